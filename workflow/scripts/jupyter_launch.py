"""Rules launch_jupyter, servers and stop: start a Jupyter server from the sandbox with a random
token, either detached on this machine (bound to 127.0.0.1) or as a Slurm job of its own (bound
to its node's address); list such servers, and stop them again."""

import getpass
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import slurm
from steps import StepError, process_alive, tail, write_json_atomic, write_text_atomic

HOST = "127.0.0.1"
POLL_SECONDS = 0.5
STOP_WAIT_SECONDS = 20
OWNER_ONLY = 0o600


def free_port(host=HOST):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def node_address(name=None):
    """The IPv4 address this machine's name resolves to: a compute node's own address, so the
    server listens where the login node can reach it, and not on every interface."""
    name = name or socket.gethostname()
    try:
        return socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except (socket.gaierror, IndexError):
        raise StepError(f"the node's name {name!r} does not resolve to an address") from None


def culling_arguments(jupyter_command, idle_timeout):
    """Jupyter's own idle shutdown, as JupyterHub's culler does it for Binder: idle kernels are
    shut down, and the server ends itself once it has had no kernels, terminals or requests
    for `idle_timeout` seconds (notebook 6 checks that once a minute). JupyterLab and Jupyter
    Server take these settings under ServerApp, the classic notebook under NotebookApp."""
    if not idle_timeout:
        return []
    words = {Path(word).name for word in jupyter_command}
    app = "ServerApp" if words & {"lab", "server", "jupyter-lab", "jupyter-server"} else "NotebookApp"
    interval = max(1, min(60, idle_timeout // 2))
    return [
        f"--{app}.shutdown_no_activity_timeout={idle_timeout}",
        f"--MappingKernelManager.cull_idle_timeout={idle_timeout}",
        f"--MappingKernelManager.cull_interval={interval}",
    ]


def server_command(
    runtime,
    sandbox,
    image,
    env_file,
    jupyter_command,
    port,
    writable=True,
    host=HOST,
    runtime_args=(),
    jupyter_args=(),
    binds=(),
):
    """`run` keeps the image's entrypoint, so repo2docker's start script runs first; --pwd
    makes the repository the working folder; the token travels in an owner-only env file,
    never on a command line that `ps` shows.

    A writable sandbox has no overlay, so the runtime would mount the user's home over the
    image's /home and hide the repository there; instead the image's own home folder inside
    the sandbox is the home, as on Binder.

    Binds (site scratch, project folders) are "source[:destination[:options]]" as the runtime
    takes them; in a writable sandbox a destination must already exist in the image.

    port None leaves out address and port: a Slurm job adds them on its node."""
    sandbox = Path(sandbox).resolve()
    command = [runtime, "run", *runtime_args, "--cleanenv", "--env-file", str(env_file), "--pwd", image["working_folder"]]
    for bind in binds:
        command += ["--bind", bind]
    image_home = image.get("home", "")
    if writable:
        command.append("--writable")
        if image_home.startswith("/") and (sandbox / image_home.lstrip("/")).is_dir():
            command += ["--home", f"{sandbox}{image_home}:{image_home}"]
    command.append(str(sandbox))
    command += [*jupyter_command, *jupyter_args]
    if port is not None:
        command += [f"--ip={host}", f"--port={port}"]
    return command + ["--no-browser"]


def create_owner_only(path, text=""):
    path = Path(path)
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, OWNER_ONLY)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    return path


def status(url, token, timeout=2.0):
    """HTTP status of GET {url}api/status, with the token if one is given (None if no answer)."""
    request = urllib.request.Request(f"{url}api/status")
    if token:
        request.add_header("Authorization", f"token {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, OSError):
        return None


def wait_until_answering(process, url, token, timeout, server_log):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise StepError(
                f"the Jupyter server exited (status {process.returncode}) before it answered; "
                f"last lines of {server_log}:\n{tail(server_log)}"
            )
        if status(url, token) == 200:
            return
        time.sleep(POLL_SECONDS)
    raise StepError(f"the Jupyter server did not answer within {timeout} s; see {server_log}")


def now():
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def note(log, text):
    """A line in the step's own log (never the token: it is in no command or message)."""
    if log:
        with open(log, "a") as handle:
            handle.write(f"{now()} {text}\n")


def record_file(connection_file):
    """A copy of launch.json that Snakemake does not know: it deletes launch.json before it
    relaunches (after a change of settings), and the copy still names the server to replace."""
    return Path(connection_file).with_name(".launch.record.json")


def record_launch(connection_file, connection):
    write_json_atomic(record_file(connection_file), connection, mode=OWNER_ONLY)
    write_json_atomic(connection_file, connection, mode=OWNER_ONLY)


def end_server(connection):
    """Stop the server a connection record names; True if it was still running."""
    if connection.get("slurm_job_id"):
        return slurm.cancel(connection["slurm_job_id"])
    was_running = process_alive(connection["pid"])
    if was_running:
        stop_process_group(connection["pid"])
    return was_running


def mark_ended(connection_file, connection, **extra):
    connection = {**connection, "ended": now(), **extra}
    write_json_atomic(Path(connection_file).with_name("launch.ended.json"), connection, mode=OWNER_ONLY)
    record_file(connection_file).unlink(missing_ok=True)


def retire_previous(connection_file):
    """A relaunch replaces the server this folder launched before, instead of orphaning it."""
    record = record_file(connection_file)
    if record.exists():
        connection = json.loads(record.read_text())
        if end_server(connection):
            print(f"  launch_jupyter: stopped the previous server ({where(connection)})", file=sys.stderr, flush=True)
        mark_ended(connection_file, connection, replaced=True)


def launch(
    runtime,
    sandbox,
    receipt,
    connection_file,
    server_log,
    jupyter_command,
    timeout,
    writable=True,
    idle_timeout=0,
    log=None,
    runtime_args=(),
    binds=(),
):
    retire_previous(connection_file)
    image = json.loads(Path(receipt).read_text())
    token = secrets.token_hex(24)
    port = free_port()
    folder = Path(connection_file).parent
    env_file = create_owner_only(folder / ".jupyter.env", f"JUPYTER_TOKEN={token}\n")
    log_handle = open(create_owner_only(server_log), "ab")
    jupyter_args = culling_arguments(jupyter_command, idle_timeout)
    command = server_command(
        runtime, sandbox, image, env_file, jupyter_command, port, writable,
        runtime_args=runtime_args, jupyter_args=jupyter_args, binds=binds,
    )
    note(log, f"$ {shlex.join(command)}")
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=log_handle,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        close_fds=True,
    )
    log_handle.close()
    url = f"http://{HOST}:{port}/"
    try:
        wait_until_answering(process, url, token, timeout, server_log)
    except BaseException as error:
        note(log, f"failed: {error}")
        stop_process_group(process.pid)
        raise
    finally:
        env_file.unlink(missing_ok=True)
    connection = {
        "launched_on": "local",
        "url": url,
        "url_with_token": f"{url}?token={token}",
        "host": HOST,
        "port": port,
        "token": token,
        "pid": process.pid,
        "idle_timeout": idle_timeout,
        "log": str(Path(server_log).resolve()),
        "sandbox": str(Path(sandbox).resolve()),
        "started": now(),
        "how_to_connect": f"open {url}?token={token} in a browser on this machine",
    }
    record_launch(connection_file, connection)
    note(log, f"the server answers at {url} ({where(connection)})")
    return connection


def slurm_settings(config):
    """The launch's Slurm settings from the workflow's config (see config.schema.yaml)."""
    return {
        "partition": config["slurm_partition"],
        "time_limit": config["slurm_time"],
        "cpus": config["slurm_cpus"],
        "mem_mb": config["slurm_mem_mb"],
        "gpus": config["slurm_gpus"],
        "extra_args": list(config["slurm_sbatch_args"]),
        "queue_timeout": config["slurm_queue_timeout"],
    }


def ssh_tunnel(host, port, login=None, user=None):
    """The command a user runs on their own machine to reach the server through this (login)
    machine; the local port is the server's port, so the URL only changes its host."""
    login = login or socket.getfqdn()
    if login.startswith("localhost"):
        # a name only /etc/hosts knows as loopback: the machine's own name is what users reach
        login = socket.gethostname()
    user = user or getpass.getuser()
    return f"ssh -N -L {port}:{host}:{port} {user}@{login}"


def wait_for_slurm_server(job_id, node_file, token, queue_timeout, timeout, server_log):
    """Follow the job until its server answers; returns what the job wrote about its node."""
    submitted = time.monotonic()
    running_since = None
    while True:
        state, detail = slurm.job_state(job_id)
        if not slurm.is_active(state):
            raise StepError(
                f"the Slurm job {job_id} ended ({state or 'no longer known to Slurm'}) before the Jupyter server "
                f"answered; last lines of {server_log}:\n{tail(server_log)}"
            )
        if state == "PENDING" and time.monotonic() - submitted > queue_timeout:
            raise StepError(
                f"the Slurm job {job_id} was still waiting in the queue after {queue_timeout} s ({detail}); "
                "it was cancelled (slurm_queue_timeout)"
            )
        if state == "RUNNING":
            running_since = running_since or time.monotonic()
            if Path(node_file).exists():
                node = json.loads(Path(node_file).read_text())
                if status(f"http://{node['host']}:{node['port']}/", token) == 200:
                    return node
            if time.monotonic() - running_since > timeout:
                raise StepError(
                    f"the Jupyter server (Slurm job {job_id}) did not answer within {timeout} s; it was cancelled; "
                    f"see {server_log}"
                )
        time.sleep(POLL_SECONDS)


def launch_slurm(
    runtime, sandbox, receipt, connection_file, server_log, jupyter_command, timeout, writable=True, idle_timeout=0,
    settings=None, log=None, runtime_args=(), binds=(),
):
    """Submit the server as a batch job of its own, wait until it answers on its node."""
    settings = settings or {}
    retire_previous(connection_file)
    image = json.loads(Path(receipt).read_text())
    token = secrets.token_hex(24)
    connection_file = Path(connection_file)
    folder = connection_file.parent.resolve()
    name = folder.parent.name
    env_file = create_owner_only(folder / ".jupyter.env", f"JUPYTER_TOKEN={token}\n")
    node_file = folder / ".jupyter.node.json"
    node_file.unlink(missing_ok=True)
    server_log = Path(server_log).resolve()
    create_owner_only(server_log)
    runtime_args = [*(["--nv"] if settings.get("gpus") else []), *runtime_args]
    jupyter_args = culling_arguments(jupyter_command, idle_timeout)
    command = server_command(
        runtime, sandbox, image, env_file, jupyter_command, None, writable,
        runtime_args=runtime_args, jupyter_args=jupyter_args, binds=binds,
    )
    script = folder / "jupyter.sbatch"
    write_text_atomic(script, slurm.job_script(sys.executable, Path(__file__).resolve(), node_file, command), mode=0o700)
    submit = slurm.sbatch_command(
        script,
        f"r2s-jupyter-{name}",
        server_log,
        folder,
        partition=settings.get("partition", ""),
        time_limit=settings.get("time_limit", ""),
        cpus=settings.get("cpus", 1),
        mem_mb=settings.get("mem_mb", 0),
        gpus=settings.get("gpus", 0),
        extra_args=settings.get("extra_args", ()),
    )
    job_id = None
    try:
        note(log, f"$ {shlex.join(str(word) for word in submit)}")
        job_id = slurm.submit(submit)
        note(log, f"Slurm job {job_id} submitted")
        print(f"  launch_jupyter: submitted Slurm job {job_id}, waiting for its server", file=sys.stderr, flush=True)
        node = wait_for_slurm_server(
            job_id, node_file, token, settings.get("queue_timeout", timeout), timeout, server_log
        )
    except BaseException as error:
        note(log, f"failed: {error}")
        if job_id:
            slurm.cancel(job_id)
        raise
    finally:
        env_file.unlink(missing_ok=True)
        node_file.unlink(missing_ok=True)
    host, port = node["host"], node["port"]
    url = f"http://{host}:{port}/"
    tunnel = ssh_tunnel(host, port)
    connection = {
        "launched_on": "slurm",
        "url": url,
        "url_with_token": f"{url}?token={token}",
        "host": host,
        "node": node["node"],
        "port": port,
        "token": token,
        "slurm_job_id": job_id,
        "time_limit": settings.get("time_limit", ""),
        "ssh_tunnel": tunnel,
        "tunnel_url": f"http://127.0.0.1:{port}/?token={token}",
        "idle_timeout": idle_timeout,
        "log": str(server_log),
        "sandbox": str(Path(sandbox).resolve()),
        "started": now(),
        "how_to_connect": (
            f"on the cluster open {url}?token={token}; from your own machine run `{tunnel}` "
            f"and open http://127.0.0.1:{port}/?token={token}"
        ),
    }
    record_launch(connection_file, connection)
    note(log, f"the server answers at {url} ({where(connection)})")
    return connection


def serve(node_file, command):
    """Inside the Slurm job: pick a free port on this node's address, tell the waiting rule
    where, then become the server (exec, so Slurm's signals reach it directly)."""
    host = node_address()
    port = free_port(host)
    write_json_atomic(node_file, {"node": socket.gethostname(), "host": host, "port": port}, mode=OWNER_ONLY)
    os.execvp(command[0], [*command, f"--ip={host}", f"--port={port}"])


def stop_process_group(pgid, wait=STOP_WAIT_SECONDS):
    """SIGTERM the server's session, then SIGKILL what is left after `wait` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        except PermissionError:
            pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.waitpid(pgid, os.WNOHANG)
            except ChildProcessError:
                pass
            if not process_alive(pgid):
                return
            time.sleep(0.2)


def server_running(connection):
    """Whether the server a launch.json names still runs: its Slurm job, or its process."""
    if connection.get("slurm_job_id"):
        return slurm.job_state(connection["slurm_job_id"])[0] == "RUNNING"
    return process_alive(connection["pid"])


def stop(connection_file):
    """Stop the server a launch.json names (scancel for a Slurm job, the process group for a
    local server), and move the file aside as ended."""
    connection_file = Path(connection_file)
    connection = json.loads(connection_file.read_text())
    was_running = end_server(connection)
    mark_ended(connection_file, connection)
    connection_file.unlink()
    return was_running


def launched(results, names=None):
    """Every launch.json under results, optionally only of the given image names."""
    for connection_file in sorted(Path(results).glob("*/*/launch.json")):
        if not names or connection_file.parent.parent.name in names:
            yield connection_file


def stop_all(results, names=None):
    return [(connection_file, stop(connection_file)) for connection_file in launched(results, names)]


def where(connection):
    if connection.get("slurm_job_id"):
        return f"Slurm job {connection['slurm_job_id']} on {connection.get('node', connection['host'])}"
    return f"pid {connection['pid']} on this machine"


def age(started, at=None):
    """'2h05m', '3m12s' or '40s' since an ISO timestamp."""
    at = at or datetime.now(timezone.utc)
    seconds = max(0, int((at - datetime.fromisoformat(started)).total_seconds()))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def server_rows(results, names=None):
    rows = []
    for connection_file in launched(results, names):
        connection = json.loads(connection_file.read_text())
        rows.append(
            {
                "name": connection_file.parent.parent.name,
                "sha": connection_file.parent.name[:12],
                "state": "running" if server_running(connection) else "ended",
                "age": age(connection["started"]),
                "where": where(connection),
                "slurm_job_id": connection.get("slurm_job_id", ""),
                "url": connection["url"],
                "details": str(connection_file),
            }
        )
    return rows


def format_servers(rows):
    if not rows:
        return "no Jupyter servers recorded"
    columns = ["name", "sha", "state", "age", "where", "url", "details"]
    widths = {column: max(len(column), *(len(str(row[column])) for row in rows)) for column in columns}
    lines = ["  ".join(column.upper().ljust(widths[column]) for column in columns)]
    lines += ["  ".join(str(row[column]).ljust(widths[column]) for column in columns) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def connection_message(connection_file):
    connection = json.loads(Path(connection_file).read_text())
    if not server_running(connection):
        return (
            f"The Jupyter server recorded in {connection_file} no longer runs; "
            "`snakemake --cores 1 stop`, then run again to launch a new one."
        )
    lines = [
        f"Jupyter is running ({where(connection)}) from {connection['sandbox']}",
        f"  open: {connection['url_with_token']}",
    ]
    if connection.get("ssh_tunnel"):
        lines.append(f"  from your own machine: {connection['ssh_tunnel']}, then open {connection['tunnel_url']}")
    if connection.get("idle_timeout"):
        lines.append(f"  it stops itself after {connection['idle_timeout']} s without activity")
    return "\n".join(
        lines
        + [
            f"  details: {connection_file} (readable by you only); server log: {connection['log']}",
            "  list servers: snakemake --cores 1 servers; stop: snakemake --cores 1 stop",
        ]
    )


def report_stopped(results, names, log):
    with open(log, "a") as stop_log:
        for connection_file, was_running in stop_all(results, names):
            state = "stopped" if was_running else "was no longer running"
            for stream in (sys.stderr, stop_log):
                print(f"{connection_file.parent}: Jupyter {state}", file=stream)


def report_servers(results, log):
    table = format_servers(server_rows(results))
    Path(log).write_text(table + "\n")
    print(table, file=sys.stderr)


if __name__ == "__main__" and sys.argv[1:2] == ["serve"]:
    # the Slurm job script: jupyter_launch.py serve NODE_FILE -- COMMAND...
    serve(sys.argv[2], sys.argv[4:])
elif "snakemake" in globals() and snakemake.rule == "stop":
    from steps import main

    main("stop", lambda: report_stopped(snakemake.params.results, snakemake.params.names, snakemake.log[0]))
elif "snakemake" in globals() and snakemake.rule == "servers":
    from steps import main

    main("servers", lambda: report_servers(snakemake.params.results, snakemake.log[0]))
elif "snakemake" in globals():
    from steps import main

    start = launch_slurm if snakemake.params.launch_on == "slurm" else launch
    options = {"settings": snakemake.params.slurm} if snakemake.params.launch_on == "slurm" else {}
    main(
        "launch_jupyter",
        lambda: start(
            snakemake.params.runtime,
            snakemake.input.sandbox,
            snakemake.input.receipt,
            snakemake.output.connection,
            snakemake.params.server_log,
            snakemake.params.jupyter_command,
            snakemake.params.timeout,
            snakemake.params.writable,
            snakemake.params.idle_timeout,
            log=snakemake.log[0],
            runtime_args=snakemake.params.runtime_args,
            binds=snakemake.params.binds,
            **options,
        ),
    )
