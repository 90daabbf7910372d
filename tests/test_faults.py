"""Faults, with the real tools: the workflow killed during each step, two runs at once, a full
disk during the SIF step. Each case checks what a user would: the rerun completes, nothing
before the killed step is redone, and no finished-looking file is left behind."""

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from .conftest import PROJECT, GitRepo, process_tree, processes_running, still_running
from .workflow_runner import SNAKEMAKE, snakemake

pytestmark = pytest.mark.integration

# a small filesystem made by `bash setup.sh test` (root) for the full-disk case
SMALL_FILESYSTEM = Path(os.environ.get("R2S_SMALL_FS") or "/mnt/r2s-small")

# each step's output under results/{name}/{sha}/, in chain order
OUTPUTS = {
    "clone_source": "source",
    "build_image": "image.json",
    "save_image": "image.tar",
    "build_sif": "faults.sif",
    "unpack_sandbox": "sandbox",
}
STEPS = list(OUTPUTS)


# an image whose build Docker's cache makes quick, so that each case costs little
DOCKERFILE = "FROM debian:bookworm\nRUN echo faults > /faults\n"


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    base = tmp_path_factory.mktemp("faults")
    repo = GitRepo(base / "repo")
    # a large file makes the clone last long enough to be killed in the middle of it
    repo.commit("first", {"Dockerfile": DOCKERFILE})
    (repo.path / "data.bin").write_bytes(os.urandom(40 << 20))
    repo.commit("data")
    return repo


def config_for(repo):
    return {"repo": repo.path, "ref": "main", "name": "faults"}


def runtime_scratch(workdir):
    """The runtime's temporary folder for the runs of one test (APPTAINER_TMPDIR), so that what
    a killed run leaves there is seen."""
    scratch = workdir.parent / f"{workdir.name}-apptainer-tmp"
    scratch.mkdir(exist_ok=True)
    return scratch


def start(workdir, repo, target="sandbox"):
    """The workflow started as a user would, its output in a file beside the working folder (a
    pipe nobody reads would stall it)."""
    command = [SNAKEMAKE, "--snakefile", str(PROJECT / "Snakefile"), "--directory", str(workdir), "--cores", "2", target]
    command += ["--config", f"repo={repo.path}", "ref=main", "name=faults"]
    output = open(workdir.parent / f"{workdir.name}-{target}.log", "w+")
    env = {**os.environ, "APPTAINER_TMPDIR": str(runtime_scratch(workdir))}
    return subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env), output


def output_of(output):
    output.seek(0)
    return output.read()[-3000:]


def run_processes(run):
    """The workflow's process and everything it started that still runs."""
    try:
        return process_tree(run.pid)
    except psutil.NoSuchProcess:
        return []


def named(processes, name):
    found = []
    for process in processes:
        try:
            if process.name() == name:
                found.append(process)
        except psutil.NoSuchProcess:
            pass
    return found


