"""Hostile and odd input through the real workflow: refused in one line before anything runs,
nothing executed; what is odd but legitimate is handled; credentials never leak."""

import json
import subprocess
import sys
import time
import uuid

import pytest

from conftest import GitRepo
from repo2singularity.processes import free_port
from workflow_runner import last_line, snakemake


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


@pytest.mark.integration
def test_credentials_in_a_url_never_reach_logs_names_or_labels(tmp_path, repo):
    # git's "dumb" HTTP protocol from a plain file server on loopback: a URL with credentials
    # that really is fetched from
    repo.git("update-server-info")
    port = free_port()
    daemon = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(repo.path), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    secret = f"s3cret{uuid.uuid4().hex[:8]}"
    try:
        url = f"http://user:{secret}@127.0.0.1:{port}/.git"
        deadline = time.monotonic() + 10
        while subprocess.run(["git", "ls-remote", url], capture_output=True).returncode:
            assert time.monotonic() < deadline, "git daemon did not answer"
            time.sleep(0.2)
        # in a manifest: Snakemake itself logs its command line, so a secret on it would show
        manifest = tmp_path / "images.tsv"
        manifest.write_text(f"name\trepo\tref\nprivate\t{url}\tmain\n")
        result = snakemake(tmp_path, config={"manifest": manifest})
    finally:
        daemon.terminate()
        daemon.wait()
    assert secret not in result.stdout + result.stderr
    sha = repo.head()
    folder = tmp_path / "results" / "private" / sha
    assert (folder / "private.sif").exists()
    leaks = subprocess.run(
        ["grep", "-rl", "--binary-files=text", secret, str(tmp_path / "results"), str(tmp_path / ".snakemake")],
        capture_output=True,
        text=True,
    ).stdout
    assert leaks == "", f"the secret is in: {leaks}"
    assert not any(secret in str(p) for p in tmp_path.rglob("*"))
    labels = json.loads((folder / "image.json").read_text())["labels"]
    assert labels["repo2singularity.repo"] == f"http://127.0.0.1:{port}/.git"
    inspect = subprocess.run(["docker", "image", "inspect", f"r2s-private:{sha}"], capture_output=True, text=True).stdout
    assert secret not in inspect
