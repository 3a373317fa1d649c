"""The connection to the API server: credentials, a JSON request helper, rate limiting, errors.

This package is the only one that imports ``kubernetes_asyncio``. Its typed models are slow to
build and hide fields, so the agent uses the client only for what it does well (kubeconfig and
in-cluster loading, credentials and their refresh) and exchanges plain JSON dicts through
:meth:`KubeSession.request` (over its own HTTP/1.1 connections, :mod:`vk_provider.kube.h1`; over
aiohttp when a proxy is set) and :meth:`KubeSession.stream` (watches, over aiohttp).

Why not the client's request path: per request it walks the body to "sanitize" it and, because its
session trusts the environment, looks up ~/.netrc and the proxy variables in two worker threads.
At a thousand status writes a second those thread hops and the GIL they contend for cost the agent
more CPU than encoding the requests. Here the proxy is looked up once, when the session is made
(``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY``; a kubeconfig ``proxy-url`` wins; ~/.netrc is not read),
and the TLS context is built once from the same settings the client would use.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import os
import re
import ssl
import urllib.parse
import urllib.request
import zlib
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio.config.config_exception import ConfigException
from yarl import URL

from vk_provider import __version__
from vk_provider.domain.messages import first_line
from vk_provider.kube.h1 import H1Error, H1Pool

log = logging.getLogger(__name__)

JSON = dict[str, Any]
Query = Mapping[str, str | int | bool] | Sequence[tuple[str, str]] | None
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
MAX_THROTTLED_RETRIES = 5
MAX_RETRY_AFTER_SECONDS = 10.0
USER_AGENT = f"vk-provider/{__version__}"  # the API server names the field manager after it


class KubeConfigError(Exception):
    """The credentials could not be loaded; the message names the source and the problem."""


class KubeError(Exception):
    """An API request failed: ``status`` is the HTTP status (0 when no answer came back)."""

    def __init__(self, status: int, reason: str, message: str, body: JSON | None = None) -> None:
        super().__init__(f"{status} {reason}: {message}" if status else message)
        self.status = status
        self.reason = reason
        self.message = message
        self.body = body or {}

    @property
    def is_conflict(self) -> bool:
        return self.status == 409

    @property
    def is_not_found(self) -> bool:
        return self.status == 404

    @property
    def is_gone(self) -> bool:
        return self.status == 410

    @property
    def is_already_exists(self) -> bool:
        return self.status == 409 and self.reason == "AlreadyExists"

    @property
    def is_transient(self) -> bool:
        """Worth retrying: no answer, throttled, or the server failing."""
        return self.status == 0 or self.status == 429 or self.status >= 500


# An object's own resourceVersion: the first in its JSON (metadata comes first, and nothing in
# metadata before it holds one).
_RESOURCE_VERSION = re.compile(rb'"resourceVersion":"([^"]*)"')


def _version_only(data: bytes) -> JSON:
    """An answer not decoded (``want_body=False``): only the object's resourceVersion, if it has one."""
    found = _RESOURCE_VERSION.search(data)
    return {"metadata": {"resourceVersion": found[1].decode()}} if found else {}


class RateLimiter:
    """A token bucket on the event loop's clock (``qps`` tokens a second, at most ``burst``)."""

    def __init__(self, qps: float, burst: int) -> None:
        self.qps = qps
        self.burst = burst
        self._tokens = float(burst)
        self._stamp: float | None = None
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        if self.qps <= 0:
            return
        async with self._lock:
            loop = asyncio.get_running_loop()
            now = loop.time()
            if self._stamp is not None:
                self._tokens = min(float(self.burst), self._tokens + (now - self._stamp) * self.qps)
            self._stamp = now
            if self._tokens < 1.0:
                wait = (1.0 - self._tokens) / self.qps
                await asyncio.sleep(wait)
                self._tokens = 1.0
                self._stamp = loop.time()
            self._tokens -= 1.0


async def load_configuration(kubeconfig: str = "") -> tuple[k8s_client.Configuration, str]:
    """Load credentials: the given kubeconfig, else in-cluster, else $KUBECONFIG, else ~/.kube/config.

    Returns the client configuration and a description of where it came from.
    """
    cfg = k8s_client.Configuration()
    if kubeconfig:
        source = f"kubeconfig {kubeconfig}"
        if not Path(kubeconfig).is_file():
            raise KubeConfigError(
                f"{source}: " + ("a directory, not a file" if Path(kubeconfig).is_dir() else "no such file")
            )
        await _load_kubeconfig(cfg, kubeconfig, source)
        return cfg, source
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        try:
            k8s_config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
            return cfg, "in-cluster service account"
        except ConfigException as exc:
            raise KubeConfigError(f"in-cluster config: {exc}") from None
    env_path = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0]
    path = env_path or str(Path.home() / ".kube" / "config")
    source = f"kubeconfig {path}" + (" (from $KUBECONFIG)" if env_path else "")
    if not Path(path).is_file():
        raise KubeConfigError(
            f"no cluster credentials: {path} does not exist (name one with --kubeconfig or $KUBECONFIG)"
        )
    await _load_kubeconfig(cfg, path, source)
    return cfg, source


