"""``signal-srv-token``: mint a development access token with the server's own HS256 secret.

For development and tests only. In production the application's backend mints its users'
tokens (see the README, "Access control"), and with ``jwt_public_key`` or ``jwks_url`` the
server never holds a key that could sign one.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Sequence

import jwt

from signal_srv.auth import GRANTS
from signal_srv.config import load_config
from signal_srv.errors import ConfigError

__all__ = ["main", "mint"]

WARNING = ("signal-srv-token: a development token, for development and tests only; "
           "in production the application's backend mints the tokens")


def mint(
    secret: str | bytes,
    sub: str,
    *,
    grants: Sequence[str] = (),
    ttl: float = 3600.0,
    name: str | None = None,
    call_id: str | None = None,
    audience: str = "",
    issuer: str = "",
    now: float | None = None,
    **claims: Any,
) -> str:
    """An HS256 token for ``sub`` with ``grants``, valid for ``ttl`` seconds from ``now``."""
    issued = int(time.time() if now is None else now)
    payload: dict[str, Any] = {"sub": sub, "iat": issued, "exp": issued + int(ttl), "grants": list(grants)}
    optional = {"name": name, "call_id": call_id, "aud": audience or None, "iss": issuer or None}
    payload.update({key: value for key, value in optional.items() if value is not None})
    payload.update(claims)
    return jwt.encode(payload, secret, algorithm="HS256")


def _grants(text: str) -> list[str]:
    grants = [g.strip() for g in text.split(",") if g.strip()]
    unknown = sorted(set(grants) - set(GRANTS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown grant {', '.join(unknown)} (known: {', '.join(GRANTS)})")
    return grants


def _ttl(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value <= 366 * 86400:
        raise argparse.ArgumentTypeError("must be seconds, > 0 and at most a year")
    return value


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        prog="signal-srv-token", description=__doc__.split("\n\n")[0],
        epilog="Other --name=value options (e.g. --conf=dev.conf) and SIGNAL_SRV_* variables configure it as they "
               "configure the server: it needs auth=jwt with jwt_secret or jwt_secret_file, and copies "
               "jwt_audience and jwt_issuer into the token.")
    p.add_argument("--sub", required=True, help="the user's identity in the application")
    p.add_argument("--name", help="the user's display name, shown to the other participant")
    p.add_argument("--grants", type=_grants, default=[], help=f"comma-separated: {','.join(GRANTS)}")
    p.add_argument("--ttl", type=_ttl, default=3600.0, help="seconds the token is valid (default %(default)g)")
    p.add_argument("--call-id", help="restrict the token to this call")
    return p.parse_known_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Print a token on stdout (and the development-only warning on stderr); exit 2 on a bad setup."""
    args, rest = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        config = load_config(["signal-srv-token", *rest], os.environ)
    except ConfigError as exc:
        sys.stderr.write(f"signal-srv-token: configuration error: {exc}\n")
        raise SystemExit(2) from None
    if not config.jwt_secret:
        sys.stderr.write("signal-srv-token: needs auth=jwt with jwt_secret or jwt_secret_file (e.g. "
                         "SIGNAL_SRV_AUTH=jwt SIGNAL_SRV_JWT_SECRET=...): it signs with the server's HS256 secret\n")
        raise SystemExit(2)
    sys.stderr.write(WARNING + "\n")
    print(mint(config.jwt_secret, args.sub, grants=args.grants, ttl=args.ttl, name=args.name, call_id=args.call_id,
               audience=config.jwt_audience, issuer=config.jwt_issuer))


if __name__ == "__main__":
    main()
