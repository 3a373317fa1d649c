"""The kubelet-style HTTPS endpoint: ``/healthz``, ``/pods``, ``/containerLogs/...``, ``/metrics``.

The only package that imports ``aiohttp.web``. It only reads: Pod state and logs come from a
:class:`PodView`, metrics from a :class:`MetricsView`. Every path but ``/healthz`` needs an
authenticated caller — a client certificate signed by the cluster's CA (the API server's kubelet
client), or a bearer token accepted by a TokenReview — who is then authorized on the Node's
subresource (``proxy``, ``stats``, ``metrics``, ``log``) by a SubjectAccessReview. Anonymous
callers get 401, callers without the permission 403.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

from aiohttp import web

from vk_provider.domain.callers import Caller, node_subresource, verb_for

log = logging.getLogger(__name__)


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
    ) -> None:
        self._node = node_name
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
        return web.Response(text="ok")

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

    async def _container_logs(self, request: web.Request) -> web.StreamResponse:
        ns, pod, container = (request.match_info[k] for k in ("namespace", "pod", "container"))
        query = request.query
        previous = _flag(query, "previous")
        source = self.pods.container_log(ns, pod, container, previous=previous)
        if source is None:
            return web.Response(status=404, text=f"container {container} of pod {ns}/{pod} not found on this node\n")
        if isinstance(source, str):
            return web.Response(status=400, text=source)  # as the kubelet: kubectl shows it after "(BadRequest): "
        try:
            tail = int(query["tailLines"]) if "tailLines" in query else None
            if tail is not None and tail < 0:
                raise ValueError
        except ValueError:
            return web.Response(status=400, text="tailLines must be a non-negative whole number\n")
        timestamps = _flag(query, "timestamps")
        follow = _flag(query, "follow")
        lines = list(source.lines)
        start = max(0, len(lines) - tail) if tail is not None else 0
        response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
        await response.prepare(request)
        async for line in _follow(source, start, follow):
            await response.write(_format(line, timestamps).encode())
        await response.write_eof()
        return response


async def _follow(source: ContainerLog, start: int, follow: bool) -> AsyncIterator[LogLine]:
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
