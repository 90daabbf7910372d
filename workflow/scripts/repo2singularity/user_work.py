"""Users' work outside the sandbox. Each image name has a work folder (`work_dir`), bound into
its Jupyter server at <working folder>/work, which no rebuild, relaunch or prune touches. What
users changed inside a sandbox (the image's home and working folder) is moved into that work
folder before a swap or a prune removes the sandbox: never deleted, and a sandbox whose changed
files cannot be moved is not removed at all.

"Changed" is measured against a record of the image's own files (size and mtime), written into
the sandbox when it is unpacked, so that it goes wherever the sandbox goes (a swap is one
rename). A sandbox without a record (unpacked by an older version) has every file of its home
and working folder kept."""

import json
import os
import shutil
import stat
import time
from pathlib import Path

from .step import StepError

# at the sandbox's top: moves with it, and is no file of the image's home
RECORD = ".repo2singularity-files.json"
# the work folder's place inside the working folder, where Jupyter's file browser shows it
WORK_MOUNT = "work"
RECOVERED = "recovered"
# made by the server or by running code, not by users; the runtime and security folders hold
# the server's token, cookie secret and kernels' keys, which must not be copied anywhere
SKIPPED_NAMES = frozenset({"__pycache__", ".ipynb_checkpoints"})
SKIPPED_IN_ROOT = (".local/share/jupyter/runtime", ".ipython/profile_default/security", ".cache")
# a bind is "source:destination", and a list of them is joined with commas
FORBIDDEN_IN_PATH = (":", ",")


def work_folder(template, name, base="."):
    """The work folder of image `name`: `template` (the `work_dir` setting) with `{name}` filled
    in and `~` expanded; a relative one is under `base` (the workflow's working folder)."""
    folder = Path(base, Path(template.replace("{name}", name)).expanduser()).absolute()
    if any(character in str(folder) for character in FORBIDDEN_IN_PATH):
        raise StepError(f"work_dir {folder} has a ':' or ',', which the runtime's --bind cannot take")
    return folder


def make_work_folder(folder):
    """The work folder, made readable by its owner only (it holds the users' notebooks)."""
    folder = Path(folder)
    if not folder.is_dir():
        folder.mkdir(mode=0o700, parents=True)
    return folder


def mount_point(image):
    """Where the work folder appears in the server: `work` in the image's working folder."""
    return f"{image['working_folder'].rstrip('/')}/{WORK_MOUNT}"


def bind(folder, image):
    return f"{folder}:{mount_point(image)}"


def outermost(folders):
    """The absolute folders among `folders` (no ".." parts), without those inside another."""
    kept = []
    for folder in folders:
        if not folder.startswith("/") or ".." in Path(folder).parts:
            continue
        folder = folder.rstrip("/") or "/"
        if not any(Path(folder).is_relative_to(other) for other in kept):
            kept = [other for other in kept if not Path(other).is_relative_to(folder)] + [folder]
    return kept


def tracked_roots(image):
    """The folders, inside the container, where users' work lands: the working folder (Jupyter's
    file browser) and the home (settings, history); one only when one holds the other."""
    return outermost([image.get("working_folder", ""), image.get("home", "")])


def inside(sandbox, container_path):
    return Path(sandbox) / container_path.lstrip("/")


def ensure_mount_point(sandbox, image):
    """The folder the work folder is bound on: in a writable sandbox a bind's destination must
    exist. An image with a folder of its own there keeps it (hidden while the server runs)."""
    destination = inside(sandbox, mount_point(image))
    if destination.is_symlink() or (destination.exists() and not destination.is_dir()):
        raise StepError(
            f"the image has a file at {mount_point(image)}, where the work folder is bound; rename it in the repository"
        )
    destination.mkdir(parents=True, exist_ok=True)


def skipped(relative, roots):
    """Whether a path (relative to the container's /) is the server's or a cache's. The work
    folder's mount point needs no exception: its bind exists only inside the server."""
    if SKIPPED_NAMES.intersection(Path(relative).parts):
        return True
    for root in roots:
        root = root.strip("/")
        for prefix in SKIPPED_IN_ROOT:
            folder = f"{root}/{prefix}" if root else prefix
            if relative == folder or relative.startswith(folder + "/"):
                return True
    return False


