"""The address a containerised agent advertises as its Node's InternalIP (``node.internal_ip: auto``).

The API server reaches the kubelet endpoint (``kubectl logs``) at the Node's InternalIP, so in a
container it must be the container's own address, which is only known at start. In order:

1. ``$POD_IP``, which a Deployment sets from the Downward API (``status.podIP``);
2. the IPv4 address of the interface that carries the default route (``/proc/net/route``), which
   in a Compose container joined to kind's network is the container's address on that network.

Owns this lookup only. Nothing is sent on the network, and nothing here raises for a missing
address: the answer is a :class:`FoundAddress` or a :class:`NoAddress` naming the problem.
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

AUTO = "auto"
POD_IP_ENV = "POD_IP"
ROUTE_TABLE = Path("/proc/net/route")

_RTF_UP = 0x1
_SIOCGIFADDR = 0x8915  # linux/sockios.h


@dataclass(frozen=True)
class FoundAddress:
    address: str
    # Where it came from, for messages: "$POD_IP" or "interface eth0 (default route)".
    source: str


@dataclass(frozen=True)
class NoAddress:
    problem: str


AddressLookup = FoundAddress | NoAddress


@dataclass(frozen=True)
class DefaultRoute:
    interface: str
    gateway: str


def default_route(table: str) -> DefaultRoute | None:
    """The first IPv4 default route that is up, from the text of ``/proc/net/route``.

    Lines are ``Iface Destination Gateway Flags RefCnt Use Metric Mask ...`` with addresses as
    little-endian hex; the first line is a header. Among several default routes the lowest metric
    wins, as in the kernel.
    """
    best: tuple[int, DefaultRoute] | None = None
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        iface, destination, gateway, flags, metric, mask = (
            fields[0], fields[1], fields[2], fields[3], fields[6], fields[7],
        )  # fmt: skip
        try:
            up = int(flags, 16) & _RTF_UP
            is_default = int(destination, 16) == 0 and int(mask, 16) == 0
            route = DefaultRoute(iface, _hex_to_ipv4(gateway))
            rank = int(metric)
        except ValueError:
            continue
        if up and is_default and (best is None or rank < best[0]):
            best = (rank, route)
    return best[1] if best else None


def _hex_to_ipv4(text: str) -> str:
    value = int(text, 16)
    if not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(text)
    return socket.inet_ntoa(struct.pack("<I", value))


def interface_ipv4(name: str) -> str | None:
    """The primary IPv4 address of a network interface, or None if it has none (Linux only)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            answer = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
        except OSError:
            return None
    return socket.inet_ntoa(answer[20:24])


def container_address(
    env: Mapping[str, str],
    route_table: Path = ROUTE_TABLE,
    address_of: Callable[[str], str | None] = interface_ipv4,
) -> AddressLookup:
    """This container's own address: ``$POD_IP`` if set, else the default route's interface address."""
    pod_ip = env.get(POD_IP_ENV, "").strip()
    if pod_ip:
        try:
            ipaddress.ip_address(pod_ip)
        except ValueError:
            return NoAddress(f"${POD_IP_ENV} is {pod_ip!r}, which is not an IP address")
        return FoundAddress(pod_ip, f"${POD_IP_ENV}")
    try:
        table = route_table.read_text(encoding="ascii", errors="replace")
    except OSError as exc:
        return NoAddress(f"${POD_IP_ENV} is not set and {route_table} cannot be read ({exc.strerror or exc})")
    route = default_route(table)
    if route is None:
        return NoAddress(f"${POD_IP_ENV} is not set and {route_table} has no IPv4 default route")
    address = address_of(route.interface)
    if address is None:
        return NoAddress(
            f"${POD_IP_ENV} is not set and {route.interface}, the default route's interface, has no IPv4 address"
        )
    return FoundAddress(address, f"interface {route.interface} (default route)")
