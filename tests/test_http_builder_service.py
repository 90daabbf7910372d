"""The HTTP builder (`builder: {kind: http}`) through the workflow, against the real build service
(Tornado) on loopback: with the service's fast stand-in runner for the client's own logic (the
phases on the terminal, a cut download resumed, the one-line errors, TLS, the remote profile),
and one real build of the example through `repo2singularity --remote --endpoint-url`."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import PROJECT
from .registry_server import CertificateAuthority, free_port
from .service_server import (
    Client,
    FakeRunner,
    ProcessServer,
    ThreadServer,
    add_user,
    settings,
    wait_for,
    write_settings,
)
from .workflow_runner import SNAKEMAKE

TOKEN_VARIABLE = "R2S_SERVICE_TOKEN"


@pytest.fixture
def repo(make_repo):
    repo = make_repo("demo")
    repo.commit("first", {"README.md": "demo\n"})
    return repo


@pytest.fixture
def service(tmp_path):
    """service(runner=None, tls=False, **settings) -> the server, with user alice (`token`)."""
    started = []

    def start(runner=None, tls=False, **values):
        work = tmp_path / "service"
        if tls:
            ca = CertificateAuthority(tmp_path / "tls")
            values.update(tls_cert=str(ca.certificate_file), tls_key=str(ca.key_file))
        server = ThreadServer(settings(work, **values), runner or FakeRunner())
        server.runner = runner
        server.token = add_user(work, "alice")
        server.ca_file = str(tmp_path / "tls" / "ca.pem") if tls else ""
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def builder(server, **extra):
    values = {"kind": "http", "url": server.url + "/api", **extra}
    if server.ca_file and "ca_file" not in extra:
        values["ca_file"] = server.ca_file
    return json.dumps(values)


def run(workdir, *args, config=None, token=None, env=None, timeout=600, popen=False):
    command = [SNAKEMAKE, "--snakefile", str(PROJECT / "Snakefile"), "--directory", str(workdir), "--cores", "1", *args]
    if config:
        command += ["--config", *(f"{key}={value}" for key, value in config.items())]
    environ = {**os.environ, **(env or {})}
    environ.pop(TOKEN_VARIABLE, None)
    if token is not None:
        environ[TOKEN_VARIABLE] = token
    if popen:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environ, start_new_session=True)
    return subprocess.run(command, capture_output=True, text=True, env=environ, timeout=timeout)


def step_error(result):
    """The step's one line (`build_image: ...`), as the workflow prints it."""
    assert result.returncode != 0, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith(("build_image: ", "save_image: ", "build_sif: ", "check_builder: "))]
    assert lines, result.stderr[-3000:]
    return lines[-1]


def everything_written(workdir, but_the_command_line=False):
    """The text of every file a run wrote; Snakemake's own log echoes the command line."""
    texts = []
    for path in Path(workdir).rglob("*"):
        if but_the_command_line and ".snakemake/log/" in str(path):
            continue
        if path.is_file() and path.stat().st_size < (1 << 20):
            texts.append(path.read_bytes().decode("utf-8", "replace"))
    return "\n".join(texts)


