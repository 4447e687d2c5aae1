"""Configuration: precedence, the shipped conf files, and start-up failures."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from signal_srv.config import Config, ignored_environment, load_config
from signal_srv.errors import ConfigError
from tests.conftest import server_environ
from tests.live_server import LiveServer, http

ROOT = Path(__file__).resolve().parent.parent


def test_embedded_defaults_need_no_file() -> None:
    config = load_config(["signal-srv"], {})
    assert (config.address, config.port, config.call_ttl, config.cleanup_interval) == ("127.0.0.1", 8080, 3600.0, 10800.0)
    assert (config.max_participants, config.max_calls, config.list_calls) == (2, 100000, "public")


def test_flag_beats_env_beats_file_beats_default(tmp_path: Path) -> None:
    conf = tmp_path / "a.conf"
    conf.write_text("port = 7000\ncall_ttl = 60\nmax_calls = 5\n")
    env = {"SIGNAL_SRV_PORT": "8000", "SIGNAL_SRV_CALL_TTL": "30"}
    config = load_config(["signal-srv", f"--conf={conf}", "--port=9000"], env)
    assert (config.port, config.call_ttl, config.max_calls, config.list_calls) == (9000, 30.0, 5, "public")


def test_conf_file_can_come_from_the_environment(tmp_path: Path) -> None:
    conf = tmp_path / "a.conf"
    conf.write_text("list_calls = 'off'\n")
    assert load_config(["signal-srv"], {"SIGNAL_SRV_CONF": str(conf)}).list_calls == "off"


def test_dev_conf_documents_every_option_at_its_default() -> None:
    text = (ROOT / "conf" / "dev.conf").read_text()
    config = load_config(["signal-srv", f"--conf={ROOT / 'conf' / 'dev.conf'}"], {})
    assert dataclasses.replace(config, conf="") == Config()
    for field in dataclasses.fields(Config):
        if field.name != "conf":
            assert f"\n{field.name} = " in text, f"conf/dev.conf lacks {field.name}"


def test_prod_conf_loads_with_its_secrets_from_the_environment() -> None:
    argv = ["signal-srv", f"--conf={ROOT / 'conf' / 'prod.conf'}"]
    secrets = {"SIGNAL_SRV_TURN_SECRET": "t", "SIGNAL_SRV_WEBHOOK_SECRET": "w"}
    config = load_config(argv, secrets)
    assert config.list_calls == "off" and config.xheaders is True and len(json.loads(config.ice_servers)) == 2
    assert (config.turn_secret, config.webhook_secret) == ("t", "w")
    assert (config.auth, config.jwks_url, config.jwt_audience) == ("jwt", "https://app.example.org/.well-known/jwks.json",
                                                                  "signal_srv")
    with pytest.raises(ConfigError, match="needs turn_secret"):
        load_config(argv, {})


@pytest.mark.parametrize(("argv", "env", "conf", "message"), [
    (["--port=70000"], {}, None, "port=70000: must be between 0 and 65535"),
    (["--port=http"], {}, None, "--port on the command line"),
    (["--call_ttl=-5"], {}, None, "call_ttl=-5.0: must be a number of seconds > 0"),
    (["--call_ttl=nan"], {}, None, "call_ttl=nan: must be a number of seconds > 0"),
    (["--cleanup_interval=0"], {}, None, "cleanup_interval=0.0"),
    (["--ws_close_grace=0"], {}, None, "ws_close_grace=0.0: must be a number of seconds > 0"),
    (["--list_calls=private"], {}, None, "list_calls='private': must be 'public' or 'off'"),
    (["--log_level=loud"], {}, None, "log_level='loud'"),
    (["--max_participants=3000"], {}, None, "max_participants=3000"),
    (["--ice_servers=[1]"], {}, None, "ice_servers='[1]'"),
    (["--max_message_size=65536", "--ws_write_buffer_limit=1000"], {}, None, "ws_write_buffer_limit=1000"),
    (["--ws_buffer_bytes=1000"], {}, None, "ws_buffer_bytes=1000: must be at least max_message_size"),
    (["--held_bytes_total=65536", "--ws_buffer_bytes=131072"], {}, None, "held_bytes_total=65536"),
    (["--allowed_hosts=http://call.example.org"], {}, None, "allowed_hosts='http://call.example.org'"),
    (["--allowed_hosts=call.example.org:443"], {}, None, "allowed_hosts='call.example.org:443'"),
    (["--event_loop=trio"], {}, None, "event_loop='trio': must be one of auto, asyncio, uvloop"),
    (["--listen_backlog=0"], {}, None, "listen_backlog=0: must be at least 1"),
    (["--bogus=1"], {}, None, "unknown option --bogus"),
    (["stray"], {}, None, "unexpected argument 'stray'"),
    ([], {"SIGNAL_SRV_PORT": "x"}, None, "--port on the environment"),
    (["--conf=/does/not/exist.conf"], {}, None, "cannot read '/does/not/exist.conf'"),
    ([], {}, "bogus_option = 1\n", "sets unknown option 'bogus_option'"),
    ([], {}, "port = (\n", "is not a valid conf file"),
    ([], {}, "port = 'eighty'\n", "--port on the conf file"),
    ([], {}, "call_ttl = -1\n", "call_ttl=-1"),
])
def test_bad_values_fail_at_load_with_a_clear_message(
    tmp_path: Path, argv: list[str], env: dict[str, str], conf: str | None, message: str
) -> None:
    if conf is not None:
        path = tmp_path / "bad.conf"
        path.write_text(conf)
        argv = [f"--conf={path}", *argv]
    with pytest.raises(ConfigError) as info:
        load_config(["signal-srv", *argv], env)
    assert message in str(info.value)


def run_server(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "signal_srv", *args], capture_output=True, text=True, timeout=30,
        env=server_environ(**(env or {})), cwd=ROOT,
    )


@pytest.mark.parametrize(("args", "env", "expected"), [
    (["--port=70000"], {}, "signal-srv: configuration error: port=70000: must be between 0 and 65535\n"),
    (["--nope=1"], {}, "signal-srv: configuration error: unknown option --nope on the command line (see --help)\n"),
    ([], {"SIGNAL_SRV_CALL_TTL": "-1"}, "signal-srv: configuration error: call_ttl=-1.0: must be a number of seconds > 0\n"),
])
def test_the_server_exits_2_with_one_line_before_listening(args: list[str], env: dict[str, str], expected: str) -> None:
    result = run_server(*args, env=env)
    assert (result.returncode, result.stderr, result.stdout) == (2, expected, "")


@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
def test_the_server_runs_on_the_event_loop_it_is_given(event_loop: str) -> None:
    server = LiveServer(event_loop=event_loop).start()
    try:
        assert f"(event loop: {event_loop})" in server.wait_for_log("listening on")
        status, body, _ = http("POST", server.base_url + "/apiv2/calls")
        assert status == 201 and body["status"] == "waiting"
        assert server.problems() == []
    finally:
        assert server.stop() == 0


def test_help_lists_the_options_and_exits_0() -> None:
    result = run_server("--help")
    assert result.returncode == 0
    for name in ("--call-ttl", "--cleanup-interval", "--max-calls", "--list-calls", "--heartbeat-timeout"):
        assert name in result.stdout


# What Kubernetes puts in every pod of the namespace for a Service named signal-srv (port
# 8080, named "http") and one named signal-srv-metrics (port 9100, unnamed).
SERVICE_LINKS = {
    "SIGNAL_SRV_SERVICE_HOST": "10.0.0.12",
    "SIGNAL_SRV_SERVICE_PORT": "8080",
    "SIGNAL_SRV_SERVICE_PORT_HTTP": "8080",
    "SIGNAL_SRV_PORT": "tcp://10.0.0.12:8080",
    "SIGNAL_SRV_PORT_8080_TCP": "tcp://10.0.0.12:8080",
    "SIGNAL_SRV_PORT_8080_TCP_PROTO": "tcp",
    "SIGNAL_SRV_PORT_8080_TCP_PORT": "8080",
    "SIGNAL_SRV_PORT_8080_TCP_ADDR": "10.0.0.12",
    "SIGNAL_SRV_METRICS_SERVICE_HOST": "10.0.0.13",
    "SIGNAL_SRV_METRICS_SERVICE_PORT": "9100",
    "SIGNAL_SRV_METRICS_PORT": "tcp://10.0.0.13:9100",
    "SIGNAL_SRV_METRICS_PORT_9100_TCP": "tcp://10.0.0.13:9100",
    "SIGNAL_SRV_METRICS_PORT_9100_TCP_PROTO": "tcp",
    "SIGNAL_SRV_METRICS_PORT_9100_TCP_PORT": "9100",
    "SIGNAL_SRV_METRICS_PORT_9100_TCP_ADDR": "10.0.0.13",
}


def test_service_links_change_no_option_and_each_is_reported() -> None:
    assert load_config(["signal-srv"], SERVICE_LINKS) == Config()
    ignored = ignored_environment({**SERVICE_LINKS, "SIGNAL_SRV_CALL_TTL": "60", "HOME": "/root"})
    assert [line.split()[1].split("=")[0].rstrip(":") for line in ignored] == sorted(SERVICE_LINKS)
    assert "ignoring SIGNAL_SRV_SERVICE_HOST: signal_srv has no option 'service_host' (see --help)" in ignored
    assert ("ignoring SIGNAL_SRV_PORT='tcp://10.0.0.12:8080': a Kubernetes service link, not a port number; "
            "set --port=<number> or SIGNAL_SRV_PORT=<number> in the container's env (see README, Kubernetes)") in ignored


def test_a_plain_port_in_the_environment_still_sets_the_port() -> None:
    """The container's own env overrides a service link of the same name; flags win over both."""
    env = {**SERVICE_LINKS, "SIGNAL_SRV_PORT": "9000", "SIGNAL_SRV_METRICS_PORT": "9101"}
    assert (load_config(["signal-srv"], env).port, load_config(["signal-srv"], env).metrics_port) == (9000, 9101)
    assert load_config(["signal-srv", "--port=7000"], env).port == 7000
    assert not [line for line in ignored_environment(env) if "SIGNAL_SRV_PORT=" in line or "METRICS_PORT=" in line]
    with pytest.raises(ConfigError, match="--port on the environment"):
        load_config(["signal-srv"], {**SERVICE_LINKS, "SIGNAL_SRV_PORT": "http://10.0.0.12:8080"})


