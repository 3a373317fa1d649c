"""Pod annotations that steer image-cache use: the only module that knows their keys.

Owns the annotation keys (both generations ECI has documented, plus the keys the product writes
back), turning a Pod's raw annotation strings into a typed ``CacheRequest``, and the ECI-style
instance id derived from a Pod's uid.

PURE: stdlib only, no I/O. A bad value never raises: it becomes a ``problems`` message (which
the resolver posts as a Warning Event) and a documented fallback.

How conflicts and bad values are settled (decision; ECI documents none of this):

- Booleans accept ``true`` / ``false`` in any letter case and nothing else (no ``yes``, ``1``,
  surrounding spaces). Any other value is a problem and the annotation is ignored.
- An empty value counts as "not set", silently: templating tools often render an unset value
  as an empty string.
- A value longer than ``MAX_VALUE_BYTES`` (UTF-8) is a problem and is ignored, whatever the key.
- Automatic matching: ``eci-auto-imc`` (newer) and ``eci-image-cache`` (seed) both set to
  different values: the newer key wins, since it is the one ECI documents today and the only
  one that can say ``false``. Reported as a problem. Neither set: ``default_auto``.
- Explicit cache: ``eci-imc-id`` (newer) and ``eci-image-snapshot-id`` (seed) set to different
  ids: a well-formed id beats a malformed one; otherwise the newer key wins. Reported.
- A malformed explicit id (not ``imc-[a-z0-9]+``) is still an explicit request: the user asked
  for one specific cache, so falling back to automatic matching or to no cache would hide the
  mistake. It is reported, and since no cache can have such an id the Pod fails with
  ``ImageCacheNotFound``, which is what ECI does for an id it does not know.
- ``imc-match-count-request`` must be a whole number of at least 1; anything else is ignored.
  ``imc-perfect-match`` beats it when both are set (ECI).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass

from vk_provider.domain.images import quote

# Read from Pods.
AUTO_IMAGE_CACHE_SEED = "k8s.aliyun.com/eci-image-cache"
AUTO_IMC = "k8s.aliyun.com/eci-auto-imc"
IMAGE_SNAPSHOT_ID_SEED = "k8s.aliyun.com/eci-image-snapshot-id"
IMC_ID = "k8s.aliyun.com/eci-imc-id"
PERFECT_MATCH = "k8s.aliyun.com/imc-perfect-match"
MATCH_COUNT_REQUEST = "k8s.aliyun.com/imc-match-count-request"

# Written to Pods by the product.
MATCHED_IMAGE_CACHE = "k8s.aliyun.com/eci-matched-image-cache"
INSTANCE_ID = "k8s.aliyun.com/eci-instance-id"

MAX_VALUE_BYTES = 1024
IMC_ID_RE = re.compile(r"imc-[a-z0-9]+")

_INSTANCE_ID_LENGTH = 20
_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
_PAIRS = tuple(_ALPHABET[n % 36] + _ALPHABET[n // 36] for n in range(36 * 36))  # two digits, low first


@dataclass(frozen=True, slots=True)
class CacheRequest:
    """What a Pod's annotations ask for.

    ``auto`` is the effective automatic-matching switch and ``auto_source`` the key that set it
    (or ``"default"``). ``explicit_id`` is the cache named explicitly (possibly malformed; see the
    module docstring) and ``explicit_source`` its key. ``explicit_id`` beats ``auto``.
    ``perfect_match`` and ``match_count_request`` only shape automatic matching.
    """

    auto: bool
    auto_source: str
    explicit_id: str | None
    explicit_source: str | None
    perfect_match: bool
    match_count_request: int | None
    problems: tuple[str, ...] = ()


def parse_cache_annotations(annotations: Mapping[str, str], default_auto: bool) -> CacheRequest:
    """Read the image-cache annotations of one Pod; bad values become ``problems``."""
    problems: list[str] = []

    seed_auto = _read_bool(annotations, AUTO_IMAGE_CACHE_SEED, problems)
    new_auto = _read_bool(annotations, AUTO_IMC, problems)
    auto, auto_source = default_auto, "default"
    if new_auto is not None:
        auto, auto_source = new_auto, AUTO_IMC
        if seed_auto is not None and seed_auto != new_auto:
            problems.append(
                f'annotations {AUTO_IMAGE_CACHE_SEED}="{_bool_text(seed_auto)}" and '
                f'{AUTO_IMC}="{_bool_text(new_auto)}" disagree; using {AUTO_IMC}'
            )
    elif seed_auto is not None:
        auto, auto_source = seed_auto, AUTO_IMAGE_CACHE_SEED

    explicit_id, explicit_source = _read_explicit_id(annotations, problems)

    perfect_match = _read_bool(annotations, PERFECT_MATCH, problems) or False
    match_count_request = _read_count(annotations, MATCH_COUNT_REQUEST, problems)

    return CacheRequest(
        auto=auto,
        auto_source=auto_source,
        explicit_id=explicit_id,
        explicit_source=explicit_source,
        perfect_match=perfect_match,
        match_count_request=match_count_request,
        problems=tuple(problems),
    )


def is_well_formed_imc_id(value: str) -> bool:
    return IMC_ID_RE.fullmatch(value) is not None


def instance_id_for(pod_uid: str) -> str:
    """A deterministic ECI-style instance id (``eci-`` + 20 lowercase alphanumerics) for a Pod."""
    return "eci-" + base36_digest(pod_uid, _INSTANCE_ID_LENGTH)


def base36_digest(text: str, length: int) -> str:
    """``length`` lowercase alphanumerics derived from a SHA-256 of ``text``; stable forever."""
    # The lowest ``length`` base-36 digits, least significant first, two at a time.
    number = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest(), "big")
    pairs = []
    for _ in range(length // 2):
        number, index = divmod(number, 1296)
        pairs.append(_PAIRS[index])
    if length % 2:
        pairs.append(_ALPHABET[number % 36])
    return "".join(pairs)


def _read_raw(annotations: Mapping[str, str], key: str, problems: list[str]) -> str | None:
    value = annotations.get(key)
    if not value:
        return None
    size = len(value.encode("utf-8", errors="replace"))
    if size > MAX_VALUE_BYTES:
        problems.append(f"annotation {key} is {size} bytes long (at most {MAX_VALUE_BYTES} allowed); ignored")
        return None
    return value


def _read_bool(annotations: Mapping[str, str], key: str, problems: list[str]) -> bool | None:
    value = _read_raw(annotations, key, problems)
    if value is None:
        return None
    lowered = value.lower()
    if lowered == "true":
        return True
    if lowered == "false":
        return False
    problems.append(f'annotation {key}={quote(value)} is not "true" or "false"; ignored')
    return None


def _read_count(annotations: Mapping[str, str], key: str, problems: list[str]) -> int | None:
    value = _read_raw(annotations, key, problems)
    if value is None:
        return None
    digits = value[1:] if value[:1] in "+-" else value
    if not (digits.isascii() and digits.isdigit()):
        problems.append(f"annotation {key}={quote(value)} is not a whole number; ignored")
        return None
    if len(digits) > 9:  # more images than any Pod has, and more digits than int() may take
        problems.append(f"annotation {key}={quote(value)} is too large; ignored")
        return None
    count = int(value)
    if count < 1:
        problems.append(f"annotation {key}={quote(value)} must be at least 1; ignored")
        return None
    return count


def _read_explicit_id(annotations: Mapping[str, str], problems: list[str]) -> tuple[str | None, str | None]:
    seed = _read_raw(annotations, IMAGE_SNAPSHOT_ID_SEED, problems)
    new = _read_raw(annotations, IMC_ID, problems)
    chosen: tuple[str | None, str | None] = (None, None)
    if new is not None and seed is not None and new != seed:
        if is_well_formed_imc_id(seed) and not is_well_formed_imc_id(new):
            chosen = (seed, IMAGE_SNAPSHOT_ID_SEED)
        else:
            chosen = (new, IMC_ID)
        problems.append(
            f"annotations {IMAGE_SNAPSHOT_ID_SEED}={quote(seed)} and {IMC_ID}={quote(new)} "
            f"name different image caches; using {chosen[1]}"
        )
    elif new is not None:
        chosen = (new, IMC_ID)
    elif seed is not None:
        chosen = (seed, IMAGE_SNAPSHOT_ID_SEED)

    explicit_id, source = chosen
    if explicit_id is not None and not is_well_formed_imc_id(explicit_id):
        problems.append(
            f"annotation {source}={quote(explicit_id)} is not an image cache id "
            "(imc- followed by lowercase letters and digits); no cache can match it"
        )
    return chosen


def _bool_text(value: bool) -> str:
    return "true" if value else "false"
