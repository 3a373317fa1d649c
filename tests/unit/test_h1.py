"""The HTTP/1.1 client (kube.h1): its answer parser fed in pieces, and the pool against real local
servers: aiohttp's, a TLS one, and raw sockets that misbehave on purpose."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from vk_provider.http.certs import serving_certificate
from vk_provider.kube.h1 import Answer, H1Error, H1Pool, _Connection, _Reader

GET = b"GET /x HTTP/1.1\r\nHost: h"


def feed_bytewise(raw: bytes) -> Answer | None:
    reader = _Reader()
    answer = None
    for i in range(len(raw)):
        assert answer is None, f"answered before the end, at byte {i}"
        answer = reader.feed(raw[i : i + 1])
    return answer


def test_an_answer_with_a_length_is_whole_only_at_its_last_byte() -> None:
    answer = feed_bytewise(b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\nRetry-After: 3\r\n\r\nhello")
    assert answer == Answer(201, {b"content-length": b"5", b"retry-after": b"3"}, b"hello")


def test_a_chunked_answer_is_joined_whatever_the_pieces() -> None:
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\n\r\n"
    answer = feed_bytewise(raw)
    assert answer is not None
    assert answer.body == b"hello world"
    whole = _Reader().feed(raw)
    assert whole is not None
    assert whole.body == b"hello world"


def test_chunked_trailers_are_read_past() -> None:
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-Trailer: 1\r\n\r\n"
    answer = feed_bytewise(raw)
    assert answer is not None
    assert answer.body == b"ok"


def test_no_content_and_close_delimited_answers() -> None:
    reader = _Reader()
    assert reader.feed(b"HTTP/1.1 204 No Content\r\n\r\n") == Answer(204, {}, b"")
    reader = _Reader()
    assert reader.feed(b"HTTP/1.1 200 OK\r\n\r\npart") is None
    assert not reader.keep_alive
    assert reader.feed(b" two") is None
    assert reader.at_eof() == Answer(200, {}, b"part two")


def test_connection_close_and_http_1_0_are_not_kept_alive() -> None:
    for head in (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
                 b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"):  # fmt: skip
        reader = _Reader()
        assert reader.feed(head) is not None
        assert not reader.keep_alive
    reader = _Reader()
    assert reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n") is not None
    assert reader.keep_alive


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP/1.1 answer"),
        (b"HTTP/1.1 abc OK\r\n\r\n", "not an HTTP/1.1 answer"),
        (b"HTTP/1.1 100 Continue\r\n\r\n", "interim"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "malformed header"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nab", "more than"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n", "does not end"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nextra", "after the last chunk"),
        (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 20000, "no end of headers"),
    ],
)
def test_answers_that_cannot_be_read_are_errors(raw: bytes, problem: str) -> None:
    with pytest.raises(H1Error, match=problem):
        _Reader().feed(raw)


# -- the pool against servers


@contextlib.asynccontextmanager
async def aiohttp_server(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]], tls: ssl.SSLContext | None = None
) -> AsyncIterator[int]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def raw_server(
    answer: Callable[[int, bytes], bytes | None],
) -> AsyncIterator[tuple[int, list[int]]]:
    """A server reading requests (head + Content-Length body) and writing ``answer(n, request)``:
    bytes to send, or None to close the connection without answering. Yields (port, requests per
    connection)."""
    counts: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        counts.append(0)
        mine = len(counts) - 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                request = head + await reader.readexactly(length)
                counts[mine] += 1
                reply = answer(counts[mine], request)
                if reply is None:
                    break
                writer.write(reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], counts
    finally:
        server.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def pool_for(
    serve: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    *,
    server_tls: ssl.SSLContext | None = None,
    client_tls: ssl.SSLContext | None = None,
) -> AsyncIterator[H1Pool]:
    """A pool to a local server running ``serve`` for each connection; both closed afterwards."""
    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_tls)
    pool = H1Pool("127.0.0.1", server.sockets[0].getsockname()[1], tls=client_tls)
    try:
        yield pool
    finally:
        await pool.close()
        server.close()
        await server.wait_closed()


def ok(body: bytes = b"{}") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


async def test_requests_share_a_kept_alive_connection_and_chunked_answers_are_read() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if request.path == "/chunked":
            resp = web.StreamResponse()
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for part in (b"one ", b"two ", body):
                await resp.write(part)
            await resp.write_eof()
            return resp
        return web.Response(body=request.method.encode() + b" " + body)

    async with aiohttp_server(handler) as port:
        pool = H1Pool("127.0.0.1", port, tls=None)
        try:
            head = b"PATCH /chunked HTTP/1.1\r\nHost: %s\r\nContent-Length: 5" % pool.host_header.encode()
            first = await pool.request("PATCH", head, b"three", 5.0)
            assert (first.status, first.body) == (200, b"one two three")
            again = await pool.request("POST", b"POST /plain HTTP/1.1\r\nHost: h\r\nContent-Length: 2", b"hi", 5.0)
            assert again.body == b"POST hi"
            assert pool.connections_made == 1
        finally:
            await pool.close()


async def test_concurrent_requests_open_connections_up_to_the_limit() -> None:
    release, two_arrived = asyncio.Event(), asyncio.Event()
    arrived = 0

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal arrived
        arrived += 1
        if arrived == 2:
            two_arrived.set()
        await release.wait()
        return web.Response(text="done")

    async with aiohttp_server(handler) as port:
        pool = H1Pool("127.0.0.1", port, tls=None, limit=2)
        try:
            calls = [asyncio.create_task(pool.request("GET", GET, None, 5.0)) for _ in range(3)]
            async with asyncio.timeout(5):
                await two_arrived.wait()
            assert pool.connections_made == 2
            assert not any(c.done() for c in calls)
            release.set()
            answers = await asyncio.gather(*calls)
            assert [a.body for a in answers] == [b"done"] * 3
            assert pool.connections_made == 2  # the third waited for a free connection
        finally:
            await pool.close()


async def test_tls_with_the_servers_own_ca(tmp_path: Path) -> None:
    cert, key = serving_certificate("", "", str(tmp_path), "localhost", "127.0.0.1")
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(text=f"secure {request.secure}")

    async with aiohttp_server(handler, tls=server_tls) as port:
        trusting = H1Pool("127.0.0.1", port, tls=ssl.create_default_context(cafile=cert))
        strangers = H1Pool("127.0.0.1", port, tls=ssl.create_default_context())
        try:
            answer = await trusting.request("GET", GET, None, 5.0)
            assert answer.body == b"secure True"
            with pytest.raises(H1Error, match=r"cannot connect to 127\.0\.0\.1:\d+: .*certificate verify failed"):
                await strangers.request("GET", GET, None, 5.0)
        finally:
            await trusting.close()
            await strangers.close()


async def test_connection_close_is_honoured() -> None:
    close = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    async with raw_server(lambda n, r: close) as (port, counts):
        pool = H1Pool("127.0.0.1", port, tls=None)
        try:
            assert (await pool.request("GET", GET, None, 5.0)).body == b"ok"
            assert (await pool.request("GET", GET, None, 5.0)).body == b"ok"
            assert pool.connections_made == 2
            assert counts == [1, 1]
        finally:
            await pool.close()


async def test_a_body_delimited_by_the_servers_close_is_read_whole() -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nall ")
        await writer.drain()
        writer.write(b"of it")
        writer.close()

    async with pool_for(serve) as pool:
        answer = await pool.request("GET", GET, None, 5.0)
        assert answer.body == b"all of it"
        assert not pool._idle  # not reusable


async def test_a_get_on_a_connection_the_server_dropped_is_sent_again_other_requests_are_not() -> None:
    # Every connection answers its first request and silently drops the second, as a server
    # closing an idle connection just as a request is sent on it.
    async with raw_server(lambda n, _: ok(b"%d" % n) if n == 1 else None) as (port, counts):
        pool = H1Pool("127.0.0.1", port, tls=None)
        try:
            assert (await pool.request("GET", GET, None, 5.0)).body == b"1"
            assert (await pool.request("GET", GET, None, 5.0)).body == b"1"  # sent again, on a new connection
            assert counts == [2, 1]
            with pytest.raises(H1Error, match="closed the connection before answering"):
                await pool.request("POST", GET, None, 5.0)  # the server may have acted on it: the caller decides
            assert counts == [2, 2]
            await pool.request("GET", GET, None, 5.0)
            with pytest.raises(H1Error, match="closed the connection before answering"):
                await pool.request("PATCH", GET, None, 5.0)
            assert counts == [2, 2, 2]
        finally:
            await pool.close()


async def test_a_connection_the_server_closed_while_idle_is_not_used() -> None:
    # Go's server closes idle connections: the next request, even a POST, goes on a new one.
    async def answer_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(ok())
        await writer.drain()
        writer.close()  # no "Connection: close": the client learns it from the socket

    async with pool_for(answer_once) as pool:
        await pool.request("GET", GET, None, 5.0)
        (idle,) = pool._idle
        async with asyncio.timeout(5):
            await idle.lost
        assert (await pool.request("POST", GET, None, 5.0)).status == 200
        assert pool.connections_made == 2


async def test_a_closed_pool_sends_nothing_more_even_for_a_request_in_flight() -> None:
    arrived = asyncio.Event()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(ok())
        await reader.readuntil(b"\r\n\r\n")
        arrived.set()  # and never answers the second
        await reader.read()
        writer.close()

    async with pool_for(hold) as pool:
        await pool.request("GET", GET, None, 5.0)
        pending = asyncio.create_task(pool.request("GET", GET, None, 5.0))  # reuses the connection
        async with asyncio.timeout(5):
            await arrived.wait()
        await pool.close()
        with pytest.raises(H1Error):  # not sent again on a new connection
            await pending
        assert pool.connections_made == 1


async def test_a_broken_answer_fails_the_request_and_its_connection_is_not_reused() -> None:
    async with raw_server(lambda n, r: b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n" if b"/bad" in r else ok()) as (
        port,
        counts,
    ):
        pool = H1Pool("127.0.0.1", port, tls=None)
        try:
            with pytest.raises(H1Error, match="bad Content-Length"):
                await pool.request("GET", b"GET /bad HTTP/1.1\r\nHost: h", None, 5.0)
            assert (await pool.request("GET", GET, None, 5.0)).status == 200
            assert len(counts) == 2
        finally:
            await pool.close()


async def test_a_timeout_or_a_cancellation_abandons_the_connection() -> None:
    hold, connected = asyncio.Event(), asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connected.set()
        await hold.wait()  # reads nothing, answers nothing
        writer.close()

    quiet = await asyncio.start_server(silent, "127.0.0.1", 0)
    pool = H1Pool("127.0.0.1", quiet.sockets[0].getsockname()[1], tls=None)
    try:
        with pytest.raises(TimeoutError):
            await pool.request("GET", GET, None, 0.05)
        assert not pool._idle
        assert not pool._open
        connected.clear()
        call = asyncio.create_task(pool.request("GET", GET, None, 5.0))
        async with asyncio.timeout(5):
            await connected.wait()
        await asyncio.sleep(0)  # the request is written once the connection is made
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert not pool._idle
        assert not pool._open
    finally:
        hold.set()
        await pool.close()
        quiet.close()
        await quiet.wait_closed()


async def test_close_ends_the_connections_and_later_requests_fail() -> None:
    async with raw_server(lambda n, r: ok()) as (port, counts):
        pool = H1Pool("127.0.0.1", port, tls=None)
        await pool.request("GET", GET, None, 5.0)
        conn = next(iter(pool._open))
        await pool.close()
        assert conn.lost.done()
        with pytest.raises(H1Error, match="closed"):
            await pool.request("GET", GET, None, 5.0)
        assert counts == [1]


async def test_warmed_connections_serve_a_burst_without_new_ones() -> None:
    async with raw_server(lambda n, r: ok()) as (port, counts):
        pool = H1Pool("127.0.0.1", port, tls=None)
        try:
            assert await pool.warm(3) == 3
            assert pool.connections_made == 3
            assert await pool.warm(3) == 3  # already open: nothing more
            answers = await asyncio.gather(*(pool.request("GET", GET, None, 5.0) for _ in range(3)))
            assert [a.status for a in answers] == [200] * 3
            assert pool.connections_made == 3
            assert sorted(counts) == [1, 1, 1]  # each warmed connection served one of them
        finally:
            await pool.close()


async def test_warming_stays_within_the_limit_and_a_closed_pool_opens_nothing() -> None:
    async with raw_server(lambda n, r: ok()) as (port, _):
        pool = H1Pool("127.0.0.1", port, tls=None, limit=2)
        try:
            assert await pool.warm(5) == 2
            assert pool.connections_made == 2
        finally:
            await pool.close()
        assert await pool.warm(5) == 0
        assert pool.connections_made == 2


async def test_a_pool_closed_while_warming_keeps_no_connection() -> None:
    async with raw_server(lambda n, r: ok()) as (port, _):
        pool = H1Pool("127.0.0.1", port, tls=None)
        warming = asyncio.create_task(pool.warm(3))
        await asyncio.sleep(0)  # the connections are being opened
        await pool.close()
        assert await warming == 0
        assert pool.connections_made == 3
        assert not pool._open
        assert not pool._idle


async def test_warming_counts_connections_being_opened_by_requests_and_by_another_warm() -> None:
    async with raw_server(lambda n, r: ok()) as (port, _):
        pool = H1Pool("127.0.0.1", port, tls=None, limit=4)
        try:
            requests = [asyncio.create_task(pool.request("GET", GET, None, 5.0)) for _ in range(3)]
            await asyncio.sleep(0)  # the three are opening their connections
            await asyncio.gather(pool.warm(4), pool.warm(4))
            await asyncio.gather(*requests)
            assert pool.connections_made == 4  # three for the requests, one more warmed
            assert len(pool._idle) == 4
        finally:
            await pool.close()


async def test_a_cancelled_warm_keeps_what_it_opened_and_a_closed_idle_connection_is_replaced() -> None:
    listener = socket.socket()  # accepts nothing: the kernel completes about backlog + 1 handshakes
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    pool = H1Pool("127.0.0.1", listener.getsockname()[1], tls=None)
    try:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await pool.warm(20)  # most wait for a handshake that does not come
        assert 1 <= pool.connections_made < 20
        assert len(pool._idle) == pool.connections_made  # none opened and then forgotten
        assert all(c.usable for c in pool._idle)
    finally:
        await pool.close()
        listener.close()

    hang_up_now, accepted = asyncio.Event(), 0

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        if accepted == 1:  # the first, when told: as an API server closes a connection idle too long
            await hang_up_now.wait()
            writer.close()
        else:
            with contextlib.suppress(ConnectionError):
                await reader.read()
            writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    pool = H1Pool("127.0.0.1", server.sockets[0].getsockname()[1], tls=None)
    try:
        assert await pool.warm(1) == 1
        hang_up_now.set()
        async with asyncio.timeout(5):
            await pool._idle[0].lost
        assert not pool._idle[0].usable
        assert await pool.warm(1) == 1
        assert pool.connections_made == 2
        assert len(pool._open) == 1
    finally:
        await pool.close()
        server.close()
        await server.wait_closed()


async def test_warming_a_pool_whose_server_refuses_is_no_error() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    pool = H1Pool("127.0.0.1", port, tls=None)
    try:
        assert await pool.warm(2) == 0
        with pytest.raises(H1Error, match="cannot connect"):
            await pool.request("GET", GET, None, 5.0)
    finally:
        await pool.close()


def test_the_host_header_leaves_out_the_default_port() -> None:
    assert H1Pool("api", 443, tls=ssl.create_default_context()).host_header == "api"
    assert H1Pool("api", 6443, tls=ssl.create_default_context()).host_header == "api:6443"
    assert H1Pool("::1", 8080, tls=None).host_header == "[::1]:8080"
    assert H1Pool("api", 80, tls=None).host_header == "api"


async def test_a_timed_out_tls_connection_is_aborted_not_left_closing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A server that stopped reading would never answer a TLS goodbye: the socket must go at once.
    cert, key = serving_certificate("", "", str(tmp_path), "localhost", "127.0.0.1")
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    connected, hold = asyncio.Event(), asyncio.Event()

    async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        transport = writer.transport
        assert isinstance(transport, asyncio.ReadTransport)
        transport.pause_reading()
        connected.set()
        await hold.wait()
        writer.transport.abort()

    server = await asyncio.start_server(deaf, "127.0.0.1", 0, ssl=server_tls)
    pool = H1Pool("127.0.0.1", server.sockets[0].getsockname()[1], tls=ssl.create_default_context(cafile=cert))
    made: list[_Connection] = []
    connect = pool._connection

    async def keeping() -> _Connection:
        conn = await connect()
        made.append(conn)
        return conn

    monkeypatch.setattr(pool, "_connection", keeping)
    try:
        with pytest.raises(TimeoutError):
            await pool.request("GET", GET, None, 1.0)
        assert connected.is_set()
        (conn,) = made
        async with asyncio.timeout(2):  # not the 30 s a TLS close waits for the peer
            await conn.lost
    finally:
        hold.set()
        await pool.close()
        server.close()
        await server.wait_closed()
