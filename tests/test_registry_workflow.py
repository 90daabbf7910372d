"""SIFs shared through a registry (issue 12), through the real workflow: Debian's docker-registry
started by these tests on 127.0.0.1 (htpasswd and TLS with a CA made here, and plain HTTP), real
builds, real pulls, Jupyter from a pulled SIF. Credentials come from an environment variable the
config names; they must reach no log and no file."""

import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from repo2singularity import registry
from repo2singularity.shared_sifs import RECEIPT_ANNOTATION

from .conftest import GitRepo, files_holding
from .jupyter_client import execute
from .registry_server import RegistryServer, tls_registry_in
from .workflow_runner import PROJECT, SNAKEMAKE, last_line, snakemake

pytestmark = pytest.mark.integration

USER, PASSWORD = "carol", "Pa55-for-the-registry"
VARIABLE = "R2S_TEST_REGISTRY_LOGIN"
NAME = "shared"


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """The bundled example (Jupyter in it), as a repository of its own."""
    repo = GitRepo(tmp_path_factory.mktemp("shared") / "repo")
    shutil.copytree(PROJECT / "example", repo.path, dirs_exist_ok=True)
    repo.commit("first")
    return repo


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    repo = GitRepo(tmp_path_factory.mktemp("tiny") / "repo")
    repo.commit("first", {"Dockerfile": "FROM debian:bookworm\nRUN echo tiny > /tiny\n"})
    return repo


@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory):
    with tls_registry_in(tmp_path_factory.mktemp("tls-registry"), {USER: PASSWORD}) as running:
        yield running


@pytest.fixture(scope="module")
def plain_registry(tmp_path_factory):
    with RegistryServer(tmp_path_factory.mktemp("plain-registry") / "registry") as server:
        yield server


def tls_config(tls_registry, mode, **extra):
    server, ca = tls_registry
    return {
        "registry": server.url("lab/binder"),
        "registry_mode": mode,
        "registry_credentials_env": VARIABLE,
        "registry_ca_file": ca.ca_file,
        **extra,
    }


def plain_config(server, mode, **extra):
    return {"registry": server.url("lab"), "registry_mode": mode, "registry_plain_http": "true", **extra}


def run(workdir, *args, config, password=PASSWORD, check=True, env=None):
    """The workflow as a user runs it, the registry's password in the named variable."""
    environment = {**os.environ, VARIABLE: f"{USER}:{password}", **(env or {})}
    return snakemake(workdir, *args, config=config, check=check, env=environment)


def client(settings_config):
    settings = registry.RegistrySettings.from_config({**settings_config, "registry_ca_file": str(settings_config.get("registry_ca_file", ""))})
    return registry.RegistryClient(settings, environ={VARIABLE: f"{USER}:{PASSWORD}", "HOME": "/nonexistent"}, progress=None)


def folder_of(workdir, sha, name=NAME):
    return Path(workdir) / "results" / name / sha


def rules_run(result):
    return {line.split()[1].rstrip(":") for line in (result.stdout + result.stderr).splitlines() if line.startswith(("rule ", "localrule "))}


@pytest.fixture(scope="module")
def pushed(repo, tls_registry, tmp_path_factory):
    """Case 1: a build in push mode (as CI or a builder runs it) pushes what it built."""
    workdir = tmp_path_factory.mktemp("builder-side")
    config = tls_config(tls_registry, "push", repo=repo.path, ref="main", name=NAME)
    result = run(workdir, "build", config=config)
    return workdir, config, repo.head(), result


def test_a_build_in_push_mode_is_pushed_with_its_provenance(pushed):
    workdir, config, sha, result = pushed
    folder = folder_of(workdir, sha)
    assert {"build_image", "build_sif", "push_sif"} <= rules_run(result) and "pull_sif" not in rules_run(result)
    receipt = json.loads((folder / f"{NAME}.sif.pushed.json").read_text())
    with client(config) as registry_client:
        found = registry_client.lookup_one(NAME, sha)
    assert found is not None and found.manifest_digest == receipt["manifest_digest"]
    assert found.sif_sha256 == sha256(folder / f"{NAME}.sif") == (folder / f"{NAME}.sif.sha256").read_text().split()[0]
    assert found.annotations["org.opencontainers.image.revision"] == sha
    assert json.loads(found.annotations[RECEIPT_ANNOTATION])["image_id"] == json.loads((folder / "image.json").read_text())["image_id"]
    assert files_holding(PASSWORD, workdir) == ""


