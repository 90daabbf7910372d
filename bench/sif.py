"""Benchmark the SIF step: the fast conversion (archive_to_sif: the saved tarball streamed into
mksquashfs) against `apptainer build` from the same tarball, at the same compression, side by
side in one run (this machine is noisy, so only ratios taken in the same run mean anything).

Two images: the bundled example (built with repo2docker, as the workflow builds it) and a large
image of many layers that the bench makes (r2s-bench-sif-large, >= 2 GB, removed afterwards).
For each image and each path:
- the SIF step alone: the same image.tar in, a finished SIF out;
- save + SIF: `docker save` to image.tar, then the SIF step (neither path streams the save into
  the SIF step: a saved image lists its layers in the order of their digests, not of the
  image, so the flattening needs the whole tarball first);
- peak memory of the step and its children (the process tree's RSS, sampled);
- temporary disk space: the largest size of the folders TMPDIR, APPTAINER_TMPDIR and
  APPTAINER_CACHEDIR point at while the step runs (each run gets fresh, empty ones).

Run it as the account that runs the workflow (in the docker group, Apptainer as itself):
    .venv/bin/python -m bench.sif [--repeat N] [--compression zstd] [--image example|large] [--keep]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from repo2singularity import archive_to_sif
from tests.conftest import GitRepo

PROJECT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SCRIPT = PROJECT / "workflow" / "scripts" / "repo2singularity" / "archive_to_sif.py"

LARGE_TAG = "r2s-bench-sif-large:latest"
LARGE_LAYERS = 16


def large_layer(n):
    """Per layer, as images grow: incompressible data (as in wheels, shared libraries, media),
    compressible text, and six folders of a thousand small files of varied sizes (a large
    image's Python or conda environment has some 100,000 files); later layers delete a hundred
    small files of an earlier layer (whiteouts) and add a file to an earlier layer's folder."""
    small = f"""{{ f = sprintf("f%04d", $1); for (i = 0; i <= ($1 * {n + 7}) % 211; i++) print $1, i > f; close(f) }}"""
    commands = [
        f"d=/data/layer{n}; mkdir -p $d/small",
        "head -c 64M /dev/urandom > $d/random.bin",
        f"seq -f 'line %.0f of layer {n}: some text that compresses well' 1 1500000 > $d/text.txt",
        f"for k in 1 2 3 4 5 6; do mkdir $d/small/$k; (cd $d/small/$k && seq 1 1000 | awk '{small}'); done",
    ]
    if n >= 3:
        commands += [f"rm -f /data/layer{n - 3}/small/1/f00*", f"head -c 8M /dev/urandom > /data/layer{n - 2}/extra.bin"]
    return "RUN set -e; " + "; \\\n    ".join(commands) + "\n"


LARGE_DOCKERFILE = "FROM debian:bookworm\n" + "".join(large_layer(n) for n in range(LARGE_LAYERS))


def run(command, **kwargs):
    subprocess.run([str(part) for part in command], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs)


class Sampler:
    """Peak RSS of a process and all its descendants, and peak size of some folders, sampled
    while the process runs; its CPU time (with the children it waited for) when it ends."""

    def __init__(self, folders=(), interval=0.2):
        self.folders = [Path(folder) for folder in folders]
        self.interval = interval
        self.peak_rss = 0
        self.peak_disk = 0
        self.cpu = 0.0

    def run(self, command, env=None):
        started = time.monotonic()
        log = tempfile.TemporaryFile()  # not a pipe: a full pipe would stall the step
        process = subprocess.Popen([str(part) for part in command], env=env, stdout=subprocess.DEVNULL, stderr=log)
        root = psutil.Process(process.pid)
        done = threading.Event()
        disk = threading.Thread(target=self.watch_disk, args=(done,), daemon=True)
        disk.start()
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                process.returncode = os.waitstatus_to_exitcode(status)
                self.cpu = usage.ru_utime + usage.ru_stime
                done.set()
                break
            total = 0
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.Error:
                tree = []
            for member in tree:
                try:
                    total += member.memory_info().rss
                except psutil.Error:
                    pass
            self.peak_rss = max(self.peak_rss, total)
            time.sleep(self.interval)
        seconds = time.monotonic() - started
        disk.join()
        log.seek(0)
        errors = log.read().decode(errors="replace")
        if process.returncode != 0:
            raise SystemExit(f"{command} failed:\n{errors[-2000:]}")
        return seconds

    def watch_disk(self, done):
        # a walk costs time in a tree of many files: every 2 s is enough to see the peak (it lasts while the SIF is packed)
        while not done.is_set():
            self.peak_disk = max(self.peak_disk, sum(folder_size(folder) for folder in self.folders))
            done.wait(2.0)


def folder_size(folder):
    total = 0
    for root, dirs, files in os.walk(folder, onerror=lambda error: None):
        for name in dirs + files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


class Measure:
    def __init__(self, seconds, cpu, rss, disk, size):
        self.seconds = seconds
        self.cpu = cpu
        self.rss = rss
        self.disk = disk
        self.size = size


def measured(command, scratch, output):
    """Run a step with fresh temporary folders; its time, peak memory, peak temporary space."""
    temporary = Path(tempfile.mkdtemp(prefix="tmp-", dir=scratch))
    folders = {name: temporary / name for name in ("tmp", "apptainer-tmp", "apptainer-cache")}
    for folder in folders.values():
        folder.mkdir()
    env = dict(
        os.environ,
        TMPDIR=str(folders["tmp"]),
        APPTAINER_TMPDIR=str(folders["apptainer-tmp"]),
        APPTAINER_CACHEDIR=str(folders["apptainer-cache"]),
    )
    sampler = Sampler(folders.values())
    seconds = sampler.run(command, env)
    size = Path(output).stat().st_size if output else 0
    subprocess.run(["chmod", "-R", "u+w", temporary], capture_output=True)
    shutil.rmtree(temporary, ignore_errors=True)
    return Measure(seconds, sampler.cpu, sampler.peak_rss, sampler.peak_disk, size)


def apptainer_command(runtime, tarball, sif, compression):
    options = ["--mksquashfs-args", " ".join(archive_to_sif.compression_options(compression))]
    return [runtime, "build", *options, sif, f"docker-archive://{tarball}"]


def fast_command(runtime, tarball, sif, compression):
    return ["python3", SCRIPT, "--runtime", runtime, *(["--compression", compression] if compression else []), tarball, sif]


def bench_image(tag, scratch, runtime, compression, repeat):
    """Rows for one image: (label, apptainer Measure, fast Measure), best time of `repeat`."""
    tarball = scratch / "image.tar"
    results = {"apptainer": [], "fast": [], "save": []}
    for _ in range(repeat):
        for path in ("apptainer", "fast"):
            # the save first (its own measure), then the SIF step from it; the two paths alternate
            tarball.unlink(missing_ok=True)
            save = measured(["docker", "save", "--output", tarball, tag], scratch, tarball)
            sif = scratch / f"{path}.sif"
            sif.unlink(missing_ok=True)
            make = apptainer_command if path == "apptainer" else fast_command
            results[path].append(measured(make(runtime, tarball, sif, compression), scratch, sif))
            results["save"].append(save)
    best = {path: min(runs, key=lambda m: m.seconds) for path, runs in results.items()}
    fast = scratch / "fast.sif"
    listing = subprocess.run(["unsquashfs", "-o", str(partition_offset(runtime, fast)), "-lc", fast], capture_output=True, text=True)
    files = listing.stdout.count("\n")
    tarball_size = tarball.stat().st_size
    tarball.unlink()
    return best, files, tarball_size


def partition_offset(runtime, sif):
    listing = subprocess.run([runtime, "sif", "list", str(sif)], capture_output=True, text=True).stdout
    for line in listing.splitlines():
        if "FS (Squashfs/*System" in line:
            return int(line.split("|")[3].split("-")[0])
    return 0


def build_example(scratch):
    repo = GitRepo(scratch / "example", branch="main")
    shutil.copytree(PROJECT / "example", repo.path, dirs_exist_ok=True)
    sha = repo.commit("bench")
    tag = f"r2s-bench-sif-example:{sha[:12]}"
    run([BIN / "repo2docker", "--no-run", "--image-name", tag, "--user-name", "jovyan", "--user-id", "1000", "--", repo.path])
    return tag


def build_large(scratch):
    context = scratch / "large"
    context.mkdir()
    (context / "Dockerfile").write_text(LARGE_DOCKERFILE)
    run(["docker", "build", "--tag", LARGE_TAG, context])
    return LARGE_TAG


def report(name, best, files, tarball_size):
    save, slow, fast = best["save"], best["apptainer"], best["fast"]
    print(f"\n{name}: {tarball_size / 1e9:.2f} GB saved, {files} files")
    print(f"  {'measure':30} {'apptainer':>12} {'fast':>12} {'ratio':>7}")
    rows = [
        ("SIF step (tarball -> SIF)", slow.seconds, fast.seconds, "s"),
        ("save + SIF", save.seconds + slow.seconds, save.seconds + fast.seconds, "s"),
        ("CPU time of the SIF step", slow.cpu, fast.cpu, "s"),
        ("peak memory, step + children", slow.rss / 1e6, fast.rss / 1e6, "MB"),
        ("temporary space", slow.disk / 1e6, fast.disk / 1e6, "MB"),
        ("SIF size", slow.size / 1e6, fast.size / 1e6, "MB"),
    ]
    for label, a, b, unit in rows:
        ratio = f"{b / a:6.2f}x" if a else ""
        print(f"  {label:30} {a:10.1f}{unit:>2} {b:10.1f}{unit:>2} {ratio:>7}")
    print(f"  (docker save alone: {save.seconds:.1f} s)")
    return {
        "image": name,
        "files": files,
        "tarball_bytes": tarball_size,
        "save_seconds": save.seconds,
        **{
            f"{path}_{key}": getattr(best[path], key) for path in ("apptainer", "fast") for key in ("seconds", "cpu", "rss", "disk", "size")
        },
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=1, help="runs of each path per image (best time counts)")
    parser.add_argument("--runtime", default="apptainer")
    parser.add_argument("--compression", default="zstd", help="zstd (the project's default), gzip (apptainer's), ...")
    parser.add_argument("--image", action="append", choices=["example", "large"], help="only this image (repeatable; default both)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="r2s-bench-sif-"))
    tags = []
    summary = []
    try:
        builders = {"example": build_example, "large": build_large}
        for name in args.image or list(builders):
            build = builders[name]
            tag = build(scratch)
            tags.append(tag)
            best, files, size = bench_image(tag, scratch, args.runtime, args.compression, args.repeat)
            summary.append(report(f"{name} ({tag}, {args.compression})", best, files, size))
    finally:
        for tag in tags:
            subprocess.run(["docker", "image", "rm", "--force", tag], capture_output=True)
        if not args.keep:
            subprocess.run(["chmod", "-R", "u+w", scratch], capture_output=True)
            shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
