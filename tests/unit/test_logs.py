"""A container's simulated log, split into runs as the kubelet keeps one log per container instance,
and how the kubelet endpoint serves it: ``/containerLogs`` options, and the streaming paths it refuses."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from vk_provider.controllers.logs import LogRun, SimLog
from vk_provider.domain.callers import Caller
from vk_provider.http.certs import serving_certificate
from vk_provider.http.server import KubeletServer, agent_runs

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def texts(run: LogRun) -> list[str]:
    return [line.text for line in run.lines]


def crash_twice(log: SimLog) -> None:
    for n in range(2):
        log.write(T0, f"pulling {n}")
        log.write(T0, f"started {n}")
        log.started()
        log.write(T0, f"exited {n}")
        log.stopped()
    log.write(T0, "pulling 2")  # the next run's steps, before it starts


def test_runs_hold_their_pull_start_and_exit_and_the_next_steps_wait_for_their_run() -> None:
    log = SimLog()
    crash_twice(log)
    assert texts(log.run(0)) == ["pulling 1", "started 1", "exited 1"]
    assert texts(log.run(1)) == ["pulling 0", "started 0", "exited 0"]
    assert log.run(0).finished
    log.write(T0, "started 2")
    log.started()
    current = log.run(0)
    assert texts(current) == ["pulling 2", "started 2"]
    assert not current.finished
    log.write(T0, "ready 2")
    assert texts(current) == ["pulling 2", "started 2", "ready 2"]  # a running run grows
    assert texts(log.run(1)) == ["pulling 1", "started 1", "exited 1"]


def test_a_run_the_log_no_longer_has_is_empty_and_finished() -> None:
    log = SimLog()
    log.write(T0, "pulling")
    gone = log.run(0)
    assert texts(gone) == []
    assert gone.finished


def test_runs_keep_their_lines_when_the_oldest_are_dropped() -> None:
    log = SimLog(max_lines=20)
    crash_twice(log)
    log.started()
    for n in range(25):
        log.write(T0, f"line {n}")
    assert texts(log.run(0))[-1] == "line 24"
    assert len(log.lines) <= 20
    assert texts(log.run(1)) == []  # dropped with the oldest lines
    log.stopped()
    assert texts(log.run(0))[-1] == "line 24"


def test_a_follower_of_a_run_wakes_for_new_lines_and_when_the_run_ends() -> None:
    async def main() -> list[str]:
        log = SimLog()
        log.started()
        run = log.run(0)
        seen: list[str] = []

        async def follow() -> None:
            while True:
                lines = run.lines
                seen.extend(line.text for line in lines[len(seen) :])
                if run.finished:
                    return
                await run.wait_for_more(len(seen))

        follower = asyncio.create_task(follow())
        await asyncio.sleep(0)
        log.write(T0, "one")
        await asyncio.sleep(0)
        log.write(T0, "exited")
        log.stopped()
        await asyncio.wait_for(follower, 1.0)
        return seen

    assert asyncio.run(main()) == ["one", "exited"]


def test_following_a_run_gets_its_last_line_written_while_a_line_was_being_sent() -> None:
    from vk_provider.http.server import _follow

    async def main() -> list[str]:
        log = SimLog()
        for text in ("pulled", "started"):
            log.write(T0, text)
        log.started()
        log.write(T0, "line a")
        seen = []
        async for line in _follow(log.run(0), 0, follow=True):
            seen.append(line.text)
            if line.text == "line a":  # the container exits while this line goes to the client
                log.write(T0, "exited with code 1")
                log.stopped()
        return seen

    assert asyncio.run(main()) == ["pulled", "started", "line a", "exited with code 1"]


# -- the kubelet endpoint's /containerLogs options, and the streaming paths it refuses

LINES = [(0, "pulling image"), (10, "created container app"), (20, "started container app"), (20, "ready")]
NOW = T0 + timedelta(seconds=25)


class Allow:
    async def authenticate_token(self, token: str) -> Caller | None:
        return Caller("tester") if token == "t" else None

    async def authorize(self, caller: Caller, verb: str, node: str, subresource: str) -> bool:
        return True


class OnePod:
    """Pod ``ns/p`` with container ``app``, whose log is ``log``'s latest run."""

    def __init__(self, log: SimLog) -> None:
        self.log = log

    def pod_list(self) -> list[dict[str, Any]]:
        return []

    def node_of(self, namespace: str, pod: str) -> str | None:
        return "n"

    def container_log(self, namespace: str, pod: str, container: str, *, previous: bool = False) -> LogRun | None:
        return self.log.run(0) if (namespace, pod, container) == ("ns", "p", "app") else None


