"""Our own process handling: a recorded server is signalled only while it is the very process
that was started, and a step's tools end with the step, however it ends."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from repo2singularity import jupyter, servers, tools
from repo2singularity.launchers.base import LaunchRequest
from repo2singularity.launchers.local import LocalLauncher
from repo2singularity.processes import ProcessIdentity, free_port, listener_in_tree
from repo2singularity.step import StepError

from .conftest import processes_running, started
from .fake_jupyter import Squatter
from .workflow_runner import PROJECT

FAKE_JUPYTER = PROJECT / "tests" / "fake_jupyter.py"


def record(folder, pid, identity):
    folder.mkdir(parents=True, exist_ok=True)
    connection = {"launched_on": "local", "pid": pid, "process": identity, "url": "http://127.0.0.1:1/", "started": jupyter.now()}
    servers.record_launch(folder / "launch.json", connection)
    return folder / "launch.json"


def test_stop_never_signals_another_process_that_got_the_recorded_pid(tmp_path):
    """Issue 13 item 3: after a reboot or pid reuse, launch.json's pid belongs to a process the
    launch never started; stop and a relaunch must leave it alone."""
    bystander = started(["sleep", "60"], start_new_session=True)
    try:
        real = ProcessIdentity.of(bystander.pid)
        results = tmp_path / "results"
        # the same pid, but the server recorded there started at another time, or ran another command
        earlier = record(results / "a" / ("0" * 40), bystander.pid, {**real.record(), "started": real.started - 3600})
        other_command = record(results / "b" / ("1" * 40), bystander.pid, {**real.record(), "command": ["apptainer", "run", "x"]})
        older_format = record(results / "c" / ("2" * 40), bystander.pid, None)
        # an older record without the identity can only tell that its pid is in use
        assert [row["state"] for row in servers.server_rows(results)] == ["ended", "ended", "running"]
        assert servers.stop_all(results) == [(earlier, False), (other_command, False), (older_format, False)]
        servers.retire_previous(results / "a" / ("0" * 40) / "launch.json")
        # no wait needed: a stop that signals waits until the group has ended (at least a zombie,
        # which poll reaps), so a bystander still running now was never stopped
        assert bystander.poll() is None, "stop signalled a process it never started"
        # the very process recorded is stopped
        mine = record(results / "d" / ("3" * 40), bystander.pid, real.record())
        assert servers.stop_all(results) == [(mine, True)]
        assert bystander.wait(timeout=30) is not None
    finally:
        bystander.kill()


def test_identity_survives_a_round_trip_through_launch_json():
    identity = ProcessIdentity.of(psutil.Process().pid)
    assert ProcessIdentity.from_record(identity.record()).matches(identity)
    assert ProcessIdentity.from_record(None) is None and ProcessIdentity.from_record({"pid": 1}) is None


def test_free_port_is_free_on_the_asked_address():
    import socket

    port = free_port("127.0.0.1")
    with socket.socket() as server:
        server.bind(("127.0.0.1", port))


def fake_runtime(folder, *extra):
    """A program in the runtime's place that starts the stand-in Jupyter (tests/fake_jupyter.py)."""
    program = folder / "runtime"
    words = " ".join(extra)
    program.write_text(f"#!/bin/sh\nexec {sys.executable} {FAKE_JUPYTER} \"$@\" {words}\n")
    program.chmod(0o755)
    return str(program)


def local_launch(folder, runtime, timeout=20):
    request = LaunchRequest(
        runtime=runtime,
        sandbox=str(folder / "sandbox"),
        image={"working_folder": "/home/jovyan"},
        connection_file=str(folder / "launch.json"),
        server_log=str(folder / "server.log"),
        jupyter_command=("jupyter", "notebook"),
        timeout=timeout,
    )
    (folder / "sandbox").mkdir()
    return LocalLauncher().launch(request)


def test_the_local_launch_finds_its_own_server_and_only_it_gets_the_token(tmp_path):
    connection = local_launch(tmp_path, fake_runtime(tmp_path))
    try:
        assert listener_in_tree(connection["pid"], "127.0.0.1", connection["port"])
        assert jupyter.status(connection["url"], connection["token"]) == 200
    finally:
        LocalLauncher().stop(connection)


@pytest.mark.parametrize("server", ["honours port_retries", "moves on whatever it is told"])
def test_a_port_taken_before_the_server_binds_it_never_receives_the_token(tmp_path, monkeypatch, server):
    """Issue 19 item 2: free_port's port is free when picked, and the server binds it a moment
    later; whoever takes it in between (here another program, in tests/root another account)
    must not be sent the token. Jupyter is told port_retries 0, and the token goes only to a
    port that the launched process tree listens on."""
    squatter = Squatter()
    monkeypatch.setattr("repo2singularity.launchers.local.free_port", lambda: squatter.port)
    runtime = fake_runtime(tmp_path, *(["--ignore-port-retries"] if server.startswith("moves") else []))
    try:
        with pytest.raises(StepError) as failed:
            local_launch(tmp_path, runtime, timeout=3)
    finally:
        squatter.close()
    assert squatter.received == [], "a request went to the program that took the port"
    if server.startswith("honours"):
        assert f"port {squatter.port} is not available" in str(failed.value)
    assert not processes_running(str(tmp_path / "sandbox"))


