"""The API client against a local HTTP server: Retry-After (429/503) waited out like client-go; Events
give way to Pod status, but not for ever."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web
from kubernetes_asyncio import client as k8s_client

from vk_provider.domain.events import EventSpec
from vk_provider.kube.pods import EventRecorder, conditions_merged
from vk_provider.kube.session import USER_AGENT, KubeConfigError, KubeError, KubeSession
from vk_provider.metrics import NodeMetrics


class Server:
    def __init__(self) -> None:
        self.answers: list[tuple[int, dict[str, str]]] = []
        self.calls = 0
        self.posted: list[dict[str, Any]] = []
        self.patched: list[tuple[str, dict[str, Any]]] = []
        self.seen: list[web.Request] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.calls += 1
        self.seen.append(request)
        if request.method == "POST":
            self.posted.append(await request.json())
        elif request.method == "PATCH" and request.path.split("/")[-2] == "events":
            self.patched.append((request.path.rsplit("/", 1)[-1], await request.json()))
        status, headers = self.answers.pop(0) if self.answers else (200, {})
        reason = {404: "NotFound", 429: "TooManyRequests"}.get(status, "ServiceUnavailable")
        body = f'{{"kind": "Status", "reason": "{reason}", "message": "no"}}' if status >= 400 else "{}"
        return web.Response(status=status, headers=headers, text=body, content_type="application/json")


@contextlib.asynccontextmanager
async def serving() -> AsyncIterator[tuple[Server, str]]:
    """A local HTTP server answering every request; yields it and its base URL."""
    server = Server()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield server, f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def served() -> AsyncIterator[tuple[Server, KubeSession]]:
    async with serving() as (server, url):
        cfg = k8s_client.Configuration()
        cfg.host = url
        session = KubeSession(cfg)
        try:
            yield server, session
        finally:
            await session.close()


async def test_retry_after_is_waited_out(served: tuple[Server, KubeSession]) -> None:
    server, session = served
    server.answers = [(429, {"Retry-After": "0"}), (503, {"Retry-After": "0"})]
    assert await session.request("PATCH", "/api/v1/namespaces/ns/pods/p/status", body={}) == {}
    assert server.calls == 3
    assert session.throttled == 2


async def test_throttling_without_retry_after_or_for_too_long_is_an_error(served: tuple[Server, KubeSession]) -> None:
    server, session = served
    server.answers = [(429, {})]
    with pytest.raises(KubeError) as caught:
        await session.request("GET", "/api/v1/pods")
    assert caught.value.status == 429
    assert caught.value.is_transient
    assert server.calls == 1
    server.answers = [(429, {"Retry-After": "0"})] * 10
    with pytest.raises(KubeError):
        await session.request("GET", "/api/v1/pods")
    assert server.calls == 1 + 6  # the first try and 5 retries


async def until(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_events_give_way_to_status_but_not_for_ever(served: tuple[Server, KubeSession]) -> None:
    server, session = served
    status_idle = asyncio.Event()
    recorder = EventRecorder(session, host="vk", give_way=status_idle.wait, max_delay=0.5)
    runner = asyncio.create_task(recorder.run(workers=1))
    try:
        started = time.monotonic()
        recorder.record(EventSpec("ns", "p", "uid-p", "Pulled", "pulled", "Normal", "spec.containers{c}"))
        await until(lambda: len(server.posted) == 1)
        assert time.monotonic() - started >= 0.4  # held back while status writes were pending...
        status_idle.set()
        recorder.record(EventSpec("ns", "p", "uid-p", "Started", "started", "Normal", "spec.containers{c}"))
        await until(lambda: len(server.posted) == 2)  # ...and sent at once when they are not
        assert [e["reason"] for e in server.posted] == ["Pulled", "Started"]
        assert server.posted[0]["involvedObject"]["fieldPath"] == "spec.containers{c}"
        assert server.posted[0]["metadata"]["name"] < server.posted[1]["metadata"]["name"]
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def test_a_repeated_event_is_one_object_with_a_count(served: tuple[Server, KubeSession]) -> None:
    server, session = served
    recorder = EventRecorder(session, host="vk")
    back_off = EventSpec("ns", "p", "uid-p", "BackOff", 'Back-off pulling image "x"', "Normal", "spec.containers{c}")
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    for i in range(3):  # before the first is posted: one object, count 3
        recorder.record(back_off, t0 + timedelta(seconds=10 * i))
    recorder.record(replace(back_off, pod_uid="uid-other"), t0)  # another Pod's is its own
    runner = asyncio.create_task(recorder.run(workers=1))
    try:
        await until(lambda: len(server.posted) == 2)
        first = server.posted[0]
        assert (first["count"], first["firstTimestamp"], first["lastTimestamp"]) == (
            3,
            "2026-01-01T00:00:00Z",
            "2026-01-01T00:00:20Z",
        )
        assert server.posted[1]["count"] == 1
        recorder.record(back_off, t0 + timedelta(seconds=80))  # later: a patch of the same object
        await until(lambda: len(server.patched) == 1)
        assert server.patched[0] == (first["metadata"]["name"], {"count": 4, "lastTimestamp": "2026-01-01T00:01:20Z"})
        server.answers = [(404, {})]  # expired meanwhile: a new object carries the count on
        recorder.record(back_off, t0 + timedelta(seconds=160))
        await until(lambda: len(server.posted) == 3)
        assert server.posted[2]["count"] == 5
        assert server.posted[2]["metadata"]["name"] != first["metadata"]["name"]
        assert (recorder.posted, recorder.repeats) == (3, 1)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def test_a_repeat_of_a_dropped_event_is_posted_not_waited_for(served: tuple[Server, KubeSession]) -> None:
    server, session = served
    recorder = EventRecorder(session, host="vk", max_queue=1)
    pulled = EventSpec("ns", "p", "uid-p", "Pulled", "pulled")
    failed = EventSpec("ns", "p", "uid-p", "Failed", "no")
    recorder.record(pulled)
    recorder.record(failed)  # the queue is full: dropped, never created
    assert recorder.dropped == 1
    runner = asyncio.create_task(recorder.run(workers=1))
    try:
        await until(lambda: len(server.posted) == 1)
        recorder.record(failed)  # again: a new Event, not a repeat of one that will never exist
        await until(lambda: len(server.posted) == 2)
        assert [(e["reason"], e["count"]) for e in server.posted] == [("Pulled", 1), ("Failed", 1)]
        await recorder.flush(timeout=2)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def test_events_beyond_the_queue_are_dropped_and_counted(served: tuple[Server, KubeSession]) -> None:
    server, session = served
    metrics = NodeMetrics()
    recorder = EventRecorder(session, host="vk", max_queue=2, on_drop=metrics.events_dropped.inc)
    for reason in ("Pulling", "Pulled", "Created", "Started"):
        recorder.record(EventSpec("ns", "p", "uid-p", reason, reason.lower()))
    assert recorder.dropped == 2
    assert "vk_provider_events_dropped_total 2" in metrics.render()
    runner = asyncio.create_task(recorder.run(workers=1))
    try:
        await until(lambda: len(server.posted) == 2)
        assert [e["reason"] for e in server.posted] == ["Pulling", "Pulled"]  # the oldest are kept
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def test_the_spam_filter_lets_25_events_of_a_pod_through_then_one_per_refill(
    served: tuple[Server, KubeSession], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vk_provider.kube.pods")
    server, session = served
    metrics, clock = NodeMetrics(), [1000.0]
    recorder = EventRecorder(
        session, host="vk", spam_refill_seconds=10.0, on_filter=metrics.events_filtered.inc, monotonic=lambda: clock[0]
    )
    for i in range(30):  # a crash loop's worth
        recorder.record(EventSpec("ns", "p", "uid-p", "BackOff", f"back-off {i}"))
    recorder.record(EventSpec("ns", "q", "uid-q", "Pulled", "pulled"))  # another Pod: a bucket of its own
    recorder.record(EventSpec("ns", "p", "uid-p", "SuccessfulHitImageCache", "hit", component="EciService"))
    assert recorder.filtered == 5
    clock[0] += 15.0  # one and a half refills: one more
    recorder.record(EventSpec("ns", "p", "uid-p", "BackOff", "later"))
    recorder.record(EventSpec("ns", "p", "uid-p", "BackOff", "too soon"))
    assert recorder.filtered == 6
    clock[0] += 5.0  # the half left over and this half: one more
    recorder.record(EventSpec("ns", "p", "uid-p", "BackOff", "later still"))
    assert recorder.filtered == 6
    assert "vk_provider_events_filtered_total 6" in metrics.render()
    told = [r.getMessage() for r in caplog.records if "spam filter" in r.getMessage()]
    assert told == [
        "pod ns/p: more than 25 Events from kubelet at once; one more every 10 s is posted, the rest are not "
        "(the kubelet's spam filter)"
    ]
    runner = asyncio.create_task(recorder.run(workers=2))
    try:
        await until(lambda: len(server.posted) == 29)
        messages = [e["message"] for e in server.posted]
        assert {f"back-off {i}" for i in range(25)} == {m for m in messages if m.startswith("back-off")}
        assert {"pulled", "hit", "later", "later still"} <= set(messages)
        assert "too soon" not in messages
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def test_events_the_spam_filter_holds_back_still_count_in_the_next_one_posted(
    served: tuple[Server, KubeSession],
) -> None:
    server, session = served
    clock = [0.0]
    recorder = EventRecorder(session, host="vk", spam_refill_seconds=300.0, monotonic=lambda: clock[0])
    back_off = EventSpec("ns", "p", "uid-p", "BackOff", "Back-off restarting failed container", "Warning")
    runner = asyncio.create_task(recorder.run(workers=1))
    try:
        for _ in range(30):
            recorder.record(back_off)
        await recorder.flush(timeout=2)
        assert recorder.filtered == 5
        clock[0] += 300.0  # one refill
        recorder.record(back_off)  # the 31st: posted, with every one before it counted
        await until(lambda: bool(server.patched) and server.patched[-1][1]["count"] == 31)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def test_the_spam_filter_can_be_turned_off(served: tuple[Server, KubeSession]) -> None:
    _, session = served
    recorder = EventRecorder(session, host="vk", spam_burst=0)
    for i in range(40):
        recorder.record(EventSpec("ns", "p", "uid-p", "BackOff", f"back-off {i}"))
    assert recorder.filtered == 0


async def test_an_unwanted_body_is_not_decoded_but_errors_still_are(served: tuple[Server, KubeSession]) -> None:
    server, session = served
    assert await session.request("PATCH", "/x", body={}, want_body=False) == {}
    server.answers = [(404, {})]
    with pytest.raises(KubeError) as caught:
        await session.request("PATCH", "/x", body={}, want_body=False)
    assert caught.value.reason == "NotFound"  # the error body was read


async def test_credentials_and_user_agent_go_with_every_request() -> None:
    async with serving() as (server, url):
        cfg = k8s_client.Configuration()
        cfg.host = url + "/"  # a trailing slash does not double the one of the path
        cfg.api_key = {"BearerToken": "Bearer one"}
        turns = iter(["Bearer two"])

        def rotate(c: k8s_client.Configuration) -> None:  # like the in-cluster token file refresh
            c.api_key["BearerToken"] = next(turns, c.api_key["BearerToken"])

        async with KubeSession(cfg) as session:
            await session.request("GET", "/api/v1/pods", query={"watch": False, "fieldSelector": "spec.nodeName=a b"})
            cfg.refresh_api_key_hook = rotate
            await session.request("POST", "/api/v1/namespaces/ns/events", body={"kind": "Event"})
    first, second = server.seen
    assert first.path == "/api/v1/pods"
    assert dict(first.query) == {"watch": "false", "fieldSelector": "spec.nodeName=a b"}
    assert first.headers["Authorization"] == "Bearer one"
    assert first.headers["User-Agent"] == USER_AGENT
    assert USER_AGENT.startswith("vk-provider/")
    assert second.headers["Authorization"] == "Bearer two"  # the refresh hook is asked before each request
    assert second.headers["Content-Type"] == "application/json"
    assert server.posted == [{"kind": "Event"}]


async def test_a_proxy_from_the_environment_is_used_unless_no_proxy_exempts_the_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with serving() as (proxy, url):
        monkeypatch.setenv("HTTP_PROXY", url)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        cfg = k8s_client.Configuration()
        cfg.host = "http://api.invalid:6443"  # reachable only through the proxy
        async with KubeSession(cfg) as session:
            await session.request("GET", "/version")
        assert [str(r.url) for r in proxy.seen] == ["http://api.invalid:6443/version"]
        monkeypatch.setenv("NO_PROXY", "api.invalid")
        async with KubeSession(cfg) as session:
            with pytest.raises(KubeError) as caught:
                await session.request("GET", "/version", timeout=5.0)
        assert caught.value.status == 0  # went straight to a host that does not resolve
        assert len(proxy.seen) == 1
        monkeypatch.delenv("NO_PROXY")
        monkeypatch.setenv("HTTP_PROXY", url.replace("http://", "https://"))  # TLS to the proxy: not supported
        async with KubeSession(cfg) as session:
            with pytest.raises(KubeError):
                await session.request("GET", "/version", timeout=5.0)
        assert len(proxy.seen) == 1  # ignored (with a warning), as aiohttp's own lookup did


async def test_unusable_tls_files_are_a_configuration_error(tmp_path: Any) -> None:
    cfg = k8s_client.Configuration()
    cfg.host = "https://127.0.0.1:6443"
    cfg.ssl_ca_cert = str(tmp_path / "missing-ca.crt")
    with pytest.raises(KubeConfigError, match=r"unusable TLS files \(CA .*missing-ca\.crt\)"):
        KubeSession(cfg, source="kubeconfig /x")


async def test_a_path_prefix_in_the_server_address_and_encoded_queries() -> None:
    async with serving() as (server, url):
        cfg = k8s_client.Configuration()
        cfg.host = url + "/k8s/clusters/c-1"  # e.g. behind Rancher's proxy
        async with KubeSession(cfg) as session:
            await session.request("GET", "/api/v1/pods", query=[("labelSelector", "app in (a,b),!old"), ("limit", "5")])
            assert session._pool is not None
            assert session._pool.connections_made == 1
    (seen,) = server.seen
    assert seen.path == "/k8s/clusters/c-1/api/v1/pods"
    assert seen.query.getall("labelSelector") == ["app in (a,b),!old"]
    assert seen.query["limit"] == "5"


async def test_warmed_connections_carry_the_first_requests_and_a_proxied_session_warms_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with serving() as (server, url):
        cfg = k8s_client.Configuration()
        cfg.host = url
        async with KubeSession(cfg) as session:
            assert await session.warm(4) == 4
            await asyncio.gather(*(session.request("GET", f"/api/v1/pods/{i}") for i in range(4)))
            assert session.connections_made == 4
        assert len(server.seen) == 4
        monkeypatch.setenv("HTTP_PROXY", url)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        async with KubeSession(cfg) as session:
            assert session._pool is None
            assert await session.warm(4) == 0
            assert session.connections_made == 0


async def test_a_line_break_in_a_token_is_refused_not_sent() -> None:
    async with serving() as (server, url):
        cfg = k8s_client.Configuration()
        cfg.host = url
        cfg.api_key = {"BearerToken": "Bearer x\r\nX-Injected: 1"}
        async with KubeSession(cfg) as session:
            with pytest.raises(KubeError, match="line break"):
                await session.request("GET", "/api/v1/pods")
    assert server.calls == 0


async def test_gzipped_answers_are_decompressed_and_an_encoded_prefix_is_kept() -> None:
    async def handler(request: web.Request) -> web.Response:
        assert "gzip" in request.headers["Accept-Encoding"]
        body = gzip.compress(b'{"items": [1, 2], "path": "%s"}' % request.raw_path.encode())
        return web.Response(body=body, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        cfg = k8s_client.Configuration()
        cfg.host = f"http://127.0.0.1:{runner.addresses[0][1]}/a%20b"
        async with KubeSession(cfg) as session:
            answer = await session.request("GET", "/api/v1/pods")
    finally:
        await runner.cleanup()
    assert answer == {"items": [1, 2], "path": "/a%20b/api/v1/pods"}


async def test_aiohttp_can_carry_every_request_when_asked() -> None:
    async with serving() as (server, url):
        cfg = k8s_client.Configuration()
        cfg.host = url
        async with KubeSession(cfg, own_http=False) as session:
            assert session._pool is None
            await session.request("GET", "/api/v1/pods", query={"limit": 5})
    (seen,) = server.seen
    assert seen.query["limit"] == "5"
    assert seen.headers["User-Agent"] == USER_AGENT


async def test_lease_renewals_do_not_wait_behind_rate_limited_writes() -> None:
    from vk_provider.kube.leases import LeaseClient
    from vk_provider.kube.nodes import NodeClient

    async with serving() as (server, url):
        cfg = k8s_client.Configuration()
        cfg.host = url
        async with KubeSession(cfg, qps=0.2, burst=1) as session:  # a token every 5 s
            await session.request("PATCH", "/api/v1/namespaces/ns/pods/p0/status", body={})  # the burst's one
            bulk = asyncio.create_task(session.request("PATCH", "/api/v1/namespaces/ns/pods/p1/status", body={}))
            await until(lambda: server.calls == 1 and session._limiter._lock.locked())  # it waits for a token
            async with asyncio.timeout(2.0):  # well before the bulk write's token
                await LeaseClient(session).get("kube-system", "vk-provider-imagecaches")
                await NodeClient(session).renew_lease(
                    {"metadata": {"name": "vk", "namespace": "kube-node-lease"}, "spec": {}}, None
                )
            assert not bulk.done()
            bulk.cancel()
            await asyncio.gather(bulk, return_exceptions=True)
    assert [r.method for r in server.seen] == ["PATCH", "GET", "PATCH"]


async def test_imagecache_writes_have_a_budget_of_their_own() -> None:
    from vk_provider.kube.imagecaches import ImageCacheClient

    async with serving() as (server, url):
        cfg = k8s_client.Configuration()
        cfg.host = url
        async with KubeSession(cfg, qps=0.2, burst=1) as session:  # a token every 5 s
            caches = ImageCacheClient(session)
            await session.request("PATCH", "/api/v1/namespaces/ns/pods/p0/status", body={})  # the burst's one
            pod = asyncio.create_task(session.request("PATCH", "/api/v1/namespaces/ns/pods/p1/status", body={}))
            await until(lambda: server.calls == 1 and session._limiter._lock.locked())  # it waits for a token
            async with asyncio.timeout(2.0):  # the cache writes' first token is their own
                await caches.patch_status("c", {"progress": "40%"})
            assert not pod.done()
            # ...and they, in turn, wait for theirs, not taking the node's.
            second = asyncio.create_task(caches.patch_status("c", {"progress": "50%"}))
            await until(lambda: caches._budget._lock.locked())
            assert server.calls == 2
            for task in (pod, second):
                task.cancel()
            await asyncio.gather(pod, second, return_exceptions=True)


def test_an_undecoded_answer_still_gives_the_objects_resource_version() -> None:
    from vk_provider.kube.session import _version_only

    pod = b'{"kind":"Pod","apiVersion":"v1","metadata":{"name":"p","namespace":"ns","uid":"u",'
    pod += b'"resourceVersion":"4242","managedFields":[{"manager":"x"}]},"status":{"phase":"Running"}}'
    assert _version_only(pod) == {"metadata": {"resourceVersion": "4242"}}
    assert _version_only(b"{}") == {}


def test_a_status_with_shared_conditions_goes_as_a_strategic_merge_of_the_nodes_own() -> None:
    status: dict[str, Any] = {
        "phase": "Running",
        "conditions": [
            {"type": "Ready", "status": "True", "lastProbeTime": None, "lastTransitionTime": "t"},
            {"type": "ContainersReady", "status": "False", "reason": "ContainersNotReady", "lastTransitionTime": "t"},
            {"type": "target-health.example.com/web", "status": "False"},  # a gate's: its writer's
        ],
        "podIP": "10.234.0.9",
        "podIPs": [{"ip": "10.234.0.9"}],
        "initContainerStatuses": None,
        "containerStatuses": [{"name": "c", "state": {"running": {"startedAt": "t"}}}],
    }
    merged = conditions_merged(status)
    assert merged["conditions"] == [
        {"type": "Ready", "status": "True", "lastProbeTime": None, "lastTransitionTime": "t", "reason": None,
         "message": None},
        {"type": "ContainersReady", "status": "False", "reason": "ContainersNotReady", "lastTransitionTime": "t",
         "message": None},
    ]  # fmt: skip
    assert {key: value for key, value in merged.items() if key != "conditions"} == {
        key: value for key, value in status.items() if key != "conditions"
    }
    assert len(status["conditions"]) == 3  # the status itself is left as it was
