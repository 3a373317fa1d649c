"""Which raw watch events the Pod watch may pass over undecoded (kube.watching.passed_over).

The lines are shaped as kube-apiserver v1.20 writes them (type first; ObjectMeta's fields in order).
"""

from __future__ import annotations

import json

from vk_provider.kube.watching import passed_over

UID = "0f4c7a1e-5b7d-4a43-9d7e-1c1f3f2b8a10"
OWNER = "77777777-5b7d-4a43-9d7e-1c1f3f2b8a10"


def event(kind: str = "MODIFIED", uid: str = UID, **meta: object) -> bytes:
    obj = {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "name": "web-1",
            "generateName": "web-",
            "namespace": "default",
            "uid": uid,
            "resourceVersion": "4711",
            "creationTimestamp": "2026-11-28T03:00:00Z",
            **meta,
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web", "uid": OWNER}],
            "annotations": {"note": '{"deletionTimestamp": "quoted in a value"}'},
        },
        "spec": {"nodeName": "vk-0", "containers": [{"name": "c", "image": "nginx"}]},
        "status": {"phase": "Running"},
    }
    return json.dumps({"type": kind, "object": obj}, separators=(",", ":")).encode()


def known(uid: str, version: str) -> bool:
    return uid == UID and int(version) <= 4711  # as the Pod watch's: tracked, and no newer than our write


def test_a_change_to_a_tracked_object_is_passed_over_with_its_version() -> None:
    assert passed_over(event(), known) == "4711"


def test_a_change_newer_than_what_the_agent_wrote_is_decoded() -> None:
    assert passed_over(event(resourceVersion="4712"), known) is None


def test_everything_else_is_decoded() -> None:
    assert passed_over(event(uid=OWNER), known) is None  # not tracked (its owner's uid is no match either)
    assert passed_over(event("ADDED"), known) is None
    assert passed_over(event("DELETED"), known) is None
    assert passed_over(event(deletionTimestamp="2026-11-28T03:01:00Z"), known) is None
    assert passed_over(b'{"type":"BOOKMARK","object":{"kind":"Pod","metadata":{"resourceVersion":"9"}}}', known) is None
    assert passed_over(b'{"type":"ERROR","object":{"kind":"Status","code":410}}', known) is None
    assert passed_over(b"not json at all", known) is None


def test_the_pattern_does_not_read_a_nested_objects_metadata() -> None:
    # A line whose object has no metadata of its own before a nested one is not read as its own.
    nested = b'{"type":"MODIFIED","object":{"kind":"Pod","spec":{"metadata":{"uid":"%s","resourceVersion":"1"}}}}'
    assert passed_over(nested % UID.encode(), known) is None
