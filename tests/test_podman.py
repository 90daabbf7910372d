"""`builder: podman` (issue 21): the bundled example built by rootless Podman as this account,
with Docker out of reach (DOCKER_HOST points nowhere), Jupyter launched from it, and its SIF held
against the Docker builder's SIF of the same commit. The base image is in the account's Podman
store already: `bash setup.sh test` (setup/podman.sh) copies it there, as there is no registry."""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from repo2singularity import builders
from repo2singularity.builders import podman as podman_builder
from repo2singularity.image import ImageSpec
from repo2singularity.step import StepError
from repo2singularity.tools import describe_progress

from .conftest import PROJECT, GitRepo, processes_running
from .jupyter_client import api, execute
from .workflow_runner import SNAKEMAKE, snakemake

RUNTIME = os.environ.get("R2S_RUNTIME") or "apptainer"
# any use of Docker by the Podman run fails: its engine is not at this address
NO_DOCKER = {**os.environ, "DOCKER_HOST": "unix:///nonexistent/docker.sock"}
# files an apt-get run stamps with its own time: they differ between any two builds
# useradd writes the day of the build into /etc/shadow (the last password change): a layer that
# one engine cached from an earlier day differs there only
STAMPED = (b"var/log/", b"var/cache/apt/", b"var/cache/debconf/", b"var/cache/ldconfig/aux-cache", b"var/lib/dpkg/status-old", b"etc/shadow")
# each run clones the repository itself: git's index and reflog record the clone's times; the
# labels are compared below
CLONE_STAMPED = (b"home/jovyan/.git/index", b"home/jovyan/.git/logs/", b".singularity.d/labels.json")
# labels that say when or by what tool an image was built
BUILD_LABELS = {"org.label-schema.build-date", "org.opencontainers.image.created", "io.buildah.version"}


# ------------------------------------------------------------------------------------ unit tests


def test_podman_is_a_builder_named_by_itself():
    assert builders.kind_of({"builder": "podman"}) == "podman"
    assert builders.builder_class({"builder": "podman"}) is podman_builder.PodmanBuilder
    with pytest.raises(builders.InvalidBuilder, match="'local', 'podman' or a mapping"):
        builders.kind_of({"builder": "docker"})


def test_subordinate_ids_are_counted_for_the_account_by_name_or_uid(tmp_path):
    subuid, subgid = tmp_path / "subuid", tmp_path / "subgid"
    subuid.write_text("alice:100000:65536\nbob:165536:65536\n1234:231072:1000\n")
    subgid.write_text("bob:165536:65536\n")
    files = {"uid": subuid, "gid": subgid}
    assert podman_builder.subordinate_ids("uid", "alice", 1000, files) == 65536
    assert podman_builder.subordinate_ids("uid", "carol", 1234, files) == 1000
    assert podman_builder.subordinate_ids("gid", "alice", 1000, files) == 0


def test_what_a_rootless_build_lacks_is_one_line_each_naming_who_fixes_it(tmp_path, monkeypatch):
    # an empty PATH: no podman, no newuidmap/newgidmap, no getsubids
    monkeypatch.setenv("PATH", str(tmp_path))
    (tmp_path / "subuid").write_text("alice:100000:65536\n")
    (tmp_path / "subgid").write_text("")
    problems = podman_builder.rootless_problems("alice", {"uid": tmp_path / "subuid", "gid": tmp_path / "subgid"})
    assert len(problems) == 4, problems
    assert problems[0].startswith("podman is not on the PATH: an administrator installs it")
    assert [p.split()[0] for p in problems[1:3]] == ["newuidmap", "newgidmap"]
    assert "alice has 0 subordinate gids in /etc/subgid" in problems[3] and "usermod --add-subgids" in problems[3]
    builder = podman_builder.PodmanBuilder({"runtime": RUNTIME, "sif_compression": "auto", "sif_conversion": "fast"}, tmp_path / "log")
    with pytest.raises(StepError, match=r"^build_image \(repo2docker, podman\): podman is not on the PATH"):
        builder.build_image(None, tmp_path, tmp_path / "image.json")


