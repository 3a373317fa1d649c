"""Leader election on a Lease, as client-go's ``leaderelection`` does it, on the injected clock.

Several agents may run on one cluster, sharing its ImageCache objects (cluster-scoped), with one
registry (a PostgreSQL database) or each its own (a SQLite file). Every one of them watches the
objects and resolves Pods against every cache, but only one, the leader, builds caches, writes
their status, deletes expired ones and enforces quotas: two agents acting on the same objects
would each build a cache and overwrite the other's status, many times a second.
The leader is whoever holds the Lease (``coordination.k8s.io/v1``, ``kube-system`` by default:
a namespace every cluster has, where control-plane components keep their own election Leases).

The rules are client-go's:

- a candidate takes the Lease when it does not exist, when its holder is empty (released), or
  when the holder has not renewed it for ``leaseDurationSeconds`` *as observed on our own
  clock* (the time we last saw the record change; the holder's ``renewTime`` would need the two
  machines' clocks to agree). So an agent started after its predecessor was killed (not
  stopped: that releases the Lease) follows for up to a lease duration before it leads;
- every write carries the resourceVersion that was read, so of two candidates in one round only
  one wins (the other gets a conflict and stays a follower);
- the leader renews every ``renew_interval_seconds``; when it has not renewed successfully for
  ``renew_deadline_seconds`` (shorter than the lease duration) it steps down, before anyone else
  can take over, so there is never a moment with two leaders acting;
- on a clean shutdown the leader steps down and releases the Lease (empty holder), so another
  agent takes over at its next try rather than after the lease duration.

It owns only the election. What leadership means is the ``on_change`` callback's business
(``ImageCacheController.leadership_changed``). It does not talk HTTP itself: ``LeaseApi`` does
(``kube.leases.LeaseClient``).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Protocol, TypeVar

from vk_provider.controllers.clock import Clock

log = logging.getLogger(__name__)

JSON = dict[str, Any]
_T = TypeVar("_T")

ElectionMode = Literal["auto", "always", "never"]


class LeaseApi(Protocol):
    """Lease objects on the API server (``kube.leases.LeaseClient``).

    Every method raises an exception with ``is_conflict`` / ``is_already_exists`` attributes
    (``KubeError``) on failure; none retries by itself.
    """

    async def get(self, namespace: str, name: str) -> JSON | None:
        """The Lease object, or None if there is none."""
        ...

    async def create(self, namespace: str, name: str, spec: JSON) -> JSON:
        """Create it with this spec; fails (409) if it exists."""
        ...

    async def update(self, namespace: str, name: str, spec: JSON, resource_version: str) -> JSON:
        """Replace its spec if it is still at ``resource_version``; fails (409) otherwise."""
        ...


@dataclass(frozen=True, slots=True)
class LeaderTiming:
    """client-go's defaults for control-plane components, renewing every 5 s."""

    lease_duration_seconds: int = 15
    renew_interval_seconds: float = 5.0
    # A leader that could not renew for this long steps down; shorter than the lease duration,
    # so it has stopped before any candidate may take the Lease.
    renew_deadline_seconds: float = 10.0
    # How often a follower tries to take the Lease (and a leader retries a failed renewal).
    retry_interval_seconds: float = 2.0

    @classmethod
    def for_lease(cls, duration_seconds: int, renew_interval_seconds: float) -> LeaderTiming:
        """client-go's proportions (15 s lease, 10 s deadline, 2 s retries) for another duration."""
        return cls(
            lease_duration_seconds=duration_seconds,
            renew_interval_seconds=renew_interval_seconds,
            renew_deadline_seconds=duration_seconds * 2 / 3,
            retry_interval_seconds=min(2.0, renew_interval_seconds),
        )

    def problems(self) -> tuple[str, ...]:
        out = []
        if self.lease_duration_seconds < 1:
            out.append("the lease duration must be at least 1 s")
        if not 0 < self.renew_interval_seconds < self.renew_deadline_seconds < self.lease_duration_seconds:
            out.append("must have 0 < renew interval < renew deadline < lease duration")
        if self.retry_interval_seconds <= 0:
            out.append("the retry interval must be positive")
        return tuple(out)


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """What a Lease says about its holder (``spec``)."""

    holder: str
    duration_seconds: int
    acquire_time: str
    renew_time: str
    transitions: int


