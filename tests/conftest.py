"""Shared fixtures: real git repositories made in temporary folders; each module's folders
removed when it ends."""

import os
import subprocess
from pathlib import Path

import psutil
import pytest

from repo2singularity.files import remove_tree

PROJECT = Path(__file__).resolve().parent.parent

GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "Test",
    "GIT_AUTHOR_EMAIL": "test@example.invalid",
    "GIT_COMMITTER_NAME": "Test",
    "GIT_COMMITTER_EMAIL": "test@example.invalid",
}


@pytest.fixture(scope="module", autouse=True)
def module_folders_removed(request, tmp_path_factory):
    """What a module's tests made under pytest's base folder (images' tarballs, SIFs, sandboxes,
    registries) goes when the module ends, unless one of its tests failed: the whole suite would
    otherwise keep about 20 GB until it ends, more than some CI machines have free. This fixture
    is set up before the module's own ones and so ends after them (their servers are stopped)."""
    base = tmp_path_factory.getbasetemp()
    made_before, failed_before = set(base.iterdir()), request.session.testsfailed
    yield
    if request.session.testsfailed == failed_before:
        for path in set(base.iterdir()) - made_before:
            remove_tree(path)


def git(repo, *args):
    result = subprocess.run(
        ["git", "-C", str(repo), *args],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **GIT_IDENTITY},
    )
    return result.stdout.strip()


class GitRepo:
    """A real repository to resolve refs in and build from."""

    def __init__(self, path, branch="main"):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        git(self.path, "init", "--quiet", f"--initial-branch={branch}")

    def commit(self, message="change", files=None):
        for name, text in (files or {f"file-{message}.txt": message}).items():
            target = self.path / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        git(self.path, "add", "--all")
        git(self.path, "commit", "--quiet", "--allow-empty", "-m", message)
        return self.head()

    def head(self, ref="HEAD"):
        return git(self.path, "rev-parse", f"{ref}^{{commit}}")

    def git(self, *args):
        return git(self.path, *args)


@pytest.fixture
def make_repo(tmp_path):
    def make(name="repo", branch="main"):
        return GitRepo(tmp_path / name, branch)

    return make


def started(command, **popen):
    """A process running `command`, returned once it has exec'd it (before that, its command line
    is still its parent's)."""
    import time

    process = subprocess.Popen(command, **popen)
    deadline = time.monotonic() + 10
    while psutil.Process(process.pid).cmdline() != list(command):
        assert time.monotonic() < deadline, f"{command} did not start"
        time.sleep(0.01)
    return process


def sif_compression(sif, runtime="apptainer"):
    """The compression of a SIF's root file system, as unsquashfs reads it inside the SIF."""
    import re

    listing = subprocess.run([runtime, "sif", "list", str(sif)], capture_output=True, text=True, check=True).stdout
    offset = next(int(line.split("|")[3].split("-")[0]) for line in listing.splitlines() if "Squashfs" in line)
    info = subprocess.run(["unsquashfs", "-s", "-o", str(offset), str(sif)], capture_output=True, text=True, check=True).stdout
    return re.search(r"^Compression (\w+)", info, re.MULTILINE)[1]


def processes_running(text):
    """Pids of the processes on this machine whose command line, as `ps` shows it, contains `text`
    (every account's: a secret on a command line is visible to all)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if text in " ".join(process.info["cmdline"] or ()):
            found.append(process.pid)
    return found


def files_holding(text, *folders, skip=()):
    """The files under `folders` that hold `text` (grep: 0 found, 1 none, anything else fails);
    `skip`: names (globs) of files and folders not to look into, e.g. a sandbox."""
    options = [f"--exclude{kind}={name}" for name in skip for kind in ("", "-dir")]
    result = subprocess.run(["grep", "-rl", "--binary-files=text", *options, "--", text, *map(str, folders)], capture_output=True, text=True)
    assert result.returncode in (0, 1), f"grep failed ({result.returncode}): {result.stderr}"
    return result.stdout


def process_tree(pid):
    """A process and all its descendants, as psutil sees them now."""
    process = psutil.Process(pid)
    return [process, *process.children(recursive=True)]


def still_running(processes):
    """Those of `processes` that still run (a zombie, or a pid now taken by another process, counts as ended)."""
    running = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                running.append(process)
        except psutil.NoSuchProcess:
            pass
    return running
