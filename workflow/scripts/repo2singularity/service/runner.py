"""A build is one run of this project's own workflow (`snakemake build`, the local builder) in a
work folder of its own: no second build path. Its output lines and its steps' log lines become
the build's events, and its rules its phases."""

import asyncio
import json
import os
import re
import sys
from pathlib import Path

from .. import PROGRAM
from ..processes import ProcessIdentity
from .queue import BuildFailed

PROJECT = Path(__file__).resolve().parents[4]
RULE_LINE = re.compile(r"^\s*(?:local)?rule (\w+):")
PHASE_OF_RULE = {
    "clone_source": "fetching",
    "build_image": "building",
    "save_image": "building",
    "build_sif": "building",
    "pull_sif": "fetching",
    "push_sif": "pushing",
}
FAILED_RULE = re.compile(r"^Error in rule (\w+):")
# the workflow's notes when the registry cannot be asked (common.smk): the run goes on, they are no reason
REGISTRY_NOTES = ("what is missing is built, and its push tried after", ": it is built instead")
LOG_POLL_SECONDS = 0.25
MAX_LINE = 2000


class WorkflowRunner:
    def __init__(self, cores=2, workflow_config=None, registry=None, snakefile=PROJECT / "Snakefile"):
        self.cores = cores
        self.workflow_config = dict(workflow_config or {})
        self.registry = dict(registry or {})
        self.snakefile = Path(snakefile)

    def command(self, config_file):
        return [
            sys.executable, "-m", "snakemake",
            "--snakefile", str(self.snakefile),
            "--directory", ".",
            "--cores", str(self.cores),
            "--configfile", str(config_file),
            "--nocolor",
            "build",
        ]  # fmt: skip

    def uses_registry(self, build):
        """Public builds share the registry; a build from a URL with credentials never reaches it."""
        return bool(self.registry.get("url")) and not build.private

    def config(self, build):
        config = {**self.workflow_config, "repo": build.url, "ref": build.sha, "name": build.image_name, "builder": "local"}
        if self.uses_registry(build):
            # push mode: the workflow pulls a commit the registry holds (pull_sif, no Docker
            # build) and pushes one it had to build; credentials only by the variable's name
            config.update(
                {
                    "registry": self.registry["url"],
                    "registry_mode": "push",
                    "registry_credentials_env": self.registry["credentials_env"],
                    "registry_ca_file": self.registry["ca_file"],
                    "registry_plain_http": self.registry["plain_http"],
                }
            )
        return config

    def environment(self, build):
        env = build.access.environment() if build.access is not None else os.environ.copy()
        env["PYTHONUNBUFFERED"] = "1"
        if self.uses_registry(build):
            if self.registry["auth_file"]:
                env["REGISTRY_AUTH_FILE"] = self.registry["auth_file"]
        elif self.registry.get("credentials_env"):
            # a private build has no use for the registry's secret: its workflow does not get it
            env.pop(self.registry["credentials_env"], None)
        return env

    async def run(self, build):
        work = build.folder / "work"
        work.mkdir(exist_ok=True)
        config_file = work / "service-build.json"
        config_file.write_text(json.dumps(self.config(build)))
        env = self.environment(build)
        build.emit("fetching", f"fetching {build.url} at {build.sha}")
        process = await asyncio.create_subprocess_exec(
            *self.command(config_file),
            cwd=work,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
            limit=1 << 20,
        )
        identity = ProcessIdentity.of(process.pid)
        build.process = identity.record() if identity else None
        build.save()
        results = work / "results" / build.image_name / build.sha
        follower = LogFollower(results / "logs")
        tail = asyncio.ensure_future(follow_logs(follower, build))
        output = []
        try:
            async for raw in process.stdout:
                line = raw.decode("utf-8", "replace").rstrip()[:MAX_LINE]
                if not line.strip():
                    continue
                output.append(line)
                del output[:-200]
                rule = RULE_LINE.match(line)
                phase = PHASE_OF_RULE.get(rule.group(1), build.phase) if rule else build.phase
                build.emit(phase, line)
            code = await process.wait()
        finally:
            if process.returncode is None:
                try:
                    os.killpg(process.pid, 15)
                except ProcessLookupError:
                    pass
            tail.cancel()
            await drain_logs(follower, build, tail)
        if code != 0 and not (self.uses_registry(build) and only_the_push_failed(output, results, build.image_name)):
            raise BuildFailed(failure_line(output, code))
        if code != 0:
            # the registry is a shared cache: the SIF is built and checked, so it is served
            reason = step_line(output, "push_sif") or f"the push to {self.registry['url']} failed"
            build.emit("pushing", f"not pushed, served by this service only: {reason}")
        self.collect(build, results)

    def collect(self, build, results):
        name = build.image_name
        sif = results / f"{name}.sif"
        try:
            digest = (results / f"{name}.sif.sha256").read_text().split()[0]
            size = sif.stat().st_size
        except (OSError, IndexError):
            raise BuildFailed(f"the workflow ended without {name}.sif and its checksum") from None
        build.sif = str(sif.relative_to(build.folder))
        build.sif_size = size
        build.sif_sha256 = digest
        build.image_json = str((results / "image.json").relative_to(build.folder))
        build.save()


def failure_line(output, code):
    """The workflow's own one-line reason (its `repo2singularity: ...` or a step's line)."""
    for line in reversed(output):
        if line.startswith(f"{PROGRAM}:") and not line.endswith(REGISTRY_NOTES):
            return line
    for line in reversed(output):
        if re.match(r"^\w+: ", line) and not line.startswith(("Shutting down", "Complete log", "Error in rule", "Exiting")):
            return line
    return f"the build's workflow failed (exit status {code})"


def step_line(output, step):
    """The step's own one-line reason for failing (`step: ...`), else None."""
    for line in reversed(output):
        if line.startswith(f"{step}: "):
            return line
    return None


def only_the_push_failed(output, results, name):
    """Whether the workflow failed in push_sif alone, its SIF and checksum finished."""
    failed = {match.group(1) for line in output if (match := FAILED_RULE.match(line))}
    return failed == {"push_sif"} and (results / f"{name}.sif").is_file() and (results / f"{name}.sif.sha256").is_file()


class LogFollower:
    """New complete lines of the steps' log files, file by file as they appear."""

    def __init__(self, folder):
        self.folder = folder
        self.offsets = {}

    def new_lines(self):
        try:
            files = sorted(self.folder.glob("*.log"), key=lambda p: p.stat().st_mtime)
        except OSError:
            return
        for path in files:
            offset = self.offsets.get(path, 0)
            try:
                with open(path, "rb") as handle:
                    handle.seek(offset)
                    data = handle.read()
            except OSError:
                continue
            end = data.rfind(b"\n") + 1
            self.offsets[path] = offset + end
            for line in data[:end].decode("utf-8", "replace").splitlines():
                # repo2docker redraws progress lines with carriage returns: the last state counts
                line = line.rsplit("\r", 1)[-1].rstrip()[:MAX_LINE]
                if line.strip():
                    yield f"[{path.stem}] {line}"


async def follow_logs(follower, build):
    while True:
        for line in follower.new_lines():
            build.emit(build.phase, line)
        await asyncio.sleep(LOG_POLL_SECONDS)


async def drain_logs(follower, build, tail):
    try:
        await tail
    except asyncio.CancelledError:
        pass
    for line in follower.new_lines():
        build.emit(build.phase, line)
