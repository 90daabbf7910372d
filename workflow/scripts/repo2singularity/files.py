"""Outputs written so that a killed step leaves nothing that looks finished."""

import hashlib
import json
import os
import queue
import shutil
import tempfile
import threading
from datetime import UTC, datetime
from pathlib import Path


def now():
    """This moment, for records (server connections, receipts): ISO 8601 in UTC, to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")


# a download goes to disk in steps of this size while it arrives
FLUSH_BYTES = 32 << 20


def temporary_sibling(path, suffix=""):
    """A fresh name next to `path`, on the same file system, so a rename is atomic."""
    path = Path(path)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".partial{suffix}", dir=path.parent)
    os.close(handle)
    os.unlink(name)
    return Path(name)


def write_text_atomic(path, text, mode=0o644):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = temporary_sibling(path)
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def write_json_atomic(path, data, mode=0o644):
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n", mode)


def sha256_file(path, chunk_size=4 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def checksum_line(digest, path):
    """The line of a `.sha256` file, as `sha256sum` writes it."""
    return f"{digest}  {Path(path).name}\n"


def make_removable(folder):
    """Sandboxes hold read-only folders; give the owner write access so they can be removed."""
    for root, dirs, _ in os.walk(folder):
        for name in dirs:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, os.stat(path).st_mode | 0o700)


def remove_tree(folder):
    folder = Path(folder)
    if folder.exists() or folder.is_symlink():
        make_removable(folder)
        shutil.rmtree(folder, ignore_errors=True)


RENAME_EXCHANGE = 2
AT_FDCWD = -100


def exchange(first, second):
    """Swap two paths in one step (renameat2's RENAME_EXCHANGE); False where the file system or
    kernel cannot."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    result = renameat2(AT_FDCWD, os.fsencode(first), AT_FDCWD, os.fsencode(second), RENAME_EXCHANGE)
    return result == 0


def replace_folder(new, target, dispose=None):
    """Put folder `new` at `target`. An existing `target` is swapped out in one step and then
    handed to `dispose` (default: removed), so a kill at any moment leaves the old folder or the
    new one, never neither."""
    new, target = Path(new), Path(target)
    if not target.exists():
        os.replace(new, target)
        return
    if not exchange(new, target):
        old = temporary_sibling(target, ".old")
        os.replace(target, old)
        os.replace(new, old.with_name(target.name))
        new = old
    (dispose or remove_tree)(new)


class HashingWriter:
    """Writes a download's chunks to a file on one thread and hashes them on another, while
    the caller receives the next ones: receiving, sha256 and writing each take about the time
    of a loopback transfer here, and all three release the GIL. The writer flushes to disk every
    FLUSH_BYTES, so the disk works during the transfer instead of all at its end
    (bench/registry.py). `digest` may hold what is already in the file (a resumed download)."""

    def __init__(self, handle, digest=None, depth=32):
        self.handle = handle
        self.digest = digest if digest is not None else hashlib.sha256()
        self.error = None
        self.workers = [
            (queue.Queue(maxsize=depth), threading.Thread(target=work, daemon=True)) for work in (self.write_all, self.hash_all)
        ]
        for _, thread in self.workers:
            thread.start()

    def chunks(self, index):
        return iter(self.workers[index][0].get, None)

    def write_all(self):
        unflushed = 0
        for chunk in self.chunks(0):
            if self.error is None:
                try:
                    self.handle.write(chunk)
                    unflushed += len(chunk)
                    if unflushed >= FLUSH_BYTES:
                        self.handle.flush()
                        os.fdatasync(self.handle.fileno())
                        unflushed = 0
                except OSError as error:
                    self.error = error

    def hash_all(self):
        for chunk in self.chunks(1):
            self.digest.update(chunk)

    def write(self, chunk):
        if self.error:
            raise self.error
        for chunks, _ in self.workers:
            chunks.put(chunk)

    def finish(self):
        """Wait for what was written, flush it to disk (a SIF that takes its name must be there
        whole, also after a crash), and give the sha256 (hex)."""
        self.stop()
        if self.error:
            raise self.error
        self.handle.flush()
        os.fsync(self.handle.fileno())
        return self.digest.hexdigest()

    def stop(self):
        for chunks, thread in self.workers:
            if thread.is_alive():
                chunks.put(None)
                thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