async def _load_kubeconfig(cfg: k8s_client.Configuration, path: str, source: str) -> None:
    try:
        await k8s_config.load_kube_config(config_file=path, client_configuration=cfg, persist_config=False)
    except ConfigException as exc:
        raise KubeConfigError(f"{source}: {exc}") from None
    except Exception as exc:  # yaml errors, bad base64, unreadable files...
        raise KubeConfigError(f"{source}: invalid kubeconfig ({first_line(exc)})") from None


class KubeSession:
    """One authenticated HTTP session to the API server, shared by every controller.

    Contract: :meth:`request` returns the decoded JSON body or raises :class:`KubeError`; it never
    raises aiohttp's exceptions. It is safe to call concurrently. :meth:`close` must be awaited once.
    """

    def __init__(
        self,
        configuration: k8s_client.Configuration,
        *,
        qps: float = 0.0,
        burst: int = 1,
        request_timeout: float = 30.0,
        source: str = "",
        user_agent: str = USER_AGENT,
        own_http: bool = True,
    ) -> None:
        self.configuration = configuration
        self.source = source
        self.host: str = str(configuration.host).rstrip("/")
        tls = _tls_context(configuration, source) if self.host.startswith("https:") else None
        self._proxy: str | None = configuration.proxy or _proxy_from_env(self.host)
        self._proxy_headers: Mapping[str, str] | None = configuration.proxy_headers
        self._server_hostname: str | None = configuration.tls_server_name or None
        self._headers = {"User-Agent": user_agent, "Accept": "application/json"}
        limit = max(configuration.connection_pool_maxsize or 0, 64)
        self._http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=limit, ssl=tls or True),
            trust_env=False,  # looked up once above, not per request in a thread
            cookie_jar=aiohttp.DummyCookieJar(),  # the API server sets none worth keeping
            read_bufsize=2**21,
        )
        # Ordinary requests go over the session's own HTTP/1.1 connections (see kube.h1), unless
        # through a proxy; watches, and everything with a proxy, over aiohttp.
        url = URL(self.host)
        self._pool: H1Pool | None = None
        self._prefix = url.raw_path.rstrip("/")  # as written (percent-encoded), not decoded
        self._head = ""  # the headers every request carries
        if own_http and self._proxy is None and url.host is not None and url.port is not None:
            self._pool = H1Pool(url.host, url.port, tls=tls, server_hostname=self._server_hostname, limit=limit,
                                host_header=url.raw_host)  # fmt: skip
            agent = _header_value(user_agent)
            self._head = (
                f"Host: {self._pool.host_header}\r\nUser-Agent: {agent}\r\n"
                "Accept: application/json\r\nAccept-Encoding: gzip"
            )
        self._limiter = RateLimiter(qps, burst)
        self._timeout = request_timeout
        self.requests_by_verb: dict[str, int] = {}
        self.throttled = 0  # answers with Retry-After that were waited out and retried

    @classmethod
    async def connect(
        cls,
        kubeconfig: str = "",
        *,
        qps: float = 0.0,
        burst: int = 1,
        request_timeout: float = 30.0,
        user_agent: str = USER_AGENT,
        own_http: bool = True,
    ) -> KubeSession:
        """``own_http``: ordinary requests over the session's own HTTP/1.1 connections (else aiohttp)."""
        cfg, source = await load_configuration(kubeconfig)
        return cls(cfg, qps=qps, burst=burst, request_timeout=request_timeout, source=source, user_agent=user_agent,
                   own_http=own_http)  # fmt: skip

    @property
    def connections_made(self) -> int:
        """How many connections for ordinary requests were opened so far, warmed ones included (0 with aiohttp)."""
        return self._pool.connections_made if self._pool is not None else 0

    async def warm(self, connections: int) -> int:
        """Open ``connections`` connections for ordinary requests ahead of need (see
        :meth:`H1Pool.warm`); how many wait open. Nothing with aiohttp (through a proxy)."""
        if self._pool is None:
            return 0
        return await self._pool.warm(connections)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
        await self._http.close()

    async def __aenter__(self) -> KubeSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def own_budget(self) -> RateLimiter:
        """A rate limit like the session's (kube.qps, kube.burst) for a caller that must not queue
        behind the node's own requests: the ImageCache builder, which stands for ECI's cache
        service, a system apart from the node."""
        return RateLimiter(self._limiter.qps, self._limiter.burst)

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: Query = None,
        content_type: str = "application/json",
        timeout: float | None = None,
        want_body: bool = True,
        limited: bool = True,
        limiter: RateLimiter | None = None,
    ) -> JSON:
        """Send one request and return its JSON body (``{}`` for an empty one, or when not ``want_body``).

        ``want_body=False`` skips decoding a successful answer (a whole Pod for a status patch) that
        the caller would throw away; an error answer is still decoded for its message.

        ``limited=False`` skips the client-side rate limit (kube.qps): for Lease renewals, which must
        not wait behind a queue of bulk writes (a Node or a leader that renews late is taken for
        dead), as client-go gives leader election a client of its own. ``limiter``: a budget of
        the caller's own (see :meth:`own_budget`) instead of the session's.

        Like client-go, a 429 or 503 answer carrying ``Retry-After`` (the API server shedding load:
        the request was not processed) is retried after that many seconds, a few times.
        """
        attempt = 0
        while True:
            if limited:
                await (limiter or self._limiter).acquire()
            self.requests_by_verb[method] = self.requests_by_verb.get(method, 0) + 1
            try:
                status, data, retry_after = await self._send(method, path, body, query, content_type, timeout)
            except KubeError:
                raise
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                raise KubeError(0, "Unreachable", f"{method} {path}: {_describe(exc)}") from None
            wait = _retry_after(retry_after) if status in (429, 503) else None
            if wait is None or attempt >= MAX_THROTTLED_RETRIES:
                if not want_body and 200 <= status < 300:
                    return _version_only(data)
                return _decode(status, data, method, path)
            attempt += 1
            self.throttled += 1
            log.debug("%s %s: %d, retrying after %.1f s", method, path, status, wait)
            await asyncio.sleep(wait)

    async def _send(
        self,
        method: str,
        path: str,
        body: Any,
        query: Query,
        content_type: str,
        timeout: float | None,
    ) -> tuple[int, bytes, str]:
        """One request and its whole answer: (status, body, Retry-After)."""
        if self._pool is None:  # through a proxy: aiohttp
            resp = await self._call(path, query, timeout or self._timeout, method, body, content_type)
            try:
                data = await resp.read()
            finally:
                resp.release()
            return resp.status, data, resp.headers.get("Retry-After", "")
        target = self._prefix + urllib.parse.quote(path, safe=_PATH_SAFE)
        if query:
            items = query.items() if isinstance(query, Mapping) else query
            target += "?" + urllib.parse.urlencode([(k, _query_text(v)) for k, v in items])
        head = f"{method} {target} HTTP/1.1\r\n{self._head}"
        token = await self._authorization()
        if token is not None:
            head += "\r\nAuthorization: " + _header_value(token)
        payload = _encode(body)
        if payload is not None:
            head += f"\r\nContent-Type: {content_type}\r\nContent-Length: {len(payload)}"
        elif method in ("POST", "PUT", "PATCH"):
            head += "\r\nContent-Length: 0"
        answer = await self._pool.request(method, head.encode("latin-1"), payload, timeout or self._timeout)
        data = answer.body
        if answer.headers.get(b"content-encoding", b"").lower() == b"gzip":
            try:
                data = gzip.decompress(data)
            except (OSError, EOFError, zlib.error) as exc:
                raise H1Error(f"an answer that does not decompress: {exc}") from None
        return answer.status, data, answer.headers.get(b"retry-after", b"").decode("latin-1")

    async def _authorization(self) -> str | None:
        """The bearer token, if the credentials have one, asked for per request: the loader's
        refresh hook (in-cluster token files, exec plugins) runs then."""
        cfg = self.configuration
        if "BearerToken" in cfg.api_key:
            return str(await cfg.get_api_key_with_prefix("BearerToken"))
        return None

    @asynccontextmanager
    async def stream(
        self, path: str, query: Mapping[str, str | int | bool], timeout: float
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        """Open a watch: yields an async iterator of its events, each one line of JSON, undecoded.

        The caller decodes them: it may tell from the raw line that an event needs no decoding.
        """
        await self._limiter.acquire()
        self.requests_by_verb["WATCH"] = self.requests_by_verb.get("WATCH", 0) + 1
        try:
            resp = await self._call(path, query, timeout)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise KubeError(0, "Unreachable", f"watch {path}: {_describe(exc)}") from None
        try:
            if resp.status >= 300:
                data = await resp.read()
                _decode(resp.status, data, "GET", path)
            yield _lines(resp, path)
        finally:
            resp.release()

    async def _call(
        self, path: str, query: Query, timeout: float, method: str = "GET", body: Any = None, content_type: str = ""
    ) -> aiohttp.ClientResponse:
        params: list[tuple[str, str]] = []
        if isinstance(query, Mapping):
            params = [(k, _query_text(v)) for k, v in query.items()]
        elif query:
            params = list(query)
        headers = dict(self._headers)
        token = await self._authorization()
        if token is not None:
            headers["Authorization"] = token
        data = _encode(body)
        if data is not None:
            headers["Content-Type"] = content_type
        resp: aiohttp.ClientResponse = await self._http.request(
            method,
            self.host + path,
            params=params or None,
            data=data,
            headers=headers,
            proxy=self._proxy,
            proxy_headers=self._proxy_headers,
            server_hostname=self._server_hostname,
            # sock_connect, not connect: under load a request may wait for a pooled
            # connection, which is not an unreachable server.
            timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=min(timeout, 5.0)),
        )
        return resp


