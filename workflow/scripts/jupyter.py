"""Rules launch_jupyter and stop: start a Jupyter server from the sandbox, detached, bound to
127.0.0.1 with a random token; find and stop such servers again."""

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

from steps import StepError, tail, write_json_atomic

HOST = "127.0.0.1"
POLL_SECONDS = 0.5
STOP_WAIT_SECONDS = 20
OWNER_ONLY = 0o600


def free_port(host=HOST):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def server_command(runtime, sandbox, image, env_file, jupyter_command, port, writable=True):
    """`run` keeps the image's entrypoint, so repo2docker's start script runs first; --pwd
    makes the repository the working folder; the token travels in an owner-only env file,
    never on a command line that `ps` shows.

    A writable sandbox has no overlay, so the runtime would mount the user's home over the
    image's /home and hide the repository there; instead the image's own home folder inside
    the sandbox is the home, as on Binder."""
    sandbox = Path(sandbox).resolve()
    command = [runtime, "run", "--cleanenv", "--env-file", str(env_file), "--pwd", image["working_folder"]]
    image_home = image.get("home", "")
    if writable:
        command.append("--writable")
        if image_home.startswith("/") and (sandbox / image_home.lstrip("/")).is_dir():
            command += ["--home", f"{sandbox}{image_home}:{image_home}"]
    command.append(str(sandbox))
    return command + list(jupyter_command) + [f"--ip={HOST}", f"--port={port}", "--no-browser"]


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


def launch(runtime, sandbox, receipt, connection_file, server_log, jupyter_command, timeout, writable=True):
    image = json.loads(Path(receipt).read_text())
    token = secrets.token_hex(24)
    port = free_port()
    folder = Path(connection_file).parent
    env_file = create_owner_only(folder / ".jupyter.env", f"JUPYTER_TOKEN={token}\n")
    log_handle = open(create_owner_only(server_log), "ab")
    command = server_command(runtime, sandbox, image, env_file, jupyter_command, port, writable)
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
    except BaseException:
        stop_process_group(process.pid)
        raise
    finally:
        env_file.unlink(missing_ok=True)
    connection = {
        "url": url,
        "url_with_token": f"{url}?token={token}",
        "host": HOST,
        "port": port,
        "token": token,
        "pid": process.pid,
        "log": str(Path(server_log).resolve()),
        "sandbox": str(Path(sandbox).resolve()),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "how_to_connect": f"open {url}?token={token} in a browser on this machine",
    }
    write_json_atomic(connection_file, connection, mode=OWNER_ONLY)
    return connection


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


def stop(connection_file):
    """Stop the server a launch.json names, and move the file aside as ended."""
    connection_file = Path(connection_file)
    connection = json.loads(connection_file.read_text())
    was_running = process_alive(connection["pid"])
    if was_running:
        stop_process_group(connection["pid"])
    connection["ended"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    ended_file = connection_file.with_name("launch.ended.json")
    write_json_atomic(ended_file, connection, mode=OWNER_ONLY)
    connection_file.unlink()
    return was_running


def stop_all(results, names=None):
    stopped = []
    for connection_file in sorted(Path(results).glob("*/*/launch.json")):
        name = connection_file.parent.parent.name
        if names and name not in names:
            continue
        was_running = stop(connection_file)
        stopped.append((connection_file, was_running))
    return stopped


def connection_message(connection_file):
    connection = json.loads(Path(connection_file).read_text())
    if not process_alive(connection["pid"]):
        return (
            f"The Jupyter server recorded in {connection_file} no longer runs; "
            "`snakemake --cores 1 stop`, then run again to launch a new one."
        )
    return (
        f"Jupyter is running (pid {connection['pid']}) from {connection['sandbox']}\n"
        f"  open: {connection['url_with_token']}\n"
        f"  details: {connection_file} (readable by you only); server log: {connection['log']}\n"
        f"  stop it with: snakemake --cores 1 stop"
    )


def report_stopped(results, names, log):
    with open(log, "a") as stop_log:
        for connection_file, was_running in stop_all(results, names):
            state = "stopped" if was_running else "was no longer running"
            for stream in (sys.stderr, stop_log):
                print(f"{connection_file.parent}: Jupyter {state}", file=stream)


if "snakemake" in globals() and snakemake.rule == "stop":
    from steps import main

    main("stop", lambda: report_stopped(snakemake.params.results, snakemake.params.names, snakemake.log[0]))
elif "snakemake" in globals():
    from steps import main

    main(
        "launch_jupyter",
        lambda: launch(
            snakemake.params.runtime,
            snakemake.input.sandbox,
            snakemake.input.receipt,
            snakemake.output.connection,
            snakemake.params.server_log,
            snakemake.params.jupyter_command,
            snakemake.params.timeout,
            snakemake.params.writable,
        ),
    )
