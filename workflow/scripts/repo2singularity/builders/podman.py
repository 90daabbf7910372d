"""`builder: podman`: repo2docker with the Podman engine, rootless, as the user who runs the step:
no daemon, no root, no docker group. Podman keeps the image in the user's own store (its
storage.conf; node-local where a Slurm job runs the step), `podman save` writes a docker-archive,
and the SIF comes from the same conversion as with Docker.

The engine is repo2podman's (pinned in requirements.txt), with the two places where its 0.2.0
does not fit repo2docker 2026.4 and Debian's podman 4.3 mended here: an image that does not exist
is an error there, not None (repo2docker asks first whether the image exists), and it refuses the
`push` and `load` arguments repo2docker now passes to every engine. repo2docker's own Podman
support needs `podman buildx` (podman 5) and a Podman API service; repo2podman needs neither.

Run as `python -m repo2singularity.builders.podman REPO2DOCKER_ARGS...`, this file is repo2docker
with that engine."""

import contextlib
import fcntl
import hashlib
import json
import os
import pwd
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
from pathlib import Path

from .. import downloads
from ..files import sha256_file, temporary_sibling, write_json_atomic
from ..image import image_receipt, repo2docker_command
from ..step import StepError
from ..tools import run_logged, say, tail
from .local import LocalBuilder

# what a full disk looks like in Podman's and repo2docker's output
DISK_FULL = ("no space left on device", "disk quota exceeded")
# runc's words when the account's pause process (which every podman command joins) was started
# in a mount namespace without /sys/fs/cgroup, e.g. under `ip netns exec`
NO_CGROUPS = "no cgroup mount found in mountinfo"
SUBORDINATE_MINIMUM = 65536


def account():
    # the account itself, whatever USER or LOGNAME say (sudo, a Slurm job's environment)
    return pwd.getpwuid(os.getuid()).pw_name


def podman_command(*args):
    return ["podman", *args]


