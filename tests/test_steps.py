"""Our own logic around the tools: compression choice, the server command, atomic outputs."""

import json
import os
import stat

import pytest

from repo2singularity import step as steps
from repo2singularity.files import write_json_atomic
from repo2singularity.jupyter import server_command
from repo2singularity.runtime import choose_compression, compression_arguments
from repo2singularity.step import StepError
from repo2singularity.tools import run_logged

from .conftest import processes_running


def test_auto_compression_is_zstd_where_the_runtime_takes_mksquashfs_args():
    assert choose_compression("auto", True) == "zstd"
    assert choose_compression("auto", False) is None
    assert compression_arguments("zstd") == ["--mksquashfs-args", "-comp zstd -Xcompression-level 3"]
    assert compression_arguments(None) == []


def test_explicit_compression_without_support_is_a_clear_error():
    assert choose_compression("gzip", False) is None
    with pytest.raises(StepError, match="needs a runtime"):
        choose_compression("lz4", False)


def test_server_command_takes_the_env_file_and_binds_loopback(tmp_path):
    """The command never holds the token (it is not given one); that the token the server really
    uses is on no command line and in no log is checked on a running server (test_chain.py,
    test_slurm.py)."""
    sandbox = tmp_path / "sandbox"
    (sandbox / "home" / "jovyan").mkdir(parents=True)
    image = {"working_folder": "/home/jovyan", "home": "/home/jovyan"}
    command = server_command("apptainer", sandbox, image, tmp_path / "env", ["jupyter", "notebook"], 8888)
    assert command[:2] == ["apptainer", "run"]
    assert "--ip=127.0.0.1" in command and "--port=8888" in command
    assert command[command.index("--pwd") + 1] == "/home/jovyan"
    assert command[command.index("--home") + 1] == f"{sandbox.resolve()}/home/jovyan:/home/jovyan"
    assert command[command.index("--env-file") + 1] == str(tmp_path / "env")
    read_only = server_command("apptainer", sandbox, image, tmp_path / "env", ["jupyter", "lab"], 1, writable=False)
    assert "--writable" not in read_only and "--home" not in read_only


def test_json_outputs_appear_whole_and_with_the_asked_mode(tmp_path):
    target = tmp_path / "launch.json"
    write_json_atomic(target, {"token": "x"}, mode=0o600)
    assert json.loads(target.read_text()) == {"token": "x"}
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["launch.json"]


def test_failing_tool_is_one_line_naming_the_log(tmp_path):
    log = tmp_path / "step.log"
    with pytest.raises(StepError, match=f"failed \\(exit status 3\\); see {log}"):
        run_logged(["sh", "-c", "echo boom; exit 3"], log, "step")
    assert "boom" in log.read_text()
    with pytest.raises(StepError, match="no-such-tool not found"):
        run_logged(["no-such-tool"], log, "step")


def test_sigterm_while_a_tool_starts_is_held_until_the_tool_can_be_stopped(tmp_path):
    import signal
    import threading
    import time

    from repo2singularity.processes import group_alive

    previous = signal.signal(signal.SIGTERM, steps.stop_on_signal)
    try:
        with steps.signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)  # the handler runs here, and only records the signal
        with pytest.raises(SystemExit):
            steps.raise_deferred_signal()
        steps.raise_deferred_signal()  # nothing left pending
        steps.DEFERRED["stopping"] = False  # a step stops once; this test stops twice
        started = time.monotonic()
        group = tmp_path / "group"

        def stop_once_the_tool_runs():
            while not group.exists() or not group.read_text().endswith("\n"):
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=stop_once_the_tool_runs, daemon=True).start()
        with pytest.raises(SystemExit):
            run_logged(["sh", "-c", f"echo $$ >{group}; sleep 30"], tmp_path / "log", "step")
        assert time.monotonic() - started < 20
        # the tool leads its own process group: nothing of it may outlive the stopped step
        assert not group_alive(int(group.read_text())), "the tool outlived its stopped step"
    finally:
        steps.DEFERRED["stopping"] = False
        signal.signal(signal.SIGTERM, previous)


