"""The shipped deployment files work in the programs they are for: nginx and systemd.

Every nginx configuration in ``conf/`` passes ``nginx -t`` with no warning, run on a copy
whose files (certificates, logs) are moved into a temporary prefix, with a throwaway
self-signed certificate, and whose ``listen`` ports are free loopback ports. The WebSocket
snippet (``conf/nginx.conf``) also proxies a real call to a real server. Every systemd unit
passes ``systemd-analyze verify`` without a single complaint: it exits 0 on an unknown key
or a bad value and only prints a warning, so the output must be empty too.

Without nginx, openssl or systemd-analyze these tests skip, unless ``CI=true``: then a
missing program fails them (``.ci/run`` installs all three).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
import websocket
from tornado.testing import bind_unused_port

from tests.conftest import TIMEOUT
from tests.live_server import LiveServer

ROOT = Path(__file__).resolve().parent.parent
NGINX_CONFS = sorted((ROOT / "conf").glob("nginx*.conf"))
UNITS = sorted((ROOT / "conf").glob("*.service"))

# Directives whose first argument is a file nginx opens; each is moved under the prefix.
_FILE_DIRECTIVE = re.compile(r"(?m)^(\s*[a-z_]+\s+)(/[^\s;]+)")
_CERTIFICATES = re.compile(r"(?m)^\s*(ssl_certificate|ssl_certificate_key|ssl_trusted_certificate)\s+([^\s;]+);")
_LISTEN = re.compile(r"(?m)^(\s*listen\s+)[^\s;]+")
_HTTP_BLOCK = re.compile(r"(?m)^http\s*\{")
_TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def require(program: str) -> str:
    """The program's path; without it a skip, or a failure in CI (``CI=true``)."""
    path = shutil.which(program)
    if path is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{program} is not installed (CI=true: .ci/run must install it)")
        pytest.skip(f"{program} is not installed")
    return path


def test_the_globs_find_the_shipped_files() -> None:
    assert ROOT / "conf" / "nginx.conf" in NGINX_CONFS and ROOT / "conf" / "signal-srv.service" in UNITS


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    """A throwaway self-signed certificate and its key (PEM) for call.example.org."""
    openssl = require("openssl")
    folder = tmp_path_factory.mktemp("tls")
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(folder / "key.pem"), "-out", str(folder / "cert.pem"), "-days", "1",
         "-subj", "/CN=call.example.org"],
        check=True, capture_output=True, timeout=TIMEOUT * 4,
    )
    return (folder / "cert.pem").read_bytes(), (folder / "key.pem").read_bytes()


@dataclass
class NginxCopy:
    """A shipped configuration, rewritten to run from ``prefix`` without root."""

    prefix: Path
    main: Path
    ports: list[int]

    def args(self, nginx: str, *extra: str) -> list[str]:
        return [nginx, "-p", str(self.prefix), "-c", str(self.main), "-e", str(self.prefix / "startup.log"), *extra]

    def moved(self, path: str) -> Path:
        """Where the file the shipped configuration names as ``path`` is in the copy."""
        return self.prefix / "root" / path.lstrip("/")


def nginx_copy(shipped: Path, prefix: Path, certificate: tuple[bytes, bytes], upstream_port: int = 0) -> NginxCopy:
    """Copy ``shipped`` into ``prefix``: files under ``prefix/root``, free ports, our certificate.

    A snippet (no ``http {}`` of its own) is included in an ``http`` block of a main file,
    as the shipped comment says; a whole configuration gets the settings that need a
    writable place (pid, error log, temp paths). ``upstream_port`` moves the upstream
    servers (``server 127.0.0.1:<port>``) there.
    """
    copy = NginxCopy(prefix, prefix / "main.conf", [])
    text = shipped.read_text()

    def free_port(match: re.Match[str]) -> str:
        sock, port = bind_unused_port()
        sock.close()
        copy.ports.append(port)
        return f"{match.group(1)}127.0.0.1:{port}"

    def move(match: re.Match[str]) -> str:
        if match.group(1).strip() == "location":
            return match.group(0)
        copy.moved(match.group(2)).parent.mkdir(parents=True, exist_ok=True)
        return match.group(1) + str(copy.moved(match.group(2)))

    text = _LISTEN.sub(free_port, text)
    text = _FILE_DIRECTIVE.sub(move, text)
    if upstream_port:
        text = re.sub(r"(?m)^(\s*server\s+)127\.0\.0\.1:\d+", rf"\g<1>127.0.0.1:{upstream_port}", text)
    for directive, path in _CERTIFICATES.findall(text):
        Path(path).write_bytes(certificate[1] if directive.endswith("_key") else certificate[0])
    own = f"pid {prefix / 'nginx.pid'};\nerror_log stderr notice;\n"
    temp = "".join(f"    {name}_temp_path {prefix / name};\n" for name in _TEMP_PATHS)
    if _HTTP_BLOCK.search(text):
        main = own + _HTTP_BLOCK.sub(lambda m: m.group(0) + "\n" + temp, text, count=1)
    else:
        (prefix / shipped.name).write_text(text)
        main = f"{own}events {{}}\nhttp {{\n{temp}    include {prefix / shipped.name};\n}}\n"
    copy.main.write_text(main)
    return copy


