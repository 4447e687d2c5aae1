"""Who may call: the application's signed access tokens (JWT) and the grants they carry.

With ``auth=jwt`` the application's backend mints a token per user; create, join, listing
and administration requests carry it as ``Authorization: Bearer <JWT>``. ``Verifier``
checks it with PyJWT against one key source (an HS256 secret, an RS256/ES256 public key,
or a JWKS URL), accepting only the algorithms that source implies, and returns its
``Claims``. Every failure is ``InvalidToken`` (401) or ``Forbidden`` (403) with a fixed
message: no token, secret or library text reaches an answer or a log line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.simple_httpclient import HTTPTimeoutError

from signal_srv.errors import Forbidden, InvalidToken

if TYPE_CHECKING:
    from signal_srv.config import Config

__all__ = [
    "GRANTS",
    "MAX_TOKEN_LENGTH",
    "MIN_SECRET_BYTES",
    "Claims",
    "JwksKeys",
    "Verifier",
    "load_public_key",
    "looks_like_jwt",
    "make_verifier",
]

logger = logging.getLogger(__name__)

GRANTS = ("create", "join", "list", "admin")
MAX_TOKEN_LENGTH = 4096  # longer bearer tokens are refused before any parsing
MIN_SECRET_BYTES = 32  # RFC 7518 section 3.2: an HS256 key at least as long as the hash
MIN_RSA_BITS = 2048
JWKS_MAX_AGE = 300.0  # seconds before cached JWKS keys are fetched again (in the background)
JWKS_MAX_BYTES = 1024 * 1024
JWKS_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"})

# PyJWT's failures, as the fixed messages clients see (most specific first).
_MESSAGES: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "the token has expired"),
    (jwt.ImmatureSignatureError, "the token is not valid yet"),
    (jwt.InvalidAudienceError, "the token is for another audience"),
    (jwt.InvalidIssuerError, "the token is from another issuer"),
    (jwt.InvalidAlgorithmError, "the token's algorithm is not accepted"),
    (jwt.InvalidSignatureError, "the token's signature does not verify"),
    (jwt.exceptions.InvalidSubjectError, "the token's sub must be a string"),
    (jwt.InvalidIssuedAtError, "the token's iat must be a number"),
    (jwt.DecodeError, "malformed token"),
)


@dataclass(frozen=True, slots=True)
class Claims:
    """What a verified token says: who (``identity`` = ``sub``, ``name``) and what it may do."""

    identity: str
    name: str | None = None
    call_id: str | None = None
    grants: frozenset[str] = frozenset()

    @property
    def admin(self) -> bool:
        return "admin" in self.grants

    def require(self, *grants: str, call_id: str | None = None) -> None:
        """Raise ``Forbidden`` unless the token holds ``grants`` and is valid for ``call_id``.

        A token restricted to one call (``call_id`` claim) is valid only for requests about
        that call; creating and listing calls (``call_id`` None) are not.
        """
        missing = [g for g in grants if g not in self.grants]
        if missing:
            raise Forbidden(f"the token lacks the grant{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
        if self.call_id is not None and self.call_id != call_id:
            raise Forbidden("the token is for another call" if call_id else "the token is restricted to one call")


def looks_like_jwt(token: str) -> bool:
    """A JWT has three dot-separated parts; a peer token (URL-safe base64) has no dot."""
    return token.count(".") == 2


def load_public_key(path: str) -> tuple[Any, str]:
    """The public key in the PEM file ``path`` and the one algorithm it implies.

    Raises ``ValueError`` with a one-line reason for an unreadable file, another kind of
    key, an RSA key under 2048 bits, or an EC key not on P-256.
    """
    try:
        with open(path, "rb") as f:
            key = load_pem_public_key(f.read())
    except OSError as exc:
        raise ValueError(f"cannot read {path!r}: {exc.strerror}") from None
    except (ValueError, TypeError):
        raise ValueError(f"{path!r} is not a PEM public key") from None
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise ValueError(f"the RSA key in {path!r} has {key.key_size} bits; at least {MIN_RSA_BITS} are needed")
        return key, "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key, "ES256"
    raise ValueError(f"the key in {path!r} must be an RSA key (RS256) or an EC P-256 key (ES256)")


def _claims(payload: dict[str, Any]) -> Claims:
    name, call_id, grants = payload.get("name"), payload.get("call_id"), payload.get("grants", [])
    if not payload["sub"]:
        raise InvalidToken("the token's sub is empty")
    if name is not None and not isinstance(name, str):
        raise InvalidToken("the token's name must be a string")
    if call_id is not None and not isinstance(call_id, str):
        raise InvalidToken("the token's call_id must be a string")
    if not isinstance(grants, list) or not all(isinstance(g, str) for g in grants):
        raise InvalidToken("the token's grants must be a list of strings")
    return Claims(payload["sub"], name, call_id, frozenset(grants))


class Verifier:
    """Verifies access tokens against one key source; use from the IOLoop only.

    ``key`` and ``algorithm``: a static key (HS256 secret, or a public key); or ``jwks``.
    ``audience`` and ``issuer`` are checked when set; ``leeway`` is the clock skew allowed
    (seconds) on ``exp``, ``nbf`` and ``iat``.
    """

    def __init__(
        self,
        key: Any = None,
        algorithm: str = "",
        *,
        jwks: JwksKeys | None = None,
        audience: str = "",
        issuer: str = "",
        leeway: float = 5.0,
    ) -> None:
        if (key is None) == (jwks is None):
            raise ValueError("give either a key (with its algorithm) or jwks")
        self._static = (key, algorithm) if key is not None else None
        self._jwks = jwks
        self._audience = audience or None
        self._issuer = issuer or None
        self._leeway = leeway
        self._options: dict[str, Any] = {"require": ["exp", "sub"], "verify_aud": bool(audience)}

    def __repr__(self) -> str:
        return f"Verifier({'jwks' if self._static is None else self._static[1]})"  # never the key

    async def verify(self, token: str) -> Claims:
        """The claims of ``token``. Raises ``InvalidToken`` for anything but a valid token of ours."""
        if len(token) > MAX_TOKEN_LENGTH:
            raise InvalidToken(f"the token is over {MAX_TOKEN_LENGTH} bytes")
        if self._static is not None:
            key, algorithm = self._static
        else:
            assert self._jwks is not None
            key, algorithm = await self._jwks.key_for(_key_id(token))
        try:
            payload = jwt.decode(token, key, algorithms=[algorithm], audience=self._audience, issuer=self._issuer,
                                 leeway=self._leeway, options=self._options)  # type: ignore[arg-type]
        except jwt.MissingRequiredClaimError as exc:
            raise InvalidToken(f"the token lacks the {exc.claim} claim") from None
        except (jwt.PyJWTError, ValueError, TypeError) as exc:  # odd input must be a 401, never a 500
            raise InvalidToken(next((m for kind, m in _MESSAGES if isinstance(exc, kind)), "invalid token")) from None
        return _claims(payload)

    def close(self) -> None:
        """Stop any JWKS fetch in flight (on shutdown)."""
        if self._jwks is not None:
            self._jwks.close()


def _key_id(token: str) -> str | None:
    try:
        kid = jwt.get_unverified_header(token).get("kid")
    except (jwt.PyJWTError, ValueError, TypeError):
        raise InvalidToken("malformed token") from None
    if kid is not None and not isinstance(kid, str):
        raise InvalidToken("the token's kid must be a string")
    return kid


def _safe_url(url: str) -> str:
    """``url`` without credentials, query or fragment, fit for a log line."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path}"


