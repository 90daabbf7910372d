"""Outputs written so that a killed step leaves nothing that looks finished."""

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path


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


def replace_folder(new, target):
    """Put folder `new` at `target`. An existing `target` is swapped out in one step and removed
    afterwards, so a kill at any moment leaves the old folder or the new one, never neither."""
    new, target = Path(new), Path(target)
    if not target.exists():
        os.replace(new, target)
        return
    if not exchange(new, target):
        old = temporary_sibling(target, ".old")
        os.replace(target, old)
        os.replace(new, old.with_name(target.name))
        new = old
    remove_tree(new)
