"""Benchmark the chain on the bundled example, side by side in one run (this machine is noisy,
so only ratios taken in the same run mean anything):

1. the workflow's cold build (resolve -> SIF; by default with its fast SIF conversion) against
   the same tools run by hand (repo2docker, docker save, apptainer build), Docker's build cache
   emptied before each;
2. gzip against zstd for the SIF step, on the same saved image: time and size;
3. a no-op rerun of the workflow.

Run it as the account that runs the workflow (in the docker group, Apptainer as itself):
    .venv/bin/python -m bench.chain [--repeat N] [--runtime apptainer] [--sif-conversion fast|apptainer]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from repo2singularity.image import ImageSpec, image_labels, repo2docker_command
from repo2singularity.runtime import compression_arguments
from tests.conftest import GitRepo

PROJECT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run(command, **kwargs):
    subprocess.run([str(c) for c in command], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs)


def timed(command, **kwargs):
    started = time.monotonic()
    run(command, **kwargs)
    return time.monotonic() - started


def empty_docker_cache(*tags):
    for tag in tags:
        subprocess.run(["docker", "image", "rm", "--force", tag], capture_output=True)
    run(["docker", "builder", "prune", "--all", "--force"])


def by_hand(repo, sha, folder, runtime, compression):
    """The same tools, with the same arguments, and nothing around them."""
    started = time.monotonic()
    source = folder / "source"
    run(["git", "ls-remote", str(repo.path), "main"])
    run(["git", "clone", "--quiet", str(repo.path), source])
    tag = f"r2s-bench-hand:{sha}"
    labels = image_labels(str(repo.path), "main", sha)
    spec = ImageSpec("hand", sha, tag, labels, "jovyan", os.getuid() or 1000)
    run(repo2docker_command(str(BIN / "repo2docker"), source, spec))
    run(["docker", "save", "--output", folder / "image.tar", tag])
    run([runtime, "build", *compression_arguments(compression), folder / "hand.sif", f"docker-archive://{folder / 'image.tar'}"])
    return time.monotonic() - started, tag


def by_workflow(repo, workdir, runtime, sif_conversion):
    command = [
        BIN / "snakemake", "--snakefile", PROJECT / "Snakefile", "--directory", workdir, "--cores", "2", "build",
        "--config", f"repo={repo.path}", "ref=main", "name=bench", f"runtime={runtime}", f"sif_conversion={sif_conversion}",
    ]
    return timed(command), command


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=1, help="pairs of cold builds (default 1)")
    parser.add_argument("--runtime", default="apptainer")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--sif-conversion", choices=("fast", "apptainer"), default="fast",
                        help="the workflow's SIF conversion (apptainer: the same tools as by hand)")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="r2s-bench-"))
    repo = GitRepo(scratch / "example", branch="main")
    shutil.copytree(PROJECT / "example", repo.path, dirs_exist_ok=True)
    sha = repo.commit("bench")
    rows = []
    try:
        for round_ in range(args.repeat):
            folder = scratch / f"hand-{round_}"
            folder.mkdir()
            empty_docker_cache(f"r2s-bench-hand:{sha}", f"r2s-bench:{sha}")
            hand_seconds, _ = by_hand(repo, sha, folder, args.runtime, "zstd")
            workdir = scratch / f"workflow-{round_}"
            empty_docker_cache(f"r2s-bench-hand:{sha}", f"r2s-bench:{sha}")
            workflow_seconds, command = by_workflow(repo, workdir, args.runtime, args.sif_conversion)
            rows.append((f"cold build, resolve -> SIF ({args.sif_conversion})", hand_seconds, workflow_seconds))
            noop = timed(command)
            rows.append(("no-op rerun of the workflow", None, noop))

        tarball = scratch / "hand-0" / "image.tar"
        sizes = {}
        times = {}
        for compression in ("gzip", "zstd", "gzip", "zstd"):
            target = scratch / f"{compression}.sif"
            target.unlink(missing_ok=True)
            seconds = timed([args.runtime, "build", *compression_arguments(None if compression == "gzip" else compression), target, f"docker-archive://{tarball}"])
            times.setdefault(compression, []).append(seconds)
            sizes[compression] = target.stat().st_size
    finally:
        if not args.keep:
            subprocess.run(["chmod", "-R", "u+w", scratch])
            shutil.rmtree(scratch, ignore_errors=True)
        empty_docker_cache(f"r2s-bench-hand:{sha}", f"r2s-bench:{sha}")

    print(f"{'measure':41} {'by hand':>9} {'workflow':>9} {'ratio':>7}")
    for label, hand, workflow in rows:
        ratio = f"{workflow / hand:6.2f}x" if hand else ""
        hand_text = f"{hand:8.1f}s" if hand else ""
        print(f"{label:41} {hand_text:>9} {workflow:8.1f}s {ratio:>7}")
    gzip_time, zstd_time = min(times["gzip"]), min(times["zstd"])
    print(f"\nSIF step on the same image ({sizes['gzip'] / 1e6:.0f} MB gzip): best of two each")
    print(f"  gzip {gzip_time:6.1f}s {sizes['gzip'] / 1e6:7.1f} MB")
    print(f"  zstd {zstd_time:6.1f}s {sizes['zstd'] / 1e6:7.1f} MB")
    print(f"  zstd/gzip: time {zstd_time / gzip_time:.2f}x, size {sizes['zstd'] / sizes['gzip']:.2f}x")
    print(json.dumps({"rows": rows, "sif_times": times, "sif_sizes": sizes}))


if __name__ == "__main__":
    main()
