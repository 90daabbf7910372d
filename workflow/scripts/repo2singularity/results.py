"""The results folder: results/{name}/{sha}/ for each image and commit, and results/{name}/latest,
a link to the commit whose SIF was made last, so nobody has to type a sha."""

import os
from pathlib import Path

from .files import temporary_sibling

LATEST = "latest"
# what the workflow itself keeps at the top of results/, beside the images' folders (names
# starting with "." are refused anyway): no image may be named like them
OWN_ENTRIES = frozenset({"logs", "benchmarks", "summary.json", "summary.md"})


def mark_latest(sif):
    """Point results/{name}/latest at the commit folder of `sif`, in one step (a new link
    renamed over the old one)."""
    folder = Path(sif).parent
    link = folder.parent / LATEST
    partial = temporary_sibling(link)
    os.symlink(folder.name, partial)
    try:
        os.replace(partial, link)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def sif_line(results, name, sha):
    """The run's last line about an image: where its SIF is, by the stable path and by commit;
    None while it has none."""
    sif = Path(results, name, sha, f"{name}.sif")
    if not sif.exists():
        return None
    latest = Path(results, name, LATEST)
    if latest.is_symlink() and os.readlink(latest) == sha:
        return f"SIF of {name} ({sha[:12]}): {latest / sif.name} (= {sif})"
    return f"SIF of {name} ({sha[:12]}): {sif}"
