"""Registry credentials: the value, Docker config parsing, and which credentials serve which host.

Owns the rules the kubelet applies to ``imagePullSecrets`` (``kubernetes.io/dockerconfigjson`` and
the older ``kubernetes.io/dockercfg``): a config maps registry keys (``https://index.docker.io/v1/``,
``registry.example.com:5000``, ``*.example.com``) to a user name and password, and an image's
registry host picks the entry whose key matches it. Docker Hub's aliases are one host, ``docker.io``.

Stdlib only, no I/O: reading the Secrets is ``vk_provider.kube.secrets``' job. Problems come back
as messages, never as exceptions, and a password never appears in a ``repr`` or a message.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

DOCKER_HUB = "docker.io"
_DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})


@dataclass(frozen=True, slots=True)
class Credentials:
    """A user name and password (or token) for one registry."""

    username: str
    password: str = field(repr=False)


def registry_key(text: str) -> str:
    """A Docker config key as a registry host: no scheme, no path, lower case, Docker Hub folded.

    ``https://index.docker.io/v1/`` → ``docker.io``; ``http://Host:5000/x`` → ``host:5000``.
    """
    host = text.strip()
    if "://" in host:
        host = host.split("://", 1)[1]
    host = host.split("/", 1)[0].lower()
    return DOCKER_HUB if host in _DOCKER_HUB_ALIASES else host


def parse_docker_config(secret_type: str, data: Mapping[str, str]) -> dict[str, Credentials] | str:
    """Credentials by registry host from a Secret's (base64-encoded) ``data``, or what is wrong.

    ``kubernetes.io/dockerconfigjson`` keeps ``{"auths": {host: entry}}`` under ``.dockerconfigjson``;
    ``kubernetes.io/dockercfg`` keeps ``{host: entry}`` under ``.dockercfg``. An entry has ``auth``
    (base64 of ``user:password``) or ``username`` and ``password``; entries with neither (e.g. only an
    ``identitytoken``, which needs an OAuth2 exchange this client does not do) are left out.
    """
    if secret_type == "kubernetes.io/dockerconfigjson":
        key = ".dockerconfigjson"
    elif secret_type == "kubernetes.io/dockercfg":
        key = ".dockercfg"
    else:
        return f"type {secret_type or '(none)'} is not kubernetes.io/dockerconfigjson or kubernetes.io/dockercfg"
    encoded = data.get(key)
    if not encoded:
        return f"has no {key} key"
    try:
        document: Any = json.loads(base64.b64decode(encoded, validate=True))
    except (binascii.Error, ValueError):
        return f"{key} is not base64-encoded JSON"
    if key == ".dockerconfigjson":
        document = document.get("auths") if isinstance(document, dict) else None
    if not isinstance(document, dict):
        return f"{key} has no registry entries"
    found: dict[str, Credentials] = {}
    for registry, entry in document.items():
        credentials = _entry_credentials(entry)
        if credentials is not None and isinstance(registry, str):
            found[registry_key(registry)] = credentials
    return found


def _entry_credentials(entry: Any) -> Credentials | None:
    if not isinstance(entry, dict):
        return None
    auth = entry.get("auth")
    if isinstance(auth, str) and auth:
        try:
            user, colon, password = base64.b64decode(auth, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return Credentials(user, password) if colon else None
    name, secret = entry.get("username"), entry.get("password")
    if isinstance(name, str) and isinstance(secret, str) and name:
        return Credentials(name, secret)
    return None


def lookup(registry: str, credentials: Mapping[str, Credentials]) -> Credentials | None:
    """The credentials for ``registry`` (a normalised host, ``docker.io`` for Docker Hub).

    An exact key wins; otherwise a wildcard key (``*.example.com``) whose dot-separated parts each
    match the host's, as the kubelet's credential keyring matches them. Without a port in the key,
    any port matches.
    """
    host = registry_key(registry)
    found = credentials.get(host)
    if found is not None:
        return found
    name, _, port = host.partition(":")
    for key, value in sorted(credentials.items()):
        key_name, _, key_port = key.partition(":")
        if key_port and key_port != port:
            continue
        if key_name == name and not key_port:
            return value
        parts, key_parts = name.split("."), key_name.split(".")
        if (
            "*" in key_name
            and len(parts) == len(key_parts)
            and all(fnmatch.fnmatchcase(part, pattern) for part, pattern in zip(parts, key_parts, strict=True))
        ):
            return value
    return None
