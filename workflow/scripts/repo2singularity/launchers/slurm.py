"""`launch_on: slurm`: the server as a batch job of its own, bound to its compute node's address;
the launch waits until it answers, as Open OnDemand does."""

import getpass
import ipaddress
import json
import os
import secrets
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from .. import runtime, slurm, user_work
from ..files import write_json_atomic, write_text_atomic
from ..jupyter import OWNER_ONLY, POLL_SECONDS, create_owner_only, note, now, status, token_file
from ..processes import alive, free_port, listener_in_tree
from ..step import StepError
from ..tools import say, tail
from .base import Launcher

# the job's entry: workflow/scripts/serve_jupyter.py, beside this package
SERVE_SCRIPT = Path(__file__).resolve().parents[2] / "serve_jupyter.py"


def ssh_tunnel(host, port, login=None, user=None):
    """The command a user runs on their own machine to reach the server through this (login)
    machine; the local port is the server's port, so the URL only changes its host."""
    login = login or socket.getfqdn()
    if login.startswith("localhost"):
        # a name only /etc/hosts knows as loopback: the machine's own name is what users reach
        login = socket.gethostname()
    user = user or getpass.getuser()
    return f"ssh -N -L {port}:{host}:{port} {user}@{login}"


def is_loopback(address):
    return ipaddress.ip_address(address).is_loopback


def resolve(name):
    try:
        return socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except (socket.gaierror, IndexError, UnicodeError):
        return None


