"""Settings: grouped, documented, frozen.

Precedence, lowest first: built-in defaults < the YAML settings file (``--config``) < environment
variables (``VK_PROVIDER_<GROUP>_<FIELD>``, e.g. ``VK_PROVIDER_NODE_NAME``) < command-line flags.
Every field below is documented where it is declared; ``config/agent.yaml`` is the annotated example.

This module parses and validates only. A problem is raised as :class:`ConfigError` with a one-line
message that names the file or variable and the setting, so the command line can print it as is.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from vk_provider import netinfo
from vk_provider.domain.labels import label_problem
from vk_provider.domain.pullmodel import PullSettings
from vk_provider.yamlfile import YamlFileError, read_yaml

ENV_PREFIX = "VK_PROVIDER_"
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_DNS_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class ConfigError(Exception):
    """A settings problem, with a message fit to print on one line."""


@dataclass(frozen=True)
class KubeSettings:
    """How the agent talks to the API server."""

    # Path of a kubeconfig. Empty: in-cluster config, then $KUBECONFIG, then ~/.kube/config.
    kubeconfig: str = ""
    # Client-side rate limit, like the kubelet's kubeAPIQPS / kubeAPIBurst. 0 disables it.
    qps: float = 50.0
    burst: int = 100
    # How long `run` keeps trying to reach the API server at start before it gives up.
    startup_timeout_seconds: float = 10.0
    # Timeout of one ordinary API request.
    request_timeout_seconds: float = 30.0
    # Longest pause between retries after API errors (back-off doubles up to this).
    max_backoff_seconds: float = 10.0
    # How ordinary requests travel: "builtin", the agent's own HTTP/1.1 connections (half the CPU
    # per request), or "aiohttp". Watches, and everything through a proxy, always use aiohttp.
    http_client: Literal["builtin", "aiohttp"] = "builtin"


@dataclass(frozen=True)
class NodeSettings:
    """The virtual Node this agent registers and keeps Ready."""

    name: str = "virtual-kubelet"
    # How many virtual nodes this agent runs. 1: one node called `name`; N > 1: nodes
    # `<name>-0` ... `<name>-<N-1>`, each with its own Node, Lease and Pods, sharing one registry,
    # one pull simulator (so one registry-wide bandwidth) and one Pod watch.
    count: int = 1
    # Provider in the taint virtual-kubelet.io/provider=<provider>:NoSchedule.
    provider: str = "alibabacloud"
    # Capacity (= allocatable) advertised by the Node.
    cpu: str = "1000"
    memory: str = "4Ti"
    pods: int = 1000
    ephemeral_storage: str = "10Ti"
    # Extra labels on the Node, on top of type, kubernetes.io/role and kubernetes.io/hostname.
    labels: dict[str, str] = field(default_factory=dict)
    # Address advertised as the Node's InternalIP; the API server reaches the kubelet endpoint here.
    # "auto" (for containers): $POD_IP, else the default route's interface address (vk_provider.netinfo).
    internal_ip: str = "127.0.0.1"
    # Lease in kube-node-lease: its duration, and how often it is renewed.
    lease_duration_seconds: int = 40
    lease_renew_interval_seconds: float = 10.0
    # The full NodeStatus is written at least this often.
    status_update_interval_seconds: float = 60.0
    # On shutdown: mark the Node NotReady ("not-ready") or delete it ("delete").
    on_shutdown: Literal["not-ready", "delete"] = "not-ready"
    # nodeInfo fields.
    operating_system: str = "linux"
    architecture: str = "amd64"
    kubelet_version: str = "v1.20.2-vk-provider"


def node_names(node: NodeSettings) -> list[str]:
    """The names of the agent's nodes (see ``NodeSettings.count``)."""
    if node.count == 1:
        return [node.name]
    return [f"{node.name}-{i}" for i in range(node.count)]


@dataclass(frozen=True)
class KubeletSettings:
    """The kubelet-style HTTPS endpoint (logs, pods, health, metrics)."""

    bind_address: str = "0.0.0.0"
    # 0 picks a free port; the bound port is what the Node advertises.
    port: int = 10250
    # A serving certificate and key you provide (PEM). Empty: a self-signed pair is generated.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # Where generated certificates are kept.
    cert_dir: str = "vk-provider-certs"
    # CA that signs the client certificates we accept (the API server's kubelet client).
    # Empty: the cluster CA from the kubeconfig or the in-cluster service account.
    client_ca_file: str = ""