def test_a_pause_process_without_cgroups_is_named_in_one_line(tmp_path, monkeypatch):
    """Seen in the lab (CI of 06a3824): a pause process started under `ip netns exec` made every
    later build of the account fail in runc, with these words in the step's log."""
    log = tmp_path / "build_image.log"
    words = (
        "STEP 2/8: RUN mkdir -p /srv/lab\n"
        "error running container: from /usr/bin/runc creating container for [/bin/sh -c mkdir -p /srv/lab]: "
        'time="2026-12-06T02:47:59Z" level=error msg="runc create failed: no cgroup mount found in mountinfo"\n'
        ": exit status 1\nTraceback (most recent call last):\n" + "  a frame\n" * 30
    )

    def failing_build(command, log_path, step, **kwargs):
        Path(log_path).write_text(words)
        raise StepError(f"{step} failed (exit 1)")

    monkeypatch.setattr(podman_builder, "run_logged", failing_build)
    monkeypatch.setattr(podman_builder.PodmanBuilder, "require_rootless", lambda self, step: None)
    monkeypatch.setattr(podman_builder, "podman", lambda *args: "podman version 4.3.1")
    builder = podman_builder.PodmanBuilder({"runtime": RUNTIME, "sif_compression": "auto", "sif_conversion": "fast"}, log)
    spec = ImageSpec("x", "abc", "r2s-x:abc", {}, "jovyan", 1000)
    with pytest.raises(StepError, match=r"pause process sees no cgroup file system .*`podman system migrate`") as raised:
        builder.build_image(spec, tmp_path, tmp_path / "image.json")
    assert "\n" not in str(raised.value) and not (tmp_path / "image.json").exists()
    assert not podman_builder.pause_without_cgroups(tmp_path / "elsewhere.log")


def test_progress_lines_read_podmans_build_steps():
    lines = ["STEP 5/16: RUN apt-get update && apt-get install jupyter-notebook", "Get:7 http://deb.debian.org/debian bookworm/main"]
    assert describe_progress(lines) == "build step 5/16: RUN apt-get update && apt-get install jupyter-notebook"
    assert describe_progress(["[2/2] STEP 3/4: COPY . /srv"]) == "build step 3/4: COPY . /srv"


# ------------------------------------------------------------------------------------ with the real tools


def podman(*args, check=True):
    return subprocess.run(["podman", *args], capture_output=True, text=True, check=check, env=NO_DOCKER, cwd="/")


@pytest.fixture(scope="module")
def rootless():
    problems = podman_builder.rootless_problems()
    assert not problems, f"{problems}: `bash setup.sh test` (as root, setup/podman.sh) sets up rootless Podman"
    assert podman("image", "exists", "docker.io/library/debian:bookworm", check=False).returncode == 0, (
        "debian:bookworm is not in this account's Podman store: `bash setup.sh test` (as root, setup/podman.sh) copies it there"
    )


def config_for(repo, name, **more):
    return {"repo": repo.path, "ref": "main", "name": name, **more}


@pytest.fixture(scope="module")
def example(tmp_path_factory, rootless):
    base = tmp_path_factory.mktemp("podman")
    repo = GitRepo(base / "example-repo", branch="main")
    shutil.copytree(PROJECT / "example", repo.path, dirs_exist_ok=True)
    repo.commit("first")
    return base, repo


@pytest.fixture(scope="module")
def launched(example):
    """The example through the Podman builder up to Jupyter, as `snakemake` with no target does."""
    base, repo = example
    workdir = base / "podman-work"
    workdir.mkdir()
    config = config_for(repo, "example", builder="podman")
    result = snakemake(workdir, config=config, env=NO_DOCKER)
    folder = workdir / "results" / "example" / repo.head()
    yield workdir, folder, result
    snakemake(workdir, "stop", config=config, check=False, env=NO_DOCKER)
    podman("image", "rm", "--force", f"r2s-example:{repo.head()}", check=False)


def test_the_example_is_built_by_podman_and_jupyter_answers(launched):
    _, folder, result = launched
    connection = json.loads((folder / "launch.json").read_text())
    assert connection["url_with_token"] in result.stdout
    assert api(connection["url"], "api/status", connection["token"]).status_code == 200
    assert api(connection["url"], "api/status").status_code == 403
    code = "import os, numpy; print(numpy.arange(4).sum(), os.getcwd(), os.environ.get('REPO2SINGULARITY_START_RAN'))"
    assert execute(connection["url"], connection["token"], code).split() == ["6", "/home/jovyan", "yes"]


def test_the_receipt_names_podman_and_docker_never_saw_the_image(launched):
    workdir, folder, result = launched
    receipt = json.loads((folder / "image.json").read_text())
    assert receipt["engine"].startswith("podman ")
    assert receipt["image_id"].startswith("sha256:")
    assert receipt["labels"]["repo2singularity.sha"] == folder.name
    assert podman("image", "inspect", "--format", "{{.Id}}", receipt["tag"]).stdout.strip() == receipt["image_id"].removeprefix("sha256:")
    # the run had no way to the Docker engine, and Docker has no such image
    assert subprocess.run(["docker", "image", "inspect", receipt["tag"]], capture_output=True).returncode != 0
    assert not (folder / "image.tar").exists(), "the temporary tarball was kept"
    # the same progress lines as the Docker builder's
    for step in ("build_image (repo2docker, podman)", "save_image (podman save)", "build_sif (fast conversion, zstd)"):
        assert f"{step}: done in" in result.stderr, result.stderr[-3000:]