def has_content(folder):
    try:
        return folder is not None and any(Path(folder).iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return False


def argument(process, index):
    try:
        return process.cmdline()[index]
    except (psutil.NoSuchProcess, IndexError):
        return None


def size_of(path):
    """0 for a file that is gone (the step renamed it into place meanwhile)."""
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def bytes_under(folder):
    return sum(size_of(os.path.join(root, name)) for root, _, files in os.walk(folder) for name in files)


def tool_at_work(step, run, folder, marker):
    """The processes of `step`'s tool when it is in the middle of its work (running, its output
    under way), else []."""
    if step == "clone_source":
        # git runs, and the partial clone already holds more of the fetched data than `git init` writes
        if bytes_under(folder / "source.partial" / ".git" / "objects") > 1 << 20:
            return named(run_processes(run), "git")
    elif step == "build_image":
        # the Dockerfile's RUN step (a sleep with a number of this case's own) runs in the builder
        return [psutil.Process(pid) for pid in processes_running(f"sleep {marker}")]
    elif step == "save_image":
        # the image streams from the engine into the partial tarball
        if any(size_of(path) > 0 for path in folder.glob(".image.tar.*.partial*")):
            return run_processes(run)
    elif step == "build_sif":
        # apptainer squashes the image's root file system, unpacked in its temporary folder
        return [process for process in named(run_processes(run), "mksquashfs") if has_content(argument(process, 1))]
    elif step == "unpack_sandbox":
        # apptainer unpacks the SIF into its temporary folder beside the (partial) sandbox
        if any(has_content(rootfs) for pattern in ("build-temp-*/rootfs", "*/build-temp-*/rootfs") for rootfs in folder.glob(pattern)):
            return named(run_processes(run), "unsquashfs")
    return []


def leftovers(folder):
    """Partial outputs of the workflow, and the runtime's temporary folders beside them."""
    return [p.name for p in folder.iterdir() if ".partial" in p.name or p.name.startswith("build-temp-")] if folder.exists() else []


def left_behind(workdir, folder):
    return leftovers(folder) + [p.name for p in runtime_scratch(workdir).iterdir()]


@pytest.mark.parametrize("killed", STEPS)
def test_killed_during_each_step_resumes_without_redoing_earlier_steps(tmp_path, repo, killed):
    """The workflow is SIGKILLed while the step's tool is at work (not as the step starts): its
    partial output goes, its tools stop, and the rerun finishes without redoing earlier steps."""
    marker = f"10.{random.randrange(10**6):06d}"
    dockerfile = DOCKERFILE + (f"RUN sleep {marker}\n" if killed == "build_image" else "")
    sha = repo.commit(f"for {killed}", {"Dockerfile": dockerfile, "step.txt": killed})
    folder = tmp_path / "results" / "faults" / sha
    run, output = start(tmp_path, repo)
    deadline = time.monotonic() + 600
    while not (tool := tool_at_work(killed, run, folder, marker)):
        assert run.poll() is None, f"the workflow ended before {killed} was seen at work:\n{output_of(output)}"
        assert time.monotonic() < deadline, f"{killed} was not seen at work"
        time.sleep(0.005)
    workflow = run_processes(run)
    os.kill(run.pid, signal.SIGKILL)
    print(f"killed during {killed}, with at work: {[argument(process, slice(0, 3)) for process in tool]}")
    run.wait()

    index = STEPS.index(killed)
    earlier = {step: folder / OUTPUTS[step] for step in STEPS[:index] if step != "save_image"}
    before = {step: path.stat().st_mtime_ns for step, path in earlier.items()}
    deadline = time.monotonic() + 60
    while left_behind(tmp_path, folder) or still_running(tool + workflow):
        assert time.monotonic() < deadline, (
            f"after a kill during {killed}: partial files {left_behind(tmp_path, folder)}, still running "
            f"{[process.cmdline() for process in still_running(tool + workflow)]}"
        )
        time.sleep(0.5)
    for step in STEPS[index:]:
        if step != "save_image" or killed == "save_image":
            assert not (folder / OUTPUTS[step]).exists(), f"{step} left an output after a kill during {killed}"

    snakemake(tmp_path, "--unlock", config=config_for(repo))
    rerun = snakemake(tmp_path, "sandbox", config=config_for(repo))
    for step in STEPS[:index]:
        assert f"rule {step}:" not in rerun.stdout + rerun.stderr, f"{step} was redone after a kill during {killed}"
    assert {step: path.stat().st_mtime_ns for step, path in earlier.items()} == before
    digest = (folder / "faults.sif.sha256").read_text().split()[0]
    assert subprocess.run(["sha256sum", folder / "faults.sif"], capture_output=True, text=True).stdout.split()[0] == digest
    assert (folder / "sandbox" / "faults").exists()


def test_a_second_run_on_the_same_results_is_refused_clearly(tmp_path, repo):
    repo.commit("concurrent", {"Dockerfile": DOCKERFILE, "step.txt": "concurrent"})
    first, output = start(tmp_path, repo, target="build")
    locks = tmp_path / ".snakemake" / "locks"
    try:
        # the first run holds Snakemake's lock once its lock files exist
        deadline = time.monotonic() + 300
        while not (locks.is_dir() and list(locks.glob("*.lock"))):
            assert first.poll() is None, f"the first run ended before it locked:\n{output_of(output)}"
            assert time.monotonic() < deadline, "the first run did not lock its folder"
            time.sleep(0.05)
        # frozen, it cannot finish (and release the lock) while the second run tries
        first.send_signal(signal.SIGSTOP)
        try:
            second = snakemake(tmp_path, "build", config=config_for(repo), check=False)
        finally:
            first.send_signal(signal.SIGCONT)
        assert second.returncode != 0
        assert "Directory cannot be locked" in second.stdout + second.stderr
    finally:
        first.wait(timeout=900)
    assert first.returncode == 0, output_of(output)
    sha = repo.head()
    folder = tmp_path / "results" / "faults" / sha
    digest = (folder / "faults.sif.sha256").read_text().split()[0]
    assert subprocess.run(["sha256sum", folder / "faults.sif"], capture_output=True, text=True).stdout.split()[0] == digest


def test_full_disk_during_the_sif_step_leaves_no_sif_and_the_next_run_succeeds(repo):
    assert SMALL_FILESYSTEM.is_dir() and os.access(SMALL_FILESYSTEM, os.W_OK), (
        f"{SMALL_FILESYSTEM} is missing: `bash setup.sh test` (as root) mounts it for this test"
    )
    workdir = SMALL_FILESYSTEM / f"work-{os.getpid()}"
    workdir.mkdir()
    filler = SMALL_FILESYSTEM / f"filler-{os.getpid()}"
    try:
        repo.commit("full disk", {"Dockerfile": DOCKERFILE, "step.txt": "full disk"})
        sha = repo.head()
        folder = workdir / "results" / "faults" / sha
        # up to the saved image, with room to spare
        snakemake(workdir, f"results/faults/{sha}/image.tar", config=config_for(repo))
        free = os.statvfs(SMALL_FILESYSTEM)
        # leave less room than the SIF needs
        with open(filler, "wb") as handle:
            handle.truncate(0)
            left = free.f_bavail * free.f_frsize - (8 << 20)
            chunk = b"\0" * (1 << 20)
            for _ in range(max(0, left) >> 20):
                handle.write(chunk)
        failed = snakemake(workdir, "build", config=config_for(repo), check=False)
        assert failed.returncode != 0
        assert "build_sif" in failed.stdout + failed.stderr
        assert not (folder / "faults.sif").exists() and not (folder / "faults.sif.sha256").exists()
        assert not leftovers(folder)
        filler.unlink()
        snakemake(workdir, "build", config=config_for(repo))
        digest = (folder / "faults.sif.sha256").read_text().split()[0]
        assert subprocess.run(["sha256sum", folder / "faults.sif"], capture_output=True, text=True).stdout.split()[0] == digest
    finally:
        filler.unlink(missing_ok=True)
        subprocess.run(["chmod", "-R", "u+w", workdir])
        subprocess.run(["rm", "-rf", workdir])


class DockerSocketRelay:
    """A relay between a socket of the test's own and the real Docker engine's socket: closing
    it is, to the workflow, the engine going away in the middle of a build."""

    def __init__(self, path, engine="/var/run/docker.sock"):
        import socket
        import threading

        self.path, self.engine = str(path), engine
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(self.path)
        self.server.listen(64)
        self.connections = []
        self.open = True
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        import socket
        import threading

        while self.open:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX)
            upstream.connect(self.engine)
            self.connections += [client, upstream]
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(target=self.pump, args=(source, target), daemon=True).start()

    @staticmethod
    def pump(source, target):
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, target):
                try:
                    end.close()
                except OSError:
                    pass

    def close(self):
        import socket

        self.open = False
        for connection in [self.server, *self.connections]:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            connection.close()
        os.unlink(self.path)