def test_an_account_without_docker_gets_the_sif_and_jupyter_from_the_registry(pushed, repo, tls_registry, tmp_path):
    """Case 2: a fresh results/ where Docker cannot be reached at all (a dead socket): pulled,
    no build step ran, and Jupyter runs from it; a second run has nothing to do."""
    _, _, sha, _ = pushed
    config = tls_config(tls_registry, "pull", repo=repo.path, ref="main", name=NAME)
    no_docker = {"DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"}
    result = run(tmp_path, config=config, env=no_docker)
    try:
        assert "pull_sif" in rules_run(result)
        assert not rules_run(result) & {"clone_source", "build_image", "save_image", "build_sif"}
        folder = folder_of(tmp_path, sha)
        assert not (folder / "source").exists()
        connection = json.loads((folder / "launch.json").read_text())
        assert execute(connection["url"], connection["token"], "import os; print(os.path.exists('hello.ipynb'))") == "True"
        again = run(tmp_path, "-n", config=config, env=no_docker)
        assert "Nothing to be done" in again.stdout + again.stderr
    finally:
        run(tmp_path, "stop", config=config, check=False)
    assert files_holding(PASSWORD, tmp_path) == ""


def test_a_new_commit_is_built_and_pushed_while_the_old_one_is_pulled(pushed, repo, tls_registry, tmp_path):
    """Case 3."""
    _, _, old, _ = pushed
    first = run(tmp_path, "build", config=tls_config(tls_registry, "push", repo=repo.path, ref=old, name=NAME))
    assert "pull_sif" in rules_run(first) and not rules_run(first) & {"build_image", "push_sif"}
    new = repo.commit("second", {"notes.md": "a new commit\n"})
    second = run(tmp_path, "build", config=tls_config(tls_registry, "push", repo=repo.path, ref="main", name=NAME))
    assert {"build_image", "build_sif", "push_sif"} <= rules_run(second) and "pull_sif" not in rules_run(second)
    with client(tls_config(tls_registry, "push")) as registry_client:
        found = registry_client.lookup([(NAME, old), (NAME, new)])
    assert all(found[(NAME, sha)] is not None for sha in (old, new))
    assert (tmp_path / "results" / NAME / "latest").readlink().name == new


def test_a_wrong_password_is_one_line_without_the_secret(repo, tls_registry, tmp_path):
    """Case 4."""
    wrong = "not-the-Pa55word"
    result = run(tmp_path, "build", config=tls_config(tls_registry, "pull", repo=repo.path, ref="main", name=NAME), password=wrong, check=False)
    assert result.returncode != 0
    line = last_line(result)
    assert line.startswith("repo2singularity: lookup of oras://") and "credentials" in line, result.stderr[-2000:]
    assert wrong not in result.stdout + result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "results" / NAME).exists()


def test_a_corrupted_blob_is_refused_and_nothing_is_kept(pushed, tls_registry, tmp_path):
    """Case 6: the registry's copy of the SIF changed; the pull refuses it."""
    workdir, config, sha, _ = pushed
    server, _ = tls_registry
    digest = "sha256:" + (folder_of(workdir, sha) / f"{NAME}.sif.sha256").read_text().split()[0]
    blob = server.blob_file(digest)
    original = blob.read_bytes()
    try:
        blob.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        result = run(tmp_path, "build", config={**config, "ref": sha, "registry_mode": "pull"}, check=False)
    finally:
        blob.write_bytes(original)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert any(line.startswith("pull_sif: pull of oras://") and "does not match its digest" in line for line in result.stderr.splitlines()), result.stderr[-2000:]
    folder = folder_of(tmp_path, sha)
    assert not (folder / f"{NAME}.sif").exists() and not (folder / f"{NAME}.sif.sha256").exists()
    assert not [p.name for p in folder.iterdir() if "partial" in p.name]