def election_wanted(mode: ElectionMode) -> bool:
    """Whether the agent must win an election before it acts on ImageCaches.

    ``auto`` and ``always``: yes, whatever its registry (agents with a SQLite file each, on one
    cluster, would otherwise fight over the objects); ``never``: it always leads (one agent per
    cluster, and no Lease in ``kube-system`` to take).
    """
    return mode != "never"


def leader_identity(node_name: str, rng: random.Random) -> str:
    """The holder identity: the node name and a random suffix (two runs of one node differ)."""
    return f"{node_name}_{rng.getrandbits(32):08x}"


def micro_time(moment: datetime) -> str:
    """A ``MicroTime`` (RFC 3339 with microseconds, UTC), as Lease times are written."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_record(lease: JSON) -> LeaseRecord:
    spec = lease.get("spec") or {}
    return LeaseRecord(
        holder=str(spec.get("holderIdentity") or ""),
        duration_seconds=int(spec.get("leaseDurationSeconds") or 0),
        acquire_time=str(spec.get("acquireTime") or ""),
        renew_time=str(spec.get("renewTime") or ""),
        transitions=int(spec.get("leaseTransitions") or 0),
    )


def lease_spec(record: LeaseRecord) -> JSON:
    return {
        "holderIdentity": record.holder,
        "leaseDurationSeconds": record.duration_seconds,
        "acquireTime": record.acquire_time,
        "renewTime": record.renew_time,
        "leaseTransitions": record.transitions,
    }


class _RoundTimeout(Exception):
    """A call to the API server did not answer before the round's deadline."""


