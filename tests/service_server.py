"""The build service on loopback for tests: in a thread of this process (with a runner the test
gives, e.g. a fast fake one for the protocol's own logic), or as its own process through its
command line (with the real workflow runner)."""

import asyncio
import hashlib
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests
import tornado.ioloop
import yaml

from repo2singularity.service import settings as service_settings
from repo2singularity.service.accounts import Accounts
from repo2singularity.service.queue import BuildFailed

PROJECT = Path(__file__).resolve().parent.parent


class FakeRunner:
    """Our own stand-in for the workflow (protocol tests only): a few log lines, an optional
    gate to hold builds in `building`, then a SIF of `size` bytes that depend on the commit."""

    def __init__(self, size=3 << 20, fail=None):
        self.size = size
        self.fail = fail
        self.started = []
        self.gate = threading.Event()
        self.gate.set()

    async def run(self, build):
        self.started.append(build.id)
        build.emit("fetching", f"fetching {build.url} at {build.sha}")
        build.emit("building", "Step 1/2 : FROM debian")
        while not self.gate.is_set():
            await asyncio.sleep(0.02)
        if self.fail:
            raise BuildFailed(self.fail)
        build.emit("building", "Step 2/2 : RUN true")
        sif = build.folder / f"{build.image_name}.sif"
        block = hashlib.sha256(build.sha.encode()).digest() * 2048
        with open(sif, "wb") as handle:
            for offset in range(0, self.size, len(block)):
                handle.write(block[: self.size - offset])
        (build.folder / "image.json").write_text('{"image": "fake"}')
        build.sif = sif.name
        build.image_json = "image.json"
        build.sif_size = self.size
        build.sif_sha256 = hashlib.sha256(sif.read_bytes()).hexdigest()
        build.save()


def settings(work_dir, **values):
    return service_settings.check({"work_dir": str(work_dir), "port": 0, "allowed_schemes": ["http", "https", "git", "file"], **values})


class ThreadServer:
    """The service in a thread, with `runner`; `url`, `service` (its objects), `stop()`."""

    def __init__(self, settings, runner):
        from repo2singularity.service.app import listen

        self.ready = threading.Event()
        self.error = None

        def run():
            asyncio.set_event_loop(asyncio.new_event_loop())
            self.loop = tornado.ioloop.IOLoop.current()
            try:
                self.service, self.server, self.url = listen(settings, runner)
            except Exception as error:  # noqa: BLE001 - told to the test below
                self.error = error
                self.ready.set()
                return
            self.ready.set()
            self.loop.start()
            self.loop.close(all_fds=True)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        self.ready.wait(30)
        if self.error:
            raise self.error

    def call(self, function, *args):
        """Run `function` on the server's loop and return its result."""
        done = threading.Event()
        box = {}

        def call():
            try:
                box["value"] = function(*args)
            finally:
                done.set()

        self.loop.add_callback(call)
        done.wait(10)
        return box.get("value")

    def stop(self):
        def stop():
            self.server.stop()
            self.loop.stop()

        self.loop.add_callback(stop)
        self.thread.join(20)


def add_user(work_dir, name):
    return Accounts(Path(work_dir) / "users.json").add_user(name)


class Client:
    """requests with a user's token, against one service."""

    def __init__(self, url, token, verify=True):
        self.url = url
        self.session = requests.Session()
        self.session.verify = verify
        if token is not None:
            self.session.headers["Authorization"] = f"token {token}"

    def get(self, path, **kwargs):
        return self.session.get(self.url + path, timeout=60, **kwargs)

    def post(self, path, **kwargs):
        return self.session.post(self.url + path, timeout=120, **kwargs)

    def build(self, url, ref="", **extra):
        return self.post("/api/builds", json={"url": url, "ref": ref, **extra})

    def events(self, build_id, timeout=600):
        """Every event of the build's stream, till the server ends it."""
        events = []
        with self.session.get(f"{self.url}/api/builds/{build_id}/events", stream=True, timeout=timeout) as answer:
            assert answer.status_code == 200, answer.text
            assert answer.headers["Content-Type"].startswith("text/event-stream")
            for line in answer.iter_lines(decode_unicode=True):
                if line.startswith("data: "):
                    import json

                    events.append(json.loads(line[6:]))
        return events


class ProcessServer:
    """`python -m repo2singularity.service serve` as its own process (the real runner)."""

    def __init__(self, config_file, env=None):
        self.config_file = config_file
        self.log = Path(config_file).with_suffix(".log")
        self.handle = open(self.log, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "repo2singularity.service", "--config", str(config_file), "serve"],
            stdout=subprocess.PIPE,
            stderr=self.handle,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        line = self.process.stdout.readline().decode()
        match = re.search(r"listening on (\S+)", line)
        assert match, f"the service did not start: {line}{self.log.read_text()[-3000:]}"
        self.url = match.group(1)

    def stop(self, sig=15, timeout=60):
        if self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout)
        self.handle.close()
        return self.process.returncode


def write_settings(path, **values):
    Path(path).write_text(yaml.safe_dump(values))
    return path


def wait_for(condition, seconds, message, interval=0.05):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(message)
