"""Builds by commit: one build per commit however many ask, the queue in front of `max_builds`
runners, the per-user and total limits, and each build's events (kept on disk, so a restart
tells every client how its build ended).

Everything here runs on the server's event loop, so looking a build up and starting it is one
step that no other request can come between."""

import collections
import hashlib
import json
import logging
import os
import secrets
import signal
import time
from pathlib import Path

import tornado.ioloop
import tornado.locks

from ..files import write_json_atomic
from ..processes import ProcessIdentity

log = logging.getLogger("repo2singularity.service")

PHASES = ("waiting", "fetching", "building", "pushing", "built", "failed")
FINAL = ("built", "failed")
RESTARTED = "the service restarted during this build; ask for it again to rebuild"
STOPPED = "the service stopped during this build; ask for it again to rebuild"


class LimitReached(Exception):
    """A limit on builds (429), in one line naming it."""


class BuildFailed(Exception):
    """A build's one-line reason for failing."""


class Build:
    """One build of one commit, its phase, its events and, once built, its SIF."""

    def __init__(self, folder, record):
        self.folder = Path(folder)
        self.id = record["id"]
        self.key = record["key"]
        self.owner = record["owner"]
        self.private = record["private"]
        self.url = record["url"]
        self.ref = record["ref"]
        self.sha = record["sha"]
        self.image_name = record["image_name"]
        self.created = record["created"]
        self.phase = record.get("phase", "waiting")
        self.error = record.get("error")
        self.sif = record.get("sif")
        self.sif_size = record.get("sif_size")
        self.sif_sha256 = record.get("sif_sha256")
        self.image_json = record.get("image_json")
        self.process = record.get("process")
        self.events = []
        self.changed = tornado.locks.Condition()
        self.access = None  # the GitAccess, with credentials: in memory only

    def record(self):
        return {
            "id": self.id,
            "key": self.key,
            "owner": self.owner,
            "private": self.private,
            "url": self.url,
            "ref": self.ref,
            "sha": self.sha,
            "image_name": self.image_name,
            "created": self.created,
            "phase": self.phase,
            "error": self.error,
            "sif": self.sif,
            "sif_size": self.sif_size,
            "sif_sha256": self.sif_sha256,
            "image_json": self.image_json,
            "process": self.process,
        }

    def save(self):
        write_json_atomic(self.folder / "build.json", self.record(), mode=0o600)

    @property
    def finished(self):
        return self.phase in FINAL

    def visible_to(self, user):
        return not self.private or user == self.owner

    @property
    def sif_path(self):
        return self.folder / self.sif if self.sif else None

    @property
    def image_json_path(self):
        return self.folder / self.image_json if self.image_json else None

    def emit(self, phase, message, **extra):
        """Add an event (and persist it): `phase` becomes the build's phase."""
        if self.finished:
            return
        event = {"phase": phase, "message": message, **extra}
        self.events.append(event)
        with open(self.folder / "events.jsonl", "a") as handle:
            handle.write(json.dumps(event) + "\n")
        if phase != self.phase:
            self.phase = phase
            if phase == "failed":
                self.error = message
            self.save()
        self.changed.notify_all()

    def load_events(self):
        try:
            with open(self.folder / "events.jsonl") as handle:
                self.events = [json.loads(line) for line in handle if line.endswith("\n")]
        except FileNotFoundError:
            self.events = []


def build_key(owner, access, sha):
    """Public builds are shared by (url, sha); a URL with credentials is its owner's alone."""
    if access.private:
        identity = f"private\n{owner}\n{access.display_url}\n{sha}"
    else:
        identity = f"public\n{access.display_url}\n{sha}"
    return hashlib.sha256(identity.encode()).hexdigest()


