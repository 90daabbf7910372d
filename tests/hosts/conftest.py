"""The three-host topology (see topology.py and lab.py), set up once for the session and torn down
at its end, also when a test fails; a run that died before leaves nothing that the next one trips on.

Run as root: `.venv/bin/python -m pytest tests/hosts` (bash setup.sh test does, after the rest of
tests/ ran as the unprivileged account)."""

import json
import os
import re
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from .lab import PROJECT, accepted_logins, log_size, make_builder, make_repo, open_lab, ready_login_node
from .topology import STATE, run


@pytest.fixture(scope="session")
def lab():
    with open_lab() as lab:
        yield lab


@pytest.fixture(scope="session")
def builder_report(lab):
    return make_builder(lab)


@pytest.fixture(scope="session")
def login_ready(lab, builder_report):
    return ready_login_node(lab, builder_report)


class Watcher:
    """Samples the machine while a run goes on (every `interval` s): processes of the login account
    that run Docker's tools or name its socket, and the TCP sockets that the login account's
    Jupyter server listens on, on node1."""

    DOCKER_WORDS = ("docker", "dockerd", "docker-buildx", "buildctl", "repo2docker")

    def __init__(self, lab, interval=0.5):
        self.lab = lab
        self.interval = interval
        self.docker_processes = set()
        self.node_listening = set()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.watch, name="watcher", daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopped.set()
        self.thread.join()

    def watch(self):
        uid = self.lab.login_account.uid
        while not self.stopped.wait(self.interval):
            for _pid, cmdline in processes_of(uid):
                words = cmdline.split("\0")
                if any(Path(word).name in self.DOCKER_WORDS for word in words[:3]) or "docker.sock" in cmdline:
                    self.docker_processes.add(cmdline.replace("\0", " ").strip())
            for address, port, pids in self.lab.node.listening():
                # the Jupyter server's socket (srun, in the sandbox job, listens on every address)
                if any(owner(pid) == uid and "jupyter" in command_line(pid) for pid in pids):
                    self.node_listening.add((address, port))


def owner(pid):
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def command_line(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").replace("\0", " ")
    except OSError:
        return ""


def processes_of(uid):
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and owner(entry.name) == uid:
            try:
                yield int(entry.name), (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue


DEMO_FILES = ("Dockerfile", "entrypoint", "start", "hello.ipynb", "README.md")


@dataclass
class Journey:
    """`snakemake --profile remote --config repo=<served repo> ref=main launch_on=slurm`, as the login
    account on the login host, and what was seen meanwhile."""

    url: str
    sha: str
    command: list
    result: subprocess.CompletedProcess
    accepted_logins: list
    watcher: Watcher
    folder: Path

    @property
    def output(self):
        return self.result.stdout + self.result.stderr

    def sandbox_jobs(self):
        return re.findall(r"has been submitted with SLURM jobid (\d+)", self.output)

    def jupyter_jobs(self):
        return re.findall(r"launch_jupyter: submitted Slurm job (\d+)", self.output)

    def launch_error(self):
        return next((line for line in self.result.stderr.splitlines() if line.startswith("launch_jupyter: ")), "")

    def connection(self):
        """launch.json, or a failure that names what the run said instead."""
        path = self.folder / "launch.json"
        assert path.exists(), (
            f"no Jupyter server: the run failed ({self.result.returncode}): {self.launch_error() or self.result.stderr[-2000:]}"
        )
        return json.loads(path.read_text())


@pytest.fixture(scope="session")
def demo(lab):
    """The repository the journey builds: the bundled example's Dockerfile (Debian's Jupyter, no
    PyPI), its start script and notebook, served by the login host's git daemon."""
    work = STATE / "repos" / "demo"
    make_repo(work, {name: PROJECT / "example" / name for name in DEMO_FILES})
    url = lab.git.publish("demo", work)
    sha = run(["git", "-C", work, "rev-parse", "HEAD"]).stdout.strip()
    return url, sha


@pytest.fixture(scope="session")
def journey(lab, login_ready, demo):
    url, sha = demo
    command = ["snakemake", "--profile", "remote", "--config", f"repo={url}", "ref=main", "launch_on=slurm"]
    since = log_size()
    with Watcher(lab) as watcher:
        result = lab.as_login(command, check=False, timeout=2400)
    folders = list((lab.checkout / "results").glob(f"*/{sha}"))
    assert len(folders) == 1, f"no results/*/{sha} folder; the run said:\n{result.stdout}\n{result.stderr[-4000:]}"
    return Journey(url, sha, command, result, accepted_logins(since), watcher, folders[0])