def scan(sandbox, roots):
    """{path relative to the container's /: [size, mtime in ns]} of the files and symbolic links
    under `roots` (symbolic links are not followed)."""
    sandbox = Path(sandbox)
    found = {}
    for root in roots:
        top = inside(sandbox, root)
        # a link on the way (an image's /home -> /var/home) would lead out of the sandbox
        if not top.is_dir() or top.resolve() != sandbox.resolve() / root.lstrip("/"):
            continue
        for folder, dirs, names in os.walk(top):
            here = Path(folder).relative_to(sandbox).as_posix()
            dirs[:] = [d for d in dirs if not skipped(f"{here}/{d}", roots)]
            # os.walk lists a symbolic link to a folder with the folders, and does not enter it
            for name in names + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
                relative = f"{here}/{name}"
                status = os.lstat(os.path.join(folder, name))
                if not skipped(relative, roots) and (stat.S_ISREG(status.st_mode) or stat.S_ISLNK(status.st_mode)):
                    found[relative] = [status.st_size, status.st_mtime_ns]
    return found


def prepare(sandbox, image):
    """A freshly unpacked sandbox: the work folder's mount point made, and its image's files
    recorded (before any server runs from it)."""
    ensure_mount_point(sandbox, image)
    roots = tracked_roots(image)
    record = {"roots": roots, "files": scan(sandbox, roots)}
    Path(sandbox, RECORD).write_text(json.dumps(record, sort_keys=True) + "\n")


def fallback_roots(sandbox):
    """What a sandbox without a record is checked by: /home, and the working folder of the
    receipt beside it (image.json) when that is readable."""
    try:
        working_folder = json.loads(Path(sandbox).parent.joinpath("image.json").read_text())["working_folder"]
    except (OSError, ValueError, KeyError, TypeError):
        working_folder = ""
    return outermost(["/home", str(working_folder)])


def changed_files(sandbox):
    """Paths (relative to the container's /) of the files users added or changed in the sandbox,
    sorted; with no record, every file of its home and working folder."""
    try:
        record = json.loads(Path(sandbox, RECORD).read_text())
        roots, recorded = record["roots"], record["files"]
    except (OSError, ValueError, KeyError, TypeError):
        roots, recorded = fallback_roots(sandbox), {}
    return sorted(path for path, facts in scan(sandbox, roots).items() if recorded.get(path) != facts)


def keep_changed(sandbox, folder, commit, log=None):
    """Move the files users changed in `sandbox` into `folder`/recovered/<commit>-<time>/, each at
    its path in the container (home/jovyan/x.ipynb); the folder they went to (None when there
    was nothing to keep). A file that cannot be moved stops it with one line, the sandbox left
    as it is. `log`: a function given one line per file kept."""
    sandbox = Path(sandbox)
    if not sandbox.is_dir():
        return None
    changed = changed_files(sandbox)
    if not changed:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    destination = Path(folder, RECOVERED, f"{commit[:12]}-{stamp}")
    for number in range(1, 1000):
        if not destination.exists():
            break
        destination = destination.with_name(f"{commit[:12]}-{stamp}-{number}")
    try:
        make_work_folder(folder)
        for relative in changed:
            source, target = sandbox / relative, destination / relative
            if not os.path.lexists(source):
                continue  # removed since it was seen (by a server still running): nothing to keep
            target.parent.mkdir(parents=True, exist_ok=True)
            # the image may have made the folder read-only
            os.chmod(source.parent, source.parent.stat().st_mode | 0o700)
            shutil.move(source, target)
            if log:
                log(f"kept {relative} of {sandbox} in {target}")
    except OSError as error:
        raise StepError(
            f"could not move the files users changed in {sandbox} into {destination} "
            f"({error.strerror or error}); the sandbox was not removed"
        ) from None
    return destination


def set_aside_name(sandbox):
    """A free name beside `sandbox` for an old sandbox that could not be removed: prune, and
    `sandboxes`, find it there."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for number in range(1000):
        name = Path(sandbox).with_name(f"{Path(sandbox).name}.old-{stamp}" + (f"-{number}" if number else ""))
        if not name.exists():
            return name
    raise StepError(f"no free name beside {sandbox} for the old sandbox")


def sandboxes(commit_folder):
    """The sandboxes in a commit's folder: `sandbox`, and old ones set aside beside it."""
    return sorted(p for p in Path(commit_folder).glob("sandbox*") if p.is_dir() and not p.is_symlink() and (p.name == "sandbox" or p.name.startswith("sandbox.old-")))

