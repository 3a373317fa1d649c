"""Pod IP addresses from the node's CIDR: unique while in use, re-usable after release.

PURE (no I/O); the pool remembers which addresses it handed out.
"""

from __future__ import annotations

import ipaddress


class PoolExhausted(Exception):
    pass


class IpPool:
    def __init__(self, cidr: str) -> None:
        self._net = ipaddress.ip_network(cidr, strict=False)
        self._used: set[str] = set()
        self._next = 0
        # Skip the network address and (for IPv4 subnets larger than /31) the broadcast address.
        self._size = self._net.num_addresses

    def _candidate(self, offset: int) -> str:
        return str(self._net.network_address + offset)

    def reserve(self, ip: str) -> None:
        if ip and ipaddress.ip_address(ip) in self._net:
            self._used.add(ip)

    def allocate(self) -> str:
        for _ in range(self._size):
            self._next = (self._next + 1) % self._size
            if self._next == 0 or (self._net.version == 4 and self._size > 2 and self._next == self._size - 1):
                continue
            ip = self._candidate(self._next)
            if ip not in self._used:
                self._used.add(ip)
                return ip
        raise PoolExhausted(f"no free Pod IP left in {self._net}")

    def release(self, ip: str) -> None:
        self._used.discard(ip)

    def __len__(self) -> int:
        return len(self._used)
