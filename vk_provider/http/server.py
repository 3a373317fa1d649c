"""The kubelet-style HTTPS endpoint: ``/healthz``, ``/pods``, ``/containerLogs/...``, ``/metrics``.

The kubelet's streaming paths (``/exec``, ``/attach``, ``/portForward``, ``/run``) answer a
``BadRequest`` Status: the containers are simulated, there is nothing to run a command in.

The only package that imports ``aiohttp.web``. It only reads: Pod state and logs come from a
:class:`PodView`, metrics from a :class:`MetricsView`. Every path but ``/healthz`` needs an
authenticated caller — a client certificate signed by the cluster's CA (the API server's kubelet
client), or a bearer token accepted by a TokenReview — who is then authorized on the Node's
subresource (``proxy``, ``stats``, ``metrics``, ``log``) by a SubjectAccessReview. Anonymous
callers get 401, callers without the permission 403.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import ssl
from collections.abc import AsyncGenerator, Callable, Collection, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import aiohttp
from aiohttp import web

from vk_provider.domain.callers import Caller, node_subresource, verb_for

log = logging.getLogger(__name__)


class _QuietBadRequests(logging.Filter):
    """A malformed request (anyone may send one: the port is open to the network) is answered 400
    by aiohttp, which also logs it as an ERROR with a traceback; a caller could fill the log so.
    Those records are kept at DEBUG, without the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, aiohttp.http_exceptions.HttpProcessingError):
            if not log.isEnabledFor(logging.DEBUG):
                return False
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            record.msg, record.args, record.exc_info = f"bad request to the kubelet endpoint: {exc}", None, None
        return True


logging.getLogger("aiohttp.server").addFilter(_QuietBadRequests())
AGENT_HEADER = "X-Vk-Provider"  # on /healthz: the endpoint is a vk-provider agent's


class Authorizer(Protocol):
    async def authenticate_token(self, token: str) -> Caller | None: ...
    async def authorize(self, caller: Caller, verb: str, node: str, subresource: str) -> bool: ...


class LogLine(Protocol):
    @property
    def at(self) -> datetime: ...
    @property
    def text(self) -> str: ...


class ContainerLog(Protocol):
    """A container's simulated log. ``lines`` only grows; ``finished`` once the container is gone."""

    @property
    def lines(self) -> Sequence[LogLine]: ...
    @property
    def finished(self) -> bool: ...
    async def wait_for_more(self, seen: int) -> None:
        """Return once there are more than ``seen`` lines, or the log is finished."""
        ...


class PodView(Protocol):
    def pod_list(self) -> list[dict[str, Any]]: ...
    def node_of(self, namespace: str, pod: str) -> str | None:
        """Which of the agent's nodes runs this Pod (``None``: none of them)."""
        ...

    def container_log(
        self, namespace: str, pod: str, container: str, *, previous: bool = False
    ) -> ContainerLog | str | None:
        """The log ``kubectl logs`` reads (``previous``: the container's run before), the text of
        the kubelet's 400 when it has none (not started yet; no run before), or None: no such container."""
        ...


class MetricsView(Protocol):
    def render(self) -> str: ...


class NoPods:
    def pod_list(self) -> list[dict[str, Any]]:
        return []

    def node_of(self, namespace: str, pod: str) -> str | None:
        return None

    def container_log(
        self, namespace: str, pod: str, container: str, *, previous: bool = False
    ) -> ContainerLog | str | None:
        return None


class NoMetrics:
    def render(self) -> str:
        return ""