class BuildQueue:
    def __init__(self, folder, runner, max_builds, max_builds_per_user, max_total_builds):
        self.folder = Path(folder)
        self.runner = runner
        self.max_builds = max_builds
        self.max_builds_per_user = max_builds_per_user
        self.max_total_builds = max_total_builds
        self.builds = {}
        self.by_key = {}
        self.waiting = collections.deque()
        self.running = set()

    def load(self):
        """The builds of earlier runs: built ones serve their SIF again; one that was under way
        when the service stopped is failed, and its workflow (if it outlived us) ended."""
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        found = []
        for record_file in self.folder.glob("*/build.json"):
            try:
                build = Build(record_file.parent, json.loads(record_file.read_text()))
            except (OSError, ValueError, KeyError) as error:
                log.warning("skipping %s: %s", record_file, error)
                continue
            build.load_events()
            if not build.finished:
                end_process(build.process)
                build.emit("failed", RESTARTED)
            found.append(build)
        for build in sorted(found, key=lambda b: b.created):
            self.builds[build.id] = build
            if build.phase == "built" and build.sif_path and build.sif_path.is_file():
                self.by_key[build.key] = build

    def get(self, build_id, user):
        """The build, or None when there is none that `user` may see (404 either way)."""
        build = self.builds.get(build_id)
        return build if build is not None and build.visible_to(user) else None

    def queue_position(self, build):
        try:
            return self.waiting.index(build) + 1
        except ValueError:
            return None

    def describe(self, build):
        return {
            "id": build.id,
            "phase": build.phase,
            "sha": build.sha,
            "image_name": build.image_name,
            "events_url": f"/api/builds/{build.id}/events",
            "sif_url": f"/api/builds/{build.id}/sif",
            "queue_position": self.queue_position(build),
            "sif_size": build.sif_size,
            "sif_sha256": build.sif_sha256,
            "error": build.error,
        }

    def submit(self, user, access, ref, sha, image_name):
        """Join the build of this commit, or start one (LimitReached when that is over a limit)."""
        key = build_key(user, access, sha)
        existing = self.by_key.get(key)
        if existing is not None and existing.phase != "failed":
            if existing.private and existing.access is None:
                existing.access = access
            return existing
        self.check_limits(user)
        build_id = secrets.token_hex(8)
        folder = self.folder / build_id
        folder.mkdir(mode=0o700)
        build = Build(
            folder,
            {
                "id": build_id,
                "key": key,
                "owner": user,
                "private": access.private,
                "url": access.display_url,
                "ref": ref,
                "sha": sha,
                "image_name": image_name,
                "created": time.time(),
            },
        )
        build.access = access
        build.save()
        self.builds[build_id] = build
        self.by_key[key] = build
        log.info("build %s: %s at %s for %s%s", build_id, access.display_url, sha, user, " (private)" if access.private else "")
        self.waiting.append(build)
        build.emit("waiting", f"{access.display_url} at {sha[:12]} ({ref or 'default branch'}) is queued", queue_position=len(self.waiting))
        self.schedule()
        return build

    def check_limits(self, user):
        unfinished = [b for b in self.builds.values() if not b.finished]
        mine = sum(1 for b in unfinished if b.owner == user)
        if mine >= self.max_builds_per_user:
            raise LimitReached(
                f"per-user limit reached: {user} has {mine} builds running or waiting (max_builds_per_user {self.max_builds_per_user})"
            )
        if len(unfinished) >= self.max_total_builds:
            raise LimitReached(
                f"total limit reached: {len(unfinished)} builds running or waiting (max_total_builds {self.max_total_builds})"
            )

    def schedule(self):
        started = False
        while len(self.running) < self.max_builds and self.waiting:
            build = self.waiting.popleft()
            self.running.add(build)
            tornado.ioloop.IOLoop.current().spawn_callback(self.run, build)
            started = True
        if started:
            for position, build in enumerate(self.waiting, 1):
                build.emit("waiting", f"waiting for a free builder: position {position} in the queue", queue_position=position)

    async def run(self, build):
        try:
            # with a registry, the runner's workflow pulls a commit it holds and pushes a new one
            await self.runner.run(build)
            self.finish(build)
        except BuildFailed as error:
            build.emit("failed", str(error))
        except Exception as error:  # noqa: BLE001 - a bug must fail the build, not hang its clients
            log.exception("build %s failed unexpectedly", build.id)
            build.emit("failed", f"internal error of the build service ({type(error).__name__}); see its log")
        finally:
            self.running.discard(build)
            if build.phase != "built" and self.by_key.get(build.key) is build:
                del self.by_key[build.key]
            self.schedule()

    def finish(self, build):
        size = build.sif_path.stat().st_size
        if size != build.sif_size:
            raise BuildFailed(f"the SIF is {size} bytes, not the {build.sif_size} recorded")
        build.emit(
            "built",
            f"built {build.image_name} at {build.sha}: {size} bytes, sha256 {build.sif_sha256}",
            sha=build.sha,
            sif_size=size,
            sif_sha256=build.sif_sha256,
            image_name=build.image_name,
        )

    def stop(self):
        """On shutdown: end every build's workflow and fail the unfinished builds."""
        for build in list(self.running) + list(self.waiting):
            end_process(build.process)
            build.emit("failed", STOPPED)


def end_process(record):
    """End a build's workflow (its process group) if it is still that very process."""
    identity = ProcessIdentity.from_record(record)
    if identity is not None and identity.still_running():
        try:
            os.killpg(identity.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