def test_docker_socket_cut_mid_build_is_a_clear_error_and_the_rerun_works(tmp_path, repo):
    """The connection to the engine is cut (the relay closes), not the engine stopped: the engine
    is shared by everything on this machine. To the workflow both look the same: its socket
    stops answering in the middle of a build."""
    socket_path = tmp_path / "docker.sock"
    relay = DockerSocketRelay(socket_path)
    env = {**os.environ, "DOCKER_HOST": f"unix://{socket_path}"}
    # a build step that takes a while, so the engine can go away in the middle of it
    # (a fresh word in the RUN line, so Docker's build cache cannot skip it)
    fresh = os.urandom(8).hex()
    repo.commit("slow build", {"Dockerfile": f"FROM debian:bookworm\nRUN sleep 20 && echo {fresh} > /faults\n"})
    sha = repo.head()
    folder = tmp_path / "results" / "faults" / sha
    command = [SNAKEMAKE, "--snakefile", str(PROJECT / "Snakefile"), "--directory", str(tmp_path), "--cores", "2", "build"]
    command += ["--config", f"repo={repo.path}", "ref=main", "name=faults"]
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 300
    while "RUN sleep 20" not in ((folder / "logs" / "build_image.log").read_text() if (folder / "logs" / "build_image.log").exists() else ""):
        assert run.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    relay.close()
    output, _ = run.communicate(timeout=300)
    assert run.returncode != 0
    assert "the Docker engine does not answer at unix://" in output
    assert not (folder / "image.json").exists()
    relay = DockerSocketRelay(socket_path)
    try:
        snakemake(tmp_path, "build", config=config_for(repo), env=env)
    finally:
        relay.close()
    assert (folder / "faults.sif").exists()
