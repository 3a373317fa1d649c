"""The API client against a local HTTP server: Retry-After (429/503) waited out like client-go; Events
give way to Pod status, but not for ever."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from kubernetes_asyncio import client as k8s_client

from vk_provider.domain.events import EventSpec
from vk_provider.kube.pods import EventRecorder
from vk_provider.kube.session import KubeError, KubeSession
from vk_provider.metrics import NodeMetrics


class Server:
    def __init__(self) -> None:
        self.answers: list[tuple[int, dict[str, str]]] = []
        self.calls = 0
        self.posted: list[dict[str, Any]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.calls += 1
        if request.method == "POST":
            self.posted.append(await request.json())
        status, headers = self.answers.pop(0) if self.answers else (200, {})
        reason = {404: "NotFound", 429: "TooManyRequests"}.get(status, "ServiceUnavailable")
        body = f'{{"kind": "Status", "reason": "{reason}", "message": "no"}}' if status >= 400 else "{}"
        return web.Response(status=status, headers=headers, text=body, content_type="application/json")


@pytest.fixture
async def served() -> AsyncIterator[tuple[Server, KubeSession]]:
    server = Server()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    cfg = k8s_client.Configuration()
    cfg.host = f"http://127.0.0.1:{port}"
    session = KubeSession(cfg)
    try:
        yield server, session
    finally:
        await session.close()
        await runner.cleanup()


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


async def test_an_unwanted_body_is_not_decoded_but_errors_still_are(served: tuple[Server, KubeSession]) -> None:
    server, session = served
    assert await session.request("PATCH", "/x", body={}, want_body=False) == {}
    server.answers = [(404, {})]
    with pytest.raises(KubeError) as caught:
        await session.request("PATCH", "/x", body={}, want_body=False)
    assert caught.value.reason == "NotFound"  # the error body was read
