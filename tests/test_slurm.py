"""Sandbox and Jupyter on a real single-node Slurm cluster (bash setup/slurm.sh starts it), run
by an unprivileged account with the Slurm profile, as on an HPC login node. The first tests are
unit tests of the launch's own logic; they need no cluster."""

import getpass
import json
import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil
import pytest
import requests

from repo2singularity import jupyter, servers, slurm
from repo2singularity.launchers import slurm as slurm_launcher
from repo2singularity.launchers.base import LaunchRequest
from repo2singularity.launchers.local import LocalLauncher
from repo2singularity.launchers.slurm import own_addresses, reachable_address, ssh_tunnel
from repo2singularity.processes import ProcessIdentity
from repo2singularity.step import StepError

from .conftest import PROJECT, files_holding, process_tree, processes_running, started, still_running
from .jupyter_client import api, contents, execute, new_notebook
from .workflow_runner import snakemake

PROFILE = str(PROJECT / "profiles" / "slurm")
PARTITION = "debug"


# ------------------------------------------------------------------ units


def test_sbatch_command_is_an_argument_list_with_only_the_asked_settings(tmp_path):
    command = slurm.sbatch_command(
        tmp_path / "job", "r2s-jupyter-x", tmp_path / "log", tmp_path, partition="gpu", time_limit="1:00:00",
        cpus=4, mem_mb=8000, gpus=1, extra_args=["--qos=short; rm -rf /"],
    )
    assert command[0] == "sbatch" and command[-1] == str(tmp_path / "job")
    for expected in ("--partition=gpu", "--time=1:00:00", "--cpus-per-task=4", "--mem=8000M", "--gpus=1", "--parsable"):
        assert expected in command
    # extra arguments stay one word each: no shell ever sees them
    assert "--qos=short; rm -rf /" in command
    bare = slurm.sbatch_command(tmp_path / "job", "n", tmp_path / "log", tmp_path, cpus=1)
    assert not any(word.startswith(("--partition", "--time", "--mem", "--gpus")) for word in bare)


def test_refusal_reason_is_slurms_last_line_without_prefixes():
    stderr = "sbatch: error: Memory specification can not be satisfied\nsbatch: error: Batch job submission failed: Requested node configuration is not available\n"
    assert slurm.refusal_reason(stderr) == "Requested node configuration is not available"
    assert slurm.refusal_reason("") == "sbatch failed without a message"


def test_job_script_quotes_every_word(tmp_path):
    script = slurm.job_script("/venv/bin/python", "/w/serve_jupyter.py", tmp_path / "node.json", ["apptainer", "run", "/a b/sandbox", "$(x)"])
    assert script.startswith("#!/bin/sh\n")
    assert "'/a b/sandbox'" in script and "'$(x)'" in script
    assert "serve_jupyter.py " in script and " -- apptainer run " in script


def test_job_script_that_unpacks_first_passes_the_sif_and_sandbox_as_words(tmp_path):
    unpack = ["apptainer", "/r s/x.sif", "/r s/x.sif.sha256", "/r s/sandbox", "/r s/logs/unpack_sandbox.log"]
    script = slurm.job_script("/venv/bin/python", "/w/serve_jupyter.py", tmp_path / "node.json", ["apptainer", "run", "/r s/sandbox"], unpack)
    words = shlex.split(script.splitlines()[-1])
    assert words[4:10] == ["--unpack", *unpack] and words[10] == "--" and words[11:] == ["apptainer", "run", "/r s/sandbox"]


def test_a_job_that_unpacks_keeps_the_images_home_only_when_the_sandbox_has_it(tmp_path):
    sandbox = tmp_path / "sandbox"
    image = {"working_folder": "/home/jovyan", "home": "/home/jovyan"}
    command = jupyter.server_command("apptainer", sandbox, image, tmp_path / "env", ["jupyter", "notebook"], None, unpacked=False)
    assert command[command.index("--home") + 1] == f"{sandbox}/home/jovyan:/home/jovyan"
    assert "--home" not in slurm_launcher.without_missing_home(command)
    (sandbox / "home" / "jovyan").mkdir(parents=True)
    assert slurm_launcher.without_missing_home(command) == command


