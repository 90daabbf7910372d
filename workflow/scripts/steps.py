"""What every step shares: run a host tool with its output in the step's log and a heartbeat
on the terminal, and write outputs so that a killed step leaves nothing that looks finished."""

import contextlib
import ctypes
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HEARTBEAT_SECONDS = 30
PR_SET_PDEATHSIG = 1


class StepError(Exception):
    """A step failed; the message is one line, the details are in the log."""


def end_with_parent():
    """Ask the kernel to end this process when its parent dies, so a killed workflow does not
    leave a build running on in the background that later renames a stale output."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def stop_session(process, grace_seconds=30):
    """End a tool and everything it started (it runs in a session of its own). A tool started
    through sudo (the Apptainer wrapper on Debian 12) belongs to root until it drops back to the
    caller, and a signal sent before that is lost: SIGTERM is sent again each second until the
    tool ends, then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline:
            try:
                os.killpg(process.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                process.wait(timeout=1)
                return
            except subprocess.TimeoutExpired:
                continue


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, but another user's
    return True


def parent_of(pid):
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return int(handle.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def watch_workflow(poll_seconds=1.0):
    """Snakemake runs a rule's script through a shell; if Snakemake itself is killed, that
    shell lives on, so the kernel's parent-death signal alone would not reach this script.
    Watch the shell's parent, and stop (SIGTERM to ourselves) when it changes."""
    shell = os.getppid()
    workflow = parent_of(shell)

    def watch():
        while True:
            time.sleep(poll_seconds)
            if os.getppid() != shell or parent_of(shell) != workflow:
                os.kill(os.getpid(), signal.SIGTERM)
                return

    threading.Thread(target=watch, daemon=True).start()


def tail(path, lines=5):
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 8192))
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(line for line in text.splitlines()[-lines:])


def start_heartbeat(step, log_path, where=""):
    """Print a progress line every HEARTBEAT_SECONDS until the returned event is set."""
    started = time.monotonic()
    finished = threading.Event()

    def heartbeat():
        while not finished.wait(HEARTBEAT_SECONDS):
            elapsed = int(time.monotonic() - started)
            print(f"  {step}: still running{where} after {elapsed} s (log: {log_path})", file=sys.stderr, flush=True)

    threading.Thread(target=heartbeat, daemon=True).start()
    return finished


def run_logged(command, log_path, step, env=None, cwd=None):
    """Run `command` (a list) with its output appended to `log_path`; print a progress line
    every HEARTBEAT_SECONDS; raise StepError naming the log when it fails."""
    started = time.monotonic()
    with open(log_path, "ab") as log:
        log.write(f"$ {' '.join(command)}\n".encode())
        log.flush()
        # a SIGTERM while the tool is being started would leave it running unseen: hold it back
        # until the tool is ours to stop
        with signals_deferred():
            try:
                process = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=cwd,
                    start_new_session=True,
                    preexec_fn=end_with_parent,
                )
            except FileNotFoundError:
                raise StepError(f"{command[0]} not found; is it installed and on PATH? (bash setup.sh check)") from None
            finished = start_heartbeat(step, log_path)
        try:
            raise_deferred_signal()
            returncode = process.wait()
        except BaseException:
            stop_session(process)
            raise
        finally:
            finished.set()
    if returncode != 0:
        raise StepError(f"{step} failed (exit status {returncode}); see {log_path}:\n{tail(log_path)}")
    print(f"  {step}: done in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)


def python_tool(name):
    """A tool installed beside the running Python (the project's venv), else the one on PATH,
    so the workflow works without the venv being activated."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else name


def temporary_sibling(path, suffix=""):
    """A fresh name next to `path`, on the same file system, so a rename is atomic."""
    path = Path(path)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".partial{suffix}", dir=path.parent)
    os.close(handle)
    os.unlink(name)
    return Path(name)


def write_text_atomic(path, text, mode=0o644):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = temporary_sibling(path)
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def write_json_atomic(path, data, mode=0o644):
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n", mode)


def sha256_file(path, chunk_size=4 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


DEFERRED = {"active": False, "signal": None, "stopping": False}


def stop_on_signal(signum, frame):
    if DEFERRED["active"]:
        DEFERRED["signal"] = signum
        return
    stop(signum)


def stop(signum):
    # a killed workflow sends two (the parent-death signal and watch_workflow's): the second
    # must not cut short the stopping and cleaning up that the first began
    if not DEFERRED["stopping"]:
        DEFERRED["stopping"] = True
        raise SystemExit(f"stopped by signal {signum}")


@contextlib.contextmanager
def signals_deferred():
    DEFERRED["active"] = True
    try:
        yield
    finally:
        DEFERRED["active"] = False


def raise_deferred_signal():
    signum, DEFERRED["signal"] = DEFERRED["signal"], None
    if signum is not None:
        stop(signum)


def main(step, function):
    """Entry point for a rule's script: one clear line on failure instead of a traceback.

    SIGTERM (sent by Snakemake on cancel, or by the kernel when the workflow dies) becomes an
    exception, so running tools are stopped and partial outputs removed on the way out."""
    signal.signal(signal.SIGTERM, stop_on_signal)
    end_with_parent()
    watch_workflow()
    try:
        function()
    except StepError as error:
        sys.exit(f"{step}: {error}")
