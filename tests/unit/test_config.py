"""Settings: defaults < file < environment < flags, and clear errors."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

from vk_provider.config import ConfigError, Settings, load_settings


def test_defaults() -> None:
    s = load_settings(env={})
    assert s == Settings()
    assert s.node.name == "virtual-kubelet"
    assert s.node.provider == "alibabacloud"
    assert s.node.lease_duration_seconds == 40
    assert s.node.lease_renew_interval_seconds == 10
    assert s.node.status_update_interval_seconds == 60
    assert s.kubelet.port == 10250


def test_shipped_example_file_is_valid() -> None:
    s = load_settings(str(Path(__file__).parents[2] / "config" / "agent.yaml"), env={})
    assert s.node.name == "virtual-kubelet"
    assert s == load_settings(env={})  # the example spells out the defaults, not other values


def test_precedence_file_env_flags(tmp_path: Path) -> None:
    f = tmp_path / "a.yaml"
    f.write_text("node: {name: from-file, pods: 10, cpu: '8'}\nlog_level: DEBUG\n")
    s = load_settings(str(f), env={"VK_PROVIDER_NODE_PODS": "20", "VK_PROVIDER_NODE_NAME": "from-env"})
    assert (s.node.name, s.node.pods, s.node.cpu, s.log_level) == ("from-env", 20, "8", "DEBUG")
    s = load_settings(str(f), env={"VK_PROVIDER_NODE_NAME": "from-env"}, overrides={"node.name": "from-flag"})
    assert s.node.name == "from-flag"
    s = load_settings(str(f), env={}, overrides={"node.name": None})
    assert s.node.name == "from-file"


def test_the_migrations_older_database_variable_is_not_silently_ignored() -> None:
    both = {"VK_PROVIDER_DB": "/data/r.db", "VK_PROVIDER_REGISTRY_DB": "/data/r.db"}
    assert load_settings(env=both).registry.db == "/data/r.db"
    assert load_settings(env={"VK_PROVIDER_DB": "/data/r.db"}, overrides={"registry.db": "/data/r.db"})
    with pytest.raises(ConfigError, match=re.escape("VK_PROVIDER_DB='/data/r.db' is the migrations' older name")):
        load_settings(env={"VK_PROVIDER_DB": "/data/r.db"})


def test_a_group_named_in_the_environment_is_an_error_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match="environment variable VK_PROVIDER_NODE: node is a group of settings"):
        load_settings(config_file=None, env={"VK_PROVIDER_NODE": "x"})


def test_files_named_by_settings_must_exist_before_anything_connects(tmp_path: Path) -> None:
    there = tmp_path / "there.pem"
    there.write_text("x")
    for name, env in [
        ("images.catalog", {"VK_PROVIDER_IMAGES_CATALOG": str(tmp_path / "no.yaml")}),
        ("images.extra_catalogs[1]", {"VK_PROVIDER_IMAGES_EXTRA_CATALOGS": f"[{there}, {tmp_path / 'no.yaml'}]"}),
        ("kubelet.client_ca_file", {"VK_PROVIDER_KUBELET_CLIENT_CA_FILE": str(tmp_path / "ca.crt")}),
        ("kubelet.tls_key_file",
         {"VK_PROVIDER_KUBELET_TLS_CERT_FILE": str(there), "VK_PROVIDER_KUBELET_TLS_KEY_FILE": str(tmp_path / "k")}),
    ]:  # fmt: skip
        with pytest.raises(ConfigError, match=rf"setting {re.escape(name)} must name a file; there is none at"):
            load_settings(env=env)


@pytest.mark.parametrize("text", ["a.yaml, b.yaml", "[a.yaml, b.yaml]", "a.yaml,b.yaml,"])
def test_env_lists_plain_or_in_brackets(text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("a.yaml", "b.yaml"):
        (tmp_path / name).write_text("images: {}\n")
    s = load_settings(env={"VK_PROVIDER_IMAGES_EXTRA_CATALOGS": text})
    assert s.images.extra_catalogs == ["a.yaml", "b.yaml"]


def test_env_dict_and_bool_and_float() -> None:
    s = load_settings(
        env={
            "VK_PROVIDER_NODE_LABELS": "{zone: a, tier: '1'}",
            "VK_PROVIDER_KUBE_QPS": "5.5",
            "VK_PROVIDER_LOG_LEVEL": "warning",
            "VK_PROVIDER_TEST_SOMETHING": "ignored",
            "VK_PROVIDER_DB": "vk-provider.db",  # the migrations' older name: the same database, so no conflict
            # What Kubernetes sets in a namespace with a Service named vk-provider:
            "VK_PROVIDER_SERVICE_HOST": "10.96.0.10",
            "VK_PROVIDER_PORT": "tcp://10.96.0.10:443",
            "VK_PROVIDER_PORT_443_TCP_ADDR": "10.96.0.10",
        }
    )
    assert s.node.labels == {"zone": "a", "tier": "1"}
    assert s.kube.qps == 5.5
    assert s.log_level == "warning"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"VK_PROVIDER_NODE_PODS": "lots"}, "environment variable VK_PROVIDER_NODE_PODS: setting node.pods"),
        ({"VK_PROVIDER_NODE_ON_SHUTDOWN": "explode"}, "node.on_shutdown must be one of"),
        ({"VK_PROVIDER_KUBE_HTTP_CLIENT": "curl"}, "kube.http_client must be one of"),
        ({"VK_PROVIDER_NODE_CPU": "four"}, "node.cpu must be a Kubernetes quantity"),
        ({"VK_PROVIDER_NODE_INTERNAL_IP": "300.1.1.1"}, "node.internal_ip must be an IP address"),
        ({"VK_PROVIDER_NODE_LEASE_RENEW_INTERVAL_SECONDS": "60"}, "shorter than the lease duration"),
        ({"VK_PROVIDER_KUBELET_PORT": "70000"}, "kubelet.port"),
        ({"VK_PROVIDER_KUBELET_TLS_CERT_FILE": "/x.crt"}, "given together"),
        ({"VK_PROVIDER_LOG_LEVEL": "loud"}, "log_level"),
        ({"VK_PROVIDER_SIMULATION_SEED": "-5"}, "simulation.seed must be 0 or more, got -5"),
        ({"VK_PROVIDER_PODS_STATUS_SETTLE_SECONDS": "-1"}, "pods.status_settle_seconds must be between 0 and 10"),
        ({"VK_PROVIDER_KUBE_QPS": "nan"}, "kube.qps must be a finite number"),
        ({"VK_PROVIDER_CACHES_SWEEP_INTERVAL_SECONDS": "inf"}, "caches.sweep_interval_seconds must be a finite"),
        ({"VK_PROVIDER_PULL_TIME_SCALE": "-inf"}, "pull.time_scale must be a finite number"),
        ({"VK_PROVIDER_KUBE_MAX_BACKOFF_SECONDS": "-1"}, "kube.max_backoff_seconds must be positive"),
        ({"VK_PROVIDER_NODE_LABELS": "{'bad key!': x}"}, "node.labels has an invalid label 'bad key!': the key's name"),
        ({"VK_PROVIDER_NODE_LABELS": "{'Example.com/a': x}"}, "the key's prefix must be a lowercase DNS"),
        ({"VK_PROVIDER_NODE_LABELS": "{zone: 'a b'}"}, "node.labels has an invalid label 'zone': the value"),
        ({"VK_PROVIDER_KUBELET_BIND_ADDRESS": "not-an-ip"}, "kubelet.bind_address must be an IP address"),
        ({"VK_PROVIDER_NODE_NAMEX": "x"}, "environment variable VK_PROVIDER_NODE_NAMEX: unknown setting node.namex"),
        ({"VK_PROVIDER_NODENAME": "vk-1"}, "environment variable VK_PROVIDER_NODENAME: unknown setting nodename"),
        ({"VK_PROVIDER_LOGLEVEL": "DEBUG"}, "environment variable VK_PROVIDER_LOGLEVEL: unknown setting loglevel"),
        ({"VK_PROVIDER_IMAGE_UNKNOWN_IMAGES": "x"}, "VK_PROVIDER_IMAGE_UNKNOWN_IMAGES: unknown setting image_"),
    ],
)
def test_invalid_values_name_the_setting(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_settings(env=env)


def test_unknown_group_key_lists_known_ones(tmp_path: Path) -> None:
    f = tmp_path / "a.yaml"
    f.write_text("kubelet: {prot: 1}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(str(f), env={})
    assert "unknown setting kubelet.prot" in str(info.value)
    assert "port" in str(info.value)
    assert str(f) in str(info.value)


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    f = tmp_path / "a.yaml"
    f.write_text("")
    assert load_settings(str(f), env={}) == Settings()


def test_bool_from_yaml_is_not_a_number(tmp_path: Path) -> None:
    f = tmp_path / "a.yaml"
    f.write_text("node: {pods: true}\n")
    with pytest.raises(ConfigError, match="whole number"):
        load_settings(str(f), env={})


def test_valid_labels_and_addresses_pass() -> None:
    s = load_settings(
        env={
            "VK_PROVIDER_NODE_LABELS": "{example.com/zone: cn-hangzhou-b, tier: '', a_b.c-d: v.1_x}",
            "VK_PROVIDER_KUBELET_BIND_ADDRESS": "::",
        }
    )
    assert s.node.labels == {"example.com/zone": "cn-hangzhou-b", "tier": "", "a_b.c-d": "v.1_x"}
    assert s.kubelet.bind_address == "::"


def test_settings_file_that_is_not_utf8(tmp_path: Path) -> None:
    f = tmp_path / "a.yaml"
    f.write_bytes(b"node: {name: \xff\xfe}\n")
    with pytest.raises(ConfigError, match=f"settings file {f}: not UTF-8 text"):
        load_settings(str(f), env={})


def test_a_key_given_twice_is_an_error_not_the_last_one_silently(tmp_path: Path) -> None:
    f = tmp_path / "a.yaml"
    f.write_text("node:\n  name: vk-1\n  name: vk-2\n")
    with pytest.raises(ConfigError, match=f"settings file {f} line 3: the key 'name' is given twice in one mapping"):
        load_settings(str(f), env={})
    f.write_text("base: &b {cpu: '8'}\nnode:\n  <<: *b\n  name: vk-1\n")  # a merge key is no repeat
    with pytest.raises(ConfigError, match="unknown setting base"):
        load_settings(str(f), env={})
    f.write_text("node: {name: vk-1}\nkube: {name: x}\n")  # the same key in two mappings is fine
    with pytest.raises(ConfigError, match=r"unknown setting kube\.name"):
        load_settings(str(f), env={})


def _setting_names(cls: type, prefix: str = "") -> set[str]:
    names: set[str] = set()
    for f in dataclasses.fields(cls):
        kind = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(kind):
            names |= _setting_names(kind, f"{prefix}{f.name}.")  # type: ignore[arg-type]
        else:
            names.add(prefix + f.name)
    return names


def _file_names(data: dict[str, Any], prefix: str = "") -> set[str]:
    names: set[str] = set()
    for key, value in data.items():
        if isinstance(value, dict) and value and prefix == "":
            names |= _file_names(value, f"{key}.")
        else:
            names.add(prefix + key)
    return names


def test_example_file_spells_out_every_setting() -> None:
    data = yaml.safe_load((Path(__file__).parents[2] / "config" / "agent.yaml").read_text())
    missing = _setting_names(Settings) - _file_names(data)
    assert not missing, f"config/agent.yaml does not document: {sorted(missing)}"