def test_a_slurm_job_names_its_port_only_once_its_own_server_listens_there(tmp_path):
    """Issue 19 item 2, the job's side: the login side sends the token to the port in the node
    file, so the job writes it only once the server itself listens there."""
    def serve(port):
        node_file = tmp_path / f"node-{port}.json"
        env_file = jupyter.token_file(tmp_path, "t0ken")
        code = (
            "import sys\n"
            "from repo2singularity.launchers import slurm\n"
            "slurm.reachable_address = lambda: '127.0.0.1'\n"
            f"slurm.free_port = lambda host: {port}\n"
            f"slurm.serve({str(node_file)!r}, [sys.executable, {str(FAKE_JUPYTER)!r}, '--env-file', {str(env_file)!r}, '--port-retries=0'])\n"
        )
        return node_file, subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)

    squatter = Squatter()
    try:
        node_file, taken = serve(squatter.port)
        output, _ = taken.communicate(timeout=30)
    finally:
        squatter.close()
    assert f"port {squatter.port} is not available" in output
    assert not node_file.exists(), "the job named a port its server does not listen on"
    assert squatter.received == []
    node_file, job = serve(free_port())
    try:
        deadline = time.monotonic() + 30
        while not node_file.exists():
            assert job.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        node = json.loads(node_file.read_text())
        assert listener_in_tree(job.pid, node["host"], node["port"]) == job.pid
        assert jupyter.status(f"http://{node['host']}:{node['port']}/", "t0ken") == 200
    finally:
        job.kill()
        job.communicate()
        (tmp_path / ".jupyter.env").unlink(missing_ok=True)


SECRETS = {"R2S_REPOSITORY_URL_0123456789abcdef": "https://ann:hunter2-url@git.example.org/x", "CI_REGISTRY_LOGIN": "ci:hunter2-registry"}


def environment_of(pid):
    return dict(line.split("=", 1) for line in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in line)


def test_the_local_server_inherits_neither_the_repository_url_nor_the_registry_credential(tmp_path, monkeypatch):
    """Issue 19 item 6: a long-lived server keeps what it inherits in /proc/PID/environ."""
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    launcher = LocalLauncher({"registry_credentials_env": "CI_REGISTRY_LOGIN"})
    request = LaunchRequest(
        runtime=fake_runtime(tmp_path),
        sandbox=str(tmp_path / "sandbox"),
        image={"working_folder": "/home/jovyan"},
        connection_file=str(tmp_path / "launch.json"),
        server_log=str(tmp_path / "server.log"),
        jupyter_command=("jupyter", "notebook"),
        timeout=20,
    )
    (tmp_path / "sandbox").mkdir()
    connection = launcher.launch(request)
    try:
        inherited = environment_of(connection["pid"])
        assert "PATH" in inherited and not SECRETS.keys() & inherited.keys()
        assert not [value for value in inherited.values() if "hunter2" in value]
    finally:
        launcher.stop(connection)


def test_a_step_drops_the_stashed_repository_url_once_it_has_its_params(tmp_path):
    code = (
        "import os\n"
        "from repo2singularity.step import run_step\n"
        "run_step('x', lambda: print(sorted(k for k in os.environ if k.startswith('R2S_REPOSITORY_URL_'))))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **SECRETS}, check=True)
    assert result.stdout == "[]\n"


def test_tools_start_without_code_between_fork_and_exec(monkeypatch, tmp_path):
    """Issue 13 item 8: preexec_fn runs Python (ctypes) after fork in a process with threads,
    which can deadlock; the parent-death signal is set by setpriv in the child instead."""
    seen = {}
    real_popen = subprocess.Popen

    def popen(command, **kwargs):
        seen.update(kwargs, command=command)
        return real_popen(command, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", popen)
    tools.run_logged(["true"], tmp_path / "log", "step")
    assert "preexec_fn" not in seen
    assert seen["command"][:4] == ["setpriv", "--pdeathsig", "TERM", "--"]


def test_a_step_killed_outright_takes_its_tool_with_it(tmp_path):
    script = tmp_path / "step.py"
    script.write_text(
        "import sys\n"
        "from repo2singularity.tools import run_logged\n"
        f"run_logged(['sleep', '300.3'], {str(tmp_path / 'log')!r}, 'step')\n"
    )
    step = subprocess.Popen([sys.executable, str(script)])

    def tool():
        return [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["sleep", "300.3"]]

    deadline = time.monotonic() + 30
    while not tool():
        assert step.poll() is None and time.monotonic() < deadline, "the tool did not start"
        time.sleep(0.05)
    step.kill()
    step.wait()
    deadline = time.monotonic() + 10
    while tool():
        assert time.monotonic() < deadline, "the tool outlived its step"
        time.sleep(0.1)
