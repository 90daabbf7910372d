"""Faults across hosts: the builder's cable pulled during a build, node1's slurmd dying while the
Jupyter job waits for it. Each ends the run with one line, and what is left is usable."""

import os
import signal
import subprocess

from .lab import make_repo
from .topology import ADDRESSES, STATE, kill_all, run, wait_for


def error_lines(stderr, prefix):
    return [line for line in stderr.splitlines() if line.startswith(prefix)]


def test_the_builders_link_going_down_during_the_build_is_one_line_and_a_rerun_completes(lab, login_ready):
    work = STATE / "repos" / "slow"
    # a build step that takes a while, with a fresh word so that Docker's cache cannot skip it
    make_repo(work, {"Dockerfile": f"FROM debian:bookworm\nRUN sleep 25 && echo {os.urandom(8).hex()} > /slow\n"})
    url = lab.git.publish("slow", work)
    sha = run(["git", "-C", work, "rev-parse", "HEAD"]).stdout.strip()
    command = ["snakemake", "--profile", "remote", "build", "--config", f"repo={url}", "ref=main"]
    started = lab.popen_as_login(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def building():
            assert started.poll() is None, f"the run ended before the build:\n{started.stderr.read()[-3000:]}"
            logs = list((lab.checkout / "results").glob(f"*/{sha}/logs/build_image.log"))
            return logs and "sleep 25" in logs[0].read_text()

        wait_for(building, 600, "the build never reached its slow step")
        lab.network.set_link("builder", up=False)
        _, stderr = started.communicate(timeout=600)
    finally:
        lab.network.set_link("builder", up=True)
        if started.poll() is None:
            started.kill()
    assert started.returncode != 0 and "Traceback" not in stderr
    failures = error_lines(stderr, "build_image: ")
    print(failures)
    assert len(failures) == 1, stderr[-4000:]
    assert ADDRESSES["builder"] in failures[0] and "run again" in failures[0], failures[0]
    # what happened: the builder stopped answering (not a tool that failed there)
    assert "has not answered a keepalive" in failures[0], failures[0]
    folder = next((lab.checkout / "results").glob(f"*/{sha}"))
    assert not (folder / "image.json").exists()

    rerun = lab.as_login(command, check=False)
    assert rerun.returncode == 0, f"the rerun failed:\n{rerun.stderr[-4000:]}"
    name = folder.parent.name
    digest = run(["sha256sum", folder / f"{name}.sif"]).stdout.split()[0]
    assert digest == (folder / f"{name}.sif.sha256").read_text().split()[0]


def test_node1s_slurmd_dying_while_the_jupyter_job_waits_is_one_line_naming_the_job(lab, journey):
    """node1 is busy with another job of the account's, so the Jupyter job waits in the queue; then
    node1's slurmd dies. Slurm marks node1 down, the job can never start: the run ends with one
    line that names it (after slurm_queue_timeout)."""
    blocker = lab.as_login(["sbatch", "--parsable", "--cpus-per-task=2", "--mem=500M", "--output=/dev/null", "--wrap", "sleep 900"]).stdout.strip()
    started = None
    try:
        wait_for(lambda: lab.cluster.job(blocker).get("JobState") == "RUNNING", 60, f"the blocking job {blocker} did not start")
        started = lab.popen_as_login([*journey.command, "slurm_queue_timeout=40"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        def pending_jupyter_job():
            assert started.poll() is None, f"the run ended before its Jupyter job was queued:\n{started.stderr.read()[-3000:]}"
            listing = lab.login.run(["squeue", "--noheader", "--format=%i %j %T"]).stdout.split("\n")
            return next((line.split()[0] for line in listing if "r2s-jupyter-" in line and line.endswith("PENDING")), None)

        job = wait_for(pending_jupyter_job, 900, "the Jupyter job was never queued")
        for pid in lab.cluster.slurmd_pids():
            os.kill(pid, signal.SIGKILL)
        _, stderr = started.communicate(timeout=600)
        assert started.returncode != 0 and "Traceback" not in stderr
        failures = error_lines(stderr, "launch_jupyter: ")
        print(failures)
        assert len(failures) == 1 and f"Slurm job {job} " in failures[0], stderr[-4000:]
        assert lab.cluster.job(job).get("JobState") == "CANCELLED"
    finally:
        if started and started.poll() is None:
            started.kill()
        lab.login.run(["scancel", blocker], check=False)
        # node1 comes back: its leftover processes go, slurmd starts again
        kill_all([pid for pid in lab.node.pids()])
        lab.cluster.start_node()