def test_a_sandbox_newer_than_its_sif_is_kept_an_older_one_unpacked_again(tmp_path):
    sif, sandbox = tmp_path / "x.sif", tmp_path / "sandbox"
    sif.write_text("sif")
    assert not slurm_launcher.sandbox_is_current(sandbox, sif)
    sandbox.mkdir()
    os.utime(sif, (1000, 1000))
    assert slurm_launcher.sandbox_is_current(sandbox, sif)
    os.utime(sif, None)
    os.utime(sandbox, (1000, 1000))
    assert not slurm_launcher.sandbox_is_current(sandbox, sif)


def test_a_job_that_unpacks_gets_the_launch_timeout_for_that_and_says_so(monkeypatch, tmp_path):
    monkeypatch.setattr(slurm, "job_state", lambda job_id: ("RUNNING", "node1"))
    monkeypatch.setattr(slurm_launcher, "POLL_SECONDS", 0.05)
    log = tmp_path / "launch.log"
    with pytest.raises(StepError) as error:
        slurm_launcher.SlurmLauncher.wait_for_server("7", tmp_path / "node.json", "t", 600, 1, tmp_path / "log", log, True)
    assert "the Slurm job 7 (RUNNING: node1) did not unpack the sandbox within 1 s (launch_timeout" in str(error.value)
    assert "Slurm job 7 left the queue (RUNNING)" in log.read_text()


def test_the_server_gets_its_own_launch_timeout_from_when_the_job_says_its_sandbox_is_ready(monkeypatch, tmp_path):
    node_file = tmp_path / "node.json"
    calls = {"n": 0}

    def job_state(job_id):
        calls["n"] += 1
        if calls["n"] == 15:  # after most of the first second, the unpack ends
            slurm_launcher.unpacked_file(node_file).write_text(json.dumps({"unpack_seconds": 0.7}))
        if calls["n"] == 25:
            node_file.write_text(json.dumps({"node": "node1", "host": "127.0.0.1", "port": 9}))
        return "RUNNING", "node1"

    monkeypatch.setattr(slurm, "job_state", job_state)
    monkeypatch.setattr(slurm_launcher, "POLL_SECONDS", 0.05)
    monkeypatch.setattr(slurm_launcher, "status", lambda url, token: 200 if calls["n"] >= 30 else None)
    log = tmp_path / "launch.log"
    node = slurm_launcher.SlurmLauncher.wait_for_server("7", node_file, "t", 600, 1, tmp_path / "log", log, True)
    assert node["node"] == "node1"
    text = log.read_text()
    assert "sandbox ready (unpacked in 0.7 s)" in text and "server listening on 127.0.0.1:9" in text and "answered with the token" in text


def test_culling_settings_follow_the_jupyter_application():
    assert jupyter.culling_arguments(["jupyter", "notebook"], 0) == []
    classic = jupyter.culling_arguments(["jupyter", "notebook"], 600)
    assert "--NotebookApp.shutdown_no_activity_timeout=600" in classic
    assert "--MappingKernelManager.cull_idle_timeout=600" in classic
    assert "--MappingKernelManager.cull_interval=60" in classic
    assert "--ServerApp.shutdown_no_activity_timeout=20" in jupyter.culling_arguments(["jupyter", "lab"], 20)


def test_server_command_binds_each_folder_as_one_argument(tmp_path):
    image = {"working_folder": "/home/jovyan", "home": "/home/jovyan"}
    command = jupyter.server_command(
        "apptainer", tmp_path, image, tmp_path / "env", ["jupyter", "notebook"], 1, binds=["/scratch/a b:/mnt", "/p:/srv:ro"]
    )
    assert command[command.index("/scratch/a b:/mnt") - 1] == "--bind"
    assert command[command.index("/p:/srv:ro") - 1] == "--bind"
    assert command.index("/p:/srv:ro") < command.index(str(tmp_path.resolve()))