@dataclass(frozen=True)
class RegistrySettings:
    """The cache registry database."""

    # A file path (SQLite) or any SQLAlchemy URL.
    db: str = "vk-provider.db"


@dataclass(frozen=True)
class PodSettings:
    """How the node runs Pods."""

    # Pod IPs are handed out from this range, unique among the node's Pods.
    pod_cidr: str = "10.234.0.0/16"
    # Concurrent Pod status writers.
    status_writers: int = 8
    # A status waits this long (real seconds) before it is written, so that a Pod passing through
    # several states at once (zero simulated delays) costs one write, not one per state.
    status_settle_seconds: float = 0.05


@dataclass(frozen=True)
class ImageSettings:
    """Where image manifests come from."""

    # The shipped catalog; empty: config/images.yaml of this checkout, if present.
    catalog: str = ""
    # Your own catalog files (same format), read after the shipped one; later entries win.
    extra_catalogs: list[str] = field(default_factory=list)
    # An image in no catalog: "synthetic" (a deterministic made-up size), "fail" (ErrImagePull), or
    # "registry" (its real manifest read from its OCI registry, stored in the registry database).
    unknown_images: Literal["synthetic", "fail", "registry"] = "synthetic"
    # Registries reached over plain http (host or host:port); localhost and 127.0.0.1 always are.
    insecure_registries: list[str] = field(default_factory=list)
    # Timeout of one request to an image registry.
    registry_timeout_seconds: float = 30.0


@dataclass(frozen=True)
class CacheSettings:
    """ImageCache objects (the CRD), their builds, quotas and Pod-side matching."""

    # Install config/crd-imagecache.yaml on start when the cluster lacks the CRD.
    install_crd: bool = True
    # Automatic matching for Pods that set neither k8s.aliyun.com/eci-auto-imc nor eci-image-cache.
    default_auto_match: bool = False
    # Most manual caches; one more fails with QuotaFull, unless lru_for_manual evicts the least recently used.
    manual_quota: int = 100
    lru_for_manual: bool = False
    # Most automatic caches; at the quota the least recently used automatic cache is evicted.
    automatic_quota: int = 100
    # How often expired caches are looked for and deleted (seconds).
    sweep_interval_seconds: float = 60.0
    # Simulated seconds of a build's snapshot step, after its images are pulled (pull.time_scale applies).
    snapshot_seconds: float = 5.0
    # Agents sharing one registry elect a leader (holder of a Lease), which alone builds caches, writes
    # their status, deletes expired ones and enforces quotas; every agent matches Pods against every
    # cache. auto (= always): agents on one cluster elect one builder, whatever their registries; never.
    leader_election: Literal["auto", "always", "never"] = "auto"
    # The election's Lease. kube-system: a namespace every cluster has (RBAC: get, create, update leases).
    leader_lease: str = "vk-provider-imagecaches"
    leader_namespace: str = "kube-system"
    # A leader renews every leader_renew_interval_seconds and steps down when it could not for 2/3 of
    # the duration; another agent takes over once the Lease went unrenewed for the duration.
    leader_lease_duration_seconds: int = 15
    leader_renew_interval_seconds: float = 5.0


@dataclass(frozen=True)
class SimulationSettings:
    # Seed of the random generator behind jitter and injected failures.
    seed: int = 0


@dataclass(frozen=True)
class Settings:
    """All settings of one agent."""

    kube: KubeSettings = field(default_factory=KubeSettings)
    node: NodeSettings = field(default_factory=NodeSettings)
    kubelet: KubeletSettings = field(default_factory=KubeletSettings)
    registry: RegistrySettings = field(default_factory=RegistrySettings)
    pods: PodSettings = field(default_factory=PodSettings)
    images: ImageSettings = field(default_factory=ImageSettings)
    # The pull model: every number documented in docs/pull-model.md (time_scale included).
    pull: PullSettings = field(default_factory=PullSettings)
    caches: CacheSettings = field(default_factory=CacheSettings)
    simulation: SimulationSettings = field(default_factory=SimulationSettings)
    # Python logging level name.
    log_level: str = "INFO"


