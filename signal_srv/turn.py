"""Time-limited TURN credentials in the "TURN REST API" form (coturn ``use-auth-secret``).

username = ``<expiry unix time>:<peer_id>``; credential = base64(HMAC-SHA1(secret, username)).
The TURN server recomputes the credential from the username with the same shared secret,
so the secret itself never leaves this server.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any, Sequence

__all__ = ["ice_servers", "turn_credential"]


def turn_credential(secret: str, peer_id: str, now: float, ttl: float) -> tuple[str, str]:
    """The (username, credential) pair valid until ``now + ttl`` (Unix seconds)."""
    username = f"{int(now + ttl)}:{peer_id}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode("ascii")


def ice_servers(
    static: str, turn_uris: Sequence[str], secret: str, peer_id: str | None, now: float, ttl: float
) -> list[dict[str, Any]]:
    """The configured ICE servers, plus TURN with fresh credentials for an authenticated peer."""
    servers: list[dict[str, Any]] = json.loads(static)
    if turn_uris and peer_id is not None:
        username, credential = turn_credential(secret, peer_id, now, ttl)
        servers.append({"urls": list(turn_uris), "username": username, "credential": credential})
    return servers
