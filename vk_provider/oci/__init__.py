"""Reading image manifests from OCI registries (Distribution API) and registry credentials.

An I/O adapter, like ``vk_provider.kube`` and ``vk_provider.http``: the only package besides those
that uses aiohttp. Callers get domain values (:class:`~vk_provider.domain.model.ImageManifest`) or
:class:`RegistryError` values, never HTTP objects.
"""

from vk_provider.oci.client import ErrorReason, Platform, RegistryClient, RegistryError
from vk_provider.oci.credentials import Credentials, lookup, parse_docker_config

__all__ = [
    "Credentials",
    "ErrorReason",
    "Platform",
    "RegistryClient",
    "RegistryError",
    "lookup",
    "parse_docker_config",
]
