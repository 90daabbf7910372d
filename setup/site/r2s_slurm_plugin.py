"""Two changes to the pinned Slurm executor plugin, made as it is imported (set-up installs this
module into .venv with r2s_slurm_plugin.pth, which imports it when Python starts).

1. Its question to the controller, bounded at start.

snakemake-executor-plugin-slurm (2.8) runs `scontrol show config` for MinJobAge as soon as it is
imported, only to word the help of --slurm-status-command, and Snakemake imports every installed
executor plugin at every start, `snakemake --version` included. Where Slurm's commands are
installed but no controller answers (a builder VM made from a cluster's image), scontrol retries
for 10 s: 10 s added to every local run there. The plugin asks again at every status check of a
Slurm run. Here the first question (the import's) waits at most PROBE_SECONDS; an answer is kept
for the process (MinJobAge is a setting of the controller); a question that got no answer is
asked again the plugin's own way, so a Slurm run still gets its answer.

2. Its status polls, at the profile's pace. After every check that finds no job finished, the
plugin waits 10 s longer before the next (up to 180 s; not configurable in 2.8.0): a sandbox job
of 8 s was seen after 12 s, one of 13 s after 33 s. Here the wait never grows past
`seconds-between-status-checks` (2 s in this project's profiles: an squeue every 2 s while jobs
run; raise it in the profile for a busy cluster).

R2S_SLURM_PLUGIN_AS_IS=1 in the environment leaves the plugin as it is (to compare, or to rule
these changes out).
"""

# Only cheap modules at the top: the .pth imports this module in every Python of the venv (each
# job's script included); subprocess and inspect wait until the plugin is loaded, and the finder
# is a plain class because importlib.abc pulls in importlib.resources, tempfile and typing (24 ms).
import importlib.machinery
import os
import sys

PLUGIN = "snakemake_executor_plugin_slurm"
MODULE = f"{PLUGIN}.job_status_query"
PROBE_SECONDS = 0.5


def controller_answers(timeout=PROBE_SECONDS):
    """True when `scontrol show config` succeeds within timeout seconds."""
    import subprocess

    try:
        subprocess.run(["scontrol", "show", "config"], capture_output=True, timeout=timeout, check=True)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


def bounded(ask, probe=controller_answers):
    """ask (the plugin's get_min_job_age), with its first call cut short when the controller does
    not answer at once, and its answer kept once there is one."""
    state = {"asked": False, "answer": None}

    def get_min_job_age():
        if state["answer"] is not None:
            return state["answer"]
        first, state["asked"] = not state["asked"], True
        if first and not probe():
            return None
        state["answer"] = ask()
        return state["answer"]

    get_min_job_age.__doc__ = ask.__doc__
    return get_min_job_age


def steady_polling(check):
    """check (the plugin's Executor.check_active_jobs, an async generator), leaving the wait
    before the next check no longer than the run's seconds_between_status_checks."""

    async def check_active_jobs(self, active_jobs):
        async for job in check(self, active_jobs):
            yield job
        steady = self.workflow.remote_execution_settings.seconds_between_status_checks
        if self.next_seconds_between_status_checks > steady:
            self.next_seconds_between_status_checks = steady

    check_active_jobs.__doc__ = check.__doc__
    return check_active_jobs


def patch_query(module):
    ask = getattr(module, "get_min_job_age", None)
    if callable(ask):
        module.get_min_job_age = bounded(ask)


def patch_plugin(module):
    import inspect

    executor = getattr(module, "Executor", None)
    if executor is not None and inspect.isasyncgenfunction(getattr(executor, "check_active_jobs", None)):
        executor.check_active_jobs = steady_polling(executor.check_active_jobs)


PATCHES = {MODULE: patch_query, PLUGIN: patch_plugin}


class _Finder:
    """Changes the plugin's modules as they are loaded: get_min_job_age before the plugin's own
    modules import it by name, the Executor before Snakemake uses it."""

    def find_spec(self, name, path, target=None):
        patch = PATCHES.get(name)
        if patch is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            patch(module)

        spec.loader.exec_module = exec_module
        return spec


def install():
    if os.environ.get("R2S_SLURM_PLUGIN_AS_IS"):
        return
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


install()
