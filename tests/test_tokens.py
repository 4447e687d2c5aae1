"""``signal-srv-token``: development tokens from the configured secret, accepted by the server."""

from __future__ import annotations

import os
import subprocess
import sys

import jwt
import pytest

from signal_srv.client import SignalingClient

SECRET = "a-development-secret-of-at-least-32-bytes"
ENV = {"SIGNAL_SRV_AUTH": "jwt", "SIGNAL_SRV_JWT_SECRET": SECRET}


def run_token(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SIGNAL_SRV_")}
    return subprocess.run([sys.executable, "-m", "signal_srv.tokens", *args], capture_output=True, text=True,
                          timeout=30, env={**clean, **(env or {})})


@pytest.mark.settings(auth="jwt", jwt_secret=SECRET, jwt_audience="calls", jwt_issuer="dev")
async def test_a_minted_token_carries_the_grants_and_the_server_accepts_it(client: SignalingClient) -> None:
    result = run_token("--sub", "alice", "--name", "Alice", "--grants", "create,join", "--ttl", "120",
                       "--jwt_audience=calls", "--jwt_issuer=dev", env=ENV)
    assert result.returncode == 0, result.stderr
    assert "for development and tests only" in result.stderr and SECRET not in result.stderr
    token = result.stdout.strip()
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], audience="calls", issuer="dev")
    assert (claims["sub"], claims["name"], claims["grants"], claims["exp"] - claims["iat"]) == (
        "alice", "Alice", ["create", "join"], 120)
    host = await client.create_call(access_token=token)
    assert (host["identity"], host["name"]) == ("alice", "Alice")


def test_a_call_id_restricts_the_token() -> None:
    result = run_token("--sub", "bob", "--grants", "join", "--call-id", "AAAAAAAAAAAAAAAAAAAAAA", env=ENV)
    assert jwt.decode(result.stdout.strip(), SECRET, algorithms=["HS256"])["call_id"] == "AAAAAAAAAAAAAAAAAAAAAA"


@pytest.mark.parametrize(("args", "env", "message"), [
    (["--sub", "a"], {}, "needs auth=jwt with jwt_secret or jwt_secret_file"),
    (["--sub", "a"], {"SIGNAL_SRV_AUTH": "jwt", "SIGNAL_SRV_JWKS_URL": "https://app.example/jwks.json"},
     "needs auth=jwt with jwt_secret or jwt_secret_file"),
    (["--sub", "a"], {"SIGNAL_SRV_AUTH": "jwt", "SIGNAL_SRV_JWT_SECRET": "short"}, "at least 32 bytes"),
    (["--sub", "a", "--grants", "create,fly"], ENV, "unknown grant fly"),
    (["--sub", "a", "--ttl", "0"], ENV, "must be seconds, > 0"),
    (["--grants", "create"], ENV, "the following arguments are required: --sub"),
])
def test_a_bad_setup_exits_2_without_a_token(args: list[str], env: dict[str, str], message: str) -> None:
    result = run_token(*args, env=env)
    assert (result.returncode, result.stdout) == (2, "")
    assert message in result.stderr
