"""Issue 19 item 2 with a real other account: a throw-away account takes the port that the local
launch picked before the server binds it; the launch fails and that account receives no token.
Run as root (it makes the account): `pytest tests/root`."""

import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from repo2singularity.launchers.base import LaunchRequest
from repo2singularity.launchers.local import LocalLauncher
from repo2singularity.step import StepError

TESTS = Path(__file__).resolve().parent.parent

if os.geteuid() != 0:
    raise RuntimeError("tests/root runs as root: it makes throw-away accounts (pytest tests/root, as root)")


@pytest.fixture
def other_account():
    name = f"r2st{secrets.token_hex(4)}s"
    subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/sh", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["pkill", "-KILL", "-u", name], check=False)
        subprocess.run(["userdel", name], check=False)


@pytest.mark.parametrize("extra", [[], ["--ignore-port-retries"]])
def test_another_account_on_the_port_receives_no_token(tmp_path, monkeypatch, other_account, extra):
    tmp_path.chmod(0o755)
    squatter = subprocess.Popen(
        ["runuser", "-u", other_account, "--", sys.executable, str(TESTS / "fake_jupyter.py"), "--squat"],
        stdout=subprocess.PIPE, text=True, cwd="/", start_new_session=True,
    )  # fmt: skip
    try:
        port = int(squatter.stdout.readline())
        monkeypatch.setattr("repo2singularity.launchers.local.free_port", lambda: port)
        runtime = tmp_path / "runtime"
        runtime.write_text(f"#!/bin/sh\nexec {sys.executable} {TESTS / 'fake_jupyter.py'} \"$@\" {' '.join(extra)}\n")
        runtime.chmod(0o755)
        (tmp_path / "sandbox").mkdir()
        request = LaunchRequest(
            runtime=str(runtime),
            sandbox=str(tmp_path / "sandbox"),
            image={"working_folder": "/home/jovyan"},
            connection_file=str(tmp_path / "launch.json"),
            server_log=str(tmp_path / "server.log"),
            jupyter_command=("jupyter", "notebook"),
            timeout=3,
        )
        with pytest.raises(StepError):
            LocalLauncher().launch(request)
    finally:
        # runuser's child holds the pipe too: end the whole group
        os.killpg(squatter.pid, signal.SIGKILL)
        received, _ = squatter.communicate()
    assert "received" not in received, received