def test_a_build_through_the_service_shows_its_phases_and_brings_the_sif(service, repo, tmp_path):
    server = service()
    work = tmp_path / "work"
    config = {"repo": f"file://{repo.path}", "ref": "main", "name": "demo", "builder": builder(server)}
    result = run(work, "build", config=config, token=server.token)
    assert result.returncode == 0, result.stderr[-4000:]
    folder = work / "results" / "demo" / repo.head()
    # nothing cloned here: the service fetched the commit itself
    assert [p.name for p in (folder / "source").iterdir()] == [".snakemake_timestamp"]
    digest = subprocess.run(["sha256sum", folder / "demo.sif"], capture_output=True, text=True, check=True).stdout.split()[0]
    assert (folder / "demo.sif.sha256").read_text() == f"{digest}  demo.sif\n"
    image = json.loads((folder / "image.json").read_text())
    assert image["image"] == "fake" and image["builder"]["sif_sha256"] == digest and image["builder"]["url"] == server.url
    # the receipt that stands for the saved image is temporary, as image.tar is
    assert not (folder / "image.build.json").exists()
    # the service's phases and log lines, as the SSH builder shows its own
    where = f"build_image on {server.url.split('//')[1]}: "
    for phase in ("fetching", "building", "built in"):
        assert where + phase in result.stderr, result.stderr[-3000:]
    log = (folder / "logs" / "build_image.log").read_text()
    assert "Step 2/2 : RUN true" in log
    assert "sha256 verified" in result.stderr
    # the token is in no file the run wrote and on no line it printed
    assert server.token not in everything_written(work) + result.stdout + result.stderr
    # a second run asks the service nothing
    again = run(work, "build", config=config, token="not-even-asked")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr


def test_a_cut_download_resumes_from_its_partial_file(service, repo, tmp_path):
    server = service(FakeRunner(size=48 << 20))
    work = tmp_path / "work"
    config = {"repo": f"file://{repo.path}", "ref": "main", "name": "demo", "builder": builder(server)}
    folder = work / "results" / "demo" / repo.head()
    partial = folder / ".demo.sif.partial"
    first = run(work, "build", config=config, token=server.token, env={"R2S_DOWNLOAD_LIMIT_BPS": str(8_000_000)}, popen=True)
    try:
        wait_for(lambda: partial.exists() and partial.stat().st_size > 8 << 20, 120, "the download never started")
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.communicate()
    cut_at = partial.stat().st_size
    assert not (folder / "demo.sif").exists() and cut_at < 48 << 20
    # a killed workflow keeps Snakemake's lock (README: unlock once, then run again)
    assert run(work, "--unlock", config=config).returncode == 0
    second = run(work, "build", config=config, token=server.token)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "download demo.sif: resuming at" in second.stderr
    assert not partial.exists() and (folder / "demo.sif").stat().st_size == 48 << 20
    digest = subprocess.run(["sha256sum", folder / "demo.sif"], capture_output=True, text=True, check=True).stdout.split()[0]
    assert digest == json.loads((folder / "image.json").read_text())["builder"]["sif_sha256"]


def test_a_wrong_or_missing_token_is_one_line(service, repo, tmp_path):
    server = service()
    config = {"repo": f"file://{repo.path}", "ref": "main", "name": "demo", "builder": builder(server)}
    wrong = run(tmp_path / "work", "build", config=config, token="wrong-token-123")
    line = step_error(wrong)
    assert line.startswith(f"build_image: the build service {server.url} refused the token in ${TOKEN_VARIABLE}")
    assert "(401: " in line and "wrong-token-123" not in wrong.stdout + wrong.stderr
    assert "wrong-token-123" not in everything_written(tmp_path / "work")
    assert not list((tmp_path / "work" / "results").rglob("*.sif"))
    missing = run(tmp_path / "work", "check_builder", config=config)
    assert f"needs your token in the environment variable {TOKEN_VARIABLE}" in step_error(missing)
    ok = run(tmp_path / "work", "check_builder", config=config, token=server.token)
    assert ok.returncode == 0 and f"build service {server.url} answers; signed in as 'alice'" in ok.stderr


def test_tls_with_and_without_the_services_ca(service, repo, tmp_path):
    server = service(tls=True)
    assert server.url.startswith("https://")
    config = {"repo": f"file://{repo.path}", "ref": "main", "builder": builder(server, ca_file="")}
    untrusted = run(tmp_path / "work", "check_builder", config=config, token=server.token)
    assert "TLS certificate not accepted" in step_error(untrusted) and "ca_file" in step_error(untrusted)
    config["builder"] = builder(server)
    trusted = run(tmp_path / "work", "check_builder", config=config, token=server.token)
    assert trusted.returncode == 0, trusted.stderr[-2000:]