def test_a_home_outside_the_sandbox_is_never_bound(tmp_path):
    # issue 19 item 7: a receipt's home with ".." parts named a folder beside the sandbox
    (tmp_path / "sandbox" / "home" / "jovyan").mkdir(parents=True)
    (tmp_path / "home" / "u").mkdir(parents=True)
    for home, bound in (("/../home/u", False), ("/home/jovyan", True)):
        image = {"working_folder": "/home/jovyan", "home": home}
        command = jupyter.server_command("apptainer", tmp_path / "sandbox", image, tmp_path / "env", ["jupyter", "notebook"], 1)
        assert ("--home" in command) == bound, command


def test_server_command_for_a_slurm_job_leaves_address_and_port_to_the_node(tmp_path):
    sandbox = tmp_path / "sandbox"
    (sandbox / "home" / "jovyan").mkdir(parents=True)
    image = {"working_folder": "/home/jovyan", "home": "/home/jovyan"}
    command = jupyter.server_command(
        "apptainer", sandbox, image, tmp_path / "env", ["jupyter", "notebook"], None, runtime_args=["--nv"], jupyter_args=["--x=1"]
    )
    assert command[:3] == ["apptainer", "run", "--nv"]
    assert "--x=1" in command
    assert not any(word.startswith(("--ip=", "--port=")) for word in command)
    # the server takes the port it is given or ends: it never moves on to another one
    assert "--port-retries=0" in command


def test_the_server_listens_where_the_login_node_reaches_the_node_never_on_its_names_loopback(monkeypatch):
    """Issue 14: a stock Debian node maps its own name to 127.0.1.1, which no login node reaches."""
    monkeypatch.setattr(socket, "gethostname", lambda: "node1")
    monkeypatch.setattr("repo2singularity.launchers.slurm.resolve", lambda name: {"node1": "127.0.1.1", "login": "10.9.8.1"}.get(name))
    monkeypatch.setattr("repo2singularity.launchers.slurm.route_source", lambda address: {"10.9.8.1": "10.9.8.3"}.get(address, "127.0.0.1"))
    monkeypatch.setattr("repo2singularity.launchers.slurm.own_addresses", lambda: ["127.0.0.1", "10.9.8.3"])
    monkeypatch.setattr("repo2singularity.launchers.slurm.slurm_node_address", lambda node: None)
    assert reachable_address("login", "node1") == "10.9.8.3"
    # the submit host cannot be resolved here: an interface's address, not the name's 127.0.1.1
    assert reachable_address("elsewhere", "node1") == "10.9.8.3"
    # submitted from this very host: loopback is reachable from there
    assert reachable_address("node1", "node1") == "127.0.0.1"


def test_age_listing_and_tunnel():
    started = datetime(2026, 1, 1, tzinfo=UTC)
    assert servers.age(started.isoformat(), started + timedelta(seconds=42)) == "42s"
    assert servers.age(started.isoformat(), started + timedelta(minutes=3, seconds=5)) == "3m05s"
    assert servers.age(started.isoformat(), started + timedelta(hours=2, minutes=7)) == "2h07m"
    assert ssh_tunnel("10.1.2.3", 40001, "login.example.org", "ann") == "ssh -N -L 40001:10.1.2.3:40001 ann@login.example.org"
    assert servers.format_servers([]) == "no Jupyter servers recorded"
    row = {"name": "x", "sha": "0123456789ab", "state": "running", "age": "1s", "where": "Slurm job 7 on n1", "url": "http://n1:1/", "details": "d"}
    table = servers.format_servers([row]).splitlines()
    assert table[0].split()[:4] == ["NAME", "SHA", "STATE", "AGE"] and "Slurm job 7 on n1" in table[1]


def test_relaunch_retires_the_previous_local_server_and_stop_marks_it_ended(tmp_path):
    def launched_in(folder):
        process = started(["sleep", "60"], start_new_session=True)
        # what the local launcher records of the server it started
        identity = ProcessIdentity.of(process.pid).record()
        connection = {"launched_on": "local", "pid": process.pid, "process": identity, "url": "http://127.0.0.1:1/", "started": jupyter.now()}
        servers.record_launch(folder / "launch.json", connection)
        return process, connection

    folder = tmp_path / "results" / "x" / ("0" * 40)
    folder.mkdir(parents=True)
    first, _ = launched_in(folder)
    # Snakemake deletes launch.json before it reruns the launch; the record remains
    (folder / "launch.json").unlink()
    servers.retire_previous(folder / "launch.json")
    assert first.wait(timeout=30) is not None
    assert json.loads((folder / "launch.ended.json").read_text())["replaced"] is True
    second, connection = launched_in(folder)
    assert [row["state"] for row in servers.server_rows(tmp_path / "results")] == ["running"]
    assert servers.stop_all(tmp_path / "results") == [(folder / "launch.json", True)]
    assert second.wait(timeout=30) is not None
    assert not (folder / "launch.json").exists() and not servers.record_file(folder / "launch.json").exists()
    assert json.loads((folder / "launch.ended.json").read_text())["pid"] == connection["pid"]
    assert stat.S_IMODE((folder / "launch.ended.json").stat().st_mode) == 0o600


