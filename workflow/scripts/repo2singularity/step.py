"""A rule's step as a process: one clear line on failure, and a clean stop when Snakemake
cancels it or dies."""

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time

from .processes import parent_of
from .repository import drop_stashed_urls

PR_SET_PDEATHSIG = 1


class StepError(Exception):
    """A step failed; the message is one line, the details are in the log."""


def end_with_parent():
    """Ask the kernel to end this process when its parent dies, so a killed workflow does not
    leave a step running on in the background that later renames a stale output. Called in
    the step's own process (never between fork and exec, where ctypes is not safe)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


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


def run_step(step, function):
    """Entry point for a rule's script: one clear line on failure instead of a traceback.

    SIGTERM (sent by Snakemake on cancel, or by the kernel when the workflow dies) becomes an
    exception, so running tools are stopped and partial outputs removed on the way out."""
    signal.signal(signal.SIGTERM, stop_on_signal)
    drop_stashed_urls()
    end_with_parent()
    watch_workflow()
    try:
        function()
    except StepError as error:
        sys.exit(f"{step}: {error}")