def test_an_unreachable_service_and_a_limit_are_one_line(service, make_repo, tmp_path):
    port = free_port()
    repo = make_repo("one")
    repo.commit("first", {"a": "1"})
    config = {"repo": f"file://{repo.path}", "ref": "main", "builder": json.dumps({"kind": "http", "url": f"http://127.0.0.1:{port}"})}
    assert step_error(run(tmp_path / "work", "build", config=config, token="t")).endswith(
        f"the build service http://127.0.0.1:{port} does not answer: connection refused (while asking for a build)"
    )
    runner = FakeRunner()
    runner.gate.clear()
    server = service(runner, max_builds_per_user=1)
    try:
        other = make_repo("two")
        other.commit("first", {"b": "2"})
        assert Client(server.url, server.token).build(f"file://{other.path}", "main").status_code == 200
        config["builder"] = builder(server)
        line = step_error(run(tmp_path / "work", "build", config=config, token=server.token))
        assert f"the build service {server.url} is at a limit while asking for a build (429: " in line
    finally:
        runner.gate.set()


def test_the_remote_profile_works_unchanged_with_an_http_builder(service, repo, tmp_path):
    """profiles/remote/config.yaml as it is, with a builder.yaml of kind http beside it."""
    server = service()
    profile = tmp_path / "remote"
    profile.mkdir()
    shutil.copy(PROJECT / "profiles" / "remote" / "config.yaml", profile / "config.yaml")
    (profile / "builder.yaml").write_text(f"builder:\n  kind: http\n  url: {server.url}/api\n")
    work = tmp_path / "work"
    command = [SNAKEMAKE, "--snakefile", str(PROJECT / "Snakefile"), "--directory", str(work), "--profile", str(profile), "build"]
    command += ["--config", f"repo=file://{repo.path}", "ref=main", "name=demo"]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, TOKEN_VARIABLE: server.token}, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (work / "results" / "demo" / repo.head() / "demo.sif").exists()


@pytest.mark.integration
def test_repo2singularity_remote_builds_the_example_through_the_service(tmp_path, make_repo):
    """The original tool's command against the real service (TLS, the real workflow runner)."""
    example = make_repo("example")
    shutil.copytree(PROJECT / "example", example.path, dirs_exist_ok=True)
    example.commit("the example")
    ca = CertificateAuthority(tmp_path / "tls")
    work_dir = tmp_path / "service"
    config = write_settings(
        tmp_path / "service.yaml",
        work_dir=str(work_dir),
        port=0,
        allowed_schemes=["file"],
        tls_cert=str(ca.certificate_file),
        tls_key=str(ca.key_file),
    )
    token = add_user(work_dir, "alice")
    server = ProcessServer(config)
    work = tmp_path / "work"
    work.mkdir()
    try:
        command = [sys.executable, "-m", "repo2singularity.cli", "--remote", "--endpoint-url", f"{server.url}/api", "--ca-file", str(ca.ca_file)]
        command += ["--name", "example", f"file://{example.path}"]
        started = time.monotonic()
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            cwd=work,
            timeout=1800,
            env={**os.environ, TOKEN_VARIABLE: token},
        )
        assert result.returncode == 0, result.stderr[-5000:]
        folder = work / "results" / "example" / example.head()
        sif = folder / "example.sif"
        labels = json.loads(subprocess.run(["apptainer", "inspect", "--json", "--labels", str(sif)], capture_output=True, text=True, check=True).stdout)
        labels = labels["data"]["attributes"]["labels"]
        assert labels["repo2singularity.sha"] == example.head()
        image = json.loads((folder / "image.json").read_text())
        assert image["tag"] == f"r2s-example:{example.head()}" and image["builder"]["kind"] == "http"
        assert "build step" in result.stderr or "building" in result.stderr
        assert token not in result.stdout + result.stderr + everything_written(work)
        print(f"built through the service in {time.monotonic() - started:.0f} s")
    finally:
        server.stop()


