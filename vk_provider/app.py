"""Composition root: builds the agent's parts from :class:`Settings` and runs them.

Start order (virtual-kubelet's): connect and check the API server, open the registry, serve the
kubelet endpoint, start taking Pods, and only then register the Node and heartbeat. Shutdown runs
in reverse: the Node is left NotReady (or deleted) first, then the tasks are cancelled, then the
HTTP server and the connections are closed.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import signal

from vk_provider import __version__
from vk_provider.catalogs import CatalogError, load_catalogs
from vk_provider.config import Settings, node_names
from vk_provider.controllers.caches import CacheManager, CacheOptions, ImageCacheController
from vk_provider.controllers.clock import SystemClock
from vk_provider.controllers.images import CatalogImages
from vk_provider.controllers.leader import LeaderElector, LeaderTiming, election_wanted, leader_identity
from vk_provider.controllers.node import NodeController, NodeTiming
from vk_provider.controllers.pods import PodController, PodTiming, node_allocatable
from vk_provider.controllers.puller import Puller
from vk_provider.controllers.records import RegistryStartRecorder
from vk_provider.controllers.reporter import StatusReporter
from vk_provider.controllers.router import PodRouter
from vk_provider.domain.ipam import IpPool
from vk_provider.domain.messages import first_line
from vk_provider.domain.node import VIRTUAL_KUBELET_TYPE, NodeFacts, node_endpoint
from vk_provider.http.certs import CertificateError, serving_certificate
from vk_provider.http.server import KubeletServer, agent_runs
from vk_provider.kube.auth import ClusterAuth
from vk_provider.kube.imagecaches import LIST_PATH as IMAGECACHES_PATH
from vk_provider.kube.imagecaches import CrdError, ImageCacheClient, ensure_crd, load_crd_manifest
from vk_provider.kube.leases import LeaseClient
from vk_provider.kube.nodes import NodeClient
from vk_provider.kube.pods import EVENT_WORKERS, SPAM_REFILL_SECONDS, EventRecorder, PodClient
from vk_provider.kube.secrets import PullSecrets
from vk_provider.kube.session import KubeConfigError, KubeError, KubeSession
from vk_provider.kube.watching import list_watch
from vk_provider.metrics import NodeMetrics
from vk_provider.oci import Platform, RegistryClient
from vk_provider.registry.engine import database_url, is_sqlite, open_registry, sqlite_file
from vk_provider.registry.migrate import upgrade
from vk_provider.registry.repository import Registry
from vk_provider.supervisor import Supervisor

log = logging.getLogger(__name__)


class StartupError(Exception):
    """The agent cannot start; the message is one line naming the problem."""


class Agent:
    """The running agent: owns the API session, the supervisor and the controllers."""

    def __init__(self, settings: Settings, session: KubeSession) -> None:
        self.settings = settings
        self.session = session
        self.supervisor = Supervisor()
        self.clock = SystemClock()
        self.server: KubeletServer | None = None
        self.node: NodeController | None = None
        self.pods: PodController | None = None  # the first node's (all of them: pod_controllers)
        self.pod_controllers: list[PodController] = []
        self.nodes: list[NodeController] = []
        self.registry: Registry | None = None
        self.images: CatalogImages | None = None
        self.metrics = NodeMetrics()
        self.records: RegistryStartRecorder | None = None
        self.cache_manager: CacheManager | None = None
        self.events: EventRecorder | None = None

    @classmethod
    async def create(cls, settings: Settings) -> Agent:
        """Connect to the API server (fails fast with :class:`StartupError`)."""
        try:
            session = await KubeSession.connect(
                settings.kube.kubeconfig,
                qps=settings.kube.qps,
                burst=settings.kube.burst,
                request_timeout=settings.kube.request_timeout_seconds,
                own_http=settings.kube.http_client == "builtin",
            )
        except KubeConfigError as exc:
            raise StartupError(str(exc)) from None
        try:
            version = await _wait_for_api_server(session, settings.kube.startup_timeout_seconds)
            log.info("connected to %s (%s) using %s", session.host, version, session.source)
        except BaseException:
            await session.close()
            raise
        return cls(settings, session)

    async def start(self) -> None:
        s = self.settings
        await self._refuse_nodes_run_elsewhere()
        await self._open_registry()
        try:
            catalog = load_catalogs(s.images.catalog, s.images.extra_catalogs)
        except CatalogError as exc:
            raise StartupError(str(exc)) from None
        try:
            cert, key = serving_certificate(
                s.kubelet.tls_cert_file, s.kubelet.tls_key_file, s.kubelet.cert_dir, s.node.name, s.node.internal_ip
            )
        except CertificateError as exc:
            raise StartupError(str(exc)) from None
        client_ca = s.kubelet.client_ca_file or self.session.configuration.ssl_ca_cert or None
        self.server = KubeletServer(
            node_name=s.node.name,
            bind_address=s.kubelet.bind_address,
            port=s.kubelet.port,
            cert_file=cert,
            key_file=key,
            client_ca_file=client_ca,
            authorizer=ClusterAuth(self.session),
            metrics=self.metrics,
            node_names=node_names(s.node),
        )
        try:
            port = await self.server.start()
        except OSError as exc:
            raise StartupError(
                f"cannot serve the kubelet endpoint on {s.kubelet.bind_address}:{s.kubelet.port}: {exc.strerror or exc}"
            ) from None

        # Pods: able to take Pods before the Node is advertised (virtual-kubelet's start order).
        puller = Puller(s.pull, random.Random(s.simulation.seed), self.clock)
        # Images in no catalog may be read from their registry (images.unknown_images: registry).
        self.images = images = CatalogImages(
            catalog,
            puller,
            unknown=s.images.unknown_images,
            seed=s.simulation.seed,
            resolver=RegistryClient(
                platform=Platform(s.node.operating_system, s.node.architecture),
                insecure_registries=s.images.insecure_registries,
                timeout=s.images.registry_timeout_seconds,
            )
            if s.images.unknown_images == "registry"
            else None,
            store=self.registry,
            credentials=PullSecrets(self.session),
        )
        self.supervisor.start("image-manifests", images.run())
        # ImageCache objects: the CRD (installed when missing), their controller and watch. Pods are
        # resolved against the caches only once those are listed.
        assert self.registry is not None
        if s.caches.install_crd:
            try:
                await ensure_crd(self.session, load_crd_manifest())
            except CrdError as exc:
                raise StartupError(str(exc)) from None
        # Agents on one cluster elect one ImageCache builder (caches.leader_election), whatever their registries.
        elector: LeaderElector | None = None
        if election_wanted(s.caches.leader_election):
            elector = LeaderElector(
                LeaseClient(self.session),
                identity=leader_identity(s.node.name, random.Random()),
                clock=self.clock,
                namespace=s.caches.leader_namespace,
                name=s.caches.leader_lease,
                timing=LeaderTiming.for_lease(
                    s.caches.leader_lease_duration_seconds, s.caches.leader_renew_interval_seconds
                ),
            )
        controller = ImageCacheController(
            leadership=elector,
            api=ImageCacheClient(self.session),
            store=self.registry,
            manifests=images,
            builder=puller,
            clock=self.clock,
            rng=random.Random(),
            options=CacheOptions(
                manual_quota=s.caches.manual_quota,
                automatic_quota=s.caches.automatic_quota,
                lru_for_manual=s.caches.lru_for_manual,
                sweep_interval_seconds=s.caches.sweep_interval_seconds,
                snapshot_seconds=s.caches.snapshot_seconds,
                time_scale=s.pull.time_scale,
                shared_registry=not is_sqlite(self.registry.engine),
            ),
        )
        self.supervisor.start("imagecaches", controller.run())
        self.supervisor.start(
            "imagecache-watch",
            list_watch(
                self.session, IMAGECACHES_PATH, controller, what="imagecaches", max_backoff=s.kube.max_backoff_seconds
            ),
        )
        try:
            await asyncio.wait_for(controller.synced.wait(), timeout=30)
        except TimeoutError:
            log.warning("image caches not listed within 30 s; Pods are resolved against what is known")
        if elector is not None:
            self.supervisor.start("imagecache-leader", elector.run())
        cache_manager = CacheManager(controller, images, self.clock, default_auto=s.caches.default_auto_match)
        self.cache_manager = cache_manager
        self.supervisor.start("imagecache-hits", cache_manager.run(max_backoff=s.kube.max_backoff_seconds))
        # The connections that Pod status and Events go over are opened now, while nothing waits,
        # not by the first burst of Pods (a TLS handshake each, on both sides, in the middle of it).
        open_now = await self.session.warm(s.pods.status_writers + EVENT_WORKERS)
        log.debug("%d connections to the API server open for Pod status and Events", open_now)
        pod_client = PodClient(self.session)
        reporter = StatusReporter(
            pod_client,
            workers=s.pods.status_writers,
            max_backoff=s.kube.max_backoff_seconds,
            settle_seconds=s.pods.status_settle_seconds,
        )
        names = node_names(s.node)
        # Events give way to Pod status: a burst of starts gets its Pods Running first.
        events = EventRecorder(
            self.session,
            host=names[0],
            give_way=reporter.wait_idle,
            on_drop=self.metrics.events_dropped.inc,
            # The kubelet's spam filter, in simulated time: one more Event per 5 simulated minutes.
            spam_refill_seconds=SPAM_REFILL_SECONDS / s.pull.time_scale,
            on_filter=self.metrics.events_filtered.inc,
        )
        self.events = events
        # So do the records of Pod starts (at most 2 s late).
        self.records = records = RegistryStartRecorder(self.registry, self.metrics, give_way=reporter.wait_idle)
        self.supervisor.start("start-records", records.run())
        allocatable = node_allocatable(s.node.cpu, s.node.memory, s.node.pods)
        ips = IpPool(s.pods.pod_cidr)
        timing = PodTiming(
            time_scale=s.pull.time_scale, create_seconds=0.0, start_seconds=s.pull.container_start_seconds
        )
        controllers = [
            PodController(
                node_name=name,
                host_ip=s.node.internal_ip,
                pod_cidr=s.pods.pod_cidr,
                allocatable=allocatable,
                api=pod_client,
                reporter=reporter,
                events=events,
                images=images,
                clock=self.clock,
                timing=timing,
                caches=cache_manager,
                records=records,
                ips=ips,
            )
            for name in names
        ]
        self.pod_controllers = controllers
        self.pods = controllers[0]
        router = PodRouter(controllers)
        self.server.pods = router
        self.supervisor.start("status-reporter", reporter.run())
        self.supervisor.start("event-recorder", events.run())
        for pod_controller in controllers:
            self.supervisor.start(f"pods:{pod_controller.node_name}", pod_controller.run())
        # One watch for every node: by field selector for one node; for several, every bound Pod
        # (a field selector cannot name several nodes), routed by spec.nodeName.
        selector = f"spec.nodeName={names[0]}" if len(names) == 1 else "spec.nodeName!="
        self.supervisor.start(
            "pod-watch",
            list_watch(
                self.session,
                "/api/v1/pods",
                router,
                query={"fieldSelector": selector},
                what="pods",
                max_backoff=s.kube.max_backoff_seconds,
                known=router.tracks,  # its own status writes come back: not decoded
            ),
        )
        try:
            await asyncio.wait_for(router.synced.wait(), timeout=30)
        except TimeoutError:
            log.warning("pods not listed within 30 s; registering the nodes anyway")

        for name in names:
            node = NodeController(
                NodeClient(self.session), self._node_facts(name, port), self._node_timing(), self.clock
            )
            self.nodes.append(node)
            self.supervisor.start(f"node-heartbeat:{name}", node.run())
        self.node = self.nodes[0]

    async def _refuse_nodes_run_elsewhere(self) -> None:
        """A Node of ours whose kubelet endpoint says it runs that Node is run by another agent
        now (this one serves nothing yet): two agents on one Node would each run its Pods, and the
        one that stops last would leave it NotReady with its endpoint gone. One list of the virtual
        Nodes, and one question per endpoint they name (the Nodes of one agent share one)."""
        ours = set(node_names(self.settings.node))
        try:
            nodes = await NodeClient(self.session).list_nodes(f"type={VIRTUAL_KUBELET_TYPE}")
        except KubeError as exc:
            log.debug("could not list the virtual Nodes before starting (%s)", exc)
            return
        asked: dict[tuple[str, int], str] = {}
        for node in nodes:
            name = str((node.get("metadata") or {}).get("name") or "")
            endpoint = node_endpoint(node)
            if name in ours and endpoint[1] and endpoint not in asked:
                asked[endpoint] = name
        for (host, port), name in asked.items():
            if await agent_runs(host, port, name):
                raise StartupError(
                    f"node {name} is run by another vk-provider agent now (its kubelet endpoint {host}:{port} "
                    "says so): stop that agent first, or choose another --node-name"
                )

    async def _open_registry(self) -> None:
        db = self.settings.registry.db
        try:
            file = sqlite_file(db)
            # A mistyped --db is a new, empty registry: said at start, not found out in a report later.
            is_new = file is not None and not file.exists()
        except (ValueError, OSError):
            is_new = False  # opening it says what is wrong
        new = " (a new file: no caches or Pod starts from earlier runs)" if is_new else ""
        try:
            self.registry = await open_registry(database_url(db))
            await upgrade(self.registry.engine)
        except Exception as exc:
            raise StartupError(f"registry database {db}: {first_line(exc)}") from None
        log.info("registry database %s is at the newest schema%s", db, new)

    def _node_facts(self, name: str, port: int) -> NodeFacts:
        n = self.settings.node
        return NodeFacts(
            name=name,
            provider=n.provider,
            cpu=n.cpu,
            memory=n.memory,
            pods=n.pods,
            ephemeral_storage=n.ephemeral_storage,
            internal_ip=n.internal_ip,
            kubelet_port=port,
            labels=tuple(sorted(n.labels.items())),
            operating_system=n.operating_system,
            architecture=n.architecture,
            kubelet_version=n.kubelet_version,
            agent_version=__version__,
        )

    def _node_timing(self) -> NodeTiming:
        n = self.settings.node
        return NodeTiming(
            lease_duration_seconds=n.lease_duration_seconds,
            lease_renew_interval=n.lease_renew_interval_seconds,
            status_interval=n.status_update_interval_seconds,
            max_backoff=self.settings.kube.max_backoff_seconds,
            on_shutdown=n.on_shutdown,
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Start, run until ``stop`` is set or a critical task fails, then shut down in order."""
        try:
            await self.start()
            # What start-up made (modules, settings, the catalog, the session) lives as long as the
            # process: take it out of the cyclic collector's view, so full collections stay cheap.
            gc.freeze()
            stopper = asyncio.create_task(stop.wait(), name="wait-stop")
            failed = asyncio.create_task(self.supervisor.failed.wait(), name="wait-failure")
            try:
                await asyncio.wait({stopper, failed}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in (stopper, failed):
                    waiter.cancel()
                await asyncio.gather(stopper, failed, return_exceptions=True)
        finally:
            await self.shutdown()
        if self.supervisor.failure is not None:
            raise StartupError(f"agent stopped: {self.supervisor.failure}")

    async def shutdown(self) -> None:
        """Reverse start order: tasks stop, the Node is left NotReady (or deleted), then HTTP and the session."""
        log.info("shutting down")
        if self.records is not None:
            await self.records.flush(timeout=3.0)
        if self.cache_manager is not None:
            try:
                await asyncio.wait_for(self.cache_manager.flush_hits(show_expiries=False), timeout=3.0)
            except TimeoutError:
                log.warning("image cache matches were not recorded before shutdown")
        if self.events is not None:  # a moment for the Events waiting; those left are counted in the log
            await self.events.flush(timeout=1.0)
        await self.supervisor.stop()
        if self.images is not None:
            await self.images.close()
        if self.nodes:
            results = await asyncio.gather(
                *(asyncio.wait_for(node.shutdown(), timeout=3.0) for node in self.nodes), return_exceptions=True
            )
            for node, result in zip(self.nodes, results, strict=True):
                if isinstance(result, TimeoutError):
                    log.warning("node %s: shutdown update timed out", node.name)
        if self.server is not None:
            await self.server.stop()
        if self.registry is not None:
            await self.registry.close()
        await self.session.close()
        log.info("stopped")


async def _wait_for_api_server(session: KubeSession, timeout: float) -> str:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    client = NodeClient(session)
    delay = 0.25
    while True:
        remaining = deadline - loop.time()
        try:
            return await client.server_version(timeout=max(1.0, min(5.0, remaining)))
        except KubeError as exc:
            if exc.status in (401, 403):
                raise StartupError(
                    f"API server {session.host} refused our credentials ({exc.status} {exc.reason})"
                ) from None
            if loop.time() + delay > deadline:
                raise StartupError(f"cannot reach the API server at {session.host}: {exc.message}") from None
        await asyncio.sleep(delay)
        delay = min(delay * 2, 2.0)


async def run_agent(settings: Settings) -> None:
    """Run the agent until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        agent = await Agent.create(settings)
        await agent.run(stop)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
