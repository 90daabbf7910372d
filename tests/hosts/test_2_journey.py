"""The journey end to end, as the login account on the login host, from its checkout prepared with
`bash setup.sh login remote`: `snakemake --profile remote --config repo=<served repo> ref=main
launch_on=slurm`. The builder steps run on the builder over SSH, the sandbox and Jupyter in one
Slurm job on node1; the user's own machine (the laptop namespace) reaches the server through the
tunnel the run prints. One run serves every test here."""

import json
import re
import shlex
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from ..jupyter_client import execute
from .lab import jupyter_status
from .topology import ADDRESSES, BUILD_ACCOUNT, LOGIN_ACCOUNT, wait_for

TUNNEL_LINE = re.compile(r"from your own machine: (ssh -N -L \S+ \S+), then open (\S+)")


def test_the_builder_steps_ran_on_the_builder_over_ssh(lab, journey):
    assert len(journey.accepted_logins) == 3, f"one SSH connection per builder step, from {ADDRESSES['login']}: {journey.accepted_logins}"
    receipt = json.loads((journey.folder / "image.json").read_text())
    assert receipt["builder"] == {"host": ADDRESSES["builder"], "port": 22, "user": BUILD_ACCOUNT}
    assert subprocess.run(["docker", "image", "inspect", receipt["tag"]], capture_output=True).returncode == 0
    name = journey.folder.parent.name
    sif = journey.folder / f"{name}.sif"
    digest = subprocess.run(["sha256sum", sif], capture_output=True, text=True, check=True).stdout.split()[0]
    assert digest == (journey.folder / f"{name}.sif.sha256").read_text().split()[0]
    assert sif.stat().st_uid == lab.login_account.uid


def test_the_login_account_never_touched_docker(lab, journey):
    assert journey.watcher.docker_processes == set()
    refused = lab.login.run(["docker", "version"], user=lab.login_account, check=False)
    assert refused.returncode != 0 and "permission denied" in refused.stderr.lower()
    assert "docker.sock" not in journey.output


def test_the_jupyter_job_unpacked_the_sandbox_on_node1(lab, journey):
    # one Slurm job, not an executor job for the sandbox and then the server's
    assert journey.sandbox_jobs() == [], journey.output[-3000:]
    log = (journey.folder / "logs" / "unpack_sandbox.log").read_text()
    assert "on node node1, in the Jupyter server's Slurm job" in log, log
    assert (journey.folder / "sandbox" / "home" / "jovyan" / "hello.ipynb").is_file()
    assert journey.folder.joinpath("sandbox").stat().st_uid == lab.login_account.uid


def test_the_jupyter_job_ran_on_node1(lab, journey):
    jobs = journey.jupyter_jobs()
    assert len(jobs) == 1, journey.output[-3000:]
    record = lab.cluster.job(jobs[0])
    assert (record["NodeList"], record["UserId"].split("(")[0]) == ("node1", LOGIN_ACCOUNT), record


def test_jupyter_listens_on_node1s_address_and_not_on_loopback(lab, journey):
    listening = journey.watcher.node_listening
    assert listening, "no process of the login account listened on node1 during the run"
    loopback = sorted(f"{address}:{port}" for address, port in listening if address.startswith("127."))
    assert not loopback, f"Jupyter listened on node1's loopback ({', '.join(loopback)}), which the login node cannot reach"
    assert {address for address, _ in listening} == {ADDRESSES["node1"]}


def test_the_run_completes_and_prints_the_tunnel(lab, journey):
    assert journey.result.returncode == 0, f"the run failed: {journey.launch_error() or journey.result.stderr[-3000:]}"
    connection = journey.connection()
    assert connection["host"] == ADDRESSES["node1"] and connection["node"] == "node1"
    assert TUNNEL_LINE.search(journey.result.stdout), journey.result.stdout[-2000:]


def test_from_the_login_host_it_answers_with_the_token_only(lab, journey):
    connection = journey.connection()
    assert lab.login.call(jupyter_status, connection["url"], connection["token"]) == 200
    assert lab.login.call(jupyter_status, connection["url"]) == 403