def test_a_second_run_has_nothing_to_do(launched, example):
    workdir, *_ = launched
    _, repo = example
    plan = snakemake(workdir, "build", "-n", config=config_for(repo, "example", builder="podman"), env=NO_DOCKER)
    assert "Nothing to be done" in plan.stdout + plan.stderr


def test_the_sif_matches_the_docker_builders_sif_of_the_same_commit(launched, example):
    """Same files, types, modes, owners and links; the same contents but for the files apt-get
    stamps with the time of the build; the same labels but for the build's time and tool."""
    from .test_archive_to_sif import Listing, compare, extract_file

    _, folder, _ = launched
    base, repo = example
    workdir = base / "docker-work"
    workdir.mkdir()
    snakemake(workdir, "build", config=config_for(repo, "example"))
    docker_sif = workdir / "results" / "example" / repo.head() / "example.sif"
    podman_sif = folder / "example.sif"
    try:
        only, differences = compare(Listing(podman_sif), Listing(docker_sif))
        assert not only, f"entries in one SIF only: {sorted(only)[:20]}"
        unexpected = {
            name: fields
            for name, fields in differences.items()
            if not (set(fields) <= {"sha256", "size"} and name.startswith(STAMPED + CLONE_STAMPED))
        }
        assert not unexpected, unexpected
        labels = [json.loads(extract_file(sif, ".singularity.d/labels.json")) for sif in (podman_sif, docker_sif)]
        assert [{k: v for k, v in label.items() if k not in BUILD_LABELS} for label in labels] == [
            {k: v for k, v in labels[1].items() if k not in BUILD_LABELS}
        ] * 2
    finally:
        subprocess.run(["docker", "image", "rm", "--force", f"r2s-example:{repo.head()}"], capture_output=True)


# ------------------------------------------------------------------------------------ faults


def slow_dockerfile(name):
    # a step of its own per test: Podman's layer cache must not skip it
    return f"FROM debian:bookworm\nRUN sleep 15 && echo {name} > /{name}\nRUN echo done > /done\n"


def started(workdir, repo, name, target="build"):
    command = [SNAKEMAKE, "--snakefile", str(PROJECT / "Snakefile"), "--directory", str(workdir), "--cores", "2", target]
    command += ["--config", *(f"{k}={v}" for k, v in config_for(repo, name, builder="podman").items())]
    output = open(workdir.parent / f"{workdir.name}.out", "w+")
    return subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=NO_DOCKER, start_new_session=True), output


def output_of(handle):
    handle.flush()
    handle.seek(0)
    return handle.read()


def test_two_builds_of_one_commit_at_once_share_one_image(example):
    base, _ = example
    repo = GitRepo(base / "twice-repo", branch="main")
    sha = repo.commit("twice", {"Dockerfile": slow_dockerfile("twice")})
    runs = []
    for index in range(2):
        workdir = base / f"twice-{index}"
        workdir.mkdir()
        runs.append((workdir, *started(workdir, repo, "twice")))
    try:
        for _workdir, process, output in runs:
            assert process.wait(timeout=900) == 0, output_of(output)
        said = [output_of(output) for _, _, output in runs]
        assert sum("another build of r2s-twice:" in text for text in said) == 1, said
        receipts = [json.loads((workdir / "results" / "twice" / sha / "image.json").read_text()) for workdir, *_ in runs]
        assert receipts[0]["image_id"] == receipts[1]["image_id"]
    finally:
        podman("image", "rm", "--force", f"r2s-twice:{sha}", check=False)


def test_a_build_killed_midway_leaves_no_image_and_the_rerun_resumes_there(example):
    base, _ = example
    repo = GitRepo(base / "killed-repo", branch="main")
    sha = repo.commit("killed", {"Dockerfile": slow_dockerfile(f"killed{os.getpid()}")})
    workdir = base / "killed"
    workdir.mkdir()
    folder = workdir / "results" / "killed" / sha
    process, output = started(workdir, repo, "killed")
    try:
        deadline = time.monotonic() + 300
        log = folder / "logs" / "build_image.log"
        while not (log.exists() and ": RUN sleep 15 && echo" in log.read_text(errors="replace")):
            assert process.poll() is None, output_of(output)
            assert time.monotonic() < deadline, output_of(output)
            time.sleep(0.5)
        time.sleep(2)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        deadline = time.monotonic() + 60
        while processes_running("sleep 15") and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not processes_running("sleep 15"), "the build outlived the killed workflow"
        assert (folder / "source").exists() and not (folder / "image.json").exists()
        assert podman("image", "exists", f"r2s-killed:{sha}", check=False).returncode != 0, "a half-built image has the tag"
        snakemake(workdir, "--unlock", config=config_for(repo, "killed", builder="podman"), env=NO_DOCKER)
        rerun = snakemake(workdir, "build", config=config_for(repo, "killed", builder="podman"), env=NO_DOCKER)
        assert "rule clone_source:" not in rerun.stdout + rerun.stderr
        assert (folder / "killed.sif").exists() and (folder / "killed.sif.sha256").exists()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        podman("image", "rm", "--force", f"r2s-killed:{sha}", check=False)