def test_a_service_restarting_mid_build_fails_the_step_in_one_line_and_leaves_no_sif(repo, tmp_path):
    """The stream breaks, the client asks again, and the restarted service (which fails the
    builds it did not finish) tells it the build failed: one line, no SIF, nothing that looks
    finished."""
    port = free_port()
    work = tmp_path / "service"
    runner = FakeRunner()
    runner.gate.clear()
    server = ThreadServer(settings(work, port=port), runner)
    token = add_user(work, "alice")
    config = {"repo": f"file://{repo.path}", "ref": "main", "name": "demo", "builder": json.dumps({"kind": "http", "url": server.url})}
    client = run(tmp_path / "work", "build", config=config, token=token, popen=True)
    restarted = None
    try:
        wait_for(lambda: runner.started, 60, "the build never started")
        time.sleep(1)
        server.stop()
        restarted = ThreadServer(settings(work, port=port), FakeRunner())
        out, err = client.communicate(timeout=120)
    finally:
        if client.poll() is None:
            os.killpg(client.pid, signal.SIGKILL)
        (restarted or server).stop()
    assert client.returncode != 0
    lines = [line for line in err.splitlines() if line.startswith("build_image: ")]
    assert lines and "failed" in lines[-1], err[-3000:]
    assert not list((tmp_path / "work" / "results").rglob("*.sif")) and not list((tmp_path / "work" / "results").rglob("image.json"))


def test_a_build_the_service_no_longer_has_names_the_rule_to_rerun(repo, tmp_path):
    """image.json names a build; a service that lost it (its work folder wiped) answers 404, and
    the step says which rule to rerun."""
    port = free_port()
    server = ThreadServer(settings(tmp_path / "service", port=port), FakeRunner())
    token = add_user(tmp_path / "service", "alice")
    work = tmp_path / "work"
    config = {"repo": f"file://{repo.path}", "ref": "main", "name": "demo", "builder": json.dumps({"kind": "http", "url": server.url})}
    try:
        assert run(work, "build", config=config, token=token).returncode == 0
    finally:
        server.stop()
    folder = work / "results" / "demo" / repo.head()
    (folder / "demo.sif").unlink()
    server = ThreadServer(settings(tmp_path / "service-anew", port=port), FakeRunner())
    token = add_user(tmp_path / "service-anew", "alice")
    try:
        line = step_error(run(work, "build", config=config, token=token))
    finally:
        server.stop()
    assert line.startswith(f"save_image: the build service {server.url} no longer has build ")
    assert line.endswith("rebuild it with: snakemake --forcerun build_image")


def test_a_private_repository_through_the_service_leaves_its_credentials_nowhere_here(service, repo, tmp_path):
    """A URL with credentials: resolved here and fetched there with them, and they reach no
    file, log or line of output on this side."""
    from .git_http_server import GitHttpServer

    bare = tmp_path / "git" / "secret.git"
    bare.parent.mkdir()
    repo.git("clone", "--quiet", "--bare", str(repo.path), str(bare))
    git_server = GitHttpServer(bare.parent, {"alice": "alices-password"})
    server = service()
    work = tmp_path / "work"
    try:
        url = git_server.url("secret.git", "alice", "alices-password")
        config = {"repo": url, "ref": "main", "name": "secret", "builder": builder(server)}
        result = run(work, "build", config=config, token=server.token)
    finally:
        git_server.stop()
    assert result.returncode == 0, result.stderr[-3000:]
    assert (work / "results" / "secret" / repo.head() / "secret.sif").exists()
    # Snakemake echoes its own command line (docs/security.md); nothing of ours repeats it
    printed = "\n".join(line for line in (result.stdout + result.stderr).splitlines() if not line.strip().startswith("Command:"))
    assert "alices-password" not in everything_written(work, but_the_command_line=True) + printed