# Command-line flags map to these dotted names.
FLAG_FIELDS = {
    "kubeconfig": "kube.kubeconfig",
    "node_name": "node.name",
    "db": "registry.db",
    "log_level": "log_level",
}


def load_settings(
    config_file: str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build :class:`Settings` from defaults, a YAML file, the environment and flag overrides.

    ``overrides`` maps dotted names (``node.name``) to values; ``None`` values are ignored.
    """
    environment = os.environ if env is None else env
    raw: dict[str, Any] = {}
    if config_file:
        raw = _read_yaml(config_file)
    merged = _merge(raw, _from_env(environment))
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(merged, dotted, value)
    settings: Settings = _build(Settings, merged, source=config_file or "settings")
    settings = _resolve_internal_ip(settings, environment)
    _validate(settings)
    older = environment.get(f"{ENV_PREFIX}DB")
    if older is not None and older != settings.registry.db:
        # Not silently ignored: whoever set it meant the agent's database.
        raise ConfigError(
            f"environment variable {ENV_PREFIX}DB={older!r} is the migrations' older name for the database, but the "
            f"agent's registry.db is {settings.registry.db!r}: set {ENV_PREFIX}REGISTRY_DB (or --db) instead"
        )
    return settings


def _resolve_internal_ip(settings: Settings, env: Mapping[str, str]) -> Settings:
    # Resolved here, once, so that everything downstream (the Node's address, the serving
    # certificate's SAN, the Pods' hostIP) sees one concrete address.
    if settings.node.internal_ip != netinfo.AUTO:
        return settings
    found = netinfo.container_address(env)
    if isinstance(found, netinfo.NoAddress):
        raise ConfigError(f"setting node.internal_ip is auto, but {found.problem}; set an address instead")
    return dataclasses.replace(settings, node=dataclasses.replace(settings.node, internal_ip=found.address))


def _read_yaml(path: str) -> dict[str, Any]:
    try:
        data = read_yaml(path, "settings file")
    except YamlFileError as exc:
        raise ConfigError(str(exc)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"settings file {path}: expected a mapping of setting groups, got {type(data).__name__}")
    return data


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    groups = {f.name: f for f in dataclasses.fields(Settings)}
    for key, value in env.items():
        if not key.startswith(ENV_PREFIX):
            continue
        rest = key[len(ENV_PREFIX) :].lower()
        if rest in groups and not dataclasses.is_dataclass(_field_type(Settings, rest)):
            out[rest] = _EnvValue(key, value)
            continue
        if rest in groups:
            raise ConfigError(
                f"environment variable {key}: {rest} is a group of settings; set one of them, "
                f"e.g. {key}_{next(f.name for f in dataclasses.fields(_field_type(Settings, rest))).upper()}"
            )
        group, _, name = rest.partition("_")
        if group in groups and name:
            out.setdefault(group, {})[name] = _EnvValue(key, value)
        elif rest not in _OTHER_ENV and not rest.startswith(_OTHER_ENV_PREFIXES):
            out[rest] = _EnvValue(key, value)  # a mistyped group: reported as an unknown setting
    return out


# VK_PROVIDER_* variables that are not settings: the migrations' older name for the database,
# VK_PROVIDER_TEST_* (the test suite's), and the ones Kubernetes puts in every container of a
# namespace with a Service named vk-provider (VK_PROVIDER_SERVICE_HOST, VK_PROVIDER_PORT_443_TCP...).
_OTHER_ENV = frozenset({"db", "port"})
_OTHER_ENV_PREFIXES = ("test_", "service_", "port_")


@dataclass(frozen=True)
class _EnvValue:
    """A value from the environment: a string to coerce, and the variable to name in errors."""

    variable: str
    text: str


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _set_dotted(target: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for part in parts[:-1]:
        target = target.setdefault(part, {})
    target[parts[-1]] = value


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _build(cls: type, data: Any, source: str, prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'settings'} must be a mapping")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        value = data[unknown[0]]
        if isinstance(value, _EnvValue):  # a typo in a variable's name, not in the file
            source = f"environment variable {value.variable}"
        raise ConfigError(
            f"{source}: unknown setting {prefix}{unknown[0]} (known in {prefix.rstrip('.') or 'top level'}: "
            f"{', '.join(sorted(known))})"
        )
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            kwargs[name] = _build(kind, value, source, f"{prefix}{name}.")  # type: ignore[arg-type]
        else:
            kwargs[name] = _coerce(kind, value, source, f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(kind: Any, value: Any, source: str, name: str) -> Any:
    where = source
    if isinstance(value, _EnvValue):
        where, value = f"environment variable {value.variable}", _parse_env_text(kind, value.text)
    origin = typing.get_origin(kind)
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            raise TypeError("true or false")
        if kind is int:
            if isinstance(value, bool) or not isinstance(value, int | str):
                raise TypeError("a whole number")
            return int(value)
        if kind is float:
            if isinstance(value, bool) or not isinstance(value, int | float | str):
                raise TypeError("a number")
            number = float(value)
            if not math.isfinite(number):  # nan, inf: no setting means "never" or "unlimited" that way
                raise TypeError("a finite number")
            return number
        if kind is str:
            if isinstance(value, bool) or not isinstance(value, str | int | float):
                raise TypeError("a string")
            return str(value)
        if origin is Literal:
            choices = typing.get_args(kind)
            if value not in choices:
                raise TypeError("one of " + ", ".join(repr(c) for c in choices))
            return value
        if origin is list:
            if isinstance(value, str) and value.strip().startswith("["):
                try:  # the YAML form, as in the settings file: [a, b]
                    value = yaml.safe_load(value)
                except yaml.YAMLError:
                    raise TypeError("a list of strings (a, b or [a, b])") from None
            elif isinstance(value, str):
                value = [v for v in value.split(",") if v.strip()]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise TypeError("a list of strings")
            return [v.strip() for v in value]
        if origin is dict:
            if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, str | int | float) and not isinstance(v, bool)
                for k, v in value.items()
            ):
                raise TypeError("a mapping of strings to strings")
            return {k: str(v) for k, v in value.items()}
        if origin in (typing.Union, types.UnionType):
            raise TypeError("unsupported")  # pragma: no cover - no optional fields yet
    except (TypeError, ValueError) as exc:
        expected = exc.args[0] if isinstance(exc, TypeError) else _EXPECTED.get(kind, "a valid value")
        raise ConfigError(f"{where}: setting {name} must be {expected}, got {value!r}") from None
    raise ConfigError(f"{where}: setting {name} has an unsupported type")  # pragma: no cover


_EXPECTED: dict[Any, str] = {int: "a whole number", float: "a number", bool: "true or false"}


def _parse_env_text(kind: Any, text: str) -> Any:
    if typing.get_origin(kind) is dict:
        try:
            return yaml.safe_load(text) or {}
        except yaml.YAMLError:
            return text
    return text


def _validate(s: Settings) -> None:
    def bad(name: str, why: str) -> ConfigError:
        return ConfigError(f"setting {name} {why}")

    if not _DNS_NAME.match(s.node.name) or len(s.node.name) > 253:
        raise bad("node.name", f"must be a lowercase DNS name, got {s.node.name!r}")
    for name, quantity in (
        ("node.cpu", s.node.cpu),
        ("node.memory", s.node.memory),
        ("node.ephemeral_storage", s.node.ephemeral_storage),
    ):
        if not _QUANTITY.match(quantity):
            raise bad(name, f"must be a Kubernetes quantity such as 4, 500m or 16Gi, got {quantity!r}")
    if not 1 <= s.node.count <= 10000:
        raise bad("node.count", f"must be between 1 and 10000, got {s.node.count}")
    if s.node.count > 1 and len(f"{s.node.name}-{s.node.count - 1}") > 253:
        raise bad("node.name", "is too long for numbered node names")
    if s.node.pods < 1:
        raise bad("node.pods", "must be at least 1")
    for key, value in s.node.labels.items():
        problem = label_problem(key, value)
        if problem:
            raise bad("node.labels", f"has an invalid label {key!r}: {problem}")
    try:
        ipaddress.ip_address(s.node.internal_ip)
    except ValueError:
        raise bad("node.internal_ip", f"must be an IP address or auto, got {s.node.internal_ip!r}") from None
    if s.node.lease_duration_seconds < 1:
        raise bad("node.lease_duration_seconds", "must be at least 1")
    if not 0 < s.node.lease_renew_interval_seconds < s.node.lease_duration_seconds:
        raise bad("node.lease_renew_interval_seconds", "must be positive and shorter than the lease duration")
    if s.node.status_update_interval_seconds <= 0:
        raise bad("node.status_update_interval_seconds", "must be positive")
    try:
        ipaddress.ip_address(s.kubelet.bind_address)
    except ValueError:
        raise bad("kubelet.bind_address", f"must be an IP address (0.0.0.0 or :: for all), got "
                  f"{s.kubelet.bind_address!r}") from None  # fmt: skip
    if not 0 <= s.kubelet.port <= 65535:
        raise bad("kubelet.port", f"must be a TCP port (0 picks a free one), got {s.kubelet.port}")
    if bool(s.kubelet.tls_cert_file) != bool(s.kubelet.tls_key_file):
        raise bad("kubelet.tls_cert_file", "and kubelet.tls_key_file must be given together")
    if s.simulation.seed < 0:
        raise bad("simulation.seed", f"must be 0 or more, got {s.simulation.seed}")
    # Files the agent reads once connected: a wrong path is a settings error, said before connecting.
    named_files = [
        ("images.catalog", s.images.catalog),
        *((f"images.extra_catalogs[{i}]", path) for i, path in enumerate(s.images.extra_catalogs)),
        ("kubelet.tls_cert_file", s.kubelet.tls_cert_file),
        ("kubelet.tls_key_file", s.kubelet.tls_key_file),
        ("kubelet.client_ca_file", s.kubelet.client_ca_file),
    ]
    for name, path in named_files:
        if path and not Path(path).is_file():
            raise bad(name, f"must name a file; there is none at {path!r}")
    if s.kube.qps < 0 or s.kube.burst < 1:
        raise bad("kube.qps", "must be >= 0 and kube.burst >= 1")
    if s.kube.startup_timeout_seconds < 0 or s.kube.request_timeout_seconds <= 0:
        raise bad("kube.startup_timeout_seconds", "and kube.request_timeout_seconds must be positive")
    if s.kube.max_backoff_seconds <= 0:
        raise bad("kube.max_backoff_seconds", f"must be positive, got {s.kube.max_backoff_seconds}")
    if s.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise bad("log_level", f"must be DEBUG, INFO, WARNING or ERROR, got {s.log_level!r}")
    from vk_provider.registry.engine import db_problem

    db_refused = db_problem(s.registry.db)
    if db_refused is not None:
        raise bad("registry.db", f"{db_refused} (got {s.registry.db!r})" if s.registry.db else db_refused)
    try:
        ipaddress.ip_network(s.pods.pod_cidr, strict=False)
    except ValueError:
        raise bad("pods.pod_cidr", f"must be a CIDR such as 10.234.0.0/16, got {s.pods.pod_cidr!r}") from None
    if s.pods.status_writers < 1:
        raise bad("pods.status_writers", "must be at least 1")
    if not 0 <= s.pods.status_settle_seconds <= 10:
        raise bad("pods.status_settle_seconds", "must be between 0 and 10")
    if s.images.registry_timeout_seconds <= 0:
        raise bad("images.registry_timeout_seconds", "must be positive")
    if s.caches.manual_quota < 0 or s.caches.automatic_quota < 0:
        raise bad("caches.manual_quota", "and caches.automatic_quota must be zero or more")
    if s.caches.sweep_interval_seconds <= 0 or s.caches.snapshot_seconds < 0:
        raise bad("caches.sweep_interval_seconds", "must be positive and caches.snapshot_seconds not negative")
    if not _DNS_NAME.match(s.caches.leader_lease) or len(s.caches.leader_lease) > 253:
        raise bad("caches.leader_lease", f"must be a lowercase DNS name, got {s.caches.leader_lease!r}")
    if not _DNS_NAME.match(s.caches.leader_namespace) or "." in s.caches.leader_namespace:
        raise bad("caches.leader_namespace", f"must be a namespace name, got {s.caches.leader_namespace!r}")
    if s.caches.leader_lease_duration_seconds < 3:
        raise bad("caches.leader_lease_duration_seconds", "must be at least 3")
    if not 0 < s.caches.leader_renew_interval_seconds < s.caches.leader_lease_duration_seconds * 2 / 3:
        raise bad("caches.leader_renew_interval_seconds", "must be positive and shorter than 2/3 of the lease duration")
    problems = s.pull.problems()
    if problems:
        raise ConfigError(f"setting pull.{problems[0]}")
