"""Our own process handling: a recorded server is signalled only while it is the very process
that was started, and a step's tools end with the step, however it ends."""

import subprocess
import sys
import time

import psutil
import pytest

from repo2singularity import jupyter, servers, tools
from conftest import started
from repo2singularity.processes import ProcessIdentity, free_port
from workflow_runner import PROJECT


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
        f"sys.path.insert(0, {str(PROJECT / 'workflow' / 'scripts')!r})\n"
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