@pytest.fixture(scope="module")
def tunnel(lab, journey):
    """The printed `ssh -N -L ...` command, run on the user's own machine (it reaches the login
    host only), with a key the login account authorized and the login host's key known."""
    connection = journey.connection()
    found = TUNNEL_LINE.search(journey.result.stdout)
    assert found, f"the run printed no tunnel command:\n{journey.result.stdout[-2000:]}"
    command, url = shlex.split(found.group(1)), found.group(2)
    user_host = command[-1]
    assert user_host.startswith(f"{LOGIN_ACCOUNT}@"), user_host
    folder = Path(tempfile.mkdtemp(prefix="laptop-", dir="/run/r2s-hosts"))
    key = folder / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
    authorized = lab.login_account.home / ".ssh" / "authorized_keys"
    authorized.write_text(Path(f"{key}.pub").read_text())
    subprocess.run(["chown", f"{LOGIN_ACCOUNT}:{LOGIN_ACCOUNT}", authorized], check=True)
    authorized.chmod(0o600)
    (folder / "known_hosts").write_text(lab.tunnel_sshd.known_hosts_line(user_host.split("@", 1)[1]))
    (folder / "config").write_text(
        f"IdentityFile {key}\nUserKnownHostsFile {folder / 'known_hosts'}\nStrictHostKeyChecking yes\n"
        "BatchMode yes\nExitOnForwardFailure yes\n"
    )
    process = lab.laptop.popen([command[0], "-F", folder / "config", *command[1:]], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    port = int(command[command.index("-L") + 1].split(":")[0])
    try:
        wait_for(lambda: process.poll() is not None or lab.laptop.connects("127.0.0.1", port), 30, "the tunnel did not open")
        assert process.poll() is None, f"the tunnel command ended: {process.stderr.read()}"
        yield url, connection["token"]
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_through_the_printed_tunnel_a_kernel_runs_code(lab, tunnel):
    url, token = tunnel
    base = url.split("?", 1)[0]
    assert base.startswith("http://127.0.0.1:")
    assert lab.laptop.call(execute, base, token, "import socket; print(socket.gethostname(), 6 * 7)") == "node1 42"


def test_chromium_through_the_tunnel_shows_the_notebook_list(lab, tunnel):
    url, _ = tunnel
    profile = tempfile.mkdtemp(prefix="chromium-", dir="/run/r2s-hosts")
    result = lab.laptop.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}", "--virtual-time-budget=20000", "--dump-dom", url],
        env={"HOME": profile}, check=False, timeout=180,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    page = result.stdout
    assert "Jupyter" in page
    for name in ("hello.ipynb", "README.md", "Dockerfile"):
        assert f">{name}<" in page or f'"{name}"' in page, f"{name} not in the notebook list:\n{page[-3000:]}"


def test_stop_cancels_the_job(lab, journey):
    connection = journey.connection()
    job = connection["slurm_job_id"]
    assert lab.cluster.job(job)["JobState"] == "RUNNING"
    lab.as_login(["snakemake", "--profile", "remote", "stop", "--config", f"repo={journey.url}", "ref=main"])
    assert lab.cluster.job(job)["JobState"] == "CANCELLED"
    assert not (journey.folder / "launch.json").exists() and (journey.folder / "launch.ended.json").exists()


def test_idle_culling_ends_the_server_by_itself(lab, journey):
    idle = 20
    result = lab.as_login([*journey.command, f"idle_timeout={idle}"], check=False)
    launched = re.findall(r"launch_jupyter: submitted Slurm job (\d+)", result.stderr)
    assert result.returncode == 0 and launched, f"the relaunch failed: {result.stderr[-3000:]}"
    job = launched[-1]
    started = time.monotonic()
    # notebook 6 looks for inactivity once a minute
    state = wait_for(lambda: (s := lab.cluster.job(job).get("JobState")) not in ("RUNNING", "PENDING", "COMPLETING") and s, idle + 240,
                     f"the server (job {job}) was still running {idle + 240} s after its launch", interval=2)
    assert state == "COMPLETED", f"job {job} ended {state}, not by itself"
    assert time.monotonic() - started >= idle
