"""Benchmark: a manifest of N local repositories, all up to date. Side by side in one run: the
workflow's no-op run against resolving the same N refs one after another with `git ls-remote`.
Goal: the whole no-op run takes no longer than that sequential resolution alone.

The up-to-date state is made once from ONE real build: the workflow builds a small image for
the first repository, and its result folder (SIF, checksum, receipt, source) is hard-linked into
each other repository's commit folder. A no-op run reads only names, times and refs, never the
SIF's content, so this is the state a real fleet of N built images presents to it.

    .venv/bin/python -m bench.manifest_noop [--images 100] [--rounds 3]

Repositories are read two ways: as local paths (git runs in-process, a few ms each, so
Snakemake's own start-up of about 1.5 s dominates) and through `git daemon` on 127.0.0.1 (a
connection per repository, as with a real server, still without network latency). The
resolution step alone (`builds.resolve`, in-process, parallel) is timed too.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from repo2singularity import builds
from repo2singularity.processes import free_port
from repo2singularity.repository import Repository
from tests.conftest import GitRepo

PROJECT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def snakemake(workdir, manifest, *args):
    command = [
        BIN / "snakemake", "--snakefile", PROJECT / "Snakefile", "--directory", workdir,
        "--cores", "2", *args, "--config", f"manifest={manifest}",
    ]
    return subprocess.run([str(c) for c in command], capture_output=True, text=True)


def clone_result(seed_folder, folder, name):
    """The seed's results, hard-linked under another name and commit, in the same time order."""
    folder.mkdir(parents=True)
    shutil.copytree(seed_folder / "source", folder / "source", copy_function=os.link)
    for suffix in (".sif", ".sif.sha256", ".card.html"):
        os.link(seed_folder / f"seed{suffix}", folder / f"{name}{suffix}")
    shutil.copy2(seed_folder / "image.json", folder / "image.json")


def start_git_daemon(base):
    port = free_port()
    daemon = subprocess.Popen(
        ["git", "daemon", "--export-all", "--reuseaddr", "--listen=127.0.0.1", f"--port={port}", f"--base-path={base}", str(base)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while subprocess.run(["git", "ls-remote", f"git://127.0.0.1:{port}/repo000"], capture_output=True).returncode:
        if time.monotonic() > deadline:
            sys.exit("git daemon did not answer")
        time.sleep(0.2)
    return daemon, port


def measure(workdir, manifest, urls, rounds):
    """Median seconds: sequential ls-remote, the resolution step alone, the whole no-op run."""
    sequential, resolution, whole = [], [], []
    settings = builds.Settings(
        runtime="apptainer", image_prefix="r2s-", user_name="jovyan", user_id=None,
        sif_compression="auto", jupyter_command=("jupyter",), launch_timeout=1, launch_writable=True,
        resolve_connections=8, keep_sifs=3, from_manifest=True,
        builds={f"i{index}": builds.BuildSpec(f"i{index}", Repository(url), "main") for index, url in enumerate(urls)},
    )
    for _ in range(rounds):
        started = time.monotonic()
        for url in urls:
            subprocess.run(["git", "ls-remote", "--", url, "main"], capture_output=True, check=True)
        sequential.append(time.monotonic() - started)
        started = time.monotonic()
        assert not builds.resolve(settings).failures
        resolution.append(time.monotonic() - started)
        started = time.monotonic()
        noop = snakemake(workdir, manifest)
        whole.append(time.monotonic() - started)
        if noop.returncode != 0 or "Nothing to be done" not in noop.stdout + noop.stderr:
            sys.exit(f"the no-op run did something or failed:\n{noop.stderr[-3000:]}")
    return [statistics.median(values) for values in (sequential, resolution, whole)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="r2s-bench-manifest-"))
    try:
        repos = []
        for index in range(args.images):
            repo = GitRepo(scratch / "repos" / f"repo{index:03d}")
            repo.commit("first", {"Dockerfile": "FROM debian:bookworm\nRUN echo small > /small\n"})
            repos.append(repo)
        workdir = scratch / "work"
        workdir.mkdir()
        seed_manifest = scratch / "seed.tsv"
        seed_manifest.write_text(f"name\trepo\tref\nseed\t{repos[0].path}\tmain\n")
        built = snakemake(workdir, seed_manifest)
        if built.returncode != 0:
            sys.exit(f"the seed build failed:\n{built.stderr[-3000:]}")
        seed_folder = workdir / "results" / "seed" / repos[0].head()
        manifest = scratch / "images.tsv"
        rows = []
        for index, repo in enumerate(repos):
            name = f"image{index:03d}"
            clone_result(seed_folder, workdir / "results" / name / repo.head(), name)
            rows.append(f"{name}\t{repo.path}\tmain\n")
        manifest.write_text("name\trepo\tref\n" + "".join(rows))
        check = snakemake(workdir, manifest, "-n")
        if "Nothing to be done" not in check.stdout + check.stderr:
            sys.exit(f"the prepared state is not up to date:\n{check.stdout[-3000:]}")

        local = measure(workdir, manifest, [str(repo.path) for repo in repos], args.rounds)
        daemon, port = start_git_daemon(scratch / "repos")
        try:
            served_manifest = scratch / "served.tsv"
            served_urls = [f"git://127.0.0.1:{port}/{repo.path.name}" for repo in repos]
            served_manifest.write_text(
                "name\trepo\tref\n" + "".join(f"image{i:03d}\t{url}\tmain\n" for i, url in enumerate(served_urls))
            )
            served = measure(workdir, served_manifest, served_urls, args.rounds)
        finally:
            daemon.terminate()
            daemon.wait()
    finally:
        subprocess.run(["chmod", "-R", "u+w", scratch])
        shutil.rmtree(scratch, ignore_errors=True)

    print(f"{args.images} images, all up to date; median of {args.rounds} rounds, measures taken alternately")
    print(f"{'':38} {'local paths':>12} {'git daemon':>12}")
    labels = ("git ls-remote, one after another", "resolution step alone (parallel)", "workflow no-op run, whole")
    for label, local_value, served_value in zip(labels, local, served, strict=True):
        print(f"  {label:36} {local_value:11.2f}s {served_value:11.2f}s")
    for title, (sequential, resolution, whole) in (("local paths", local), ("git daemon", served)):
        print(f"  {title}: whole no-op / sequential = {whole / sequential:.2f}x (goal <= 1.00x); "
              f"resolution / sequential = {resolution / sequential:.2f}x")


if __name__ == "__main__":
    main()