class LeaderElector:
    """Campaigns for the Lease ``namespace/name`` under ``identity``; see the module docstring.

    ``is_leader`` is true from the moment the Lease was won until the moment leadership is given
    up; ``on_change(True/False)`` is awaited on every change, before the elector goes on (so the
    controller has started, or stopped, acting before the next renewal). ``run()`` campaigns
    until cancelled, then steps down and releases the Lease.
    """

    def __init__(
        self,
        api: LeaseApi,
        *,
        identity: str,
        clock: Clock,
        namespace: str,
        name: str,
        timing: LeaderTiming = LeaderTiming(),
        on_change: Callable[[bool], Awaitable[None]] | None = None,
    ) -> None:
        self.api = api
        self.identity = identity
        self.clock = clock
        self.namespace = namespace
        self.name = name
        self.timing = timing
        self.on_change = on_change
        self._leading = False
        self._observed: LeaseRecord | None = None
        self._observed_at = 0.0
        self._resource_version = ""
        self._last_renew = 0.0
        self.transitions = 0  # how many times this elector became leader
        self._forbidden_told = False

    @property
    def is_leader(self) -> bool:
        return self._leading

    @property
    def holder(self) -> str:
        """The holder as last seen (empty: none, or not looked yet)."""
        return self._observed.holder if self._observed is not None else ""

    # -- the loop

    async def run(self) -> None:
        try:
            while True:
                if not self._leading:
                    if await self._round():
                        self._last_renew = self.clock.monotonic()
                        log.info(
                            "leader election: %s now leads (Lease %s/%s)", self.identity, self.namespace, self.name
                        )
                        await self._set_leading(True)
                        await self.clock.sleep(self.timing.renew_interval_seconds)
                    else:
                        await self.clock.sleep(self.timing.retry_interval_seconds)
                    continue
                if await self._round():
                    self._last_renew = self.clock.monotonic()
                    await self.clock.sleep(self.timing.renew_interval_seconds)
                    continue
                lost_to = self.holder if self.holder not in ("", self.identity) else ""
                late = self.clock.monotonic() - self._last_renew >= self.timing.renew_deadline_seconds
                if lost_to or late:
                    why = f"{lost_to} holds the Lease" if lost_to else "could not renew the Lease in time"
                    log.warning("leader election: %s steps down: %s", self.identity, why)
                    await self._set_leading(False)
                await self.clock.sleep(self.timing.retry_interval_seconds)
        finally:
            if self._leading:
                await self._set_leading(False)
                await self.release()

    async def _set_leading(self, leading: bool) -> None:
        self._leading = leading
        if leading:
            self.transitions += 1
        if self.on_change is not None:
            try:
                await self.on_change(leading)
            except asyncio.CancelledError:
                raise
            except Exception:  # leadership is decided; a failing listener must not stop the election
                log.exception("leader election: the change to leading=%s was not applied cleanly", leading)

    async def _round(self) -> bool:
        """One try to acquire or renew, bounded so that a leader cannot outlive its deadline."""
        limit = self.timing.renew_deadline_seconds
        if self._leading:
            limit = max(0.0, self._last_renew + limit - self.clock.monotonic())
        try:
            return await self._bounded(self.try_acquire_or_renew(), limit)
        except asyncio.CancelledError:
            raise
        except _RoundTimeout:
            log.warning("leader election: the API server did not answer within %.1f s", limit)
            return False
        except Exception as exc:
            if getattr(exc, "is_conflict", False):
                log.debug("leader election: lost a race for the Lease: %s", exc)
            elif getattr(exc, "status", 0) == 403:
                if not self._forbidden_told:  # once: it is a setup to fix, not a passing failure
                    self._forbidden_told = True
                    log.error(
                        "leader election: this agent may not use the Lease %s/%s (%s), so it builds no "
                        "ImageCache: grant get, create and update on it (deploy/20-rbac.yaml, Role "
                        "vk-provider-imagecache-leader), or set caches.leader_election: never if it is the "
                        "cluster's only agent",
                        self.namespace,
                        self.name,
                        exc,
                    )
            else:
                log.warning("leader election: %s", exc)
            return False

    async def _bounded(self, work: Coroutine[Any, Any, _T], seconds: float) -> _T:
        """``work``, or _RoundTimeout after ``seconds`` on the injected clock."""
        task = asyncio.ensure_future(work)
        timer = asyncio.ensure_future(self.clock.sleep(seconds))
        try:
            await asyncio.wait({task, timer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()
            if not task.done():
                task.cancel()
            await asyncio.gather(task, timer, return_exceptions=True)
        if task.cancelled():
            raise _RoundTimeout
        return task.result()

    # -- one round

    async def try_acquire_or_renew(self) -> bool:
        """Read the Lease; take it if it is free, expired or ours. True if we hold it now.

        Raises the API's errors (a conflict: another candidate wrote first).
        """
        now = self.clock.now()
        duration = self.timing.lease_duration_seconds
        lease = await self.api.get(self.namespace, self.name)
        if lease is None:
            mine = LeaseRecord(self.identity, duration, micro_time(now), micro_time(now), 0)
            self._observe(await self.api.create(self.namespace, self.name, lease_spec(mine)))
            return True
        self._observe(lease)
        record = parse_record(lease)
        if record.holder not in ("", self.identity) and not self._expired(record):
            return False
        if record.holder == self.identity:
            mine = LeaseRecord(self.identity, duration, record.acquire_time or micro_time(now), micro_time(now),
                               record.transitions)  # fmt: skip
        else:
            mine = LeaseRecord(self.identity, duration, micro_time(now), micro_time(now), record.transitions + 1)
        self._observe(await self.api.update(self.namespace, self.name, lease_spec(mine), self._resource_version))
        return True

    def _observe(self, lease: JSON) -> None:
        record = parse_record(lease)
        if record != self._observed:
            self._observed = record
            self._observed_at = self.clock.monotonic()
        self._resource_version = str((lease.get("metadata") or {}).get("resourceVersion") or "")

    def _expired(self, record: LeaseRecord) -> bool:
        duration = record.duration_seconds or self.timing.lease_duration_seconds
        return self.clock.monotonic() >= self._observed_at + duration

    async def release(self) -> None:
        """Give the Lease up (empty holder) if we hold it, so that another agent takes it at once.

        Best effort, bounded by the retry interval: a Lease not released expires anyway.
        """

        async def give_up() -> None:
            lease = await self.api.get(self.namespace, self.name)
            if lease is None or parse_record(lease).holder != self.identity:
                return
            record = parse_record(lease)
            now = micro_time(self.clock.now())
            released = LeaseRecord("", 1, now, now, record.transitions)
            version = str((lease.get("metadata") or {}).get("resourceVersion") or "")
            self._observe(await self.api.update(self.namespace, self.name, lease_spec(released), version))
            log.info("leader election: %s released the Lease %s/%s", self.identity, self.namespace, self.name)

        try:
            await self._bounded(give_up(), self.timing.retry_interval_seconds)
        except Exception as exc:
            log.warning("leader election: could not release the Lease: %s", exc)
