"""The ImageCache custom resource on the wire: the CRD, and the object's REST calls.

Owns the CRD manifest (``config/crd-imagecache.yaml``), installing it when missing and waiting
until the API server serves it, the REST paths of ``imagecaches.eci.alibabacloud.com/v1``, and
status writes as JSON merge patches on the status subresource. What to write, and when, is the
ImageCache controller's business.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import yaml

from vk_provider.kube.session import JSON, MERGE_PATCH, KubeError, KubeSession

log = logging.getLogger(__name__)

GROUP = "eci.alibabacloud.com"
VERSION = "v1"
PLURAL = "imagecaches"
CRD_NAME = f"{PLURAL}.{GROUP}"
LIST_PATH = f"/apis/{GROUP}/{VERSION}/{PLURAL}"
CRD_PATH = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
CRD_MANIFEST = Path(__file__).resolve().parents[2] / "config" / "crd-imagecache.yaml"


class CrdError(Exception):
    """The CRD could not be read, installed or seen Established; the message says which."""


def load_crd_manifest(path: Path = CRD_MANIFEST) -> JSON:
    try:
        data: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CrdError(f"cannot read the ImageCache CRD manifest {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError:
        raise CrdError(f"the ImageCache CRD manifest {path} is not valid YAML") from None
    if not isinstance(data, dict) or (data.get("metadata") or {}).get("name") != CRD_NAME:
        raise CrdError(f"{path} is not the CustomResourceDefinition {CRD_NAME}")
    return data


def _established(crd: JSON) -> bool:
    conditions = (crd.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions)


async def ensure_crd(session: KubeSession, manifest: JSON, *, timeout: float = 30.0) -> bool:
    """Install the CRD if the API server lacks it, then wait until it is Established.

    Returns True if it was installed now. An existing CRD is left as it is (whoever installed
    it owns it). Raises :class:`CrdError`.
    """
    installed = False
    try:
        crd = await session.request("GET", f"{CRD_PATH}/{CRD_NAME}")
    except KubeError as exc:
        if not exc.is_not_found:
            raise CrdError(f"cannot read the CRD {CRD_NAME}: {exc}") from None
        try:
            crd = await session.request("POST", CRD_PATH, body=manifest)
            installed = True
            log.info("installed the CRD %s", CRD_NAME)
        except KubeError as create_exc:
            if not create_exc.is_already_exists:
                raise CrdError(f"cannot install the CRD {CRD_NAME}: {create_exc}") from None
            crd = {}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not _established(crd):
        if loop.time() > deadline:
            raise CrdError(f"the CRD {CRD_NAME} was not Established within {timeout:.0f} s")
        await asyncio.sleep(0.2)
        try:
            crd = await session.request("GET", f"{CRD_PATH}/{CRD_NAME}")
        except KubeError as exc:
            if not (exc.is_not_found or exc.is_transient):
                raise CrdError(f"cannot read the CRD {CRD_NAME}: {exc}") from None
    return installed


class ImageCacheClient:
    """REST calls on ImageCache objects (cluster-scoped)."""

    def __init__(self, session: KubeSession) -> None:
        self._s = session
        # Cache writes (a progress write per step of each build) must not hold back Pod status.
        self._budget = session.own_budget()

    async def create(self, body: JSON) -> JSON:
        return await self._s.request("POST", LIST_PATH, body=body, limiter=self._budget)

    async def get(self, name: str) -> JSON | None:
        try:
            return await self._s.request("GET", f"{LIST_PATH}/{name}")
        except KubeError as exc:
            if exc.is_not_found:
                return None
            raise

    async def patch_status(self, name: str, status: JSON) -> JSON:
        """Merge-patch ``status`` (a None value removes that field). Raises KubeError (404: gone)."""
        return await self._s.request(
            "PATCH",
            f"{LIST_PATH}/{name}/status",
            body={"status": status},
            content_type=MERGE_PATCH,
            limiter=self._budget,
        )

    async def delete(self, name: str) -> None:
        """Delete the object; one already gone is not an error."""
        try:
            await self._s.request("DELETE", f"{LIST_PATH}/{name}", limiter=self._budget)
        except KubeError as exc:
            if not exc.is_not_found:
                raise
