"""Bound the Slurm executor plugin's question to the controller (set-up installs this module
into .venv with r2s_slurm_probe.pth, which imports it when Python starts).

snakemake-executor-plugin-slurm (2.8) runs `scontrol show config` for MinJobAge as soon as it is
imported, only to word the help of --slurm-status-command, and Snakemake imports every installed
executor plugin at every start, `snakemake --version` included. Where Slurm's commands are
installed but no controller answers (a builder VM made from a cluster's image), scontrol retries
for 10 s: 10 s added to every local run there. The plugin asks again at every status check of a
Slurm run. Here the first question (the import's) waits at most PROBE_SECONDS; an answer is kept
for the process (MinJobAge is a setting of the controller); a question that got no answer is
asked again the plugin's own way, so a Slurm run still gets its answer.
"""

import importlib.abc
import importlib.machinery
import subprocess
import sys

MODULE = "snakemake_executor_plugin_slurm.job_status_query"
PROBE_SECONDS = 0.5


def controller_answers(timeout=PROBE_SECONDS):
    """True when `scontrol show config` succeeds within timeout seconds."""
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


class _Finder(importlib.abc.MetaPathFinder):
    """Wraps get_min_job_age as the plugin's module is loaded, before the plugin's own modules
    import it by name."""

    def find_spec(self, name, path, target=None):
        if name != MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            ask = getattr(module, "get_min_job_age", None)
            if callable(ask):
                module.get_min_job_age = bounded(ask)

        spec.loader.exec_module = exec_module
        return spec


def install():
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


install()
