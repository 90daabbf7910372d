"""The whole chain on the bundled example, with the real Docker engine, repo2docker and
Apptainer, run by an unprivileged account as a workstation user would."""

import json
import os
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest
import requests

from repo2singularity.processes import alive

from .conftest import PROJECT, files_holding, process_tree, processes_running, sif_compression, still_running
from .jupyter_client import api, contents, edit_notebook, execute, new_notebook
from .workflow_runner import snakemake

RUNTIME = os.environ.get("R2S_RUNTIME") or "apptainer"
pytestmark = pytest.mark.integration


def process_gone(pid):
    """True when `pid` no longer runs (a zombie waiting for a non-reaping init counts as gone)."""
    return not alive(pid)


def runtime(*args, check=True):
    return subprocess.run([RUNTIME, *args], capture_output=True, text=True, check=check)


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """The bundled example as a repository of its own, and a working folder for the workflow."""
    from .conftest import GitRepo

    base = tmp_path_factory.mktemp("chain")
    repo = GitRepo(base / "example-repo", branch="main")
    shutil.copytree(PROJECT / "example", repo.path, dirs_exist_ok=True)
    repo.commit("first")
    workdir = base / "work"
    workdir.mkdir()
    return repo, workdir


def config_for(repo):
    return {"repo": repo.path, "ref": "main", "name": "example"}


def result_dir(workdir, sha):
    return workdir / "results" / "example" / sha


@pytest.fixture(scope="module")
def launched(example):
    repo, workdir = example
    result = snakemake(workdir, config=config_for(repo))
    sha = repo.head()
    connection = json.loads((result_dir(workdir, sha) / "launch.json").read_text())
    yield repo, workdir, sha, connection, result
    snakemake(workdir, "stop", config=config_for(repo), check=False)


def test_run_prints_how_to_connect_and_where_the_sif_is(launched):
    _, workdir, sha, connection, result = launched
    assert connection["url_with_token"] in result.stdout
    # issue 19 item 1: where users' work is kept
    assert f"save your work in work/ (kept in {workdir / 'results' / 'example' / 'work'}, outside the sandbox)" in result.stdout
    # issue 14: the last line names the SIF by a path without a sha, and that path works
    last = result.stdout.strip().splitlines()[-1]
    assert last == f"SIF of example ({sha[:12]}): results/example/latest/example.sif (= results/example/{sha}/example.sif)"
    assert (workdir / "results" / "example" / "latest" / "example.sif").samefile(result_dir(workdir, sha) / "example.sif")


def test_sif_exists_with_checksum_and_provenance_labels(launched):
    repo, workdir, sha, *_ = launched
    folder = result_dir(workdir, sha)
    sif = folder / "example.sif"
    digest, name = (folder / "example.sif.sha256").read_text().split()
    assert name == "example.sif"
    assert subprocess.run(["sha256sum", sif], capture_output=True, text=True).stdout.split()[0] == digest
    labels = json.loads(runtime("inspect", "--json", "--labels", str(sif)).stdout)["data"]["attributes"]["labels"]
    assert labels["repo2singularity.repo"] == str(repo.path)
    assert labels["repo2singularity.ref"] == "main"
    assert labels["repo2singularity.sha"] == sha
    assert labels["repo2docker.ref"] == sha
    receipt = json.loads((folder / "image.json").read_text())
    assert receipt["tag"] == f"r2s-example:{sha}"
    assert receipt["image_id"].startswith("sha256:")
    assert receipt["repo2docker_version"]
    assert not (folder / "image.tar").exists(), "the temporary tarball was kept"
    # the fast conversion (the default) with sif_compression auto: zstd
    assert sif_compression(sif, RUNTIME) == "zstd"


def test_outputs_are_not_world_writable(launched):
    _, workdir, sha, *_ = launched
    folder = result_dir(workdir, sha)
    for path in (folder / "example.sif", folder / "sandbox"):
        assert not path.stat().st_mode & stat.S_IWOTH


def test_sandbox_runs_a_command(launched):
    _, workdir, sha, *_ = launched
    sandbox = result_dir(workdir, sha) / "sandbox"
    result = runtime("exec", str(sandbox), "python3", "-c", "print(6 * 7)")
    assert result.stdout.strip() == "42"