def test_the_server_starts_in_a_pod_with_service_links_and_logs_each_as_a_warning() -> None:
    server = LiveServer(env=SERVICE_LINKS).start()
    try:
        status, body, _ = http("POST", server.base_url + "/apiv2/calls")
        assert status == 201 and body["status"] == "waiting"
        warnings = [line for line in server.lines if " WARNING signal_srv.server: configuration: ignoring " in line]
        for name in SERVICE_LINKS:
            assert any(f"ignoring {name}:" in line or f"ignoring {name}=" in line for line in warnings), name
        assert server.problems() == []
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize(("args", "conf", "expected"), [
    (["--port=70000"], None, "port=70000: must be between 0 and 65535"),
    ([], "port = 'tcp://10.0.0.12:8080'\n", "--port on the conf file"),
    ([], "call_ttl = 0\n", "call_ttl=0.0: must be a number of seconds > 0"),
])
def test_a_bad_flag_or_conf_value_still_exits_2_among_service_links(
    tmp_path: Path, args: list[str], conf: str | None, expected: str
) -> None:
    if conf is not None:
        (tmp_path / "bad.conf").write_text(conf)
        args = [f"--conf={tmp_path / 'bad.conf'}", *args]
    result = run_server(*args, env=SERVICE_LINKS)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("signal-srv: configuration error: ") and result.stderr.count("\n") == 1
    assert expected in result.stderr