def running_log() -> SimLog:
    log = SimLog()
    for seconds, text in LINES:
        log.write(T0 + timedelta(seconds=seconds), text)
    log.started()
    return log


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return serving_certificate("", "", str(tmp_path_factory.mktemp("certs")), "n", "127.0.0.1")


class Client:
    """Requests to the endpoint, as the API server's kubelet client (a bearer token here)."""

    def __init__(self, session: aiohttp.ClientSession, port: int) -> None:
        self.session = session
        self.port = port

    async def get(self, path: str, method: str = "GET", token: str = "t") -> tuple[int, str]:
        """The status and the whole body (within a deadline)."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        url = f"https://127.0.0.1:{self.port}{path}"
        async with self.session.request(method, url, headers=headers, ssl=False) as response:
            return response.status, await asyncio.wait_for(response.text(), 5.0)

    def stream(self, path: str) -> Any:
        url = f"https://127.0.0.1:{self.port}{path}"
        return self.session.get(url, headers={"Authorization": "Bearer t"}, ssl=False)


async def read_at_least(response: aiohttp.ClientResponse, size: int) -> bytes:
    """What the body has sent once it is ``size`` bytes long or ended (within a deadline)."""
    got = b""
    async with asyncio.timeout(5.0):
        while len(got) < size:
            chunk = await response.content.readany()
            if not chunk:
                break
            got += chunk
    return got


@contextlib.asynccontextmanager
async def endpoint(certificate: tuple[str, str], log: SimLog) -> AsyncIterator[Client]:
    """The kubelet endpoint serving ``log`` as container ``ns/p/app``, with sinceSeconds counted
    back from NOW."""
    server = KubeletServer(
        node_name="n",
        bind_address="127.0.0.1",
        port=0,
        cert_file=certificate[0],
        key_file=certificate[1],
        client_ca_file=None,
        authorizer=Allow(),
        pods=OnePod(log),
        now=lambda: NOW,
    )
    port = await server.start()
    try:
        async with aiohttp.ClientSession() as session:
            yield Client(session, port)
    finally:
        await server.stop()


LOGS = "/containerLogs/ns/p/app"
ALL = "".join(f"{text}\n" for _, text in LINES)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", ALL),
        ("sinceSeconds=15", "created container app\nstarted container app\nready\n"),  # from T0+10 on, inclusive
        ("sinceSeconds=5", "started container app\nready\n"),
        ("sinceSeconds=3600", ALL),
        ("sinceTime=2026-01-01T00:00:20Z", "started container app\nready\n"),
        ("sinceTime=2026-01-01T00:00:19.999999999Z", "started container app\nready\n"),
        ("sinceTime=2026-01-01T01:00:10%2B01:00", "created container app\nstarted container app\nready\n"),
        ("sinceTime=2026-01-01T00:00:21Z", ""),
        ("limitBytes=20", ALL[:20]),
        ("limitBytes=14", "pulling image\n"),
        ("limitBytes=100000", ALL),
        ("timestamps=true&limitBytes=10", "2026-01-01"),
        ("timestamps=true&sinceSeconds=5&limitBytes=37",
         "2026-01-01T00:00:20.000000Z started c"),
        # tailLines, then the since filter, then limitBytes (the kubelet's ReadLogs order)
        ("tailLines=3&sinceSeconds=5", "started container app\nready\n"),
        ("tailLines=1&sinceSeconds=15", "ready\n"),
        ("tailLines=3&sinceSeconds=20&limitBytes=25", "created container app\nsta"),
        ("tailLines=0&limitBytes=5", ""),
    ],
)  # fmt: skip
async def test_logs_since_and_limit_bytes_as_the_kubelet(
    certificate: tuple[str, str], query: str, expected: str
) -> None:
    async with endpoint(certificate, running_log()) as client:
        assert await client.get(f"{LOGS}?{query}") == (200, expected)


@pytest.mark.parametrize(
    ("query", "status", "message"),
    [
        # A value that cannot be read: the kubelet's 400 ("Unable to decode query").
        ("sinceSeconds=1.5", 400, "sinceSeconds must be a whole number greater than 0, not '1.5'"),
        ("sinceSeconds=", 400, "sinceSeconds must be a whole number greater than 0, not ''"),
        ("limitBytes=20MB", 400, "limitBytes must be a whole number greater than 0, not '20MB'"),
        ("tailLines=" + "9" * 5000, 400, "tailLines must be a non-negative whole number"),  # int() would refuse it
        ("tail=ten", 400, "tailLines must be a non-negative whole number, not 'ten'"),
        ("sinceTime=2026-01-01", 400,
         "sinceTime must be an RFC 3339 time such as 2026-01-02T15:04:05Z, not '2026-01-01'"),
        ("sinceTime=2026-01-01T00:00:20", 400, "sinceTime must be an RFC 3339 time"),  # no zone
        ("sinceTime=2026-02-30T00:00:20Z", 400, "sinceTime must be an RFC 3339 time"),
        # Read first, validated after: an unreadable value is the 400 even beside an invalid one.
        ("sinceSeconds=0&sinceTime=yesterday", 400, "sinceTime must be an RFC 3339 time"),
        # Read, but refused by the kubelet's validation: its 422 ("Invalid request").
        ("sinceSeconds=0", 422, "sinceSeconds must be a whole number greater than 0, not '0'"),
        ("sinceSeconds=-5", 422, "sinceSeconds must be a whole number greater than 0, not '-5'"),
        ("limitBytes=0", 422, "limitBytes must be a whole number greater than 0, not '0'"),
        ("tailLines=-1", 422, "tailLines must be a non-negative whole number, not '-1'"),
        ("tail=-2", 422, "tailLines must be a non-negative whole number, not '-2'"),
        ("sinceSeconds=5&sinceTime=2026-01-01T00:00:20Z", 422,
         "at most one of `sinceTime` or `sinceSeconds` may be specified"),
    ],
)  # fmt: skip
async def test_invalid_log_options_are_refused_as_the_kubelet_saying_what_is_wrong(
    certificate: tuple[str, str], query: str, status: int, message: str
) -> None:
    async with endpoint(certificate, running_log()) as client:
        got, body = await client.get(f"{LOGS}?{query}")
    assert got == status
    assert body.startswith(message), body


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("tail=1", "ready\n"),
        ("tail=1&tailLines=3", "ready\n"),  # the old parameter wins, as in the kubelet
        ("tail=all&tailLines=1", ALL),  # "all": no limit at all
        ("tail=0", ""),
    ],
)
async def test_the_old_tail_parameter_works_as_the_kubelets(
    certificate: tuple[str, str], query: str, expected: str
) -> None:
    async with endpoint(certificate, running_log()) as client:
        assert await client.get(f"{LOGS}?{query}") == (200, expected)


async def test_following_ends_once_limit_bytes_are_sent(certificate: tuple[str, str]) -> None:
    log = running_log()
    async with endpoint(certificate, log) as client:
        # Reached within the lines there already are: the stream ends though the container runs.
        assert await client.get(f"{LOGS}?follow=true&limitBytes=20") == (200, ALL[:20])
        # Reached with a line written while following.
        async with client.stream(f"{LOGS}?follow=true&limitBytes={len(ALL) + 4}") as response:
            assert await read_at_least(response, len(ALL)) == ALL.encode()
            assert not response.content.at_eof()
            log.write(NOW, "serving requests")
            assert await read_at_least(response, 100) == b"serv"
            assert response.content.at_eof()
        # Without a limit, following a running container goes on until its run ends.
        async with client.stream(f"{LOGS}?follow=true&sinceSeconds=1") as response:
            assert await read_at_least(response, 17) == b"serving requests\n"
            log.write(NOW, "still serving")
            assert await read_at_least(response, 14) == b"still serving\n"
            assert not response.content.at_eof()
            log.stopped()
            assert await read_at_least(response, 1) == b""


STREAMING = [
    ("exec", "/exec/ns/p/app?command=ls&output=1"),
    ("exec", "/exec/ns/p/0d4c1f34-uid/app?command=ls"),
    ("attach", "/attach/ns/p/app?output=1"),
    ("attach", "/attach/ns/p/0d4c1f34-uid/app"),
    ("port-forward", "/portForward/ns/p?port=80"),
    ("port-forward", "/portForward/ns/p/0d4c1f34-uid"),
    ("run", "/run/ns/p/app?cmd=ls"),
    ("run", "/run/ns/p/0d4c1f34-uid/app?cmd=ls"),
]


@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize(("what", "path"), STREAMING)
async def test_exec_attach_port_forward_and_run_get_a_bad_request_status(
    certificate: tuple[str, str], method: str, what: str, path: str
) -> None:
    async with endpoint(certificate, running_log()) as client:
        status, body = await client.get(path, method)
        anonymous, _ = await client.get(path, method, token="")
    assert status == 400
    # A metav1.Status: what kubectl decodes and prints as "Error from server (BadRequest): <message>".
    assert json.loads(body) == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": f"vk-provider simulates containers: {what} is not supported",
        "reason": "BadRequest",
        "code": 400,
    }
    assert anonymous == 401


async def test_an_agent_endpoint_is_told_from_a_closed_port_and_from_other_servers(
    certificate: tuple[str, str],
) -> None:
    # What an agent asks before it takes over a Node: does that Node's kubelet endpoint run it now?
    async with endpoint(certificate, running_log()) as client:
        assert await agent_runs("127.0.0.1", client.port, "n")  # the endpoint's own node
        assert not await agent_runs("127.0.0.1", client.port, "other")  # an agent now serving other Nodes
        port = client.port
    assert not await agent_runs("127.0.0.1", port, "n")  # stopped: nothing listens there any more
    assert not await agent_runs("", port, "n")
    assert not await agent_runs("127.0.0.1", 0, "n")

    async def not_ours(request: web.Request) -> web.Response:
        return web.Response(text="ok")  # a kubelet's /healthz: no vk-provider header

    app = web.Application()
    app.router.add_get("/healthz", not_ours)
    runner = web.AppRunner(app)
    await runner.setup()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    try:
        other = runner.addresses[0][1]
        assert not await agent_runs("127.0.0.1", other, "n")
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    "request_bytes",
    [b"GARBAGE\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n", b"GET /pods HTTP/1.1\r\nContent-Length: -1\r\n\r\n"],
)
async def test_a_malformed_request_is_a_400_without_an_error_in_the_log(
    certificate: tuple[str, str], request_bytes: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    async with endpoint(certificate, running_log()) as client:
        tls = ssl.create_default_context()
        tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
        reader, writer = await asyncio.open_connection("127.0.0.1", client.port, ssl=tls)
        try:
            writer.write(request_bytes)
            await writer.drain()
            async with asyncio.timeout(5):
                answer = await reader.read(200)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        # A fresh, well-formed request still works.
        assert (await client.get(f"{LOGS}?tailLines=1"))[0] == 200
    status_line = answer.split(b"\r\n")[0]
    assert status_line.startswith(b"HTTP/1.")
    assert b" 400 " in status_line
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
