"""Processes and ports: the one place for free ports, a process's identity and ending a
process group."""

import os
import signal
import socket
import time
from dataclasses import asdict, dataclass

import psutil

LOOPBACK = "127.0.0.1"
# psutil derives a start time from the boot time and the process's start tick: the same process
# always gives the same value, another process started later never does
START_TIME_TOLERANCE = 0.05


def free_port(host=LOOPBACK):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def listener_in_tree(pid, host, port):
    """The pid of the process, `pid` itself or one of its descendants, that listens on
    host:port (or on every address), else None. Only then does a request to host:port reach
    that process: the port was free when picked, and another account may have bound it since."""
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.Error:
        return None
    for process in tree:
        try:
            sockets = process.net_connections(kind="tcp")
        except psutil.Error:
            continue
        for found in sockets:
            if found.status == psutil.CONN_LISTEN and found.laddr.port == port and found.laddr.ip in (host, "0.0.0.0", "::"):
                return process.pid
    return None


def alive(pid):
    """Whether a process with this pid exists (another user's included); a zombie does not count."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def parent_of(pid):
    try:
        return psutil.Process(pid).ppid()
    except psutil.Error:
        return None


@dataclass(frozen=True)
class ProcessIdentity:
    """Enough to tell a process from a later one that got the same pid (after a reboot, or pid
    reuse): its start time and its command line."""

    pid: int
    started: float
    command: tuple

    @classmethod
    def of(cls, pid):
        """The identity of a running process, or None if there is none with that pid."""
        try:
            process = psutil.Process(pid)
            with process.oneshot():
                return cls(pid, process.create_time(), tuple(process.cmdline()))
        except psutil.Error:
            return None

    @classmethod
    def from_record(cls, record):
        if not isinstance(record, dict) or not {"pid", "started", "command"} <= record.keys():
            return None
        return cls(int(record["pid"]), float(record["started"]), tuple(record["command"]))

    def record(self):
        return {**asdict(self), "command": list(self.command)}

    def matches(self, other):
        return (
            other is not None
            and other.pid == self.pid
            and abs(other.started - self.started) < START_TIME_TOLERANCE
            and other.command == self.command
        )

    def still_running(self):
        """True only while the very process this identity was taken from runs."""
        return self.matches(ProcessIdentity.of(self.pid)) and alive(self.pid)


def group_alive(pgid):
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return any(alive(process.pid) for process in psutil.process_iter() if safe_pgid(process.pid) == pgid)


def safe_pgid(pid):
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def end_process_group(pgid, grace_seconds=20, child=None):
    """SIGTERM a process group each second until it has ended, then SIGKILL what is left after
    `grace_seconds`. A tool started through sudo (the Apptainer wrapper on Debian 12) belongs to
    root until it drops back to the caller, and a signal sent before that is lost: hence the
    repeats. `child`: our Popen of the group's leader, reaped on the way so it is no zombie."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                if child is not None:
                    child.poll()
                return
            except PermissionError:
                pass
            for _ in range(5):
                if child is not None:
                    child.poll()
                if not group_alive(pgid):
                    return
                time.sleep(0.2)