# Access control options -----------------------------------------------------------------

JWT_SECRET = "a-secret-for-the-config-tests-0123456789"


def _pem(tmp_path: Path, key: object, name: str = "key.pem") -> str:
    from cryptography.hazmat.primitives import serialization

    path = tmp_path / name
    path.write_bytes(key.public_key().public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return str(path)


def test_jwt_secret_comes_from_the_environment_or_a_file(tmp_path: Path) -> None:
    config = load_config(["signal-srv"], {"SIGNAL_SRV_AUTH": "jwt", "SIGNAL_SRV_JWT_SECRET": JWT_SECRET})
    assert (config.auth, config.jwt_secret) == ("jwt", JWT_SECRET)
    assert JWT_SECRET not in repr(config)
    secret_file = tmp_path / "jwt.secret"
    secret_file.write_text(JWT_SECRET + "\n")
    config = load_config(["signal-srv", "--auth=jwt", f"--jwt_secret_file={secret_file}"], {})
    assert config.jwt_secret == JWT_SECRET


def test_a_pem_public_key_is_checked_at_load(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    good = _pem(tmp_path, ec.generate_private_key(ec.SECP256R1()))
    assert load_config(["signal-srv", "--auth=jwt", f"--jwt_public_key={good}"], {}).jwt_public_key == good
    for key, message in ((rsa.generate_private_key(public_exponent=65537, key_size=1024), "has 1024 bits"),
                         (ec.generate_private_key(ec.SECP384R1()), "must be an RSA key (RS256) or an EC P-256 key")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(["signal-srv", "--auth=jwt", f"--jwt_public_key={_pem(tmp_path, key, 'bad.pem')}"], {})
    (tmp_path / "junk.pem").write_text("-----BEGIN PUBLIC KEY-----\nnope\n")
    with pytest.raises(ConfigError, match="is not a PEM public key"):
        load_config(["signal-srv", "--auth=jwt", f"--jwt_public_key={tmp_path / 'junk.pem'}"], {})


@pytest.mark.parametrize(("argv", "message"), [
    (["--auth=ldap"], "auth='ldap': must be 'none' or 'jwt'"),
    (["--auth=jwt"], "auth=jwt needs exactly one of jwt_secret, jwt_secret_file, jwt_public_key, jwks_url"),
    (["--auth=jwt", f"--jwt_secret={JWT_SECRET}", "--jwks_url=https://app.example/jwks.json"],
     "(set: jwt_secret, jwks_url)"),
    (["--auth=jwt", "--jwt_secret=short"], "jwt_secret: must be at least 32 bytes (RFC 7518 section 3.2)"),
    (["--auth=jwt", "--jwt_secret_file=/does/not/exist"], "jwt_secret_file: cannot read '/does/not/exist'"),
    (["--auth=jwt", "--jwt_public_key=/does/not/exist.pem"], "jwt_public_key: cannot read '/does/not/exist.pem'"),
    (["--auth=jwt", "--jwks_url=ftp://app.example/jwks"], "jwks_url='ftp://app.example/jwks': must be an http"),
    ([f"--jwt_secret={JWT_SECRET}"], "jwt_secret is set but auth is 'none'"),
    (["--jwt_leeway=-1"], "jwt_leeway=-1.0: must be a number of seconds >= 0"),
    (["--jwks_refresh_interval=0"], "jwks_refresh_interval=0.0: must be a number of seconds > 0"),
])
def test_bad_access_control_options_fail_at_load(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(["signal-srv", *argv], {})
    assert message in str(info.value)
    assert JWT_SECRET not in str(info.value)


def test_a_bad_secret_stops_the_server_without_printing_it() -> None:
    secret = "tooshort-but-secret"
    result = run_server(env={"SIGNAL_SRV_AUTH": "jwt", "SIGNAL_SRV_JWT_SECRET": secret})
    assert result.returncode == 2
    assert result.stderr == ("signal-srv: configuration error: jwt_secret: must be at least 32 bytes "
                             "(RFC 7518 section 3.2)\n")
