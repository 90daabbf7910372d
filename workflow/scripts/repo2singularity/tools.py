"""Host tools run by a step: output into the step's log, a progress line on the terminal while
they run, and one line naming the log when they fail."""

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from .processes import end_process_group
from .step import StepError, raise_deferred_signal, signals_deferred

TOOL_PROGRESS_SECONDS = 10
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


# a build service's log lines carry their step's name first: "[build_image] #6 [2/6] RUN ..."
STEP_PREFIX = r"^(?:\[\w+\] )?"
# a build step of `docker buildx build --progress=plain` (what repo2docker runs), of the
# classic builder or of `podman build` ("STEP 5/16: RUN ..."), and the line of output that
# follows it
BUILD_STEP = re.compile(STEP_PREFIX + r"(?:#(\d+) \[(?:\S+ )?(\d+)/(\d+)\] (.+)$|(?:Step|(?:\[\d+/\d+\] )?STEP) (\d+)/(\d+) ?: (.+)$)")
BUILD_OUTPUT = re.compile(STEP_PREFIX + r"#(\d+) \d+\.\d+ (.+)$")
# Apptainer's own phases: "INFO:    Creating SIF file..."
RUNTIME_PHASE = re.compile(STEP_PREFIX + r"(?:INFO|VERBOSE):\s+(.+?)[.\s]*$")
# any tool's percentage: mksquashfs's bar, our own conversion's and transfers' lines
PERCENT = re.compile(r"(?<![\d.])(\d{1,3}(?:\.\d+)?) ?%")


def shorten(text, limit=90):
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def describe_progress(lines):
    """Where a tool is, from its latest lines of output: repo2docker's build step (with its
    latest output), Apptainer's phase, or a percentage; None when no line says."""
    latest_output = {}
    for line in reversed(lines):
        line = line.strip()
        output = BUILD_OUTPUT.match(line)
        if output:
            latest_output.setdefault(output[1], output[2])
            continue
        step = BUILD_STEP.match(line)
        if step:
            if step[1]:
                said = latest_output.get(step[1])
                return f"build step {step[2]}/{step[3]}: {shorten(step[4], 60)}" + (f" | {shorten(said, 50)}" if said else "")
            return f"build step {step[5]}/{step[6]}: {shorten(step[7], 60)}"
        percent = PERCENT.search(line)
        if percent and float(percent[1]) <= 100:
            return shorten(line, 100)
        phase = RUNTIME_PHASE.match(line)
        if phase:
            return shorten(phase[1], 100)
    return None


def log_tail_lines(path, size=16384):
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - size))
            return handle.read().decode("utf-8", "replace").replace("\r", "\n").splitlines()
    except OSError:
        return []


def report_progress(step, log_path, where=""):
    """While a tool runs: a line on the terminal saying where it is (read from its output in the
    step's log), when that changes (at most every TOOL_PROGRESS_SECONDS) and at least every
    HEARTBEAT_SECONDS. Returns the event that ends the reports."""
    started = time.monotonic()
    finished = threading.Event()

    def report():
        said, said_at = None, started
        while not finished.wait(TOOL_PROGRESS_SECONDS):
            now = time.monotonic()
            where_now = describe_progress(log_tail_lines(log_path))
            if where_now != said or now - said_at >= HEARTBEAT_SECONDS:
                elapsed = int(now - started)
                state = where_now or "still running"
                say(f"  {step}{where}: {state} ({elapsed // 60}m{elapsed % 60:02d}s; log: {log_path})")
                said, said_at = where_now, now

    threading.Thread(target=report, daemon=True).start()
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
            finished = report_progress(step, log_path)
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
