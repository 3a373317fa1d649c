"""A Pod's ``imagePullSecrets``: reads the Secrets and turns them into registry credentials.

Owns the API reads (``GET /api/v1/namespaces/<ns>/secrets/<name>``; the agent's identity needs
``get`` on secrets). Parsing the Docker config inside is ``vk_provider.oci.credentials``' job.

Never raises for a missing, unreadable or malformed Secret: like the kubelet, it logs one line and
goes on without it, so the pull is tried anonymously and the registry's answer says what is wrong.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from vk_provider.kube.session import JSON, KubeError, KubeSession
from vk_provider.oci.credentials import Credentials, parse_docker_config

log = logging.getLogger(__name__)


class PullSecrets:
    """Implements the image service's ``CredentialSource`` against the API server."""

    def __init__(self, session: KubeSession) -> None:
        self._session = session

    async def credentials(self, namespace: str, names: Sequence[str]) -> dict[str, Credentials]:
        """Credentials by registry host from the named Secrets; an earlier Secret wins for a host."""
        wanted = list(dict.fromkeys(name for name in names if name))
        secrets = await asyncio.gather(*(self._read(namespace, name) for name in wanted))
        found: dict[str, Credentials] = {}
        for name, secret in zip(wanted, secrets, strict=True):
            if secret is None:
                continue
            raw = secret.get("data")
            data = {k: v for k, v in raw.items() if isinstance(v, str)} if isinstance(raw, dict) else {}
            parsed = parse_docker_config(str(secret.get("type") or ""), data)
            if isinstance(parsed, str):
                log.warning("image pull secret %s/%s is not usable (%s); it is ignored", namespace, name, parsed)
                continue
            for host, credentials in parsed.items():
                found.setdefault(host, credentials)
        return found

    async def _read(self, namespace: str, name: str) -> JSON | None:
        try:
            return await self._session.request("GET", f"/api/v1/namespaces/{namespace}/secrets/{name}")
        except KubeError as exc:
            if exc.is_not_found:
                log.warning(
                    "image pull secret %s/%s not found; the image pull may fail (pulling anonymously)", namespace, name
                )
            else:
                log.warning("cannot read image pull secret %s/%s: %s; pulling anonymously", namespace, name, exc)
            return None
