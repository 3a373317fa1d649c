"""A small HTTP/1.1 client for the API server's ordinary requests (not watches).

Why it exists: at a thousand Pod starts a second, aiohttp's request machinery (URL building,
header multidicts, its response parser and stream objects, about 330 us of CPU per request here)
cost the agent more than the rest of a status write, and the agent shares the machine with the
API server it is waiting for. This client does the one thing it needs: send a request with a body
of known length on a kept-alive connection, and read back the whole answer (``Content-Length``,
chunked, or until the connection closes), in about half that.

What it leaves out, on purpose: proxies (:class:`~vk_provider.kube.session.KubeSession` keeps
aiohttp for a session with a proxy, and for watches),
``Expect: 100-continue``, pipelining, HTTP/2, redirects, cookies. An answer it cannot read, a
broken connection or a timeout is raised as :class:`H1Error` (an ``OSError``) or ``TimeoutError``,
and that connection is closed, never reused.

A request sent on a kept-alive connection that the server had already closed (it closes idle
connections) fails before any byte of an answer arrives; a GET (HEAD, OPTIONS) is then sent once
more on a new connection, as Go's client does; other requests fail (as "Unreachable"), and their
callers retry as they retry any transient failure. Large answers may come gzipped (``gzip`` is
accepted, as aiohttp did: the API server compresses answers over 128 KB, e.g. list pages): the
session decompresses them.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from dataclasses import dataclass

MAX_HEAD = 64 * 1024  # the status line and headers of one answer
CONNECT_TIMEOUT = 5.0
CLOSE_WAIT = 1.0  # how long close() waits for a TLS connection to finish closing
# Sent again on a new connection when a kept-alive one turns out closed (Go's net/http rule).
REPLAYABLE = frozenset({"GET", "HEAD", "OPTIONS"})
_HEX = re.compile(rb"[0-9a-fA-F]{1,16}")


class H1Error(OSError):
    """The connection broke, or the answer on it could not be read."""


@dataclass(slots=True)
class Answer:
    status: int
    headers: dict[bytes, bytes]  # lower-case names; a repeated header keeps its last value
    body: bytes


class _Reader:
    """Parses one answer from bytes as they arrive. ``feed`` returns the answer once it is whole."""

    __slots__ = ("_buf", "_chunks", "_head_end", "_headers", "_left", "_mode", "_pos", "_status", "keep_alive")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._head_end = -1
        self._status = 0
        self._headers: dict[bytes, bytes] = {}
        self._mode = ""  # "length", "chunked" or "close"
        self._left = 0  # body bytes still expected ("length")
        self._pos = 0  # parse position in _buf ("chunked")
        self._chunks: list[bytes] = []
        self.keep_alive = True

    @property
    def started(self) -> bool:
        return bool(self._buf) or self._head_end >= 0

    def feed(self, data: bytes) -> Answer | None:
        self._buf += data
        if self._head_end < 0 and not self._read_head():
            return None
        if self._mode == "length":
            if len(self._buf) - self._head_end < self._left:
                return None
            end = self._head_end + self._left
            if len(self._buf) > end:
                raise H1Error("the server sent more than the answer's Content-Length")
            return Answer(self._status, self._headers, bytes(self._buf[self._head_end : end]))
        if self._mode == "chunked":
            return self._read_chunks()
        return None  # "close": whole when the connection ends

    def at_eof(self) -> Answer | None:
        """The connection ended: the answer, if it was one that ends with the connection."""
        if self._head_end >= 0 and self._mode == "close":
            return Answer(self._status, self._headers, bytes(self._buf[self._head_end :]))
        return None

    def _read_head(self) -> bool:
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > MAX_HEAD:
                raise H1Error(f"no end of headers in the first {MAX_HEAD} bytes of the answer")
            return False
        lines = bytes(self._buf[:end]).split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise H1Error(f"not an HTTP/1.1 answer: {lines[0][:80]!r}")
        status = int(parts[1])
        if status < 200:  # 1xx: never asked for (no Expect, no Upgrade)
            raise H1Error(f"unexpected interim answer {status}")
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise H1Error(f"malformed header line {line[:80]!r}")
            key, value = name.strip().lower(), value.strip()
            if key == b"content-length" and headers.get(key, value) != value:
                raise H1Error("two different Content-Length headers")
            headers[key] = value
        self._status, self._headers, self._head_end = status, headers, end + 4
        connection = headers.get(b"connection", b"").lower()
        self.keep_alive = parts[0] == b"HTTP/1.1" and b"close" not in connection
        if status in (204, 304):
            self._mode, self._left = "length", 0
        elif b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            self._mode, self._pos = "chunked", self._head_end
        elif b"content-length" in headers:
            length = headers[b"content-length"]
            if not length.isdigit():
                raise H1Error(f"bad Content-Length {length[:40]!r}")
            self._mode, self._left = "length", int(length)
        else:
            self._mode, self.keep_alive = "close", False
        return True

    def _read_chunks(self) -> Answer | None:
        buf = self._buf
        while True:
            line_end = buf.find(b"\r\n", self._pos)
            if line_end < 0:
                return None
            size_text = bytes(buf[self._pos : line_end]).split(b";", 1)[0].strip()
            if not _HEX.fullmatch(size_text):
                raise H1Error(f"bad chunk size {size_text[:40]!r}")
            size = int(size_text, 16)
            if size == 0:
                # Trailers (none expected), then an empty line.
                rest = line_end + 2
                if buf[rest : rest + 2] == b"\r\n":
                    end = rest + 2
                else:
                    found = buf.find(b"\r\n\r\n", rest)
                    if found < 0:
                        return None
                    end = found + 4
                if len(buf) > end:
                    raise H1Error("the server sent more after the last chunk")
                return Answer(self._status, self._headers, b"".join(self._chunks))
            start = line_end + 2
            if len(buf) < start + size + 2:
                return None
            if buf[start + size : start + size + 2] != b"\r\n":
                raise H1Error("a chunk does not end where its size says")
            self._chunks.append(bytes(buf[start : start + size]))
            self._pos = start + size + 2


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._reader: _Reader | None = None
        self._answer: asyncio.Future[Answer] | None = None
        self.reused = False

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self._reader is None or self._answer is None or self._answer.done():
            self._fail(H1Error("the server sent bytes no request asked for"))
            return
        try:
            answer = self._reader.feed(data)
        except H1Error as exc:
            self._fail(exc)
            return
        if answer is not None:
            self._answer.set_result(answer)

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost settles the waiting request

    def connection_lost(self, exc: Exception | None) -> None:
        if self._answer is not None and not self._answer.done():
            answer = self._reader.at_eof() if self._reader is not None else None
            if answer is not None:
                self._answer.set_result(answer)
            else:
                self._answer.set_exception(_Closed(self.reused and not self._reader_started(), exc))
        if not self.lost.done():
            self.lost.set_result(None)

    # -- use

    @property
    def usable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing() and not self.lost.done()

    def send(self, data: bytes) -> asyncio.Future[Answer]:
        assert self.transport is not None
        self._reader = _Reader()
        self._answer = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self._answer

    @property
    def keep_alive(self) -> bool:
        return self._reader is not None and self._reader.keep_alive

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _reader_started(self) -> bool:
        return self._reader is not None and self._reader.started

    def _fail(self, exc: H1Error) -> None:
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()


class _Closed(H1Error):
    def __init__(self, before_answer_on_reused: bool, cause: Exception | None) -> None:
        detail = f": {cause}" if cause else ""
        super().__init__(f"the server closed the connection before answering{detail}")
        self.retryable = before_answer_on_reused


class H1Pool:
    """Kept-alive connections to one server, at most ``limit`` open at a time."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        tls: ssl.SSLContext | None,
        server_hostname: str | None = None,
        limit: int = 64,
        host_header: str | None = None,
    ) -> None:
        """``host_header``: the host as written in the URL (punycode, percent-encoded zone), if it differs."""
        self._host, self._port = host, port
        self._tls = tls
        self._server_hostname = (server_hostname or host) if tls is not None else None
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()
        self._limit = limit
        self._connecting = 0  # connections being opened
        self._slots = asyncio.Semaphore(limit)
        self._closed = False
        self.connections_made = 0
        default = 443 if tls is not None else 80
        written = host_header or host
        bracketed = f"[{written}]" if ":" in written else written
        self.host_header = bracketed if port == default else f"{bracketed}:{port}"

    async def request(self, method: str, head: bytes, body: bytes | None, timeout: float) -> Answer:
        """Send ``head`` (request line and headers, without the blank line) and ``body``; read the answer."""
        if self._closed:
            raise H1Error("the connection pool is closed")
        data = head + b"\r\n\r\n" + body if body is not None else head + b"\r\n\r\n"
        async with asyncio.timeout(timeout), self._slots:
            for attempt in (1, 2):
                conn = await self._connection()
                try:
                    answer = await conn.send(data)
                except _Closed as exc:
                    self._discard(conn, abort=True)
                    if attempt == 1 and exc.retryable and method in REPLAYABLE and not self._closed:
                        continue
                    raise
                except BaseException:  # an error, a timeout, a cancellation: its state is unknown
                    self._discard(conn, abort=True)
                    raise
                if conn.keep_alive and not self._closed:
                    self._idle.append(conn)
                else:
                    self._discard(conn)
                return answer
        raise AssertionError("unreachable")  # pragma: no cover

    async def warm(self, count: int) -> int:
        """Open connections, all at once, until ``count`` (within the limit) wait idle; how many wait now.

        A long-running client's connections are open when a burst of requests comes: the burst
        does not pay a TLS handshake per connection, on either side, while it is served. A
        connection that cannot be opened is left out (the next request opens one, and fails if it
        must); one opened before a cancellation waits idle like the others."""
        for conn in [c for c in self._idle if not c.usable]:  # closed by the server meanwhile
            self._idle.remove(conn)
            self._discard(conn)
        wanted = min(count - len(self._idle), self._limit - len(self._open) - self._connecting)
        if self._closed or wanted <= 0:
            return len(self._idle)
        self._connecting += wanted  # counted at once: a request or warm() at the same time sees them
        try:
            opened = await asyncio.gather(*(self._open_idle() for _ in range(wanted)), return_exceptions=True)
        finally:
            self._connecting -= wanted
        for outcome in opened:
            if isinstance(outcome, BaseException) and not isinstance(outcome, H1Error):
                raise outcome
        return len(self._idle)

    async def _open_idle(self) -> None:
        conn = await self._connect(counted=True)
        if conn.usable:
            self._idle.append(conn)
        else:
            self._discard(conn)

    async def close(self) -> None:
        self._closed = True
        conns = list(self._open)
        self._idle.clear()
        for conn in conns:
            conn.close()
        if conns:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_WAIT):
                    await asyncio.gather(*(c.lost for c in conns), return_exceptions=True)
            for conn in conns:
                if not conn.lost.done() and conn.transport is not None:
                    conn.transport.abort()
        self._open.clear()

    async def _connection(self) -> _Connection:
        if self._closed:
            raise H1Error("the connection pool is closed")
        while self._idle:
            conn = self._idle.pop()
            if conn.usable:
                conn.reused = True
                return conn
            self._discard(conn)
        return await self._connect()

    async def _connect(self, *, counted: bool = False) -> _Connection:
        """A new connection; ``counted``: already in ``_connecting`` (by warm)."""
        loop = asyncio.get_running_loop()
        if not counted:
            self._connecting += 1
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                _, conn = await loop.create_connection(
                    _Connection, self._host, self._port, ssl=self._tls, server_hostname=self._server_hostname
                )
        except TimeoutError:
            raise H1Error(f"cannot connect to {self.host_header}: no answer in {CONNECT_TIMEOUT:.0f} s") from None
        except OSError as exc:  # refused, unreachable, unknown name, TLS (certificate) failures
            raise H1Error(f"cannot connect to {self.host_header}: {type(exc).__name__}: {exc}") from None
        finally:
            if not counted:
                self._connecting -= 1
        self.connections_made += 1
        if self._closed:  # while it was being opened
            conn.close()
            raise H1Error("the connection pool is closed")
        self._open.add(conn)
        return conn

    def _discard(self, conn: _Connection, *, abort: bool = False) -> None:
        """Forget the connection; ``abort``: at once (no TLS goodbye a silent server would not answer)."""
        if abort and conn.transport is not None:
            conn.transport.abort()
        else:
            conn.close()
        self._open.discard(conn)