def podman(*args, timeout=120):
    """A short podman command's output; StepError with its last line when it fails."""
    try:
        result = subprocess.run(podman_command(*args), capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise StepError(podman_missing()) from None
    except subprocess.TimeoutExpired:
        raise StepError(f"`podman {' '.join(args[:2])}` did not answer in {timeout} s") from None
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise StepError(f"`podman {' '.join(args[:2])}` failed: {last}")
    return result.stdout


def podman_missing():
    return "podman is not on the PATH: an administrator installs it (Debian: apt-get install podman uidmap fuse-overlayfs); `bash setup.sh login slurm` checks what a rootless build needs"


def subordinate_ids(kind, user=None, uid=None, files=None):
    """How many subordinate uids (kind "uid") or gids ("gid") the user has: from getsubids where
    there is one (it also asks the site's directory service), else from /etc/subuid or /etc/subgid."""
    user = user or account()
    uid = os.getuid() if uid is None else uid
    if files is None and shutil.which("getsubids"):
        result = subprocess.run(["getsubids", *(["-g"] if kind == "gid" else []), user], capture_output=True, text=True)
        # "0: r2s 100000 65536" per range
        return sum(int(line.split()[-1]) for line in result.stdout.splitlines() if line.split()[-1:] and line.split()[-1].isdigit())
    path = Path((files or {}).get(kind) or f"/etc/sub{kind}")
    total = 0
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        fields = line.strip().split(":")
        if len(fields) == 3 and fields[0] in (user, str(uid)) and fields[2].isdigit():
            total += int(fields[2])
    return total


def rootless_problems(user=None, files=None):
    """What a rootless Podman build lacks for this user, one line each (empty when nothing)."""
    user = user or account()
    problems = []
    if not shutil.which("podman"):
        problems.append(podman_missing())
    for tool in ("newuidmap", "newgidmap"):
        if not shutil.which(tool):
            problems.append(f"{tool} is not on the PATH: an administrator installs it (Debian: apt-get install uidmap)")
    for kind in ("uid", "gid"):
        count = subordinate_ids(kind, user, files=files)
        if count < SUBORDINATE_MINIMUM:
            problems.append(
                f"{user} has {count} subordinate {kind}s in /etc/sub{kind} (a build needs {SUBORDINATE_MINIMUM}): "
                f"an administrator adds them (usermod --add-sub{kind}s 100000-165535 {user}, a range no one else has)"
            )
    return problems


def storage_driver():
    """Podman's storage driver for this user, and where its store is."""
    return podman("info", "--format", "{{.Store.GraphDriverName}} {{.Store.GraphRoot}}").split(maxsplit=1)


def check_lines(user=None):
    """`bash setup.sh login slurm`: ("ok"|"missing", line) for each thing a rootless build needs."""
    problems = rootless_problems(user)
    lines = [("missing", problem) for problem in problems]
    if not problems:
        lines.append(("ok", f"podman {podman('--version').split()[-1]}, newuidmap/newgidmap and subordinate ids"))
        try:
            driver, store = storage_driver()
        except (StepError, ValueError) as error:
            lines.append(("missing", f"podman storage: {error} (the user's ~/.config/containers/storage.conf, or ask the administrator)"))
        else:
            slow = " (copies every layer in full: slow; overlay is faster, see docs/podman.md)" if driver == "vfs" else ""
            lines.append(("ok", f"podman storage driver {driver} in {store.strip()}{slow}"))
    return lines


@contextlib.contextmanager
def commit_lock(tag):
    """One build of a tag at a time on this host for this user: a second waits, then finds the
    image built and reuses it. The lock lives where Podman keeps its own run-time state."""
    folder = Path(os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/repo2singularity-{os.getuid()}") / "podman-builds"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = folder / (hashlib.sha256(tag.encode()).hexdigest()[:24] + ".lock")
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"  build_image (podman): another build of {tag} runs on this host; waiting for it, then reusing its image")
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def disk_full(log):
    return any(sign in tail(log, 40).lower() for sign in DISK_FULL)


def pause_without_cgroups(log):
    return NO_CGROUPS in tail(log, 60)


class PodmanBuilder(LocalBuilder):
    kind = "podman"
    saved_image_file = "image.tar"
    engine_name = "Podman"
    # no daemon and nothing of this machine's: with --profile slurm the three steps are one job
    step_group = "podman_build"

    def require_rootless(self, step):
        problems = rootless_problems()
        if problems:
            raise StepError(f"{step}: {problems[0]}")

    def inspect(self, tag, step):
        """`podman image inspect` in Docker's terms (an Id with its sha256: prefix), or None."""
        if subprocess.run(podman_command("image", "exists", tag), capture_output=True).returncode != 0:
            return None
        details = json.loads(podman("image", "inspect", tag))[0]
        if not details["Id"].startswith("sha256:"):
            details["Id"] = "sha256:" + details["Id"]
        return details

    def store_full(self, step):
        try:
            _, store = storage_driver()
        except (StepError, ValueError):
            store = "Podman's store"
        return StepError(f"{step} failed: no space left in {store.strip()}; free some (podman image prune, podman system prune) and run again")

    def build_image(self, spec, source, receipt):
        step = "build_image (repo2docker, podman)"
        self.require_rootless(step)
        engine = "podman " + podman("--version").split()[-1]
        # runpy warns that the package imported this file before it runs as __main__: harmless here
        command = [sys.executable, "-W", "ignore::RuntimeWarning:runpy", "-m", "repo2singularity.builders.podman", *repo2docker_command("repo2docker", source, spec)[1:]]
        environment = dict(os.environ)
        # Docker is not used: a DOCKER_HOST left in the environment must not matter
        environment.pop("DOCKER_HOST", None)
        with commit_lock(spec.tag):
            try:
                run_logged(command, self.log, step, env=environment)
            except StepError:
                if disk_full(self.log):
                    raise self.store_full(step) from None
                if pause_without_cgroups(self.log):
                    raise StepError(
                        f"{step} failed: {account()}'s Podman pause process sees no cgroup file system (it was started "
                        "where /sys/fs/cgroup is not mounted); restart it with `podman system migrate` and run again"
                    ) from None
                raise
        details = self.inspect(spec.tag, step)
        if details is None:
            raise StepError(f"repo2docker finished but Podman has no image {spec.tag}")
        version = subprocess.run([sys.executable, "-m", "repo2docker", "--version"], capture_output=True, text=True, check=True).stdout.strip()
        write_json_atomic(receipt, image_receipt(details, spec.tag, spec.user_name, version, engine))

    def save_image(self, name, sha, receipt, saved):
        step = "save_image (podman save)"
        image, details = self.image_to_save(receipt, saved, step)
        partial = temporary_sibling(saved, ".tar")
        # the image's size in the store: about what the tarball will be
        meter = downloads.TransferMeter("save", image["tag"], details.get("Size") or 0, limited=False)
        finished = threading.Event()

        def progress():
            # podman writes the tarball itself: its growth is the transfer
            while not finished.wait(downloads.PROGRESS_SECONDS):
                written = partial.stat().st_size if partial.exists() else 0
                meter.advance(written - meter.done)

        threading.Thread(target=progress, daemon=True).start()
        try:
            try:
                run_logged(podman_command("save", "--format", "docker-archive", "--output", str(partial), image["tag"]), self.log, step)
            except StepError:
                if disk_full(self.log):
                    raise StepError(f"{step} failed: no space left for {saved}; free some there and run again") from None
                raise
            finally:
                finished.set()
            with open(partial, "rb") as handle:
                os.fsync(handle.fileno())
            digest = sha256_file(partial)
            written = partial.stat().st_size
            os.replace(partial, saved)
        finally:
            partial.unlink(missing_ok=True)
        self.step_log.info(f"saved {image['tag']} to {saved}: {written} bytes, sha256 {digest}")
        say(f"  {step}: done in {meter.seconds:.0f} s ({written / 1e6:.0f} MB)")

    def readiness(self):
        problems = rootless_problems()
        if problems:
            raise StepError(problems[0])
        driver, store = storage_driver()
        return f"builder: podman {podman('--version').split()[-1]}, rootless as {account()}, storage {driver} in {store.strip()}"


def repo2docker_with_podman(argv):
    """repo2docker's own main, with the Podman engine below in place of Docker's."""
    from repo2docker.__main__ import main
    from repo2docker.app import Repo2Docker
    from repo2podman.podman import PodmanEngine, exec_podman_stream

    class Engine(PodmanEngine):
        def inspect_image(self, image):
            if subprocess.run(podman_command("image", "exists", image), capture_output=True).returncode != 0:
                return None
            return super().inspect_image(image)

        def build(self, *, push=False, load=False, buildargs=None, cache_from=None, container_limits=None, tag="", custom_context=False, dockerfile="", fileobj=None, path="", labels=None, platform=None, **kwargs):
            """repo2podman's `podman build`, with the user's own network for RUN steps: a rootless
            build gains nothing by it, and needs neither slirp4netns nor /dev/net/tun for it."""
            # the image stays in the user's store (load) and is never pushed from here
            if push:
                raise ValueError("builder: podman does not push images; the SIF is pushed")
            command = ["build", "--network", "host", "--rm", "--tag", tag]
            for key, value in (buildargs or {}).items():
                command += ["--build-arg", f"{key}={value}"]
            if cache_from:
                command += ["--cache-from", ",".join(cache_from)]
            for key, flag in (("memory", "--memory"), ("memswap", "--memory-swap"), ("cpusetcpus", "--cpuset-cpus"), ("cpushares", "--cpu-shares")):
                if (container_limits or {}).get(key):
                    command += [flag, str(container_limits[key])]
            if dockerfile:
                command += ["--file", dockerfile]
            for key, value in (labels or {}).items():
                command += ["--label", f"{key}={value}"]
            if platform:
                command += ["--platform", platform]
            if fileobj is None:
                yield from exec_podman_stream([*command, path], exe=self.podman_executable)
                return
            # the buildpacks other than Dockerfile hand over their context as a tar stream
            with tempfile.TemporaryDirectory() as context:
                with tarfile.open(fileobj=fileobj) as archive:
                    archive.extractall(context, filter="tar")
                yield from exec_podman_stream([*command, context], exe=self.podman_executable)

    engines = {}

    def get_engine(app):
        if "podman" not in engines:
            engines["podman"] = Engine(parent=app)
        return engines["podman"]

    Repo2Docker.get_engine = get_engine
    sys.argv = ["repo2docker", *argv]
    main()


def main():
    if sys.argv[1:] == ["--check"]:
        lines = check_lines()
        for state, line in lines:
            print(("ok: " if state == "ok" else "MISSING: ") + line)
        sys.exit(1 if any(state == "missing" for state, _ in lines) else 0)
    repo2docker_with_podman(sys.argv[1:])


if __name__ == "__main__":
    main()