@pytest.mark.parametrize("states", [["CONFIGURING"], ["RUNNING", "SUSPENDED"], ["PENDING", "REQUEUED"]])
def test_a_job_that_left_the_queue_is_bounded_by_the_launch_timeout_whatever_its_state(monkeypatch, tmp_path, states):
    """Issue 13 item 6: only PENDING has a deadline of its own (slurm_queue_timeout); any other
    state the job lingers in counts against launch_timeout, and the error says which."""
    seen = iter(states)
    last = {"state": states[0]}

    def job_state(job_id):
        last["state"] = next(seen, last["state"])
        return last["state"], "node1" if last["state"] == "RUNNING" else "Reason"

    monkeypatch.setattr(slurm, "job_state", job_state)
    monkeypatch.setattr(slurm_launcher, "POLL_SECONDS", 0.05)
    with pytest.raises(StepError) as error:
        slurm_launcher.SlurmLauncher.wait_for_server("7", tmp_path / "node.json", "t", 600, 1, tmp_path / "log")
    assert f"(Slurm job 7, {states[-1]}: " in str(error.value) and "did not answer within 1 s" in str(error.value)


# ------------------------------------------------------------------ the real cluster

integration = pytest.mark.integration


def run_tool(*command):
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"{command} failed (is the cluster up? as root: bash setup/slurm.sh): {result.stderr}"
    return result.stdout


def jobs_from(workdir):
    """{job id: state} of this account's jobs, running or ended (squeue keeps an ended job for
    MinJobAge), whose working folder is in `workdir`: the jobs this module's runs submitted,
    whatever else the cluster runs."""
    jobs = {}
    for line in run_tool("squeue", "--noheader", "--user", str(os.getuid()), "--states=all", "--format=%i|%T|%Z").splitlines():
        job_id, state, folder = line.split("|", 2)
        if Path(folder) == workdir or workdir in Path(folder).parents:
            jobs[job_id] = state
    return jobs


def jobs_since(workdir, before):
    """{job id: state} of the jobs of ours that appeared in the queue since `before`; none of them
    may still run."""
    appeared = {job_id: state for job_id, state in jobs_from(workdir).items() if job_id not in before}
    assert not [job_id for job_id, state in appeared.items() if slurm.is_active(state)], f"a failed launch left a job running: {appeared}"
    return appeared


def submitted_jobs(result):
    """The jobs a launch says it submitted."""
    return re.findall(r"submitted Slurm job (\d+)", result.stderr)


def job_processes(job_id):
    """The processes of a running job, as Slurm lists them on this node, with their descendants."""
    pids = [int(line.split()[0]) for line in run_tool("scontrol", "listpids", str(job_id)).splitlines() if line.split()[0].isdigit()]
    processes = {}
    for pid in pids:
        try:
            processes.update((process.pid, process) for process in process_tree(pid))
        except psutil.NoSuchProcess:
            pass
    return list(processes.values())


def command_lines(processes):
    lines = []
    for process in processes:
        try:
            lines.append(" ".join(process.cmdline()))
        except psutil.NoSuchProcess:
            pass
    return lines


def wait_until(condition, timeout, message):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(1)


