"""``node.internal_ip: auto``: the container's own address, from $POD_IP or the default route."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vk_provider.config import ConfigError, load_settings
from vk_provider.netinfo import (
    DefaultRoute,
    FoundAddress,
    NoAddress,
    container_address,
    default_route,
    interface_ipv4,
)

HEADER = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT"


def hex_ip(address: str) -> str:
    return f"{struct.unpack('<I', socket.inet_aton(address))[0]:08X}"


def route(iface: str, dest: str, gateway: str, flags: int = 0x3, metric: int = 0, mask: str = "0.0.0.0") -> str:
    return f"{iface}\t{hex_ip(dest)}\t{hex_ip(gateway)}\t{flags:04X}\t0\t0\t{metric}\t{hex_ip(mask)}\t0\t0\t0"


# What `docker run --network kind` shows: the default route via kind's bridge, and the subnet.
KIND = "\n".join(
    [
        HEADER,
        route("eth0", "0.0.0.0", "172.18.0.1"),
        route("eth0", "172.18.0.0", "0.0.0.0", flags=0x1, mask="255.255.0.0"),
    ]
)


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        (KIND, DefaultRoute("eth0", "172.18.0.1")),
        # A Pod in kind (kindnet): the default route's gateway is the node's bridge.
        (HEADER + "\n" + route("eth0", "0.0.0.0", "10.244.1.1"), DefaultRoute("eth0", "10.244.1.1")),
        # No default route at all (network_mode: none, or only a subnet route).
        (HEADER + "\n" + route("eth0", "172.18.0.0", "0.0.0.0", flags=0x1, mask="255.255.0.0"), None),
        (HEADER, None),
        ("", None),
        # A default route that is down is not used.
        (HEADER + "\n" + route("eth0", "0.0.0.0", "172.18.0.1", flags=0x2), None),
        # Two default routes: the lower metric wins, whatever the order.
        (
            "\n".join([HEADER, route("eth1", "0.0.0.0", "10.0.0.1", metric=100), route("eth0", "0.0.0.0", "10.0.1.1")]),
            DefaultRoute("eth0", "10.0.1.1"),
        ),
        # A default route through a point-to-point device has no gateway.
        (HEADER + "\n" + route("wg0", "0.0.0.0", "0.0.0.0", flags=0x1), DefaultRoute("wg0", "0.0.0.0")),
        # Garbage lines are skipped, not fatal.
        (HEADER + "\nthis is not a route\neth0\tZZZ\t0\t3\t0\t0\t0\t0\n" + route("eth0", "0.0.0.0", "172.18.0.1"),
         DefaultRoute("eth0", "172.18.0.1")),
    ],
)  # fmt: skip
def test_default_route(table: str, expected: DefaultRoute | None) -> None:
    assert default_route(table) == expected


@given(
    gateway=st.ip_addresses(v=4).map(str),
    iface=st.from_regex(r"[a-z][a-z0-9]{0,14}", fullmatch=True),
    metric=st.integers(min_value=0, max_value=10_000),
)
def test_default_route_reads_back_what_the_kernel_writes(gateway: str, iface: str, metric: int) -> None:
    table = "\n".join(
        [
            HEADER,
            route("other", "10.0.0.0", "0.0.0.0", mask="255.0.0.0"),
            route(iface, "0.0.0.0", gateway, metric=metric),
        ]
    )
    assert default_route(table) == DefaultRoute(iface, gateway)


def test_interface_ipv4_of_loopback_and_of_a_missing_interface() -> None:
    assert interface_ipv4("lo") == "127.0.0.1"
    assert interface_ipv4("no-such-if0") is None


def write_table(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "route"
    path.write_text(text)
    return path


def test_pod_ip_wins_over_the_route_table(tmp_path: Path) -> None:
    table = write_table(tmp_path, KIND)
    assert container_address({"POD_IP": "10.244.0.7"}, table, lambda _: "172.18.0.5") == FoundAddress(
        "10.244.0.7", "$POD_IP"
    )
    assert container_address({"POD_IP": " fd00::7 "}, table) == FoundAddress("fd00::7", "$POD_IP")


def test_the_default_route_interface_when_there_is_no_pod_ip(tmp_path: Path) -> None:
    asked: list[str] = []

    def address_of(name: str) -> str:
        asked.append(name)
        return "172.18.0.5"

    table = write_table(tmp_path, KIND)
    assert container_address({"POD_IP": ""}, table, address_of) == FoundAddress(
        "172.18.0.5", "interface eth0 (default route)"
    )
    assert asked == ["eth0"]


@pytest.mark.parametrize(
    ("env", "table", "address", "problem"),
    [
        ({"POD_IP": "not-an-ip"}, KIND, "172.18.0.5", "$POD_IP is 'not-an-ip', which is not an IP address"),
        ({}, HEADER, "172.18.0.5", "has no IPv4 default route"),
        ({}, KIND, None, "eth0, the default route's interface, has no IPv4 address"),
        ({}, None, "172.18.0.5", "cannot be read"),
    ],
)
def test_problems_are_values_naming_the_cause(
    tmp_path: Path, env: dict[str, str], table: str | None, address: str | None, problem: str
) -> None:
    path = write_table(tmp_path, table) if table is not None else tmp_path / "missing"
    found = container_address(env, path, lambda _: address)
    assert isinstance(found, NoAddress)
    assert problem in found.problem


def test_settings_resolve_auto_from_pod_ip() -> None:
    env = {"VK_PROVIDER_NODE_INTERNAL_IP": "auto", "POD_IP": "10.244.0.7"}
    assert load_settings(env=env).node.internal_ip == "10.244.0.7"
    # An address given explicitly is kept as it is; POD_IP alone changes nothing.
    assert load_settings(env={"POD_IP": "10.244.0.7"}).node.internal_ip == "127.0.0.1"


def test_settings_auto_from_this_machine_is_an_address_or_a_clear_error() -> None:
    expected = container_address({})
    if isinstance(expected, FoundAddress):
        assert load_settings(env={"VK_PROVIDER_NODE_INTERNAL_IP": "auto"}).node.internal_ip == expected.address
    else:
        with pytest.raises(ConfigError, match=r"node.internal_ip is auto, but \$POD_IP is not set"):
            load_settings(env={"VK_PROVIDER_NODE_INTERNAL_IP": "auto"})


def test_settings_auto_with_a_bad_pod_ip_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"node.internal_ip is auto, but \$POD_IP is 'x'"):
        load_settings(env={"VK_PROVIDER_NODE_INTERNAL_IP": "auto", "POD_IP": "x"})