def _tls_context(cfg: k8s_client.Configuration, source: str) -> ssl.SSLContext:
    """The TLS settings of the kubeconfig (or service account): CA, client certificate, verification."""
    try:
        context = ssl.create_default_context(cafile=cfg.ssl_ca_cert or None)
        if cfg.cert_file:
            context.load_cert_chain(cfg.cert_file, keyfile=cfg.key_file or None)
    except (OSError, ssl.SSLError) as exc:
        files = ", ".join(f"{k} {v}" for k, v in (("CA", cfg.ssl_ca_cert), ("certificate", cfg.cert_file),
                                                     ("key", cfg.key_file)) if v)  # fmt: skip
        raise KubeConfigError(f"{source or 'credentials'}: unusable TLS files ({files}): {_describe(exc)}") from None
    if not cfg.verify_ssl:  # insecure-skip-tls-verify
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if cfg.disable_strict_ssl_verification:
        context.verify_flags &= ~ssl.VERIFY_X509_STRICT
    return context


def _proxy_from_env(host: str) -> str | None:
    """The proxy for ``host`` from HTTPS_PROXY/HTTP_PROXY, unless NO_PROXY exempts it (read once).

    Read by urllib's rules (NO_PROXY lists host names and domain suffixes, not CIDR ranges). Only an
    ``http://`` proxy is used (it tunnels TLS with CONNECT): aiohttp cannot speak TLS to the proxy
    itself, and ignored such proxies before, too.
    """
    url = URL(host)
    if url.host is None or urllib.request.proxy_bypass(url.host):
        return None
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and URL(proxy).scheme != "http":
        log.warning("ignoring the %s proxy %s from the environment: only http:// proxies are supported",
                    url.scheme, URL(proxy).with_user(None))  # fmt: skip
        return None
    return proxy


