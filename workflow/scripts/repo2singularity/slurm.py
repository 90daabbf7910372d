"""Slurm for the launch rule: submit the Jupyter server as a batch job, follow its state, end it.

Everything goes through argument lists (sbatch, squeue, scancel); nothing a user configures is
ever parsed by a shell."""

import shlex
import subprocess
import time

from .step import StepError

# states in which a job may still start or is running (squeue --states=... spelling)
ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "RESIZING", "SUSPENDED", "REQUEUED"}
CANCEL_WAIT_SECONDS = 30


def sbatch_command(script, job_name, output, workdir, partition="", time_limit="", cpus=1, mem_mb=0, gpus=0, extra_args=()):
    """The sbatch call for a job script; empty settings are left to the cluster's defaults."""
    command = ["sbatch", "--parsable", f"--job-name={job_name}", f"--output={output}", "--open-mode=append", f"--chdir={workdir}"]
    if partition:
        command.append(f"--partition={partition}")
    if time_limit:
        command.append(f"--time={time_limit}")
    if cpus:
        command.append(f"--cpus-per-task={cpus}")
    if mem_mb:
        command.append(f"--mem={mem_mb}M")
    if gpus:
        command.append(f"--gpus={gpus}")
    return command + [*extra_args, str(script)]


def job_script(python, entry, node_file, command, unpack=None):
    """A POSIX shell script that hands over to `entry` (workflow/scripts/serve_jupyter.py), which
    unpacks the sandbox first when `unpack` (runtime, sif, checksum, sandbox, log, image receipt,
    work folder) is given, picks the address and port on the node (only the node knows which
    are free) and then becomes the server itself."""
    words = [python, entry, node_file, *(["--unpack", *unpack] if unpack else []), "--", *command]
    return (
        "#!/bin/sh\n"
        "# Jupyter server of repo2singularity, written and submitted by the launch_jupyter rule\n"
        f"exec {shlex.join(str(word) for word in words)}\n"
    )


def submit(command, env=None):
    """Run sbatch; the job id, or StepError with Slurm's own reason in one line. sbatch hands
    the job its own environment (`env`, else this process's)."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env)
    except FileNotFoundError:
        raise StepError("sbatch not found; launch_on=slurm needs the Slurm client tools on PATH") from None
    if result.returncode != 0:
        raise StepError(f"Slurm refused the job: {refusal_reason(result.stderr)}")
    # --parsable prints "jobid" or "jobid;cluster"
    return result.stdout.strip().split(";")[0]


def refusal_reason(stderr):
    """sbatch's last error line without its prefixes, e.g. 'Requested node configuration is not
    available' or 'invalid partition specified: nosuch'."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    if not lines:
        return "sbatch failed without a message"
    reason = lines[-1]
    for prefix in ("sbatch: error:", "Batch job submission failed:"):
        reason = reason.removeprefix(prefix).strip()
    return reason


def job_state(job_id):
    """(state, reason or node list) of a job as squeue shows it; (None, "") once Slurm has
    forgotten it (MinJobAge after its end)."""
    result = subprocess.run(
        ["squeue", "--noheader", "--jobs", str(job_id), "--states=all", "--format=%T|%R"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    line = result.stdout.strip().splitlines()[0] if result.returncode == 0 and result.stdout.strip() else ""
    if not line:
        return None, ""
    state, _, detail = line.partition("|")
    # a pending job's reason comes in parentheses, "(Resources)"; a running job's is its nodes
    return state.strip(), detail.strip().removeprefix("(").removesuffix(")")


def is_active(state):
    return state in ACTIVE_STATES


def cancel(job_id, wait=CANCEL_WAIT_SECONDS):
    """scancel the job and wait until Slurm no longer counts it as active; True if it was."""
    state, _ = job_state(job_id)
    if not is_active(state):
        return False
    subprocess.run(["scancel", str(job_id)], capture_output=True, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and is_active(job_state(job_id)[0]):
        time.sleep(0.5)
    return True