class JwksKeys:
    """Public keys from a JWKS URL, fetched when needed and cached by ``kid``.

    A token whose ``kid`` is not cached triggers a fetch, at most once every
    ``refresh_interval`` seconds (so random kids cannot make us hammer the endpoint); keys
    older than ``max_age`` are fetched again in the background. A fetch that fails, is
    slow or answers garbage keeps the known keys; a request never waits longer than
    ``timeout`` for one.
    """

    def __init__(self, url: str, *, timeout: float, refresh_interval: float, max_age: float = JWKS_MAX_AGE) -> None:
        self.url = url
        self.timeout = timeout
        self.refresh_interval = refresh_interval
        self.max_age = max_age
        self.fetches = 0
        self._keys: dict[str | None, tuple[Any, str]] = {}
        self._loaded_at = -math.inf
        self._tried_at = -math.inf
        self._fetch: asyncio.Task[None] | None = None
        self._failing = 0

    async def key_for(self, kid: str | None) -> tuple[Any, str]:
        """The key and algorithm for ``kid``. Raises ``InvalidToken`` if it is (still) unknown."""
        now = time.monotonic()
        if self._keys and now - self._loaded_at >= self.max_age:
            self._start_fetch(now)
        found = self._find(kid)
        if found is None and self._start_fetch(now) is not None:
            assert self._fetch is not None
            try:
                await asyncio.wait_for(asyncio.shield(self._fetch), self.timeout)
            except TimeoutError:
                pass
            found = self._find(kid)
        if found is None:
            raise InvalidToken("the token's key is unknown" if kid is not None else "the token names no key (kid)")
        return found

    def _find(self, kid: str | None) -> tuple[Any, str] | None:
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        return self._keys.get(kid) if kid is not None else None

    def _start_fetch(self, now: float) -> asyncio.Task[None] | None:
        """The fetch in flight, or a new one if the last one is ``refresh_interval`` old; else None."""
        if self._fetch is not None and not self._fetch.done():
            return self._fetch
        if now - self._tried_at < self.refresh_interval:
            return None
        self._tried_at = now
        self._fetch = asyncio.get_running_loop().create_task(self._refresh())
        return self._fetch

    async def _refresh(self) -> None:
        self.fetches += 1
        try:
            keys = await self._download()
        except Exception as exc:
            self._failed(exc)
            return
        if keys.keys() != self._keys.keys() or self._failing:
            logger.info("JWKS from %s: %d keys", _safe_url(self.url), len(keys))
        self._keys, self._loaded_at, self._failing = keys, time.monotonic(), 0

    async def _download(self) -> dict[str | None, tuple[Any, str]]:
        client = AsyncHTTPClient(force_instance=True, max_body_size=JWKS_MAX_BYTES)
        try:
            response = await client.fetch(HTTPRequest(
                self.url, headers={"Accept": "application/json"}, connect_timeout=self.timeout,
                request_timeout=self.timeout, follow_redirects=True, max_redirects=3,
            ), raise_error=False)
        finally:
            client.close()
        if response.code != 200:
            raise ValueError("timeout or connection error" if response.code == 599 else f"HTTP {response.code}")
        return _parse_jwks(response.body)

    def _failed(self, exc: Exception) -> None:
        why = _describe(exc)
        if self._failing:
            logger.debug("JWKS fetch from %s failed again: %s", _safe_url(self.url), why)
        else:
            logger.warning("JWKS fetch from %s failed: %s; keeping %d known keys (further failures at DEBUG)",
                           _safe_url(self.url), why, len(self._keys))
        self._failing += 1

    def close(self) -> None:
        if self._fetch is not None:
            self._fetch.cancel()


