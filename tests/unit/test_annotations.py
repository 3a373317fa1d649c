"""Parsing a Pod's image-cache annotations: both generations, conflicts and bad values."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vk_provider.domain.annotations import (
    AUTO_IMAGE_CACHE_SEED,
    AUTO_IMC,
    IMAGE_SNAPSHOT_ID_SEED,
    IMC_ID,
    MATCH_COUNT_REQUEST,
    PERFECT_MATCH,
    CacheRequest,
    instance_id_for,
    parse_cache_annotations,
)
from vk_provider.domain.images import quote

SEED_ID = "imc-2ze5tm5gehgtiigaabcd"
NEW_ID = "imc-bp1abcdefghij0123456"


@pytest.mark.parametrize(
    ("annotations", "default_auto", "auto", "auto_source"),
    [
        ({}, False, False, "default"),
        ({}, True, True, "default"),
        ({AUTO_IMAGE_CACHE_SEED: "true"}, False, True, AUTO_IMAGE_CACHE_SEED),
        ({AUTO_IMAGE_CACHE_SEED: "false"}, True, False, AUTO_IMAGE_CACHE_SEED),
        ({AUTO_IMC: "true"}, False, True, AUTO_IMC),
        ({AUTO_IMC: "false"}, True, False, AUTO_IMC),
        ({AUTO_IMC: "TRUE"}, False, True, AUTO_IMC),
        ({AUTO_IMC: "False"}, True, False, AUTO_IMC),
        ({AUTO_IMC: "true", AUTO_IMAGE_CACHE_SEED: "true"}, False, True, AUTO_IMC),
        # conflicting generations: the newer key wins
        ({AUTO_IMAGE_CACHE_SEED: "true", AUTO_IMC: "false"}, False, False, AUTO_IMC),
        ({AUTO_IMAGE_CACHE_SEED: "false", AUTO_IMC: "true"}, False, True, AUTO_IMC),
        # an unusable newer value falls back to the seed key, then the default
        ({AUTO_IMAGE_CACHE_SEED: "true", AUTO_IMC: "yes"}, False, True, AUTO_IMAGE_CACHE_SEED),
        ({AUTO_IMC: "1"}, True, True, "default"),
        ({AUTO_IMC: ""}, False, False, "default"),
    ],
)
def test_automatic_switch(annotations: dict[str, str], default_auto: bool, auto: bool, auto_source: str) -> None:
    request = parse_cache_annotations(annotations, default_auto)
    assert (request.auto, request.auto_source) == (auto, auto_source)


@pytest.mark.parametrize(
    ("annotations", "explicit_id", "explicit_source"),
    [
        ({}, None, None),
        ({IMAGE_SNAPSHOT_ID_SEED: SEED_ID}, SEED_ID, IMAGE_SNAPSHOT_ID_SEED),
        ({IMC_ID: NEW_ID}, NEW_ID, IMC_ID),
        ({IMC_ID: NEW_ID, IMAGE_SNAPSHOT_ID_SEED: NEW_ID}, NEW_ID, IMC_ID),
        # two different ids: the newer key wins...
        ({IMC_ID: NEW_ID, IMAGE_SNAPSHOT_ID_SEED: SEED_ID}, NEW_ID, IMC_ID),
        # ...unless only the seed key's id is well formed
        ({IMC_ID: "IMC-X", IMAGE_SNAPSHOT_ID_SEED: SEED_ID}, SEED_ID, IMAGE_SNAPSHOT_ID_SEED),
        ({IMC_ID: "bogus", IMAGE_SNAPSHOT_ID_SEED: "also-bogus"}, "bogus", IMC_ID),
        # a malformed id stays explicit (the Pod will fail with ImageCacheNotFound)
        ({IMC_ID: "imc-2ze5tm5gehgtiiga****"}, "imc-2ze5tm5gehgtiiga****", IMC_ID),
        ({IMC_ID: ""}, None, None),
        ({IMC_ID: "imc-" + "a" * 2000}, None, None),
    ],
)
def test_explicit_id(annotations: dict[str, str], explicit_id: str | None, explicit_source: str | None) -> None:
    request = parse_cache_annotations(annotations, default_auto=False)
    assert (request.explicit_id, request.explicit_source) == (explicit_id, explicit_source)


@pytest.mark.parametrize(
    ("annotations", "perfect_match", "match_count_request"),
    [
        ({}, False, None),
        ({PERFECT_MATCH: "true"}, True, None),
        ({PERFECT_MATCH: "TRUE"}, True, None),
        ({PERFECT_MATCH: "false"}, False, None),
        ({PERFECT_MATCH: "yes"}, False, None),
        ({MATCH_COUNT_REQUEST: "2"}, False, 2),
        ({MATCH_COUNT_REQUEST: "007"}, False, 7),
        ({MATCH_COUNT_REQUEST: "abc"}, False, None),
        ({MATCH_COUNT_REQUEST: "0"}, False, None),
        ({MATCH_COUNT_REQUEST: "-1"}, False, None),
        ({MATCH_COUNT_REQUEST: "1.5"}, False, None),
        ({MATCH_COUNT_REQUEST: "٣"}, False, None),  # a non-ASCII digit is not a count
        ({PERFECT_MATCH: "true", MATCH_COUNT_REQUEST: "1"}, True, 1),
    ],
)
def test_match_requirements(annotations: dict[str, str], perfect_match: bool, match_count_request: int | None) -> None:
    request = parse_cache_annotations(annotations, default_auto=True)
    assert (request.perfect_match, request.match_count_request) == (perfect_match, match_count_request)


@pytest.mark.parametrize(
    ("annotations", "expected_problems"),
    [
        ({}, []),
        ({AUTO_IMC: "true", AUTO_IMAGE_CACHE_SEED: "true", IMC_ID: NEW_ID, PERFECT_MATCH: "true"}, []),
        ({AUTO_IMC: ""}, []),
        (
            {MATCH_COUNT_REQUEST: "abc"},
            [f'annotation {MATCH_COUNT_REQUEST}="abc" is not a whole number; ignored'],
        ),
        ({MATCH_COUNT_REQUEST: "0"}, [f'annotation {MATCH_COUNT_REQUEST}="0" must be at least 1; ignored']),
        ({MATCH_COUNT_REQUEST: "-3"}, [f'annotation {MATCH_COUNT_REQUEST}="-3" must be at least 1; ignored']),
        ({MATCH_COUNT_REQUEST: "--3"}, [f'annotation {MATCH_COUNT_REQUEST}="--3" is not a whole number; ignored']),
        (
            {MATCH_COUNT_REQUEST: "9" * 1000},
            [f"annotation {MATCH_COUNT_REQUEST}={quote('9' * 1000)} is too large; ignored"],
        ),
        ({AUTO_IMC: "yes"}, [f'annotation {AUTO_IMC}="yes" is not "true" or "false"; ignored']),
        ({PERFECT_MATCH: " true"}, [f'annotation {PERFECT_MATCH}=" true" is not "true" or "false"; ignored']),
        (
            {AUTO_IMAGE_CACHE_SEED: "true", AUTO_IMC: "false"},
            [f'annotations {AUTO_IMAGE_CACHE_SEED}="true" and {AUTO_IMC}="false" disagree; using {AUTO_IMC}'],
        ),
        (
            {IMC_ID: NEW_ID, IMAGE_SNAPSHOT_ID_SEED: SEED_ID},
            [
                f'annotations {IMAGE_SNAPSHOT_ID_SEED}="{SEED_ID}" and {IMC_ID}="{NEW_ID}" '
                f"name different image caches; using {IMC_ID}"
            ],
        ),
        (
            {IMC_ID: "IMC-abc"},
            [
                f'annotation {IMC_ID}="IMC-abc" is not an image cache id '
                "(imc- followed by lowercase letters and digits); no cache can match it"
            ],
        ),
        (
            {AUTO_IMC: "x" * 1025},
            [f"annotation {AUTO_IMC} is 1025 bytes long (at most 1024 allowed); ignored"],
        ),
        (
            {MATCH_COUNT_REQUEST: "é" * 513},
            [f"annotation {MATCH_COUNT_REQUEST} is 1026 bytes long (at most 1024 allowed); ignored"],
        ),
    ],
)
def test_problems(annotations: dict[str, str], expected_problems: list[str]) -> None:
    assert list(parse_cache_annotations(annotations, False).problems) == expected_problems


def test_problem_messages_stay_short_for_huge_bad_values() -> None:
    request = parse_cache_annotations({MATCH_COUNT_REQUEST: "z" * 1000, IMC_ID: "Z" * 1000}, False)
    assert len(request.problems) == 2
    assert all(len(problem) < 300 for problem in request.problems)


@pytest.mark.parametrize(
    ("annotations", "expected"),
    [
        # The seed's examples: automatic on the Deployment template and the Pod, explicit on both.
        (
            {AUTO_IMAGE_CACHE_SEED: "true"},
            CacheRequest(True, AUTO_IMAGE_CACHE_SEED, None, None, False, None, ()),
        ),
        (
            {IMAGE_SNAPSHOT_ID_SEED: "imc-2ze5tm5gehgtiiga****"},
            CacheRequest(False, "default", "imc-2ze5tm5gehgtiiga****", IMAGE_SNAPSHOT_ID_SEED, False, None, ()),
        ),
    ],
)
def test_seed_examples(annotations: dict[str, str], expected: CacheRequest) -> None:
    request = parse_cache_annotations(annotations, default_auto=False)
    assert request.auto == expected.auto
    assert request.auto_source == expected.auto_source
    assert request.explicit_id == expected.explicit_id
    assert request.explicit_source == expected.explicit_source
    # The seed's masked id ("****") is not a real id: flagged, but still explicit.
    assert len(request.problems) == (0 if expected.explicit_id is None else 1)


@given(
    st.dictionaries(
        st.sampled_from(
            [
                AUTO_IMC,
                AUTO_IMAGE_CACHE_SEED,
                IMC_ID,
                IMAGE_SNAPSHOT_ID_SEED,
                PERFECT_MATCH,
                MATCH_COUNT_REQUEST,
                "other",
            ]
        ),
        st.text(max_size=2000),
    ),
    st.booleans(),
)
def test_any_annotations_parse_without_raising(annotations: dict[str, str], default_auto: bool) -> None:
    request = parse_cache_annotations(annotations, default_auto)
    assert isinstance(request.auto, bool)
    assert request.match_count_request is None or request.match_count_request >= 1
    assert all(isinstance(problem, str) and problem for problem in request.problems)


@pytest.mark.parametrize("uid", ["", "7f1c2a9e-0000-4000-8000-000000000001", "x" * 10_000, "ünïcode"])
def test_instance_id_shape(uid: str) -> None:
    assert re.fullmatch(r"eci-[a-z0-9]{20}", instance_id_for(uid))


def test_instance_id_is_deterministic_and_distinct() -> None:
    # Pinned so an accidental change of derivation (which would re-key every Pod) shows up.
    assert instance_id_for("uid-1") == "eci-gjm5s9xdo2a8rmkqgmm2"
    ids = {instance_id_for(f"uid-{number}") for number in range(1000)}
    assert len(ids) == 1000