class KubeletServer:
    """Serves the endpoint as one task among the agent's; :meth:`start` returns the bound port."""

    def __init__(
        self,
        *,
        node_name: str,
        bind_address: str,
        port: int,
        cert_file: str,
        key_file: str,
        client_ca_file: str | None,
        authorizer: Authorizer,
        pods: PodView | None = None,
        metrics: MetricsView | None = None,
        now: Callable[[], datetime] | None = None,
        node_names: Collection[str] = (),
    ) -> None:
        self._node = node_name
        # All the Nodes this endpoint serves (node.count); by default the one it is named for.
        self._node_names = frozenset(node_names) or frozenset({node_name})
        self._now = now or _utc_now  # what sinceSeconds counts back from
        self._bind = bind_address
        self._port = port
        self._auth = authorizer
        self.pods: PodView = pods or NoPods()
        self.metrics: MetricsView = metrics or NoMetrics()
        self._ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._ssl.load_cert_chain(cert_file, key_file)
        if client_ca_file:
            self._ssl.load_verify_locations(cafile=client_ca_file)
            self._ssl.verify_mode = ssl.CERT_OPTIONAL
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> int:
        app = web.Application(middlewares=[self._authenticate])
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/pods", self._pods)
        app.router.add_get("/containerLogs/{namespace}/{pod}/{container}", self._container_logs)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/stats/summary", self._stats_summary)
        for path in _STREAMING_PATHS:
            for method in ("GET", "POST"):
                app.router.add_route(method, path, self._not_supported)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._bind, self._port, ssl_context=self._ssl, backlog=256)
        await site.start()
        server = site._server  # the bound socket: port 0 means "pick one"
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self._port
        log.info("kubelet endpoint listening on https://%s:%d", self._bind, self.port)
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path == "/healthz":
            return await handler(request)  # type: ignore[no-any-return]
        caller = await self._caller(request)
        if caller is None:
            return web.Response(status=401, text="Unauthorized\n")
        subresource = node_subresource(request.path)
        node = self._node_for(request)
        if not await self._auth.authorize(caller, verb_for(request.method), node, subresource):
            return web.Response(
                status=403,
                text=f"Forbidden (user={caller.user}, verb={verb_for(request.method)}, resource=nodes, "
                f'subresource="{subresource}")\n',
            )
        return await handler(request)  # type: ignore[no-any-return]

    def _node_for(self, request: web.Request) -> str:
        """The node a request is about: the one running the Pod it names, else the agent's first."""
        info = request.match_info
        if "namespace" in info and "pod" in info:
            return self.pods.node_of(info["namespace"], info["pod"]) or self._node
        return self._node

    async def _caller(self, request: web.Request) -> Caller | None:
        header = request.headers.get("Authorization", "")
        if header.lower().startswith("bearer "):
            token = header[7:].strip()
            return await self._auth.authenticate_token(token) if token else None
        peercert = request.transport.get_extra_info("peercert") if request.transport else None
        if peercert:
            return _caller_from_cert(peercert)
        return None

    async def _healthz(self, request: web.Request) -> web.Response:
        # ?node=NAME: the header tells another agent starting with that node name whether we run it.
        runs = request.query.get("node") in self._node_names
        return web.Response(text="ok", headers={AGENT_HEADER: "runs" if runs else "vk-provider"})

    async def _pods(self, request: web.Request) -> web.Response:
        body = {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": self.pods.pod_list()}
        return web.json_response(body)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=self.metrics.render(), content_type="text/plain", charset="utf-8")

    async def _stats_summary(self, request: web.Request) -> web.Response:
        pods = [
            {"podRef": {"name": p["metadata"]["name"], "namespace": p["metadata"]["namespace"],
                        "uid": p["metadata"].get("uid", "")}}
            for p in self.pods.pod_list()
        ]  # fmt: skip
        return web.json_response({"node": {"nodeName": self._node}, "pods": pods})

    async def _not_supported(self, request: web.Request) -> web.Response:
        # A Status, not text: kubectl decodes the (API server-proxied) answer to a failed upgrade as
        # a Status, and reads a plain text with ": " in it as YAML, showing "Error from server: ".
        what = _STREAMING_NAMES[request.path.split("/", 2)[1]]
        return web.json_response(
            {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": f"vk-provider simulates containers: {what} is not supported",
                "reason": "BadRequest",
                "code": 400,
            },
            status=400,
        )

    async def _container_logs(self, request: web.Request) -> web.StreamResponse:
        ns, pod, container = (request.match_info[k] for k in ("namespace", "pod", "container"))
        query = request.query
        previous = _flag(query, "previous")
        source = self.pods.container_log(ns, pod, container, previous=previous)
        if source is None:
            return web.Response(status=404, text=f"container {container} of pod {ns}/{pod} not found on this node\n")
        if isinstance(source, str):
            return web.Response(status=400, text=source)  # as the kubelet: kubectl shows it after "(BadRequest): "
        options = _log_options(query, self._now())
        if isinstance(options, LogRefusal):
            return web.Response(status=options.status, text=options.text)
        start = max(0, len(source.lines) - options.tail) if options.tail is not None else 0
        response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
        await response.prepare(request)
        async with aclosing(_log_stream(source, start, options)) as chunks:
            async for chunk in chunks:
                await response.write(chunk)
        await response.write_eof()
        return response


async def _follow(source: ContainerLog, start: int, follow: bool) -> AsyncGenerator[LogLine, None]:
    seen = start
    while True:
        # Whether it had ended, read before its lines: a line written before the end is among them
        # (a log's lines may be a copy taken when asked for, and yielding can wait on the client).
        finished = source.finished
        lines = source.lines
        while seen < len(lines):
            yield lines[seen]
            seen += 1
        if not follow or finished:
            return
        await source.wait_for_more(seen)
        await asyncio.sleep(0)


@dataclass(frozen=True, slots=True)
class LogOptions:
    """The kubelet's PodLogOptions that shape the output (``previous`` chooses the log)."""

    tail: int | None = None  # the last lines only
    since: datetime | None = None  # lines at or after this time only
    limit: int | None = None  # at most this many bytes, then the stream ends
    timestamps: bool = False
    follow: bool = False


@dataclass(frozen=True, slots=True)
class LogRefusal:
    """An invalid ``/containerLogs`` query, answered as the kubelet does: 400 when a value cannot be
    read at all, 422 when it can but the kubelet's validation refuses it; ``text`` says why."""

    status: int
    text: str