def _describe(exc: Exception) -> str:
    """A short cause for a log line; never the URL (it may carry credentials)."""
    if isinstance(exc, ValueError):
        return str(exc)
    if isinstance(exc, HTTPTimeoutError):
        return "timeout"
    if isinstance(exc, OSError):
        return f"connection error ({exc.strerror or type(exc).__name__})"
    return type(exc).__name__


def _parse_jwks(body: bytes) -> dict[str | None, tuple[Any, str]]:
    """The signing keys of a JWKS document by ``kid``. Raises ``ValueError`` if it has none.

    Keys meant for encryption, symmetric keys (a public JWKS must never hold one: it would
    let anyone sign) and keys PyJWT cannot load are skipped.
    """
    try:
        document = json.loads(body)
    except ValueError:
        raise ValueError("the answer is not JSON") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise ValueError('the answer has no "keys" list')
    keys: dict[str | None, tuple[Any, str]] = {}
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig" or entry.get("kty") == "oct":
            continue
        try:
            jwk = jwt.PyJWK(entry)
        except (jwt.PyJWTError, ValueError, TypeError):
            continue
        kid = entry.get("kid")
        if jwk.algorithm_name in JWKS_ALGORITHMS and (kid is None or isinstance(kid, str)):
            keys[kid] = (jwk.key, jwk.algorithm_name)
    if not keys:
        raise ValueError("the answer has no usable signing key")
    return keys


def make_verifier(config: Config) -> Verifier | None:
    """The verifier ``config`` asks for (None with ``auth=none``); the config is already checked."""
    if config.auth != "jwt":
        return None
    common: dict[str, Any] = {"audience": config.jwt_audience, "issuer": config.jwt_issuer,
                              "leeway": config.jwt_leeway}
    if config.jwks_url:
        jwks = JwksKeys(config.jwks_url, timeout=config.ask_timeout, refresh_interval=config.jwks_refresh_interval)
        return Verifier(jwks=jwks, **common)
    if config.jwt_public_key:
        return Verifier(*load_public_key(config.jwt_public_key), **common)
    return Verifier(config.jwt_secret.encode(), "HS256", **common)
