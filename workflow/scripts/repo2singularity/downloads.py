"""A file brought here from a builder: into a dot-partial file beside its final name, resumed from
that file when an earlier transfer of the same file was cut, written and hashed as it arrives
with a progress line every few seconds, checked against the sender's sha256, and only then
renamed into place. The SSH transport and the build service's client differ only in how the
bytes arrive."""

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path

from .files import HashingWriter, write_json_atomic
from .step import StepError
from .steplog import step_log
from .tools import say

# what every transfer here shares: the SSH transport's, the build service client's and the registry's
CHUNK = 1 << 20
CONNECT_TIMEOUT_SECONDS = 15
PROGRESS_SECONDS = 5
# tests slow a download down to cut it midway (bytes per second)
RATE_LIMIT_VARIABLE = "R2S_DOWNLOAD_LIMIT_BPS"


def resume_offset(partial_size, partial_meta, remote_size, remote_sha256):
    """Where to resume a download: the partial file's size when it belongs to the same remote
    file (same digest and size) and is not longer than it, else 0 (start over)."""
    if not partial_meta or partial_size <= 0:
        return 0
    if partial_meta.get("sha256") != remote_sha256 or partial_meta.get("size") != remote_size:
        return 0
    if partial_size > remote_size:
        return 0
    return partial_size


def progress_line(name, done, total, started_bytes, elapsed, width=24, verb="download"):
    """One progress line (a log is no terminal, so a line every few seconds, not a redrawn bar).
    A total that is only an estimate (a saved image's size) may be passed: the bar stops full."""
    rate = (done - started_bytes) / elapsed if elapsed > 0 else 0.0
    fraction = min(1.0, done / total) if total else 1.0
    bar = "#" * round(width * fraction) + "." * (width - round(width * fraction))
    left = f", {max(0, total - done) / rate:.0f} s left" if rate > 0 and total else ""
    return f"  {verb} {name} [{bar}] {100 * fraction:3.0f}%  {done / 1e6:.1f} of {total / 1e6:.1f} MB, {rate / 1e6:.1f} MB/s{left}"


class TransferMeter:
    """What every transfer here shares, whatever carries its bytes: a progress line every
    PROGRESS_SECONDS, and the rate limit of RATE_LIMIT_VARIABLE for downloads (a test aid, and a
    way to share a thin link). `report` takes each line (None: no lines); `done` counts bytes
    that were there before (a resumed transfer), which the rate leaves out."""

    def __init__(self, verb, name, total, done=0, report=say, limited=True, environ=None):
        self.verb, self.name, self.total, self.report = verb, name, total, report
        self.offset = self.done = done
        self.limit = float((os.environ if environ is None else environ).get(RATE_LIMIT_VARIABLE) or 0) if limited else 0
        self.started = self.last = time.monotonic()

    def advance(self, count):
        self.done += count
        now = time.monotonic()
        if self.limit:
            # sleep to stay under the rate, measured from the start of this transfer
            ahead = (self.done - self.offset) / self.limit - (now - self.started)
            if ahead > 0:
                time.sleep(ahead)
                now = time.monotonic()
        if self.report and now - self.last >= PROGRESS_SECONDS:
            self.report(progress_line(self.name, self.done, self.total, self.offset, now - self.started, verb=self.verb))
            self.last = now

    @property
    def seconds(self):
        return time.monotonic() - self.started


class Download:
    """One file of `size` bytes and `sha256` to bring to `local_path`. `offset` is where the
    sender is to start; `log` is the step's log (steplog.step_log)."""

    def __init__(self, local_path, size, sha256, log=None, record=None):
        self.path = Path(local_path)
        self.partial = self.path.with_name(f".{self.path.name}.partial")
        self.meta_path = self.partial.with_name(self.partial.name + ".json")
        self.size = size
        self.sha256 = sha256
        self.log = log or step_log(None)
        self.record = record or {}
        try:
            meta = json.loads(self.meta_path.read_text())
        except (OSError, ValueError):
            meta = None
        self.offset = resume_offset(self.partial.stat().st_size if self.partial.exists() else 0, meta, size, sha256)
        self.done = self.offset
        self.found = None
        self.started = time.monotonic()

    def say(self, line):
        say(line)
        self.log.info(line)

    def begin(self, origin):
        """Say where the file comes from, or where it resumes; record what the partial file is a
        part of, so that only the same file resumes it."""
        if self.offset:
            self.say(f"  download {self.path.name}: resuming at {self.offset / 1e6:.1f} of {self.size / 1e6:.1f} MB from {self.partial.name}")
        else:
            self.partial.unlink(missing_ok=True)
            self.say(f"  download {self.path.name}: {self.size / 1e6:.1f} MB from {origin}")
        write_json_atomic(self.meta_path, {**self.record, "sha256": self.sha256, "size": self.size})
        self.started = time.monotonic()
        return self.offset

    def start_over(self):
        """The sender sends the whole file after all."""
        self.offset = self.done = 0

    @contextlib.contextmanager
    def receiving(self):
        """A function that takes each arriving chunk: written and hashed on threads of their own
        (files.HashingWriter), with a progress line every PROGRESS_SECONDS."""
        digest = hashlib.sha256()
        if self.offset:
            with open(self.partial, "rb") as handle:
                while chunk := handle.read(4 << 20):
                    digest.update(chunk)
        meter = TransferMeter("download", self.path.name, self.size, done=self.offset, report=self.say)
        with open(self.partial, "r+b" if self.offset else "wb") as handle:
            handle.seek(self.offset)
            handle.truncate()
            with HashingWriter(handle, digest) as target:

                def write(chunk):
                    target.write(chunk)
                    meter.advance(len(chunk))
                    self.done = meter.done

                yield write
                self.found = target.finish()

    def finish(self, what, sender, after_rename=None):
        """Checked and renamed into place; `what` and `sender` name the file and who sent it in
        the error lines."""
        if self.done != self.size:
            raise StepError(f"download of {what} ended at {self.done} of {self.size} bytes; run again to resume")
        if self.found != self.sha256:
            self.partial.unlink(missing_ok=True)
            self.meta_path.unlink(missing_ok=True)
            raise StepError(f"the downloaded {self.path.name} does not match the {sender}'s sha256; run again to fetch it anew")
        os.chmod(self.partial, 0o644)
        os.replace(self.partial, self.path)
        self.meta_path.unlink(missing_ok=True)
        if after_rename:
            after_rename()
        elapsed = time.monotonic() - self.started
        self.say(f"  download {self.path.name}: done, {(self.size - self.offset) / 1e6:.1f} MB in {elapsed:.1f} s, sha256 verified")
