"""The `repo2singularity` console command: each flag maps to the Snakemake command it stands
for (unit tests), and `--run` on the bundled example launches a Jupyter server (end to end)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from repo2singularity import cli

from .conftest import PROJECT, GitRepo
from .jupyter_client import api

URL = "https://github.com/org/repo"


def command(*argv, cwd=PROJECT):
    return cli.snakemake_command(cli.parse(list(argv)), cwd=cwd)


def usage_error(*argv, cwd=PROJECT):
    with pytest.raises(cli.UsageError) as caught:
        command(*argv, cwd=cwd)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_a_repository_builds_its_sif_with_the_local_profile():
    assert command(URL) == ["snakemake", "build", "--profile", "local", "--config", f"repo={URL}"]


def test_ref_and_name():
    assert command("--ref", "v1.0", "--name", "paper", URL)[-3:] == [f"repo={URL}", "ref=v1.0", "name=paper"]


@pytest.mark.parametrize(
    "ref, given",
    [
        # Snakemake reads a --config value as a number, True/False or YAML when it can, and
        # strips quotes first
        ("0123456", "ref=!!str 0123456"),
        ("1e5", "ref=!!str 1e5"),
        ("True", "ref=!!str True"),
        ("it's", "ref=it's"),
        ("main", "ref=main"),
        ("feature/ü", "ref=feature/ü"),
    ],
)
def test_a_ref_reaches_the_workflow_as_the_same_string(ref, given):
    from snakemake.cli import parse_config

    line = command("--ref", ref, URL)
    assert given in line
    assert parse_config([given])["ref"] == ref


def test_sandbox_and_run_choose_the_target():
    assert command("--sandbox", URL)[1] == "sandbox"
    assert command("--run", URL)[1] == "launch"


def test_slurm_launches_jupyter_as_a_job_with_the_slurm_profile():
    assert command("--run", "--slurm", URL) == ["snakemake", "launch", "--profile", "slurm", "--config", f"repo={URL}", "launch_on=slurm"]
    assert command("--run", "--slurm", "--profile", "remote", URL)[2:4] == ["--profile", "remote"]


def test_remote_endpoint_is_the_http_builder():
    line = command("--remote", "--endpoint-url", "https://builder.example/api", URL)
    assert line[-1] == 'builder={"kind": "http", "url": "https://builder.example/api"}'
    from snakemake.cli import parse_config

    assert parse_config([line[-1]])["builder"] == {"kind": "http", "url": "https://builder.example/api"}


def test_endpoint_token_variable_and_ca_file(tmp_path):
    ca = tmp_path / "ca.pem"
    line = command("--endpoint-url", "https://b:8443", "--token-env", "MY_TOKEN", "--ca-file", str(ca), URL)
    assert json.loads(line[-1].split("=", 1)[1]) == {"kind": "http", "url": "https://b:8443", "token_env": "MY_TOKEN", "ca_file": str(ca)}


@pytest.mark.parametrize(
    "given, setting",
    [
        ("me@vm.example.org", {"kind": "ssh", "host": "vm.example.org", "user": "me"}),
        ("vm", {"kind": "ssh", "host": "vm"}),
        ("me@10.0.0.2:2222", {"kind": "ssh", "host": "10.0.0.2", "user": "me", "port": 2222}),
        ("me@[::1]:2222", {"kind": "ssh", "host": "::1", "user": "me", "port": 2222}),
    ],
)
def test_builder_ssh(given, setting):
    line = command("--builder-ssh", given, URL)
    assert line[-1].startswith("builder=")
    assert json.loads(line[-1].split("=", 1)[1]) == setting


def test_manifest_builds_its_default_target():
    assert command("--manifest", "config/manifest.tsv") == ["snakemake", "--profile", "local", "--config", "manifest=config/manifest.tsv"]
    assert command("--run", "--manifest", "m.tsv")[1] == "launch"


def test_servers_and_stop():
    assert command("servers") == ["snakemake", "servers", "--profile", "local"]
    assert command("stop", URL) == ["snakemake", "stop", "--profile", "local", "--config", f"repo={URL}"]
    assert command("stop", "--manifest", "m.tsv")[-1] == "manifest=m.tsv"


def test_check_builder():
    assert command("check-builder", "--builder-ssh", "vm")[:4] == ["snakemake", "check_builder", "--profile", "local"]


def test_profile_cores_and_config_pass_through():
    line = command("--profile", "slurm", "--cores", "4", "--config", "sif_compression=gzip", "--config", "launch_binds=[/scratch]", URL)
    assert line == [
        "snakemake",
        "build",
        "--profile",
        "slurm",
        "--cores",
        "4",
        "--config",
        f"repo={URL}",
        "sif_compression=gzip",
        "launch_binds=[/scratch]",
    ]


def test_from_another_folder_the_snakefile_and_profile_are_the_checkouts(tmp_path):
    line = command(URL, cwd=tmp_path)
    assert line[:5] == ["snakemake", "--snakefile", str(PROJECT / "Snakefile"), "build", "--profile"]
    assert line[5] == str(PROJECT / "profiles" / "local")
    # a profile of that name in the working folder is Snakemake's to find
    (tmp_path / "local").mkdir()
    assert command(URL, cwd=tmp_path)[5] == "local"
    assert command("--profile", str(tmp_path / "mine"), URL, cwd=tmp_path)[5] == str(tmp_path / "mine")


def test_a_profile_that_sets_the_builder_is_not_mixed_with_another(tmp_path):
    message = usage_error("--profile", "remote", "--endpoint-url", "https://b", URL)
    assert "profile remote sets the builder" in message and "builder.yaml" in message
    profile = tmp_path / "plain"
    profile.mkdir()
    (profile / "config.yaml").write_text("cores: 1\n")
    assert command("--profile", str(profile), "--endpoint-url", "https://b", URL)[-1].startswith("builder=")


@pytest.mark.parametrize(
    "argv, says",
    [
        ([], "which repository"),
        (["--remote", URL], "--remote needs --endpoint-url"),
        (["--endpoint-url", "https://b", "--builder-ssh", "vm", URL], "two builders"),
        (["--slurm", URL], "goes with --run"),
        (["--ca-file", "x.pem", URL], "go with --endpoint-url"),
        ([URL, "https://github.com/org/other"], "one repository at a time"),
        (["--manifest", "m.tsv", URL], "not both"),
        (["servers", URL], "takes no repository"),
        (["stop"], "which repository"),
        (["stop", "--run", URL], "takes no --sandbox or --run"),
        (["check-builder"], "needs a builder"),
        (["--builder-ssh=-oProxyCommand=x", URL], "not [USER@]HOST[:PORT]"),
        (["--builder-ssh", "vm:ssh", URL], "port is not a number"),
        (["--config", "novalue", URL], "KEY=VALUE"),
        (["--ref", "'quoted'", URL], "cannot be passed"),
    ],
)
def test_bad_command_lines_are_one_line(argv, says):
    assert says in usage_error(*argv)


def run_cli(*argv, cwd, env=None, timeout=60):
    return subprocess.run(
        [sys.executable, "-m", "repo2singularity.cli", *argv],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_dry_run_prints_the_command_and_runs_nothing(tmp_path):
    result = run_cli("--dry-run", "--run", "--ref", "main", URL, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    printed = result.stdout.strip()
    assert printed.endswith(f"--snakefile {PROJECT / 'Snakefile'} launch --profile {PROJECT / 'profiles' / 'local'} --config repo={URL} ref=main")
    assert not (tmp_path / "results").exists() and not (tmp_path / ".snakemake").exists()


def test_errors_exit_2_with_one_line(tmp_path):
    result = run_cli("--slurm", URL, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == "repo2singularity: --slurm launches Jupyter as a Slurm job: it goes with --run\n"


def test_help_reads_like_the_original():
    result = run_cli("--help", cwd=PROJECT)
    assert result.returncode == 0
    for text in ("usage: repo2singularity", "--remote", "--endpoint-url URL", "--run", "--slurm", "--dry-run", "servers", "stop REPO"):
        assert text in result.stdout


def test_the_workflows_own_errors_and_exit_status_pass_through(tmp_path):
    # a ref starting with "-" is refused by the workflow before anything runs
    result = run_cli("--ref=-x", str(tmp_path / "nothing-here"), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines()[0].startswith("repo2singularity: running ")
    assert result.stderr.strip().splitlines()[-1].startswith("repo2singularity: ")


@pytest.mark.integration
def test_run_launches_jupyter_on_the_example(tmp_path):
    """`repo2singularity --run` on the bundled example (a repository of its own, as a user
    would have it), then `servers` and `stop`."""
    repo = GitRepo(tmp_path / "example", branch="main")
    shutil.copytree(PROJECT / "example", repo.path, dirs_exist_ok=True)
    repo.commit("first")
    work = tmp_path / "work"
    work.mkdir()
    argv = ["--run", "--name", "example", "--ref", "main", str(repo.path)]
    result = run_cli(*argv, cwd=work, timeout=1800)
    try:
        assert result.returncode == 0, result.stderr[-4000:]
        connection = json.loads((work / "results" / "example" / repo.head() / "launch.json").read_text())
        assert connection["url_with_token"] in result.stdout
        assert api(connection["url"], "api/status", connection["token"]).status_code == 200
        assert api(connection["url"], "api/status").status_code == 403
        listed = run_cli("servers", cwd=work)
        assert listed.returncode == 0 and "running" in listed.stdout + listed.stderr
    finally:
        stopped = run_cli("stop", "--name", "example", str(repo.path), cwd=work, timeout=300)
    assert stopped.returncode == 0, stopped.stderr
    assert not (work / "results" / "example" / repo.head() / "launch.json").exists()


def test_the_package_installs_the_console_command(tmp_path):
    command = Path(sys.executable).with_name("repo2singularity")
    result = subprocess.run([str(command), "--dry-run", "servers"], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[1:5] == ["--snakefile", str(PROJECT / "Snakefile"), "servers", "--profile"]
