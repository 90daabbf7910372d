"""Rule prune: keep the newest N SIFs of each name; remove older commits' folders (SIF, sandbox,
source, logs). Never the newest, never one a running Jupyter server uses, never outside results/,
never a file users changed in a sandbox (it goes to the image's work folder first)."""

import json
import re
import shutil
import sys
from pathlib import Path

from . import servers, user_work
from .files import make_removable
from .step import StepError
from .tools import say

SHA_FOLDER = re.compile(r"[0-9a-f]{40}")


def in_use(folder):
    connection_file = folder / "launch.json"
    if not connection_file.exists():
        return False
    try:
        return servers.running(json.loads(connection_file.read_text()))
    except (ValueError, KeyError, OSError):
        return True  # unreadable: keep it rather than guess


def commits_by_age(results, name):
    """Commit folders of `name` that hold a SIF, newest SIF first."""
    folders = []
    for folder in Path(results, name).iterdir():
        sif = folder / f"{name}.sif"
        if SHA_FOLDER.fullmatch(folder.name) and folder.is_dir() and not folder.is_symlink() and sif.is_file():
            folders.append((sif.stat().st_mtime, folder))
    return [folder for _, folder in sorted(folders, reverse=True)]


def prunable(results, keep, names=None):
    """What `prune` would remove: (folder, reason kept or None) for each older commit."""
    results = Path(results).resolve()
    removable = []
    for name_folder in sorted(p for p in results.iterdir() if p.is_dir() and not p.is_symlink() and not p.name.startswith(".")):
        if names and name_folder.name not in names:
            continue
        for folder in commits_by_age(results, name_folder.name)[keep:]:
            if folder.resolve().parent.parent != results:
                continue
            if not in_use(folder):
                removable.append(folder)
    return removable


def prune(results, keep, work_dir, names=None, log=sys.stderr):
    """Remove the older commits' folders; the files users changed in their sandboxes go to the
    image's work folder first (`work_dir`, a template with {name}). A folder whose changed files
    cannot be moved is left whole; the list of what was removed, and of such refusals."""
    removed, refused = [], []
    for folder in prunable(results, keep, names):
        name = folder.parent.name
        try:
            work_folder = user_work.work_folder(work_dir, name)
            for sandbox in user_work.sandboxes(folder):
                kept = user_work.keep_changed(sandbox, work_folder, folder.name, log=lambda line: print(f"prune: {line}", file=log))
                if kept:
                    say(f"prune: the files users changed in {sandbox} are in {kept}")
        except StepError as error:
            refused.append(folder)
            print(f"prune: kept {folder}: {error}", file=log)
            say(f"prune: kept {folder}: {error}")
            continue
        make_removable(folder)
        shutil.rmtree(folder)
        removed.append(folder)
        print(f"prune: removed {folder}", file=log)
    return removed, refused


def prune_with_log(results, keep, names, log_path, work_dir):
    with open(log_path, "a") as log:
        removed, refused = prune(results, keep, work_dir, names, log=log)
        print(f"prune: kept the newest {keep} SIFs per name; removed {len(removed)} older commits", file=log)
    print(f"prune: removed {len(removed)} older commits", file=sys.stderr)
    if refused:
        raise StepError(f"kept {len(refused)} older commits whose changed files could not be moved to their work folder (see above)")