@pytest.mark.parametrize("shipped", NGINX_CONFS, ids=lambda p: p.name)
def test_nginx_accepts_the_shipped_configuration_without_a_warning(
    shipped: Path, tmp_path: Path, certificate: tuple[bytes, bytes]
) -> None:
    nginx = require("nginx")
    copy = nginx_copy(shipped, tmp_path, certificate)
    result = subprocess.run(copy.args(nginx, "-t"), capture_output=True, text=True, timeout=TIMEOUT * 4)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "test is successful" in output, output
    assert not re.findall(r"\[(?:warn|emerg|alert|crit|error)\].*", output), output


class RunningNginx:
    """``nginx -g 'daemon off;'`` as our child; ready once its master starts the workers."""

    def __init__(self, nginx: str, copy: NginxCopy) -> None:
        self.process = subprocess.Popen(
            copy.args(nginx, "-g", "daemon off;"), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True, start_new_session=True,
        )
        self.lines: list[str] = []
        self.ready = False
        self._started_or_gone = threading.Event()
        threading.Thread(target=self._read_log, name="nginx-log", daemon=True).start()
        if not (self._started_or_gone.wait(TIMEOUT * 4) and self.ready):
            self.stop()
            raise RuntimeError("nginx did not start:\n" + "".join(self.lines))

    def _read_log(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            if "start worker process" in line:
                self.ready = True
                self._started_or_gone.set()
        self._started_or_gone.set()

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(TIMEOUT * 4)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(TIMEOUT)


@pytest.fixture
def backend() -> Iterator[LiveServer]:
    server = LiveServer().start()
    yield server
    assert server.stop() == 0


INSECURE = ssl.create_default_context()
INSECURE.check_hostname = False
INSECURE.verify_mode = ssl.CERT_NONE  # the throwaway certificate


def https(method: str, url: str) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=b"" if method == "POST" else None, method=method)
    with urllib.request.urlopen(request, timeout=TIMEOUT, context=INSECURE) as response:
        return response.status, json.loads(response.read())


def test_the_nginx_snippet_proxies_a_call_and_keeps_the_token_out_of_its_log(
    tmp_path: Path, certificate: tuple[bytes, bytes], backend: LiveServer
) -> None:
    copy = nginx_copy(ROOT / "conf" / "nginx.conf", tmp_path, certificate, upstream_port=backend.port)
    proxy = RunningNginx(require("nginx"), copy)
    try:
        origin = f"127.0.0.1:{copy.ports[0]}"
        status, host = https("POST", f"https://{origin}/apiv2/calls")
        assert status == 201
        url = f"wss://{origin}/apiv2/ws?call_id={host['call_id']}&peer_id={host['peer_id']}&token={host['peer_token']}"
        # The page's own origin, port included, as a browser sends it: the proxy must pass the port on in Host.
        ws = websocket.create_connection(url, timeout=TIMEOUT, sslopt={"cert_reqs": ssl.CERT_NONE},
                                         origin=f"https://{origin}")
        try:
            state = json.loads(ws.recv())
            assert (state["type"], state["event"], state["subject"]) == ("state", "connected", host["peer_id"])
            ws.send(json.dumps({"type": "ping"}))
            assert json.loads(ws.recv())["type"] == "pong"
        finally:
            ws.close(timeout=TIMEOUT)
    finally:
        proxy.stop()
    access = copy.moved("/var/log/nginx/signal_srv.access.log").read_text()
    assert '"POST /apiv2/calls" 201' in access and '"GET /apiv2/ws" 101' in access, access
    assert host["peer_token"] not in access
    assert backend.problems() == []


def verify_unit(text: str, name: str, folder: Path) -> str:
    """``systemd-analyze verify`` of a unit with this text: its exit status and output, or '' if clean.

    The programs the unit runs (``Exec*=`` paths) are replaced by stand-ins in ``folder``,
    since the package is not installed at those paths here.
    """
    analyze = require("systemd-analyze")
    (folder / "bin").mkdir(exist_ok=True)

    def stand_in(match: re.Match[str]) -> str:
        program = folder / "bin" / Path(match.group(2)).name
        program.write_text("#!/bin/sh\nexit 0\n")
        program.chmod(0o755)
        return match.group(1) + str(program)

    unit = folder / name
    unit.write_text(re.sub(r"(?m)^(Exec[A-Za-z]*=[-@:+!]*)(/\S+)", stand_in, text))
    result = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True,
                            timeout=TIMEOUT * 4)
    output = (result.stdout + result.stderr).strip()
    return output if result.returncode == 0 else f"exit {result.returncode}: {output}"


@pytest.mark.parametrize("shipped", UNITS, ids=lambda p: p.name)
def test_systemd_accepts_the_shipped_unit_without_a_complaint(shipped: Path, tmp_path: Path) -> None:
    assert verify_unit(shipped.read_text(), shipped.name, tmp_path) == ""


@pytest.mark.parametrize(("change", "complaint"), [
    (("Restart=on-failure", "Restrat=on-failure"), "Unknown key"),
    (("Restart=on-failure", "Restart=on-falure"), "Failed to parse"),
    (("LimitNOFILE=262144", "LimitNOFILE=lots"), "Failed to parse"),
])
def test_the_unit_check_catches_a_typo(change: tuple[str, str], complaint: str, tmp_path: Path) -> None:
    """systemd-analyze exits 0 on these: the check must read its output too."""
    text = (ROOT / "conf" / "signal-srv.service").read_text()
    assert change[0] in text
    assert complaint in verify_unit(text.replace(change[0], change[1]), "signal-srv.service", tmp_path)
