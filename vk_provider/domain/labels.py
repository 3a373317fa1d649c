"""Kubernetes label syntax. PURE.

A label value, and the name part of a label key, are at most 63 letters, digits, '-', '_' or '.',
starting and ending with a letter or digit (a value may also be empty).
"""

from __future__ import annotations

import re

_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")


def is_label_value(value: str) -> bool:
    return len(value) <= 63 and _NAME.match(value) is not None


def is_label_name(name: str) -> bool:
    """The part of a label key after its optional ``prefix/``."""
    return bool(name) and is_label_value(name)


_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def label_problem(key: str, value: str) -> str:
    """Why ``key: value`` is not a valid Kubernetes label, or "" if it is."""
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return "the key's prefix must be a lowercase DNS subdomain"
    if not is_label_name(name):
        return "the key's name must be 1-63 letters, digits, '-', '_' or '.', starting and ending alphanumeric"
    if not is_label_value(value):
        return "the value must be at most 63 letters, digits, '-', '_' or '.', starting and ending alphanumeric"
    return ""


_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def is_namespace_name(name: str) -> bool:
    """A namespace name: a DNS label (at most 63 lowercase letters, digits and '-', alphanumeric at both ends)."""
    return _DNS_LABEL.match(name) is not None