async def _lines(resp: aiohttp.ClientResponse, path: str) -> AsyncIterator[bytes]:
    buffer = b""
    try:
        async for chunk in resp.content.iter_any():
            if b"\n" not in chunk:
                buffer += chunk
                continue
            *lines, rest = (buffer + chunk).split(b"\n")  # one pass per chunk, however many events
            buffer = rest
            for line in lines:
                if line.strip():
                    yield line
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise KubeError(0, "Unreachable", f"watch {path}: {_describe(exc)}") from None
    if buffer.strip():
        yield buffer


def _encode(body: Any) -> bytes | None:
    return None if body is None else json.dumps(body, separators=(",", ":")).encode()


def _decode(status: int, data: bytes, method: str, path: str) -> JSON:
    try:
        body = json.loads(data) if data else {}
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {"items": body}
    if 200 <= status < 300:
        return body
    reason = str(body.get("reason") or "")
    message = str(body.get("message") or data[:200].decode("utf-8", "replace") or "no message")
    raise KubeError(status, reason, f"{method} {path}: {message}", body)


def _retry_after(header: str) -> float | None:
    """Seconds to wait from a ``Retry-After: <seconds>`` header (capped), or None without one."""
    raw = header.strip()
    if not raw.isdigit():
        return None
    return min(float(raw), MAX_RETRY_AFTER_SECONDS)


# Kept as they are in a request path (RFC 3986 pchar and "/"); anything else is percent-encoded.
_PATH_SAFE = "/-._~!$&'()*+,;=:@"


def _header_value(value: str) -> str:
    """A header value as sent: a line break in it (from a kubeconfig, say) would split the request."""
    if "\r" in value or "\n" in value:
        raise KubeError(0, "BadHeader", "a header value (user agent or token) contains a line break")
    return value


def _query_text(value: str | int | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
