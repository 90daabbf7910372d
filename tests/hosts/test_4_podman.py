"""Without Docker anywhere (issue 21): the login account, in no docker group, builds with
`snakemake --profile slurm build --config builder=podman`; build_image, save_image and build_sif
run as one Slurm job on node1, rootless Podman as the account, and only the SIF comes back. The
repository builds without network (nothing leaves the lab): its base image is copied into the
account's Podman store from the machine's Docker by `setup/podman.sh base ACCOUNT`, as an
administrator would load it. Its SIF is held against the Docker builder's of the same commit."""

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import Watcher
from .lab import PROJECT, make_repo
from .topology import LOGIN_ACCOUNT, STATE, Account, run

DOCKERFILE = "FROM debian:bookworm\nRUN mkdir -p /srv/lab && echo {word} > /srv/lab/word && ln -s word /srv/lab/link\n"
# labels that say when or by what tool an image was built
BUILD_LABELS = {"org.label-schema.build-date", "org.opencontainers.image.created", "io.buildah.version"}


@dataclass
class PodmanJourney:
    url: str
    sha: str
    result: object
    watcher: Watcher
    folder: Path

    @property
    def output(self):
        return self.result.stdout + self.result.stderr


def step_logs(folders, most=20):
    """The lines of each step's log that say error or failed: the cause (Podman's and runc's
    words) is there, above the traceback that Snakemake's output ends with."""
    said = []
    for log in sorted(log for folder in folders for log in (folder / "logs").glob("*.log")):
        lines = [line for line in log.read_text(errors="replace").splitlines() if re.search(r"error|fail", line, re.IGNORECASE)]
        said += [f"--- {log}:", *lines[:most]]
    return "\n".join(said)


@pytest.fixture(scope="module")
def podman_journey(lab):
    run(["bash", "setup/podman.sh", "base", LOGIN_ACCOUNT], cwd=PROJECT, timeout=600)
    work = STATE / "repos" / "podman"
    make_repo(work, {"Dockerfile": DOCKERFILE.format(word=os.urandom(8).hex())})
    url = lab.git.publish("podman", work)
    sha = run(["git", "-C", work, "rev-parse", "HEAD"]).stdout.strip()
    command = ["snakemake", "--profile", "slurm", "build", "--config", f"repo={url}", "ref=main", "builder=podman"]
    with Watcher(lab) as watcher:
        result = lab.as_login(command, check=False, timeout=1800)
    folders = list((lab.checkout / "results").glob(f"*/{sha}"))
    assert result.returncode == 0 and len(folders) == 1, f"the run failed:\n{result.stdout[-3000:]}\n{result.stderr[-4000:]}\n{step_logs(folders)}"
    return PodmanJourney(url, sha, result, watcher, folders[0])


def test_the_three_steps_ran_as_one_job_of_the_login_account_on_node1(lab, podman_journey):
    jobs = re.findall(r"has been submitted with SLURM jobid (\d+)", podman_journey.output)
    assert len(jobs) == 1, podman_journey.output[-3000:]
    record = lab.cluster.job(jobs[0])
    assert (record["NodeList"], record["JobState"], record["UserId"].split("(")[0]) == ("node1", "COMPLETED", LOGIN_ACCOUNT), record
    folder = podman_journey.folder
    name = folder.parent.name
    receipt = json.loads((folder / "image.json").read_text())
    assert receipt["engine"].startswith("podman ")
    sif = folder / f"{name}.sif"
    assert run(["sha256sum", sif]).stdout.split()[0] == (folder / f"{name}.sif.sha256").read_text().split()[0]
    assert sif.stat().st_uid == lab.login_account.uid
    assert not (folder / "image.tar").exists()


def test_the_login_account_never_touched_docker(lab, podman_journey):
    # repo2docker drives Podman here (its engine plugin); asking its version or building with
    # --engine podman reaches no Docker engine, anything else of the watcher's words would
    touched = {
        command
        for command in podman_journey.watcher.docker_processes
        if not ("repo2docker" in command and ("--version" in command or "--engine podman" in command))
        or "docker.sock" in command
    }
    assert touched == set()
    refused = lab.login.run(["docker", "version"], user=lab.login_account, check=False)
    assert refused.returncode != 0 and "permission denied" in refused.stderr.lower()
    assert "docker.sock" not in podman_journey.output


def test_the_sif_matches_the_docker_builders_of_the_same_commit(lab, podman_journey):
    """The Docker builder (this machine's engine, as the workflow's account in the docker group, on
    the login host) builds the same commit from the same URL: the same files, types, modes and links, owners
    aside; the same labels but for the build's time and tool."""
    from ..test_archive_to_sif import Listing, compare, extract_file

    account = os.environ.get("R2S_USER") or "r2s"
    workdir = Path(tempfile.mkdtemp(prefix="r2s-hosts-podman-docker-"))
    shutil.chown(workdir, account)
    command = [PROJECT / ".venv" / "bin" / "snakemake", "--snakefile", PROJECT / "Snakefile", "--directory", workdir, "--cores", "2", "build"]
    command += ["--config", f"repo={podman_journey.url}", "ref=main"]
    try:
        # on the login host, where the git daemon serves the repository (the same URL, the same labels)
        lab.login.run(command, user=Account(account), cwd="/", timeout=1200)
        name = podman_journey.folder.parent.name
        docker_sif = next((workdir / "results").glob(f"*/{podman_journey.sha}/{name}.sif"))
        podman_sif = podman_journey.folder / f"{name}.sif"
        only, differences = compare(Listing(podman_sif), Listing(docker_sif))
        assert not only, f"entries in one SIF only: {sorted(only)[:20]}"
        for entry, fields in differences.items():
            if entry != b".singularity.d/labels.json":
                assert set(fields) <= {"uid", "gid"}, (entry, fields)
        labels = [json.loads(extract_file(sif, ".singularity.d/labels.json")) for sif in (podman_sif, docker_sif)]
        assert [{k: v for k, v in label.items() if k not in BUILD_LABELS} for label in labels] == [
            {k: v for k, v in labels[1].items() if k not in BUILD_LABELS}
        ] * 2
    finally:
        run(["docker", "image", "rm", "--force", f"r2s-{podman_journey.folder.parent.name}:{podman_journey.sha}"], check=False)
        run(["rm", "-rf", workdir], check=False)
