"""Hostile and odd input through the real workflow: refused in one line before anything runs,
nothing executed; what is odd but legitimate is handled; credentials never leak."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from repo2singularity.processes import free_port

from .conftest import GitRepo, files_holding
from .workflow_runner import PROJECT, SNAKEMAKE, last_line, snakemake


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = GitRepo(tmp_path_factory.mktemp("hostile") / "repo")
    repo.commit("first", {"Dockerfile": "FROM debian:bookworm\nRUN echo hostile > /hostile\n"})
    repo.git("branch", "zweig-ünïcode")
    return repo


MARKER = f"/tmp/r2s-pwned-{uuid.uuid4().hex}"

HOSTILE = [
    ({"ref": f"--upload-pack=touch {MARKER}"}, "may not start with '-'"),
    ({"ref": "-x"}, "may not start with '-'"),
    ({"ref": "main\nrm -rf /"}, "ref"),
    ({"ref": "a..b"}, "not a valid git ref name"),
    ({"repo": f"ext::sh -c touch% {MARKER}"}, "transport 'ext::'"),
    ({"repo": "fd::3"}, "transport 'fd::'"),
    ({"repo": f"-oProxyCommand=touch {MARKER}"}, "may not start with '-'"),
    ({"repo": f"--upload-pack=touch {MARKER}"}, "may not start with '-'"),
    ({"repo": "ftp://127.0.0.1/x"}, "scheme 'ftp'"),
    ({"name": "../../etc"}, "may not contain"),
    ({"name": "a/b"}, "may not contain"),
    ({"name": ".."}, "may not contain"),
    ({"name": "bell\x07"}, "control characters"),
    ({"name": "x" * 5000}, "longer than"),
    ({"subdir": "../../outside"}, "may not leave the repository"),
    ({"launch_timeout": "[1, 2]"}, "'launch_timeout'"),
    ({"repo2docker_args": "--no-run"}, "'repo2docker_args'"),
    ({"repo2docker_args": "[--run, --volume, '/:/host', --, sh, -c, 'touch /host/tmp/x']"}, "option '--run' is not allowed"),
    ({"repo2docker_args": f"[--config, {MARKER}.py]"}, "option '--config' is not allowed"),
    ({"repo2docker_args": "[--label, repo2singularity.sha=forged]"}, "option '--label' is not allowed"),
    ({"repo2docker_args": "[--appendix, 'LABEL repo2singularity.sha=forged']"}, "--appendix: 'LABEL'"),
    ({"user_id": 0}, "'user_id'"),
]


@pytest.mark.parametrize("override, message", HOSTILE, ids=[str(i) for i in range(len(HOSTILE))])
def test_hostile_input_is_refused_in_one_line_and_runs_nothing(tmp_path, repo, override, message):
    config = {"repo": repo.path, "ref": "main", **override}
    result = snakemake(tmp_path, config=config, check=False)
    assert result.returncode != 0
    line = last_line(result)
    assert line.startswith("repo2singularity: ") and message in line, result.stderr[-2000:]
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").iterdir())
    assert not subprocess.run(["test", "-e", MARKER]).returncode == 0, "a hostile input ran a command"


def test_unicode_branch_and_name_are_handled(tmp_path, repo):
    from repo2singularity.naming import DOCKER_COMPONENT_PATTERN, check_name

    name = check_name("Ünïcode Name")
    assert DOCKER_COMPONENT_PATTERN.fullmatch(name)
    result = snakemake(tmp_path, "-n", "build", config={"repo": repo.path, "ref": "zweig-ünïcode", "name": "Ünïcode Name"})
    assert f"name={name}, sha={repo.head()}" in result.stdout


class DumbHttpRepository:
    """git's "dumb" HTTP protocol from a plain file server on loopback: a URL with credentials
    that really is fetched from."""

    def __init__(self, repo):
        repo.git("update-server-info")
        port = free_port()
        self.server = subprocess.Popen(
            [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(repo.path), str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.secret = f"s3cret{uuid.uuid4().hex[:8]}"
        self.url = f"http://user:{self.secret}@127.0.0.1:{port}/.git"
        deadline = time.monotonic() + 10
        while subprocess.run(["git", "ls-remote", self.url], capture_output=True).returncode:
            assert time.monotonic() < deadline, "the file server did not answer"
            time.sleep(0.2)

    def stop(self):
        self.server.terminate()
        self.server.wait()


@pytest.mark.integration
def test_credentials_are_on_no_disk_even_after_the_workflow_is_killed(tmp_path):
    """Issue 13 item 1: Snakemake writes each script job's params to .snakemake/scripts/ and
    deletes the file only when the job ends; a SIGKILLed workflow leaves it there."""
    repo = GitRepo(tmp_path / "big-repo")
    (repo.path / "data.bin").write_bytes(os.urandom(60 << 20))
    repo.commit("data", {"Dockerfile": "FROM debian:bookworm\n"})
    tmp_path = tmp_path / "work"
    tmp_path.mkdir()
    served = DumbHttpRepository(repo)
    try:
        manifest = tmp_path / "images.tsv"
        manifest.write_text(f"name\trepo\tref\nprivate\t{served.url}\tmain\n")
        command = [SNAKEMAKE, "--snakefile", str(PROJECT / "Snakefile"), "--directory", str(tmp_path), "--cores", "2", "--config", f"manifest={manifest}"]
        run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        cloning = tmp_path / "results" / "private" / repo.head() / "source.partial"
        deadline = time.monotonic() + 120
        while not cloning.exists():
            assert run.poll() is None and time.monotonic() < deadline, "the clone did not start"
            time.sleep(0.005)
        scripts = list((tmp_path / ".snakemake" / "scripts").glob("*clone_source*"))
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
    finally:
        served.stop()
    assert scripts, "the clone job's script should still be there after the kill"
    assert files_holding(served.secret, tmp_path / ".snakemake", tmp_path / "results") == ""


@pytest.mark.integration
def test_credentials_in_a_url_never_reach_logs_names_or_labels(tmp_path, repo):
    served = DumbHttpRepository(repo)
    secret = served.secret
    try:
        # in a manifest: Snakemake itself logs its command line, so a secret on it would show
        manifest = tmp_path / "images.tsv"
        manifest.write_text(f"name\trepo\tref\nprivate\t{served.url}\tmain\n")
        result = snakemake(tmp_path, config={"manifest": manifest})
    finally:
        served.stop()
    port = served.url.rsplit(":", 1)[1].split("/")[0]
    assert secret not in result.stdout + result.stderr
    sha = repo.head()
    folder = tmp_path / "results" / "private" / sha
    assert (folder / "private.sif").exists()
    leaks = files_holding(secret, tmp_path / "results", tmp_path / ".snakemake")
    assert leaks == "", f"the secret is in: {leaks}"
    assert not any(secret in str(p) for p in tmp_path.rglob("*"))
    labels = json.loads((folder / "image.json").read_text())["labels"]
    assert labels["repo2singularity.repo"] == f"http://127.0.0.1:{port}/.git"
    inspect = subprocess.run(["docker", "image", "inspect", f"r2s-private:{sha}"], capture_output=True, text=True).stdout
    assert secret not in inspect


def test_a_bare_repository_is_built_from_like_a_work_tree(tmp_path, repo):
    from repo2singularity.naming import default_name

    bare = tmp_path / "mirror.git"
    repo.git("clone", "--quiet", "--bare", str(repo.path), str(bare))
    sha = repo.head()
    name = default_name(str(bare.resolve()))
    snakemake(tmp_path, f"results/{name}/{sha}/source", config={"repo": bare, "ref": "main"})
    assert (tmp_path / "results" / name / sha / "source" / "Dockerfile").read_text().startswith("FROM debian:bookworm")


def test_repo2docker_options_of_a_manifest_row_are_refused_with_its_line(tmp_path, repo):
    manifest = tmp_path / "images.tsv"
    manifest.write_text(
        "name\trepo\tref\trepo2docker_args\n"
        f"fine\t{repo.path}\tmain\t--build-arg A=1 --target-repo-dir /srv/repo\n"
        f"escape\t{repo.path}\tmain\t--run --volume /:/host\n"
    )
    result = snakemake(tmp_path, "-n", config={"manifest": manifest}, check=False)
    assert result.returncode != 0
    assert last_line(result).startswith(f"{manifest}:3: repo2docker_args: option '--run' is not allowed"), result.stderr[-2000:]
    # the config's own list is the default of every row: checked once, before the rows
    manifest.write_text(manifest.read_text().replace("\t--run --volume /:/host", "\t"))
    assert snakemake(tmp_path, "-n", config={"manifest": manifest}).returncode == 0
    result = snakemake(tmp_path, "-n", config={"manifest": manifest, "repo2docker_args": "[--push]"}, check=False)
    assert last_line(result).startswith("repo2singularity: repo2docker_args of the config: option '--push' is not allowed")