def test_the_login_check_for_slurm_says_what_a_rootless_build_has(rootless):
    result = subprocess.run(["bash", "setup.sh", "login", "slurm"], capture_output=True, text=True, cwd=PROJECT, env=NO_DOCKER)
    assert "MISSING: rootless podman" not in result.stdout, result.stdout
    assert "ok: podman " in result.stdout and "newuidmap/newgidmap and subordinate ids" in result.stdout, result.stdout
    assert "ok: podman storage driver " in result.stdout, result.stdout


def test_a_full_store_is_one_line_and_leaves_no_receipt(rootless, tmp_path):
    """Podman's store on the small file system `bash setup.sh test` mounts (tests/test_faults.py):
    a build that fills it stops with one line naming the store."""
    small = Path(os.environ.get("R2S_SMALL_FS") or "/mnt/r2s-small")
    assert small.is_dir() and os.access(small, os.W_OK), f"{small} is missing: `bash setup.sh test` (as root) mounts it"
    store = small / f"podman-store-{os.getpid()}"
    conf = tmp_path / "storage.conf"
    driver = podman("info", "--format", "{{.Store.GraphDriverName}}").stdout.strip()
    # a rootless store's place is rootless_storage_path; its run-time folder follows XDG_RUNTIME_DIR
    conf.write_text(f'[storage]\ndriver = "{driver}"\nrootless_storage_path = "{store}"\n')
    runtime_dir = tmp_path / "run"
    runtime_dir.mkdir(mode=0o700)
    env = {**NO_DOCKER, "CONTAINERS_STORAGE_CONF": str(conf), "XDG_RUNTIME_DIR": str(runtime_dir)}
    base = tmp_path / "base.tar"
    podman("save", "--format", "docker-archive", "--output", str(base), "docker.io/library/debian:bookworm")
    subprocess.run(["podman", "load", "--input", str(base)], env=env, check=True, capture_output=True)
    base.unlink()
    repo = GitRepo(tmp_path / "full-repo", branch="main")
    sha = repo.commit("full", {"Dockerfile": f"FROM debian:bookworm\nRUN head -c 2000M /dev/zero > /big-{os.getpid()}\n"})
    workdir = tmp_path / "work"
    workdir.mkdir()
    try:
        failed = snakemake(workdir, "build", config=config_for(repo, "full", builder="podman"), check=False, env=env)
        assert failed.returncode != 0
        lines = [line for line in (failed.stdout + failed.stderr).splitlines() if "no space left in" in line]
        assert lines and lines[0].startswith("build_image: build_image (repo2docker, podman) failed: no space left in " + str(store)), failed.stderr[-3000:]
        assert not (workdir / "results" / "full" / sha / "image.json").exists()
    finally:
        subprocess.run(["podman", "unshare", "rm", "-rf", str(store)], env=env, capture_output=True)
        subprocess.run(["rm", "-rf", str(store)], capture_output=True)


def test_with_the_slurm_profile_the_three_steps_are_one_slurm_job(rootless, tmp_path):
    """`--profile slurm builder=podman`: build_image, save_image and build_sif go to the cluster
    together (the image stays in the node's store between them); only the SIF comes back."""
    import re

    from .test_slurm import PARTITION

    repo = GitRepo(tmp_path / "slurm-repo", branch="main")
    sha = repo.commit("slurm", {"Dockerfile": f"FROM debian:bookworm\nRUN echo {os.getpid()} > /on-a-node\n"})
    workdir = tmp_path / "work"
    workdir.mkdir()
    config = config_for(repo, "slurmbuild", builder="podman", slurm_partition=PARTITION)
    try:
        result = snakemake(workdir, "--profile", str(PROJECT / "profiles" / "slurm"), "build", config=config, env=NO_DOCKER)
        output = result.stdout + result.stderr
        jobs = re.findall(r"Job \S+ has been submitted with SLURM jobid (\d+)", output)
        assert len(jobs) == 1, output[-3000:]
        assert "group job podman_build" in output or "podman_build" in output, output[-3000:]
        folder = workdir / "results" / "slurmbuild" / sha
        assert (folder / "slurmbuild.sif").exists() and (folder / "slurmbuild.sif.sha256").exists()
        assert json.loads((folder / "image.json").read_text())["engine"].startswith("podman ")
    finally:
        podman("image", "rm", "--force", f"r2s-slurmbuild:{sha}", check=False)