def test_server_answers_with_token_and_refuses_without(launched):
    _, workdir, sha, connection, _ = launched
    launch_file = result_dir(workdir, sha) / "launch.json"
    assert stat.S_IMODE(launch_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(Path(connection["log"]).stat().st_mode) == 0o600
    assert connection["host"] == "127.0.0.1"
    assert api(connection["url"], "api/status", connection["token"]).status_code == 200
    assert api(connection["url"], "api/status").status_code == 403
    assert api(connection["url"], "api/status", "wrong-token").status_code == 403


def test_kernel_runs_code_in_the_repository_after_the_start_script(launched):
    *_, connection, _ = launched
    code = "import os, numpy; print(numpy.arange(4).sum(), os.getcwd(), os.environ.get('REPO2SINGULARITY_START_RAN'))"
    total, cwd, start_ran = execute(connection["url"], connection["token"], code).split()
    assert total == "6"
    assert cwd == "/home/jovyan"
    assert start_ran == "yes"
    listing = api(connection["url"], "api/contents", connection["token"]).json()
    assert "hello.ipynb" in {item["name"] for item in listing["content"]}


def current_connection(workdir, sha):
    """The server that runs now (a later test may have replaced the fixture's)."""
    return json.loads((result_dir(workdir, sha) / "launch.json").read_text())


def test_the_token_is_on_no_command_line_and_in_no_log(launched):
    """The token the server really uses (it answers to it) is in what `ps` shows no account,
    and in no file of the run but the owner-only launch records."""
    _, workdir, sha, *_ = launched
    folder = result_dir(workdir, sha)
    connection = current_connection(workdir, sha)
    token = connection["token"]
    assert api(connection["url"], "api/status", token).status_code == 200
    command_lines = [" ".join(process.cmdline()) for process in process_tree(connection["pid"])]
    # these are the server's processes: Jupyter on the recorded port among them
    assert any("jupyter" in line and f"--port={connection['port']}" in line for line in command_lines), command_lines
    assert not any(token in line for line in command_lines)
    assert not processes_running(token), "the token is on a command line that ps shows"
    # every log and record of the run (the sandbox only holds Jupyter's own owner-only runtime files)
    assert Path(connection["log"]).stat().st_size > 0 and (folder / "logs" / "launch_jupyter.log").stat().st_size > 0
    holding = set(files_holding(token, workdir, skip=["sandbox", "*.sif"]).split())
    assert holding == {str(folder / "launch.json"), str(folder / ".launch.record.json")}, holding
    assert not (folder / ".jupyter.env").exists()


def test_second_run_has_nothing_to_do(launched):
    repo, workdir, *_ = launched
    result = snakemake(workdir, "-n", config=config_for(repo))
    assert "Nothing to be done" in result.stdout + result.stderr


def test_a_manifest_rows_runtime_options_reach_the_server(launched, tmp_path):
    """Issue 13 item 7: a manifest's `runtime_options` are options of the runtime's `run` for
    that image's server (after the config's launch_runtime_args)."""
    repo, workdir, sha, *_ = launched
    manifest = tmp_path / "images.yaml"
    manifest.write_text(
        f"- name: example\n  repo: {repo.path}\n  ref: main\n  runtime_options: [--env, R2S_FROM_MANIFEST=yes]\n"
    )
    snakemake(workdir, "launch", config={"manifest": manifest})
    connection = json.loads((result_dir(workdir, sha) / "launch.json").read_text())
    assert execute(connection["url"], connection["token"], "import os; print(os.environ.get('R2S_FROM_MANIFEST'))") == "yes"



def kept_copies(work, relative, text):
    """The copies of `relative` (a path in the container) under work/recovered that hold `text`."""
    return [path for path in sorted(work.glob(f"recovered/*/{relative}")) if text in path.read_text()]


def test_users_work_survives_a_forced_unpack_of_the_same_commit(launched):
    """Issue 19 item 1: a notebook edited in the sandbox's home, and one saved in work/, are both
    still there after `unpack_sandbox` reruns and swaps the sandbox: the first under
    work/recovered/, the second where it was, and the relaunched server shows both."""
    repo, workdir, sha, *_ = launched
    connection = current_connection(workdir, sha)
    work = workdir / "results" / "example" / "work"
    edit_notebook(connection, "hello.ipynb", "first edit, before the rerun")
    new_notebook(connection, "work/mine.ipynb", "saved in work/")
    assert "saved in work/" in (work / "mine.ipynb").read_text(), "work/ is the work folder, bound into the server"

    rerun = snakemake(workdir, "--forcerun", "unpack_sandbox", config=config_for(repo))
    assert "rule unpack_sandbox" in rerun.stdout + rerun.stderr and "rule launch_jupyter" in rerun.stdout + rerun.stderr
    assert "the files users changed in the old sandbox are in" in rerun.stderr
    [kept] = kept_copies(work, "home/jovyan/hello.ipynb", "first edit, before the rerun")
    assert kept.parents[2].name.startswith(sha[:12] + "-")
    sandbox_notebook = (result_dir(workdir, sha) / "sandbox" / "home" / "jovyan" / "hello.ipynb").read_text()
    assert "first edit" not in sandbox_notebook, "the new sandbox holds the image's notebook"
    assert "saved in work/" in (work / "mine.ipynb").read_text()
    relaunched = current_connection(workdir, sha)
    assert relaunched["token"] != connection["token"]
    assert "saved in work/" in json.dumps(contents(relaunched, "work/mine.ipynb")["content"])
    recovered = contents(relaunched, f"work/{kept.relative_to(work).as_posix()}")
    assert "first edit, before the rerun" in json.dumps(recovered["content"])
    # for the prune at the end of this module: an edit in this sandbox, whose commit goes then
    edit_notebook(relaunched, "hello.ipynb", "second edit, before the prune")
    # the server's own runtime files (its token) are never copied out of a sandbox
    assert not files_holding(connection["token"], work)


def test_stop_ends_the_server(launched):
    repo, workdir, sha, *_ = launched
    connection = current_connection(workdir, sha)
    server = process_tree(connection["pid"])
    assert api(connection["url"], "api/status", connection["token"]).status_code == 200
    snakemake(workdir, "stop", config=config_for(repo))
    folder = result_dir(workdir, sha)
    assert not (folder / "launch.json").exists()
    assert json.loads((folder / "launch.ended.json").read_text())["ended"]
    # nothing listens on its port any more, and none of its processes runs on
    with pytest.raises(requests.ConnectionError, match="Connection refused"):
        api(connection["url"], "api/status", connection["token"], timeout=3)
    assert process_gone(connection["pid"])
    assert not still_running(server), [process.cmdline() for process in still_running(server)]


def test_new_commit_builds_only_the_new_sha(launched):
    repo, workdir, old_sha, *_ = launched
    old_sif = result_dir(workdir, old_sha) / "example.sif"
    old_mtime = old_sif.stat().st_mtime_ns
    new_sha = repo.commit("second", {"notes.md": "a new commit on main\n"})
    plan = snakemake(workdir, "build", "-n", config=config_for(repo)).stdout
    assert new_sha in plan and old_sha not in plan
    snakemake(workdir, "build", config=config_for(repo))
    assert (result_dir(workdir, new_sha) / "example.sif").exists()
    assert old_sif.stat().st_mtime_ns == old_mtime
    # results/example/latest follows the newest commit built, and is no server folder of its own
    assert (workdir / "results" / "example" / "latest").readlink().name == new_sha
    listing = snakemake(workdir, "servers", config=config_for(repo)).stderr
    assert "/latest/" not in listing


def test_run_killed_during_the_sif_step_resumes_without_rebuilding_the_image(launched):
    repo, workdir, *_ = launched
    sha = repo.commit("third", {"notes.md": "a third commit\n"})
    folder = result_dir(workdir, sha)
    command = [
        str(Path(os.sys.executable).with_name("snakemake")),
        "--snakefile", str(PROJECT / "Snakefile"), "--directory", str(workdir), "--cores", "2", "build",
        "--config", f"repo={repo.path}", "ref=main", "name=example",
    ]
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    sif_log = folder / "logs" / "build_sif.log"
    deadline = time.monotonic() + 600
    while not (sif_log.exists() and sif_log.stat().st_size > 200):
        assert run.poll() is None, "the workflow ended before the SIF step"
        assert time.monotonic() < deadline
        time.sleep(0.5)
    receipt_mtime = (folder / "image.json").stat().st_mtime_ns
    run.send_signal(signal.SIGKILL)
    run.wait()
    # the step notices that the workflow is gone, stops its tools and removes its partial file
    deadline = time.monotonic() + 60
    while list(folder.glob(".example.sif.*partial*")):
        assert time.monotonic() < deadline, "the killed SIF step left its partial file behind"
        time.sleep(0.5)
    assert not (folder / "example.sif").exists(), "a killed SIF step left a finished-looking SIF"
    assert not (folder / "example.sif.sha256").exists()
    # as Snakemake itself tells a user after a kill: release its lock, then run again
    snakemake(workdir, "--unlock", config=config_for(repo))
    resumed = snakemake(workdir, "build", config=config_for(repo))
    assert "rule build_image" not in resumed.stderr + resumed.stdout
    assert "rule save_image" not in resumed.stderr + resumed.stdout
    assert (folder / "image.json").stat().st_mtime_ns == receipt_mtime
    digest = (folder / "example.sif.sha256").read_text().split()[0]
    assert subprocess.run(["sha256sum", folder / "example.sif"], capture_output=True, text=True).stdout.split()[0] == digest
    assert not list(folder.glob(".example.sif.*partial*"))


def test_users_work_survives_a_new_commit_and_a_prune(launched):
    """Issue 19 item 1, after the new commits above: the newest commit launches with the same
    work folder, and the prune that removes the older commits' folders moves the edit made in the
    first commit's sandbox to work/recovered/ first."""
    repo, workdir, first_sha, *_ = launched
    work = workdir / "results" / "example" / "work"
    newest = repo.head()
    assert newest != first_sha
    snakemake(workdir, config=config_for(repo))
    connection = current_connection(workdir, newest)
    assert "saved in work/" in json.dumps(contents(connection, "work/mine.ipynb")["content"])
    snakemake(workdir, "stop", config=config_for(repo))
    assert (result_dir(workdir, first_sha) / "sandbox").is_dir()
    pruned = snakemake(workdir, "prune", config={**config_for(repo), "keep_sifs": 1})
    assert not result_dir(workdir, first_sha).exists()
    assert {p.name for p in (workdir / "results" / "example").iterdir()} == {newest, "latest", "work"}
    assert f"the files users changed in {result_dir(workdir, first_sha).resolve() / 'sandbox'} are in" in pruned.stderr
    [kept] = kept_copies(work, "home/jovyan/hello.ipynb", "second edit, before the prune")
    assert kept.parents[2].name.startswith(first_sha[:12] + "-")
    assert len(kept_copies(work, "home/jovyan/hello.ipynb", "first edit, before the rerun")) == 1
    assert "saved in work/" in (work / "mine.ipynb").read_text()
    assert not files_holding(connection["token"], work)


def rules_run(result):
    """The rules a run ran, or a dry run would run (local rules are listed as `localrule`)."""
    lines = (result.stdout + result.stderr).splitlines()
    return {line.split()[1].rstrip(":") for line in lines if line.startswith(("rule ", "localrule "))}


def test_changing_sif_conversion_reruns_the_sif_step_and_not_the_image_build(launched):
    """Issue 18: settings reach a job as its params, and a setting that changes an output reruns
    exactly its rule. `sif_conversion` changes the SIF: build_sif reruns, build_image does not.
    save_image reruns as well, because image.tar is a temp() file, gone once the SIF was made,
    and build_sif needs it again (from the image that Docker still holds)."""
    repo, workdir, *_ = launched
    sha = repo.head()
    folder = result_dir(workdir, sha)
    apptainer = {**config_for(repo), "sif_conversion": "apptainer"}
    snakemake(workdir, "build", config=config_for(repo))  # the newest commit's SIF, if a test before left none
    unchanged = snakemake(workdir, "build", "-n", "--rerun-triggers", "params", config=config_for(repo))
    assert "Nothing to be done" in unchanged.stdout + unchanged.stderr
    # only params may trigger a rerun here, so what the plan lists is what the change of setting reruns
    plan = snakemake(workdir, "build", "-n", "--rerun-triggers", "params", config=apptainer)
    assert rules_run(plan) == {"save_image", "build_sif", "build"}, plan.stdout + plan.stderr
    assert "Params have changed since last execution" in plan.stdout + plan.stderr
    receipt_mtime = (folder / "image.json").stat().st_mtime_ns
    sif_mtime = (folder / "example.sif").stat().st_mtime_ns
    rerun = snakemake(workdir, "build", config=apptainer)
    assert rules_run(rerun) == {"save_image", "build_sif", "build"}
    assert (folder / "image.json").stat().st_mtime_ns == receipt_mtime
    assert (folder / "example.sif").stat().st_mtime_ns != sif_mtime
    commands = [line for line in (folder / "logs" / "build_sif.log").read_text().splitlines() if line.startswith("$ ")]
    assert commands[-1].split()[2] == "build" and "docker-archive://" in commands[-1], commands[-1]
    digest = (folder / "example.sif.sha256").read_text().split()[0]
    assert subprocess.run(["sha256sum", folder / "example.sif"], capture_output=True, text=True).stdout.split()[0] == digest
    labels = json.loads(runtime("inspect", "--json", "--labels", str(folder / "example.sif")).stdout)["data"]["attributes"]["labels"]
    assert labels["repo2singularity.sha"] == sha
    # the same setting again: nothing to do; back to the default: the SIF step again, and only it
    again = snakemake(workdir, "build", "-n", config=apptainer)
    assert "Nothing to be done" in again.stdout + again.stderr
    assert rules_run(snakemake(workdir, "build", "-n", config=config_for(repo))) == {"save_image", "build_sif", "build"}