def route_source(address):
    """This host's address on the way to `address` (a UDP socket's connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((address, 9))
        return probe.getsockname()[0]


def same_host(name, other):
    return name.split(".")[0] == other.split(".")[0]


def slurm_node_address(node):
    """NodeAddr of a node, as slurmctld reaches it."""
    if not node:
        return None
    result = subprocess.run(["scontrol", "show", "node", "--oneliner", node], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    for word in result.stdout.split():
        if word.startswith("NodeAddr="):
            return resolve(word.partition("=")[2])
    return None


def own_addresses():
    return [a.address for addresses in psutil.net_if_addrs().values() for a in addresses if a.family == socket.AF_INET]


def reachable_address(submit_host=None, node=None):
    """An address of this compute node that the login node can reach: the one this node takes
    to reach the host that submitted the job. Not what the node's own name resolves to: a stock
    Debian /etc/hosts maps it to 127.0.1.1. Loopback only when the job was submitted from this
    very host; else Slurm's NodeAddr, else the first address of an interface that is not
    loopback."""
    own_name = socket.gethostname()
    submit_host = submit_host or os.environ.get("SLURM_SUBMIT_HOST", "")
    target = resolve(submit_host) if submit_host else None
    if target:
        source = route_source(target)
        if not is_loopback(source) or same_host(submit_host, own_name):
            return source
    local = own_addresses()
    for candidate in (slurm_node_address(node or os.environ.get("SLURMD_NODENAME")), resolve(own_name), *local):
        if candidate and not is_loopback(candidate) and candidate in local:
            return candidate
    raise StepError(f"node {own_name} has no address but loopback that the login node {submit_host or '(unknown)'} could reach")


def sandbox_is_current(sandbox, sif):
    """A sandbox already unpacked from this SIF (made after it; a rebuilt SIF is newer)."""
    try:
        return Path(sandbox).is_dir() and Path(sandbox).stat().st_mtime >= Path(sif).stat().st_mtime
    except OSError:
        return False


def unpack_here(runtime_name, sif, checksum, sandbox, log, receipt, work_folder):
    """The sandbox from the SIF on this node, unless it is there already (then only the work
    folder's mount point is made, for a sandbox an older version unpacked); seconds it took."""
    started = time.monotonic()
    image = json.loads(Path(receipt).read_text())
    if sandbox_is_current(sandbox, sif):
        note(log, f"sandbox {sandbox} is newer than {Path(sif).name}: kept (node {socket.gethostname()})")
        user_work.ensure_mount_point(sandbox, image)
        return 0.0
    note(log, f"unpacking {Path(sif).name} on node {socket.gethostname()}, in the Jupyter server's Slurm job")
    runtime.unpack_sandbox(runtime_name, sif, checksum, sandbox, log, image, work_folder)
    return time.monotonic() - started


def without_missing_home(command):
    """The server command without its `--home SOURCE:DEST` when SOURCE is no folder (an image
    without its user's home; the launch could not look before the sandbox was unpacked)."""
    if "--home" in command:
        at = command.index("--home")
        if at + 1 < len(command) and not Path(command[at + 1].split(":", 1)[0]).is_dir():
            return command[:at] + command[at + 2 :]
    return command


def unpacked_file(node_file):
    """Where a job that unpacks the sandbox says it is done (and how long it took)."""
    return Path(f"{node_file}.unpacked")


def serve(node_file, command, unpack=None):
    """Inside the Slurm job: unpack the sandbox when asked (runtime, sif, checksum, sandbox, log)
    and say so, pick a free port on an address the login node reaches, become the server (exec,
    so Slurm's signals reach it directly), and tell the waiting rule where once the server itself
    listens there: the rule sends the token to that port, which another account on the node
    could have bound in between (a watcher process says it, see `report_when_listening`)."""
    if unpack:
        seconds = unpack_here(*unpack)
        command = without_missing_home(command)
        write_json_atomic(unpacked_file(node_file), {"unpack_seconds": round(seconds, 1)}, mode=OWNER_ONLY)
    host = reachable_address()
    port = free_port(host)
    server = os.getpid()
    watcher = os.fork()
    if watcher == 0:
        # the watcher's own child does the work, reparented away from the server (which would
        # never reap it); the server waits only for this short-lived middle process
        try:
            if os.fork() == 0:
                report_when_listening(node_file, server, host, port)
        finally:
            os._exit(0)
    os.waitpid(watcher, 0)
    os.execvp(command[0], [*command, f"--ip={host}", f"--port={port}"])


def report_when_listening(node_file, server, host, port, poll_seconds=0.1):
    """Write the node file once process `server` (or a child of it) listens on host:port; give
    up when it has ended (it could not take the port: Jupyter then says so in its log)."""
    while alive(server):
        if listener_in_tree(server, host, port):
            write_json_atomic(node_file, {"node": socket.gethostname(), "host": host, "port": port}, mode=OWNER_ONLY)
            return
        time.sleep(poll_seconds)


class SlurmLauncher(Launcher):
    kind = "slurm"

    def settings(self):
        config = self.config
        return {
            "partition": config["slurm_partition"],
            "time_limit": config["slurm_time"],
            "cpus": config["slurm_cpus"],
            "mem_mb": config["slurm_mem_mb"],
            "gpus": config["slurm_gpus"],
            "extra_args": list(config["slurm_sbatch_args"]),
            "queue_timeout": config["slurm_queue_timeout"],
        }

    def launch(self, request):
        """Submit the server as a batch job of its own, wait until it answers on its node."""
        settings = self.settings()
        token = secrets.token_hex(24)
        folder = Path(request.connection_file).parent.resolve()
        name = folder.parent.name
        env_file = token_file(folder, token)
        node_file = folder / ".jupyter.node.json"
        node_file.unlink(missing_ok=True)
        unpacked_file(node_file).unlink(missing_ok=True)
        server_log = Path(request.server_log).resolve()
        create_owner_only(server_log)
        command = request.server_command(env_file, None, runtime_args=["--nv"] if settings["gpus"] else [], unpacked=not request.sif)
        script = folder / "jupyter.sbatch"
        unpack = None
        if request.sif:
            paths = (request.sif, request.checksum, request.sandbox, request.unpack_log, request.receipt, request.work_folder)
            unpack = [request.runtime, *(Path(p).resolve() for p in paths)]
        write_text_atomic(script, slurm.job_script(sys.executable, SERVE_SCRIPT, node_file, command, unpack), mode=0o700)
        submit = slurm.sbatch_command(
            script,
            f"r2s-jupyter-{name}",
            server_log,
            folder,
            partition=settings["partition"],
            time_limit=settings["time_limit"],
            cpus=settings["cpus"],
            mem_mb=settings["mem_mb"],
            gpus=settings["gpus"],
            extra_args=settings["extra_args"],
        )
        job_id = None
        try:
            note(request.log, f"$ {shlex.join(str(word) for word in submit)}")
            job_id = slurm.submit(submit, env=self.child_environment())
            note(request.log, f"Slurm job {job_id} submitted")
            say(f"  launch_jupyter: submitted Slurm job {job_id}, waiting for its server")
            node = self.wait_for_server(job_id, node_file, token, settings["queue_timeout"], request.timeout, server_log, request.log, bool(unpack))
        except BaseException as error:
            note(request.log, f"failed: {error}")
            if job_id:
                slurm.cancel(job_id)
            raise
        finally:
            env_file.unlink(missing_ok=True)
            node_file.unlink(missing_ok=True)
            unpacked_file(node_file).unlink(missing_ok=True)
        host, port = node["host"], node["port"]
        url = f"http://{host}:{port}/"
        tunnel = ssh_tunnel(host, port)
        return {
            "launched_on": self.kind,
            "url": url,
            "url_with_token": f"{url}?token={token}",
            "host": host,
            "node": node["node"],
            "port": port,
            "token": token,
            "slurm_job_id": job_id,
            "time_limit": settings["time_limit"],
            "ssh_tunnel": tunnel,
            "tunnel_url": f"http://127.0.0.1:{port}/?token={token}",
            "idle_timeout": request.idle_timeout,
            "log": str(server_log),
            "sandbox": str(Path(request.sandbox).resolve()),
            "started": now(),
            "how_to_connect": (
                f"on the cluster open {url}?token={token}; from your own machine run `{tunnel}` "
                f"and open http://127.0.0.1:{port}/?token={token}"
            ),
        }

    @staticmethod
    def wait_for_server(job_id, node_file, token, queue_timeout, timeout, server_log, log=None, unpacking=False):
        """Follow the job until its server answers; returns what the job wrote about its node.
        PENDING is bounded by `queue_timeout`; once the job has left the queue, whatever state
        it is in (CONFIGURING, RUNNING, SUSPENDED, REQUEUED, ...) `timeout` bounds the wait;
        a job that unpacks the sandbox first gets `timeout` for that and again for its server
        (from when it says where it listens). Each phase's end goes into `log` with its time."""
        submitted = time.monotonic()
        left_queue = None
        node = None
        unpacked = None

        def phase(text):
            note(log, f"Slurm job {job_id} {text} {time.monotonic() - submitted:.1f} s after submission")

        while True:
            state, detail = slurm.job_state(job_id)
            if not slurm.is_active(state):
                raise StepError(
                    f"the Slurm job {job_id} ended ({state or 'no longer known to Slurm'}) before the Jupyter server "
                    f"answered; last lines of {server_log}:\n{tail(server_log)}"
                )
            if state == "PENDING" and left_queue is None:
                if time.monotonic() - submitted > queue_timeout:
                    raise StepError(
                        f"the Slurm job {job_id} was still waiting in the queue after {queue_timeout} s ({detail}); "
                        "it was cancelled (slurm_queue_timeout)"
                    )
            else:
                if left_queue is None:
                    left_queue = time.monotonic()
                    phase(f"left the queue ({state})")
                if unpacking and not unpacked and unpacked_file(node_file).exists():
                    unpacked = json.loads(unpacked_file(node_file).read_text())
                    # the server's own wait starts now
                    left_queue = time.monotonic()
                    phase(f"sandbox ready (unpacked in {unpacked['unpack_seconds']} s)")
                if state == "RUNNING" and node is None and Path(node_file).exists():
                    node = json.loads(Path(node_file).read_text())
                    phase(f"server listening on {node['host']}:{node['port']}")
                if state == "RUNNING" and node is not None and status(f"http://{node['host']}:{node['port']}/", token) == 200:
                    phase("answered with the token")
                    return node
                if time.monotonic() - left_queue > timeout:
                    if unpacking and not unpacked:
                        raise StepError(
                            f"the Slurm job {job_id} ({state}{f': {detail}' if detail else ''}) did not unpack the sandbox within "
                            f"{timeout} s (launch_timeout; raise it for a large image); it was cancelled; see {server_log}"
                        )
                    raise StepError(
                        f"the Jupyter server (Slurm job {job_id}, {state}{f': {detail}' if detail else ''}) did not answer "
                        f"within {timeout} s; it was cancelled; see {server_log}"
                    )
            time.sleep(POLL_SECONDS)

    def running(self, connection):
        """Pending, running, suspended...: the job may still serve."""
        return slurm.is_active(slurm.job_state(connection["slurm_job_id"])[0])

    def stop(self, connection):
        return slurm.cancel(connection["slurm_job_id"])

    def describe(self, connection):
        return f"Slurm job {connection['slurm_job_id']} on {connection.get('node', connection['host'])}"