_STREAMING_NAMES = {"exec": "exec", "attach": "attach", "portForward": "port-forward", "run": "run"}
_STREAMING_PATHS = [
    *(f"/{kind}/{{namespace}}/{{pod}}/{{container}}" for kind in ("exec", "attach", "run")),
    *(f"/{kind}/{{namespace}}/{{pod}}/{{uid}}/{{container}}" for kind in ("exec", "attach", "run")),
    "/portForward/{namespace}/{pod}",
    "/portForward/{namespace}/{pod}/{uid}",
]
_WHOLE_NUMBER = re.compile(r"[+-]?[0-9]{1,18}")  # longer: not a count anyone means (nor one int() takes)
_RFC3339 = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2})")


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _log_options(query: Mapping[str, str], now: datetime) -> LogOptions | LogRefusal:
    """The options of a ``/containerLogs`` query, or why it is refused.

    As the kubelet: the old ``tail`` parameter stands for tailLines (``tail=all``: no limit); a value
    that is not a number (or an RFC 3339 time) is a 400; then ValidatePodLogOptions, whose refusals
    are a 422: tailLines >= 0, limitBytes >= 1, sinceSeconds >= 1, at most one of sinceSeconds and
    sinceTime.
    """
    query = dict(query)
    if "tail" in query:
        tail = query.pop("tail")
        query.pop("tailLines", None)
        if tail != "all":
            query["tailLines"] = tail
    rules = {"tailLines": (0, "a non-negative whole number"), "limitBytes": (1, "a whole number greater than 0"),
             "sinceSeconds": (1, "a whole number greater than 0")}  # fmt: skip
    # Read every value first (400), then validate (422), as the kubelet does.
    for name, (_, rule) in rules.items():
        if name in query and not _WHOLE_NUMBER.fullmatch(query[name]):
            return LogRefusal(400, f"{name} must be {rule}, not {query[name]!r}\n")
    since: datetime | None = None
    if query.get("sinceTime"):
        since = _rfc3339(query["sinceTime"])
        if since is None:
            text = f"sinceTime must be an RFC 3339 time such as 2026-01-02T15:04:05Z, not {query['sinceTime']!r}\n"
            return LogRefusal(400, text)
    numbers = {name: int(query[name]) for name in rules if name in query}
    for name, (least, rule) in rules.items():
        if numbers.get(name, least) < least:
            return LogRefusal(422, f"{name} must be {rule}, not {query[name]!r}\n")
    if since is not None and "sinceSeconds" in numbers:
        return LogRefusal(422, "at most one of `sinceTime` or `sinceSeconds` may be specified\n")
    if since is None and "sinceSeconds" in numbers:
        try:
            since = now - timedelta(seconds=numbers["sinceSeconds"])
        except OverflowError:
            since = None  # before any log line
    return LogOptions(
        tail=numbers.get("tailLines"),
        since=since,
        limit=numbers.get("limitBytes"),
        timestamps=_flag(query, "timestamps"),
        follow=_flag(query, "follow"),
    )


def _rfc3339(text: str) -> datetime | None:
    """A time as Go's time.Parse(time.RFC3339) reads it (a date, "T", a time and a zone), or None."""
    if not _RFC3339.fullmatch(text):
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:  # no such day or hour
        return None


async def _log_stream(source: ContainerLog, start: int, options: LogOptions) -> AsyncGenerator[bytes, None]:
    """What ``/containerLogs`` sends, as the kubelet's ReadLogs: from line ``start`` (tailLines),
    the lines at or after ``since``, cut at ``limit`` bytes (timestamps count), which ends the stream."""
    left = options.limit
    async with aclosing(_follow(source, start, options.follow)) as lines:
        async for line in lines:
            if options.since is not None and line.at < options.since:
                continue
            chunk = _format(line, options.timestamps).encode()
            if left is not None:
                chunk = chunk[:left]
                left -= len(chunk)
            yield chunk
            if left is not None and left <= 0:
                return


async def agent_runs(host: str, port: int, node: str, timeout: float = 2.0) -> bool:
    """Whether a vk-provider agent's kubelet endpoint at ``host:port`` says it runs ``node`` now
    (its ``/healthz?node=``).

    Asked before an agent takes over a Node. No certificate is checked (only what the endpoint
    answers); any failure to connect, an answer from something else, or from an agent that runs
    other Nodes now (it took over the address) is False.
    """
    if not host or not 0 < port < 65536:
        return False
    url = f"https://{host}:{port}/healthz" if ":" not in host else f"https://[{host}]:{port}/healthz"
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
            session.get(url, params={"node": node}, ssl=_probe_context()) as response,
        ):
            return response.status == 200 and response.headers.get(AGENT_HEADER) == "runs"
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
        return False


@functools.cache
def _probe_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _flag(query: Mapping[str, str], name: str) -> bool:
    """A boolean query parameter, as the kubelet reads it (absent: false)."""
    return query.get(name, "false").lower() in ("true", "1")


def _format(line: LogLine, timestamps: bool) -> str:
    if timestamps:
        return f"{line.at.strftime('%Y-%m-%dT%H:%M:%S.%fZ')} {line.text}\n"
    return f"{line.text}\n"


def _caller_from_cert(peercert: dict[str, Any]) -> Caller | None:
    user = ""
    groups: list[str] = []
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                user = value
            elif key == "organizationName":
                groups.append(value)
    return Caller(user, (*groups, "system:authenticated")) if user else None
