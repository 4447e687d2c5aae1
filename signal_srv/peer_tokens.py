"""Peer tokens as the server keeps them: only their SHA-256 digest, taken at the edge.

A peer token lets its holder act as a participant, so it is a secret. The REST handlers
and the socket turn a token into its digest as soon as it arrives, and everything behind
them (the call's events and participants, snapshots, and in a cluster the call's log and
the bridged events in Redis) carries only the digest; the token itself appears once, in
the answer to the create or join that made it.

A plain SHA-256, without salt or a slow key derivation, is right here: a peer token is
128 random bits from the system's random source (``registry.new_ids``), so there is no
dictionary to precompute and guessing a token from its digest costs as much as guessing
the token. Salts and slow hashes protect low-entropy secrets such as passwords.
"""

from __future__ import annotations

import hashlib

__all__ = ["token_digest"]


def token_digest(token: str) -> bytes:
    """The SHA-256 digest of ``token``'s UTF-8 bytes (any string, even one with lone surrogates)."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
