"""Which ``Host`` names the server answers to (option ``allowed_hosts``). Pure: no I/O.

A server on 127.0.0.1 is reachable from any web page through DNS rebinding: a name the
attacker controls first resolves to the attacker's server, then to 127.0.0.1, and the
page then talks to us as its own origin, with ``Host`` and ``Origin`` both naming the
attacker's domain. Refusing hosts that are not ours closes that door. IP literals are
always accepted: a rebinding needs a name.
"""

from __future__ import annotations

import functools
import ipaddress
import re

__all__ = ["host_allowed", "is_host_pattern"]

_HOST_PATTERN = re.compile(r"^(\*|(\*\.)?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*)$")


def is_host_pattern(text: str) -> bool:
    """True for an ``allowed_hosts`` entry: a host name, ``*.`` and a domain, ``*``, or an IP literal."""
    return bool(_HOST_PATTERN.match(text.lower())) or is_ip_literal(text)


def host_allowed(name: str, allowed: tuple[str, ...]) -> bool:
    """True if the host ``name`` (without port) is an IP literal or matches an entry of ``allowed``.

    Names compare case-insensitively and without a trailing dot; ``*.example.org`` matches
    every name under example.org (not example.org itself); ``*`` matches any name.
    """
    name = name.lower().rstrip(".")
    if is_ip_literal(name):
        return True
    for entry in allowed:
        entry = entry.lower()
        if entry == "*" or name == entry or (entry.startswith("*.") and name.endswith(entry[1:])):
            return True
    return False


@functools.lru_cache(maxsize=1024)
def is_ip_literal(name: str) -> bool:
    """True for an IPv4 or IPv6 address, the latter with or without brackets.

    Every request asks, with one of a few names, and parsing costs more than the rest of the
    host check: the answers are cached.
    """
    try:
        ipaddress.ip_address(name.removeprefix("[").removesuffix("]"))
    except ValueError:
        return False
    return True