@pytest.fixture(scope="module")
def cluster():
    """The single-node cluster must answer; a missing tool is a failure, never a skip."""
    for tool in ("sinfo", "sbatch", "squeue", "scancel", "scontrol"):
        assert shutil.which(tool), f"{tool} not found: as root run `bash setup/slurm.sh`"
    result = subprocess.run(["sinfo", "--noheader", "--partition", PARTITION, "--format=%T"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.split(), f"no Slurm partition {PARTITION!r}: {result.stderr.strip()} (bash setup/slurm.sh)"
    assert result.stdout.split()[0] in ("idle", "mixed", "allocated"), f"node state: {result.stdout.strip()}"


@pytest.fixture(scope="module")
def example(cluster, tmp_path_factory):
    from .conftest import GitRepo

    base = tmp_path_factory.mktemp("slurm")
    repo = GitRepo(base / "example-repo", branch="main")
    shutil.copytree(PROJECT / "example", repo.path, dirs_exist_ok=True)
    repo.commit("first")
    workdir = base / "work"
    workdir.mkdir()
    # a site's scratch folder, bound into the server
    (base / "scratch").mkdir()
    (base / "scratch" / "note.txt").write_text("from scratch\n")
    return repo, workdir


def config_for(repo, **extra):
    scratch = repo.path.parent / "scratch"
    return {
        "repo": repo.path, "ref": "main", "name": "example", "launch_on": "slurm", "slurm_partition": PARTITION,
        "launch_binds": f"[{scratch}:/mnt:ro]", **extra,
    }


def on_slurm(workdir, *args, **kwargs):
    return snakemake(workdir, "--profile", PROFILE, *args, **kwargs)


def folder_of(workdir, sha):
    return workdir / "results" / "example" / sha


def read_connection(workdir, sha):
    return json.loads((folder_of(workdir, sha) / "launch.json").read_text())


def launch_error(result):
    """The one line launch_jupyter failed with."""
    return next(line for line in result.stderr.splitlines() if line.startswith("launch_jupyter: "))


def stop(workdir, repo):
    return on_slurm(workdir, "stop", config=config_for(repo))


@dataclass
class Launched:
    """The module's one full run with the Slurm profile, as it was when it ended."""

    repo: object
    workdir: Path
    sha: str
    connection: dict  # launch.json right after the run
    result: subprocess.CompletedProcess
    job_records: dict  # `scontrol show job` of each job the run submitted, right after it

    @property
    def folder(self):
        return folder_of(self.workdir, self.sha)


@pytest.fixture(scope="module")
def launched(example):
    """One full run with the Slurm profile: image and SIF here, sandbox and Jupyter as jobs."""
    repo, workdir = example
    started = time.monotonic()
    result = on_slurm(workdir, config=config_for(repo))
    print(f"snakemake start to live Slurm URL (cold, image build included): {time.monotonic() - started:.0f} s")
    sha = repo.head()
    submitted = re.findall(r"Job \d+ has been submitted with SLURM jobid (\d+)", result.stdout + result.stderr)
    # Slurm forgets an ended job MinJobAge after its end, long before a late test looks
    records = {job_id: run_tool("scontrol", "show", "job", job_id) for job_id in submitted}
    yield Launched(repo, workdir, sha, read_connection(workdir, sha), result, records)
    on_slurm(workdir, "stop", config=config_for(repo), check=False)


@pytest.fixture
def server(launched):
    """A Slurm job's server with the module's settings that answers now: the module's run's
    while it runs, else a new one (an earlier test may have stopped or replaced it, in any order)."""
    launch_file = launched.folder / "launch.json"
    if launch_file.exists():
        connection = json.loads(launch_file.read_text())
        if connection["launched_on"] == "slurm" and jupyter.status(connection["url"], connection["token"]) == 200:
            return connection
        stop(launched.workdir, launched.repo)
    on_slurm(launched.workdir, "launch", config=config_for(launched.repo))
    return read_connection(launched.workdir, launched.sha)


@integration
def test_the_jupyter_job_unpacks_the_sandbox_on_its_node_before_it_serves(launched):
    # one Slurm job where there were two: nothing went to the executor, whose round trips
    # (submission, status polls) cost seconds; the builder rules stayed on this machine
    assert not launched.job_records, launched.job_records
    log = (launched.folder / "logs" / "unpack_sandbox.log").read_text()
    assert f"on node {socket.gethostname()}, in the Jupyter server's Slurm job" in log, log
    assert (launched.folder / "sandbox" / "home" / "jovyan").is_dir()
    assert "sandbox ready (unpacked in " in (launched.folder / "logs" / "launch_jupyter.log").read_text()


@integration
def test_a_slurm_server_keeps_users_work_in_the_work_folder(launched, server):
    """Issue 19 item 1: the job binds the image's work folder as work/, outside the sandbox."""
    new_notebook(server, "work/on-the-node.ipynb", "saved through a Slurm job's server")
    assert "saved through a Slurm job's server" in (launched.workdir / "results" / "example" / "work" / "on-the-node.ipynb").read_text()
    assert "on-the-node.ipynb" in {item["name"] for item in contents(server, "work")["content"]}


@integration
def test_the_run_prints_the_url_and_the_tunnel_of_its_server(launched):
    connection, output = launched.connection, launched.result.stdout
    assert connection["launched_on"] == "slurm"
    assert connection["ssh_tunnel"].startswith(f"ssh -N -L {connection['port']}:{connection['host']}:{connection['port']} ")
    assert connection["url_with_token"] in output
    assert connection["ssh_tunnel"] in output


@integration
def test_launch_json_names_node_port_and_job_of_the_server_that_runs(launched, server):
    assert stat.S_IMODE((launched.folder / "launch.json").stat().st_mode) == 0o600
    assert stat.S_IMODE(Path(server["log"]).stat().st_mode) == 0o600
    assert slurm.job_state(server["slurm_job_id"]) == ("RUNNING", server["node"])
    # the server listens on one address of its node, the one this host reaches it by, not on all
    # (the unit test above covers a node whose name maps to 127.0.1.1)
    listening = {c.laddr.ip for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port == server["port"]}
    assert listening == {server["host"]} and server["host"] in own_addresses(), listening


@integration
def test_the_token_is_in_no_command_line_job_record_or_log(launched, server):
    """The token the server really uses (it answers to it), looked for where other accounts or
    the site's staff could see it: `ps`, Slurm's record and copy of the job script, the logs."""
    token, job_id = server["token"], server["slurm_job_id"]
    assert api(server["url"], "api/status", token).status_code == 200
    lines = command_lines(job_processes(job_id))
    # these are the job's processes: Jupyter on the recorded port among them
    assert any("jupyter" in line and f"--port={server['port']}" in line for line in lines), lines
    assert not [line for line in lines if token in line]
    assert not processes_running(token), "the token is on a command line that ps shows"
    record = run_tool("scontrol", "show", "job", "--details", job_id)
    stored_script = run_tool("scontrol", "write", "batch_script", job_id, "-")
    assert f"JobId={job_id} " in record and "serve_jupyter.py" in stored_script
    assert token not in record and token not in stored_script
    assert token not in (launched.folder / "jupyter.sbatch").read_text()
    # the server's log (the job's output) and every other log and record of the runs
    assert Path(server["log"]).stat().st_size > 0
    holding = set(files_holding(token, launched.workdir, skip=["sandbox", "*.sif"]).split())
    assert holding == {str(launched.folder / "launch.json"), str(launched.folder / ".launch.record.json")}, holding
    assert not (launched.folder / ".jupyter.env").exists()


@integration
def test_kernel_runs_code_on_the_node_after_the_start_script(server):
    code = (
        "import os; print(os.getcwd(), os.environ.get('REPO2SINGULARITY_START_RAN'), os.environ.get('SLURM_JOB_ID'),"
        " open('/mnt/note.txt').read().split()[-1], os.path.exists('hello.ipynb'))"
    )
    cwd, start_ran, job_id, scratch, notebook = execute(server["url"], server["token"], code).split()
    # the repository is the working folder, the start script ran, the bind did not hide it
    assert (cwd, start_ran, scratch, notebook) == ("/home/jovyan", "yes", "scratch", "True")
    # --cleanenv keeps the job's variables away from the notebook
    assert job_id == "None"


@integration
def test_servers_lists_the_running_server(launched, server):
    result = on_slurm(launched.workdir, "servers", config=config_for(launched.repo))
    line = next(line for line in result.stderr.splitlines() if line.startswith("example "))
    assert "running" in line and f"Slurm job {server['slurm_job_id']}" in line and server["url"] in line


@integration
def test_relaunch_with_other_settings_replaces_the_server(launched, server):
    first = server
    # Snakemake reruns the launch when its settings change; the first server must not be orphaned
    idle_timeout = 3601 if first.get("idle_timeout") == 3600 else 3600
    on_slurm(launched.workdir, "launch", config=config_for(launched.repo, idle_timeout=idle_timeout))
    second = read_connection(launched.workdir, launched.sha)
    assert second["slurm_job_id"] != first["slurm_job_id"]
    assert not slurm.is_active(slurm.job_state(first["slurm_job_id"])[0])
    ended = json.loads((launched.folder / "launch.ended.json").read_text())
    assert ended["slurm_job_id"] == first["slurm_job_id"] and ended["replaced"]
    assert api(second["url"], "api/status", second["token"]).status_code == 200


@integration
def test_stop_ends_the_slurm_job_and_the_server(launched, server):
    processes = job_processes(server["slurm_job_id"])
    assert any(f"--port={server['port']}" in line for line in command_lines(processes))
    stop(launched.workdir, launched.repo)
    assert not (launched.folder / "launch.json").exists()
    assert json.loads((launched.folder / "launch.ended.json").read_text())["ended"]
    assert not slurm.is_active(slurm.job_state(server["slurm_job_id"])[0])
    # nothing listens on its port any more, and none of the job's processes runs on
    with pytest.raises(requests.ConnectionError, match="Connection refused"):
        api(server["url"], "api/status", server["token"], timeout=3)
    assert not still_running(processes), command_lines(still_running(processes))


@integration
@pytest.mark.parametrize(
    "settings, reason",
    [
        ({"slurm_mem_mb": 100_000_000}, "Requested node configuration is not available"),
        ({"slurm_partition": "nosuch"}, "Invalid partition name specified"),
    ],
)
def test_impossible_request_is_one_line_and_leaves_nothing_running(launched, settings, reason):
    before = jobs_from(launched.workdir)
    result = on_slurm(launched.workdir, "launch", config=config_for(launched.repo, **settings), check=False)
    assert result.returncode != 0
    assert launch_error(result) == f"launch_jupyter: Slurm refused the job: {reason}"
    assert not (launched.folder / "launch.json").exists()
    # Slurm may keep a record of a job it refused, FAILED at once (a memory request no node has)
    assert submitted_jobs(result) == []
    assert set(jobs_since(launched.workdir, before).values()) <= {"FAILED"}


@integration
def test_job_that_dies_before_answering_is_one_line_with_its_log(launched):
    before = jobs_from(launched.workdir)
    result = on_slurm(launched.workdir, "launch", config=config_for(launched.repo, jupyter_command="[jupyter,no-such-app]"), check=False)
    assert result.returncode != 0
    line = launch_error(result)
    assert re.fullmatch(r"launch_jupyter: the Slurm job \d+ ended \(FAILED\) before the Jupyter server answered; last lines of .*:", line), line
    assert "no-such-app" in result.stderr
    assert len(submitted_jobs(result)) == 1 and set(jobs_since(launched.workdir, before)) == set(submitted_jobs(result))


@integration
def test_server_that_never_answers_is_cancelled_after_the_wait(launched):
    before = jobs_from(launched.workdir)
    settings = {"jupyter_command": '[sh,-c,"sleep 600"]', "launch_timeout": 5}
    result = on_slurm(launched.workdir, "launch", config=config_for(launched.repo, **settings), check=False)
    assert result.returncode != 0
    line = launch_error(result)
    assert re.fullmatch(r"launch_jupyter: the Jupyter server \(Slurm job \d+, RUNNING: \S+\) did not answer within 5 s; it was cancelled; see .*", line), line
    assert len(submitted_jobs(result)) == 1 and set(jobs_since(launched.workdir, before)) == set(submitted_jobs(result))


@integration
def test_job_left_waiting_in_the_queue_is_cancelled_after_the_queue_timeout(launched):
    before = jobs_from(launched.workdir)
    # extra sbatch arguments reach sbatch as they are: this one keeps the job pending
    settings = {"slurm_sbatch_args": "[--begin=now+3600]", "slurm_queue_timeout": 3}
    result = on_slurm(launched.workdir, "launch", config=config_for(launched.repo, **settings), check=False)
    assert result.returncode != 0
    line = launch_error(result)
    assert re.fullmatch(
        r"launch_jupyter: the Slurm job \d+ was still waiting in the queue after 3 s \(BeginTime\); it was cancelled \(slurm_queue_timeout\)",
        line,
    ), line
    assert len(submitted_jobs(result)) == 1 and set(jobs_since(launched.workdir, before)) == set(submitted_jobs(result))


@integration
def test_idle_local_server_shuts_itself_down(launched):
    snakemake(launched.workdir, "launch", config=config_for(launched.repo, launch_on="local", idle_timeout=5))
    connection = read_connection(launched.workdir, launched.sha)
    assert connection["launched_on"] == "local"
    wait_until(lambda: not LocalLauncher().running(connection), 150, "the idle local server still runs")
    stop(launched.workdir, launched.repo)


@integration
def test_the_slurm_job_of_a_server_inherits_neither_the_repository_url_nor_the_registry_credential(tmp_path, monkeypatch):
    """Issue 19 item 6: sbatch hands the job its own environment (Slurm keeps it with the job);
    the job's server runs for hours. A stand-in server (tests/fake_jupyter.py): no image needed."""
    secrets = {"R2S_REPOSITORY_URL_0123456789abcdef": "https://ann:hunter2-url@git.example.org/x", "CI_REGISTRY_LOGIN": "ci:hunter2-registry"}
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    runtime = tmp_path / "runtime"
    runtime.write_text(f"#!/bin/sh\nexec {sys.executable} {PROJECT / 'tests' / 'fake_jupyter.py'} \"$@\"\n")
    runtime.chmod(0o755)
    folder = tmp_path / "results" / "fake" / ("0" * 40)
    (folder / "sandbox").mkdir(parents=True)
    config = {
        "registry_credentials_env": "CI_REGISTRY_LOGIN", "slurm_partition": PARTITION, "slurm_time": "0:10:00", "slurm_cpus": 1,
        "slurm_mem_mb": 0, "slurm_gpus": 0, "slurm_sbatch_args": [], "slurm_queue_timeout": 120,
    }  # fmt: skip
    request = LaunchRequest(
        runtime=str(runtime),
        sandbox=str(folder / "sandbox"),
        image={"working_folder": "/home/jovyan"},
        connection_file=str(folder / "launch.json"),
        server_log=str(folder / "server.log"),
        jupyter_command=("jupyter", "notebook"),
        timeout=120,
    )
    launcher = slurm_launcher.SlurmLauncher(config)
    connection = launcher.launch(request)
    try:
        job_id = connection["slurm_job_id"]
        processes = job_processes(job_id)
        assert any("fake_jupyter.py" in line for line in command_lines(processes))
        for process in processes:
            try:
                environ = Path(f"/proc/{process.pid}/environ").read_bytes().decode(errors="replace")
            except (FileNotFoundError, PermissionError):
                continue  # slurmstepd (root) or ended
            assert "hunter2" not in environ and "R2S_REPOSITORY_URL_" not in environ, process.cmdline()
        assert "hunter2" not in run_tool("scontrol", "show", "job", "--details", str(job_id))
    finally:
        launcher.stop(connection)


@integration
def test_the_sandbox_target_is_still_a_slurm_job_with_the_profiles_resources(launched):
    # last in this module: it unpacks the sandbox anew, under any server still running from it
    stop(launched.workdir, launched.repo)
    result = on_slurm(launched.workdir, "sandbox", "--forcerun", "unpack_sandbox", config=config_for(launched.repo))
    submitted = re.findall(r"Job \d+ has been submitted with SLURM jobid (\d+)", result.stdout + result.stderr)
    assert len(submitted) == 1, result.stderr[-3000:]
    record = run_tool("scontrol", "show", "job", submitted[0])
    assert "Comment=rule_unpack_sandbox" in record and "JobState=COMPLETED" in record and f"UserId={getpass.getuser()}(" in record
    assert "MinMemoryNode=2000M" in record and "TimeLimit=00:30:00" in record, record
    assert (launched.folder / "sandbox" / "home" / "jovyan").is_dir()
