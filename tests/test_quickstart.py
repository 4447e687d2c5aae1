"""The README's Quick start commands, as typed: CI runs the test command, and the run command
starts the server on a machine whose only Python is the distribution's."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from signal_srv.spawn import free_port
from tests.conftest import TIMEOUT
from tests.e2e.support import skip_or_fail

ROOT = Path(__file__).resolve().parent.parent
DISTRIBUTION_PATH = "/usr/bin:/bin"
# Creating a virtual environment and installing the package from the registry.
INSTALL_TIMEOUT = 60 * TIMEOUT
_LISTENING = re.compile(r"listening on http://[^:/]+:(\d+)/")
_COPY_IGNORE = shutil.ignore_patterns(".git", ".venv*", "__pycache__", "*.egg-info", "build", "dist",
                                      ".pytest_cache", ".hypothesis", "artifacts")


def quick_start_commands() -> list[str]:
    """The commands of the README's Quick start block, without their comments."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "the Quick start has no sh block"
    return [line.split("  # ", 1)[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_the_quick_start_has_a_run_and_a_test_command() -> None:
    run, test = quick_start_commands()
    assert run.endswith("signal-srv") and "pytest" in test, (run, test)


def test_ci_runs_the_readme_test_command_exactly() -> None:
    test = quick_start_commands()[1]
    script = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert any(line.startswith(test) for line in script.splitlines()), f".ci/run does not run {test!r}"


def distribution_env() -> dict[str, str]:
    """This environment with only the distribution's programs on PATH, and no Python or signal_srv settings."""
    dropped = ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYENV_", "CONDA_", "SIGNAL_SRV_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
    env["PATH"] = DISTRIBUTION_PATH
    return env


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    """The working tree as it is (uncommitted changes too), without build output or environments."""
    copy = tmp_path / "signal_srv"
    shutil.copytree(ROOT, copy, ignore=_COPY_IGNORE, symlinks=True)
    return copy


@pytest.fixture
def distribution_python() -> None:
    python = shutil.which("python3", path=DISTRIBUTION_PATH)
    if python is None:
        skip_or_fail(f"no python3 on {DISTRIBUTION_PATH}: apt-get install python3")
    if subprocess.run([python, "-c", "import ensurepip, venv"], capture_output=True).returncode:
        skip_or_fail(f"{python} cannot create virtual environments: apt-get install python3-venv")


class Shell:
    """A command run by ``sh -c``; its output is collected, and the first port it logs listening on is noted."""

    def __init__(self, command: str, cwd: Path, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(["/bin/sh", "-c", command], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
        self.lines: list[str] = []
        self.port: int | None = None
        self.listening = threading.Event()
        self.finished = threading.Event()
        threading.Thread(target=self._read, name="quick-start-output", daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            match = _LISTENING.search(line)
            if match and not self.listening.is_set():
                self.port = int(match.group(1))
                self.listening.set()
        self.finished.set()
        self.listening.set()  # the command ended without listening: stop waiting

    def output(self) -> str:
        return "".join(self.lines[-40:])

    def children(self) -> list[int]:
        path = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(pid) for pid in path.read_text().split()] if path.exists() else []

    def server_pid(self) -> int:
        """The server's pid: the shell's one child, or the shell itself if it exec'd the last command."""
        children = self.children()
        assert len(children) <= 1, children
        return children[0] if children else self.process.pid

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def shell_runs() -> Iterator[list[Shell]]:
    shells: list[Shell] = []
    yield shells
    for shell in shells:
        for pid in shell.children():
            os.kill(pid, signal.SIGKILL)
        shell.stop()


@pytest.mark.e2e
def test_the_readme_run_command_starts_the_server_with_the_distributions_python(
    repo_copy: Path, distribution_python: None, shell_runs: list[Shell]
) -> None:
    port = free_port()
    command = f"{quick_start_commands()[0]} --port={port}"
    shell = Shell(command, repo_copy, distribution_env())
    shell_runs.append(shell)
    assert shell.listening.wait(INSTALL_TIMEOUT), f"{command!r} did not start within {INSTALL_TIMEOUT:.0f} s"
    assert shell.port == port, f"{command!r} did not start listening on {port}:\n{shell.output()}"
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=TIMEOUT) as answer:
        assert answer.status == 200
    venv = (repo_copy / ".venv" / "pyvenv.cfg").read_text()
    assert re.search(r"^home = /usr/bin$", venv, re.M), venv  # made from the distribution's Python
    os.kill(shell.server_pid(), signal.SIGTERM)
    assert shell.process.wait(TIMEOUT) == 0, shell.output()
    assert shell.finished.wait(TIMEOUT) and "signal_srv stopped" in shell.output(), shell.output()
