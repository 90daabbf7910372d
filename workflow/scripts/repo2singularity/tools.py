"""Host tools run by a step: output into the step's log, a progress line on the terminal while
they run, and one line naming the log when they fail."""

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from .processes import end_process_group
from .step import StepError, raise_deferred_signal, signals_deferred

HEARTBEAT_SECONDS = 30
# the tool ends with the step, even when the step is killed outright: setpriv sets the
# parent-death signal in the child, after fork, where Python code could deadlock
END_WITH_STEP = ["setpriv", "--pdeathsig", "TERM", "--"]


def tail(path, lines=5):
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 8192))
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(line for line in text.splitlines()[-lines:])


def say(text):
    print(text, file=sys.stderr, flush=True)


def start_heartbeat(step, log_path, where=""):
    """Print a progress line every HEARTBEAT_SECONDS until the returned event is set."""
    started = time.monotonic()
    finished = threading.Event()

    def heartbeat():
        while not finished.wait(HEARTBEAT_SECONDS):
            elapsed = int(time.monotonic() - started)
            say(f"  {step}: still running{where} after {elapsed} s (log: {log_path})")

    threading.Thread(target=heartbeat, daemon=True).start()
    return finished


def run_logged(command, log_path, step, env=None, cwd=None):
    """Run `command` (a list) with its output appended to `log_path`; print a progress line
    every HEARTBEAT_SECONDS; raise StepError naming the log when it fails."""
    if not shutil.which(command[0], path=(env or os.environ).get("PATH")):
        raise StepError(f"{command[0]} not found; is it installed and on PATH? (bash setup.sh check)")
    started = time.monotonic()
    with open(log_path, "ab") as log:
        log.write(f"$ {' '.join(command)}\n".encode())
        log.flush()
        # a SIGTERM while the tool is being started would leave it running unseen: hold it back
        # until the tool is ours to stop
        with signals_deferred():
            try:
                process = subprocess.Popen(
                    [*END_WITH_STEP, *command],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=cwd,
                    start_new_session=True,
                )
            except FileNotFoundError:
                raise StepError("setpriv (util-linux) not found; is util-linux installed? (bash setup.sh check)") from None
            finished = start_heartbeat(step, log_path)
        try:
            raise_deferred_signal()
            returncode = process.wait()
        except BaseException:
            end_process_group(process.pid, grace_seconds=30, child=process)
            raise
        finally:
            finished.set()
    if returncode != 0:
        raise StepError(f"{step} failed (exit status {returncode}); see {log_path}:\n{tail(log_path)}")
    say(f"  {step}: done in {time.monotonic() - started:.0f} s")


def python_tool(name):
    """A tool installed beside the running Python (the project's venv), else the one on PATH,
    so the workflow works without the venv being activated."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else name
