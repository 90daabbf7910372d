"""setup/site/r2s_slurm_plugin.py: the Slurm plugin's MinJobAge question, cut short at start where
no controller answers, and asked the plugin's own way otherwise; its status polls at the
profile's pace."""

import asyncio
import os
import subprocess
import sys
import textwrap
import time

# set-up installs it into .venv, whose r2s_slurm_plugin.pth has imported it already
import r2s_slurm_plugin

from .conftest import PROJECT


class Asked:
    def __init__(self, answer):
        self.answer = answer
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return self.answer


def test_no_controller_at_start_gives_no_answer_without_asking_then_asks_the_plugins_way():
    ask = Asked(None)
    get = r2s_slurm_plugin.bounded(ask, probe=lambda: False)
    assert get() is None and ask.calls == 0
    assert get() is None and ask.calls == 1
    assert get() is None and ask.calls == 2


def test_an_answer_is_kept_for_the_process():
    ask = Asked(300)
    get = r2s_slurm_plugin.bounded(ask, probe=lambda: True)
    assert [get(), get(), get()] == [300, 300, 300]
    assert ask.calls == 1


def test_a_late_answer_is_kept_too():
    ask = Asked(300)
    get = r2s_slurm_plugin.bounded(ask, probe=lambda: False)
    assert get() is None
    assert [get(), get()] == [300, 300]
    assert ask.calls == 1


def test_a_silent_scontrol_is_cut_at_the_probes_limit(tmp_path):
    (tmp_path / "scontrol").write_text("#!/bin/sh\nexec sleep 30\n")
    (tmp_path / "scontrol").chmod(0o755)
    failing = tmp_path / "failing"
    failing.mkdir()
    (failing / "scontrol").write_text("#!/bin/sh\nexit 1\n")
    (failing / "scontrol").chmod(0o755)
    script = textwrap.dedent("""
        import os, sys, time
        import r2s_slurm_plugin
        os.environ["PATH"] = sys.argv[1] + os.pathsep + os.environ["PATH"]
        started = time.monotonic()
        print(r2s_slurm_plugin.controller_answers(), round(time.monotonic() - started, 1))
    """)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(PROJECT / "setup" / "site")}
    for folder, expected in ((tmp_path, "False"), (failing, "False")):
        started = time.monotonic()
        out = subprocess.run([sys.executable, "-c", script, folder], capture_output=True, text=True, env=env, check=True)
        assert out.stdout.split()[0] == expected
        assert time.monotonic() - started < 5


def test_the_plugins_module_gets_the_bounded_question_before_the_plugin_imports_it():
    # the venv's .pth (setup/python.sh) installs the finder in every Python of the venv
    script = textwrap.dedent("""
        import snakemake_executor_plugin_slurm as plugin
        import snakemake_executor_plugin_slurm.job_status_query as query
        import snakemake_executor_plugin_slurm.validation as validation
        names = {f.__module__ + "." + f.__qualname__ for f in (query.get_min_job_age, validation.get_min_job_age)}
        print(sorted(names))
        print(plugin.Executor.check_active_jobs.__qualname__)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == ["['r2s_slurm_plugin.bounded.<locals>.get_min_job_age']", "steady_polling.<locals>.check_active_jobs"], (
        out.stdout + out.stderr
    )


class Settings:
    seconds_between_status_checks = 2


class Workflow:
    remote_execution_settings = Settings()


class Executor:
    """The plugin's growing wait: 10 s more after each check that finds no job finished."""

    def __init__(self):
        self.workflow = Workflow()
        self.next_seconds_between_status_checks = 1

    async def check_active_jobs(self, active_jobs):
        for job in active_jobs:
            yield job
        self.next_seconds_between_status_checks += 10


def test_the_wait_between_status_checks_stays_at_the_profiles_pace():
    Executor.check_active_jobs = r2s_slurm_plugin.steady_polling(Executor.check_active_jobs)
    executor = Executor()

    async def check(jobs):
        return [job async for job in executor.check_active_jobs(jobs)]

    assert asyncio.run(check(["a", "b"])) == ["a", "b"]
    assert executor.next_seconds_between_status_checks == 2
    assert asyncio.run(check(["a"])) == ["a"] and executor.next_seconds_between_status_checks == 2
    executor.next_seconds_between_status_checks = 1
    Executor.check_active_jobs = r2s_slurm_plugin.steady_polling(lambda self, jobs: _empty())
    assert asyncio.run(check([])) == [] and executor.next_seconds_between_status_checks == 1


async def _empty():
    return
    yield


def test_the_plugin_stays_as_it_is_when_asked():
    script = "import snakemake_executor_plugin_slurm as p; print(p.get_min_job_age.__module__, p.Executor.check_active_jobs.__qualname__)"
    env = {**os.environ, "R2S_SLURM_PLUGIN_AS_IS": "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.split() == ["snakemake_executor_plugin_slurm.job_status_query", "Executor.check_active_jobs"], out.stdout + out.stderr