def test_a_tool_deaf_to_the_first_sigterm_is_still_stopped_despite_a_second_one(tmp_path):
    """A killed workflow sends the step two SIGTERMs (parent death, then watch_workflow); a tool
    started through sudo cannot be signalled until it drops back to the caller. The stop must
    outlast both: the tool ends, and the step waits for it."""
    import subprocess
    import sys
    import time

    script = tmp_path / "step.py"
    script.write_text(
        "import os, signal, sys, threading, time\n"
        "from repo2singularity import step, tools\n"
        "signal.signal(signal.SIGTERM, step.stop_on_signal)\n"
        "def twice():\n"
        "    for pause in (0.5, 0.3):\n"
        "        time.sleep(pause)\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "threading.Thread(target=twice, daemon=True).start()\n"
        "try:\n"
        f"    tools.run_logged(['sh', '-c', \"trap '' TERM; sleep 2; trap - TERM; sleep 300.7\"], {str(tmp_path / 'log')!r}, 'step')\n"
        "except SystemExit:\n"
        "    print('stopped', flush=True)\n"
    )
    started = time.monotonic()
    step = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert step.stdout.strip() == "stopped", step.stderr
    assert time.monotonic() - started < 15
    assert not processes_running("sleep 300.7"), "the tool outlived its stopped step"


def test_progress_lines_say_where_the_tool_is():
    """Issue 14: a progress line names repo2docker's build step, Apptainer's phase, a percentage."""
    from repo2singularity.tools import describe_progress

    buildx = ["#6 [2/6] RUN apt-get update && apt-get install jupyter-notebook", "#6 3.21 Get:12 http://deb.debian.org/debian bookworm/main python3"]
    assert describe_progress(buildx) == "build step 2/6: RUN apt-get update && apt-get install jupyter-notebook | Get:12 http://deb.debian.org/debian bookworm/main…"
    assert describe_progress(["Step 3/5 : COPY . /home/jovyan", " ---> abc"]) == "build step 3/5: COPY . /home/jovyan"
    assert describe_progress(["INFO:    Starting build...", "2026/11/30 warn rootless{dev/full} creating empty file", "INFO:    Creating SIF file..."]) == "Creating SIF file"
    assert describe_progress(["[=====|     ] 1200/2400  50%"]) == "[=====| ] 1200/2400 50%"
    assert describe_progress(["nothing to say"]) is None


def test_a_running_tool_reports_its_build_step(tmp_path, monkeypatch, capsys):
    from repo2singularity import tools

    monkeypatch.setattr(tools, "TOOL_PROGRESS_SECONDS", 0.2)
    run_logged(["sh", "-c", "echo '#5 [2/3] RUN make all'; sleep 2; echo '#6 [3/3] COPY . /srv'; sleep 2"], tmp_path / "log", "build_image")
    lines = capsys.readouterr().err.splitlines()
    assert any(line.startswith("  build_image: build step 2/3: RUN make all (0m") for line in lines), lines
    assert any(line.startswith("  build_image: build step 3/3: COPY . /srv (0m") for line in lines), lines


def test_builder_settings_are_no_plain_param_and_the_sif_options_are():
    """Issue 18: the scripts read their settings from their params. Snakemake records and
    compares plain params only (rerun-triggers `params`): the builder's settings are an object,
    so where a step runs reruns nothing; the SIF's options are a plain dict, so a change of one
    reruns build_sif. The rerun itself is checked on the real workflow (test_chain.py)."""
    from snakemake.persistence import UNREPRESENTABLE, PersistenceBase

    from repo2singularity import builders
    from repo2singularity.builders.local import LocalBuilder

    config = {"builder": "local", "runtime": "apptainer", "sif_compression": "auto", "sif_conversion": "fast", "repo": "x"}
    settings = builders.BuilderSettings.from_config(config)
    recorded = PersistenceBase._serialize_param_builtin  # what Snakemake 9 records of a param, and compares
    assert recorded(None, settings) is UNREPRESENTABLE
    assert recorded(None, settings.sif_options) == "{'runtime': 'apptainer', 'sif_compression': 'auto', 'sif_conversion': 'fast'}"
    builder = builders.from_config(settings.with_sif_options({**settings.sif_options, "sif_conversion": "apptainer"}), "log")
    assert isinstance(builder, LocalBuilder) and builder.conversion == "apptainer" and builder.runtime == "apptainer"
    assert settings["builder"] == "local" and settings.get("repo") is None
    with pytest.raises(KeyError):
        settings["sif_options"]
