"""List, then watch from the list's resourceVersion; ``410 Gone`` or a broken stream → list again.

:func:`list_watch` feeds a :class:`WatchHandler`: after every (re)list it gets the complete set of
objects (so it can notice deletions it missed while disconnected), then each change as it
happens. It never returns except by cancellation, and never raises for API trouble: errors are
logged and retried with capped exponential back-off.

A node agent's watch brings back every status it writes. With ``known``, a ``MODIFIED`` event of
an object the handler says needs no reading (a Pod it tracks, exactly as its own last write left it),
and that is not being deleted, is passed over without being decoded (only its uid and
resourceVersion are read from the raw line): the handler would ignore it anyway, and decoding a
whole Pod per status write was a tenth of the agent's CPU.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable, Mapping
from typing import Protocol

from vk_provider.kube.session import JSON, KubeError, KubeSession

log = logging.getLogger(__name__)


class WatchHandler(Protocol):
    async def resync(self, objects: list[JSON]) -> None:
        """The full current set, after a list. Objects absent from it are gone."""
        ...

    async def upsert(self, obj: JSON) -> None: ...

    async def delete(self, obj: JSON) -> None: ...


async def list_watch(
    session: KubeSession,
    path: str,
    handler: WatchHandler,
    *,
    query: Mapping[str, str] | None = None,
    what: str = "objects",
    watch_timeout: int = 300,
    max_backoff: float = 10.0,
    page_size: int = 500,
    known: Callable[[str, str], bool] | None = None,
) -> None:
    """``known(uid, resourceVersion)``: whether ``handler.upsert`` would ignore this object at that
    version while it has no deletionTimestamp."""
    backoff = 0.0
    failing = False
    while True:
        try:
            items, version = await _list_all(session, path, dict(query or {}), page_size)
            await handler.resync(items)
            if failing:
                log.info("watch of %s: API server reachable again; re-listed %d", what, len(items))
            failing, backoff = False, 0.0
            while True:
                version = await _watch_once(session, path, dict(query or {}), version, handler, watch_timeout, known)
        except _Relist:
            continue
        except KubeError as exc:
            if not failing:
                log.warning("watch of %s failed (%s); re-listing with back-off", what, exc)
            failing = True
        except (ValueError, KeyError, TypeError) as exc:  # a malformed event: start over
            log.warning("watch of %s: unexpected data (%s); re-listing", what, exc)
        backoff = min(max_backoff, max(0.5, backoff * 2))
        await asyncio.sleep(backoff)


class _Relist(Exception):
    pass


async def _list_all(session: KubeSession, path: str, query: dict[str, str], page_size: int) -> tuple[list[JSON], str]:
    items: list[JSON] = []
    token = ""
    while True:
        page = {**query, "limit": str(page_size)}
        if token:
            page["continue"] = token
        try:
            body = await session.request("GET", path, query=page)
        except KubeError as exc:
            if exc.is_gone and token:  # the continue token expired: start the list again
                items, token = [], ""
                continue
            raise
        items.extend(body.get("items") or [])
        meta = body.get("metadata") or {}
        token = meta.get("continue") or ""
        if not token:
            return items, str(meta.get("resourceVersion", ""))


# The object's own metadata: the first "metadata" of the event line (the API server writes "type"
# first, then the object), whose name, generateName, namespace and selfLink (plain strings: no
# braces) come before uid and resourceVersion, in the order of ObjectMeta's fields.
_OWN_META = re.compile(
    rb'^\{"type":"MODIFIED","object":\{[^{]*"metadata":\{[^{}]*?"uid":"([^"]+)","resourceVersion":"([^"]+)"'
)


def passed_over(line: bytes, known: Callable[[str, str], bool]) -> str | None:
    """The resourceVersion of a watch event that needs no decoding, or None to decode it.

    Such an event is a MODIFIED one, of an object ``known(uid, resourceVersion)`` says needs no
    reading (the Pod watch: a Pod it runs, as its own last write left it), with no deletionTimestamp
    anywhere in it. Whatever the line cannot be read this way is decoded: never the other way round.
    """
    if b'"deletionTimestamp"' in line:
        return None
    match = _OWN_META.match(line)
    if match is None:
        return None
    version = match[2].decode()
    return version if known(match[1].decode(), version) else None


async def _watch_once(
    session: KubeSession,
    path: str,
    query: dict[str, str],
    version: str,
    handler: WatchHandler,
    timeout: int,
    known: Callable[[str, str], bool] | None = None,
) -> str:
    params = {
        **query,
        "watch": "true",
        "resourceVersion": version,
        "allowWatchBookmarks": "true",
        "timeoutSeconds": str(timeout),
    }
    async with session.stream(path, params, timeout=timeout + 30) as lines:
        async for line in lines:
            if known is not None:
                unchanged = passed_over(line, known)
                if unchanged is not None:
                    version = unchanged
                    continue
            event = json.loads(line)
            if not isinstance(event, dict):
                raise ValueError(f"a watch event that is not an object: {line[:100]!r}")
            kind = event.get("type")
            obj = event.get("object") or {}
            if kind == "ERROR":
                if obj.get("code") == 410:
                    raise _Relist
                raise KubeError(int(obj.get("code") or 0), str(obj.get("reason", "")), str(obj.get("message", "")))
            new_version = (obj.get("metadata") or {}).get("resourceVersion")
            if kind == "BOOKMARK":
                version = new_version or version
                continue
            if kind in ("ADDED", "MODIFIED"):
                await handler.upsert(obj)
            elif kind == "DELETED":
                await handler.delete(obj)
            version = new_version or version
    return version