def test_a_registry_stopped_mid_pull_leaves_no_partial_sif_and_a_rerun_completes(pushed, repo, plain_registry, tmp_path):
    """Case 5, on the plain-HTTP registry."""
    workdir, _, sha, _ = pushed
    config = plain_config(plain_registry, "pull", repo=repo.path, ref=pushed[2], name=NAME)
    with client(plain_config(plain_registry, "push")) as registry_client:
        sif = folder_of(workdir, sha) / f"{NAME}.sif"
        receipt = (folder_of(workdir, sha) / "image.json").read_text()
        registry_client.push(sif, NAME, sha, {RECEIPT_ANNOTATION: receipt})
    command = [SNAKEMAKE, "--snakefile", str(PROJECT / "Snakefile"), "--directory", str(tmp_path), "--cores", "2", "build", "--config"]
    command += [f"{key}={value}" for key, value in config.items()]
    env = {**os.environ, registry.RATE_LIMIT_VARIABLE: str(2_000_000)}
    pulling = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    folder = folder_of(tmp_path, sha)
    deadline = time.monotonic() + 120
    while not any(p.stat().st_size > 1_000_000 for p in folder.glob(f".{NAME}.sif.*partial*")) if folder.exists() else True:
        assert pulling.poll() is None, pulling.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "the pull did not begin"
        time.sleep(0.05)
    plain_registry.stop(kill=True)
    try:
        _, stderr = pulling.communicate(timeout=120)
    finally:
        plain_registry.start()
    assert pulling.returncode != 0 and "Traceback" not in stderr
    assert any(line.startswith("pull_sif: pull of oras://") and "nothing kept, run again" in line for line in stderr.splitlines()), stderr[-2000:]
    assert not (folder / f"{NAME}.sif").exists() and not [p.name for p in folder.iterdir() if "partial" in p.name]
    snakemake(tmp_path, "--unlock", config=config)
    snakemake(tmp_path, "build", config=config)
    assert sha256(folder / f"{NAME}.sif") == (folder / f"{NAME}.sif.sha256").read_text().split()[0] == sha256(sif)


def test_a_manifest_of_20_images_builds_exactly_the_missing_half(tiny, plain_registry, tmp_path):
    """Case 7: ten names are in the registry, ten are not; the run pulls the ten and builds and
    pushes the other ten, and its summary says so."""
    sha = tiny.head()
    seed = tmp_path / "seed"
    snakemake(seed, "build", config={"repo": tiny.path, "ref": sha, "name": "seed"})
    sif = folder_of(seed, sha, "seed") / "seed.sif"
    receipt = (folder_of(seed, sha, "seed") / "image.json").read_text()
    names = [f"fleet-{number:02d}" for number in range(20)]
    with client(plain_config(plain_registry, "push")) as registry_client:
        for name in names[:10]:
            registry_client.push(sif, name, sha, {RECEIPT_ANNOTATION: receipt})
    manifest = tmp_path / "fleet.tsv"
    manifest.write_text("name\trepo\tref\n" + "".join(f"{name}\t{tiny.path}\t{sha}\n" for name in names))
    config = plain_config(plain_registry, "push", manifest=manifest)
    plan = run(tmp_path, "-n", config=config)
    counts = {line.split()[0]: int(line.split()[1]) for line in plan.stdout.splitlines() if line.split()[:1] and line.split()[-1:][0].isdigit() and len(line.split()) == 2}
    assert (counts.get("pull_sif"), counts.get("build_sif"), counts.get("push_sif")) == (10, 10, 10), plan.stdout
    run(tmp_path, config=config)
    rows = {row["name"]: row["status"] for row in json.loads((tmp_path / "results" / "summary.json").read_text())["images"]}
    assert rows == {**{name: "pulled" for name in names[:10]}, **{name: "built and pushed" for name in names[10:]}}
    assert "10 built and pushed, 10 pulled" in (tmp_path / "results" / "summary.md").read_text()
