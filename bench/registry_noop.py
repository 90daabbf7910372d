"""Benchmark for issue 12, side by side in one run (this machine is noisy: only ratios taken in the
same run mean anything):

1. a no-op manifest run of N images that are all in a registry (pull mode, SIFs already here)
   against the same run without a registry; goal <= 1.5x;
2. the planning of a fresh results/ folder (`snakemake -n`): with the registry it looks the N
   images up (in parallel, once) and plans N pulls; without, it plans N builds.

The images are the seed build of bench/manifest_noop.py hard-linked under N names, and pushed
under those N names to Debian's docker-registry on 127.0.0.1 (plain HTTP), started here.

    .venv/bin/python -m bench.registry_noop [--images 100] [--rounds 3]
"""

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.manifest_noop import BIN, clone_result
from repo2singularity import registry
from repo2singularity.shared_sifs import RECEIPT_ANNOTATION
from tests.conftest import GitRepo
from tests.registry_server import RegistryServer

PROJECT = Path(__file__).resolve().parent.parent


def timed(workdir, manifest, *args, config=()):
    command = [BIN / "snakemake", "--snakefile", PROJECT / "Snakefile", "--directory", workdir, "--cores", "2", *args]
    command += ["--config", f"manifest={manifest}", *config]
    started = time.monotonic()
    result = subprocess.run([str(word) for word in command], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"the run failed:\n{result.stderr[-3000:]}")
    return time.monotonic() - started, result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="r2s-bench-registry-"))
    try:
        repo = GitRepo(scratch / "repo")
        repo.commit("first", {"Dockerfile": "FROM debian:bookworm\nRUN echo small > /small\n"})
        sha = repo.head()
        workdir = scratch / "work"
        workdir.mkdir()
        seed_manifest = scratch / "seed.tsv"
        seed_manifest.write_text(f"name\trepo\tref\nseed\t{repo.path}\tmain\n")
        timed(workdir, seed_manifest)
        seed_folder = workdir / "results" / "seed" / sha
        names = [f"image{index:03d}" for index in range(args.images)]
        for name in names:
            clone_result(seed_folder, workdir / "results" / name / sha, name)
        manifest = scratch / "images.tsv"
        manifest.write_text("name\trepo\tref\n" + "".join(f"{name}\t{repo.path}\tmain\n" for name in names))

        with RegistryServer(scratch / "registry") as server:
            settings = registry.RegistrySettings.from_url(server.url("lab"), mode="push")
            receipt = (seed_folder / "image.json").read_text()
            with registry.RegistryClient(settings, progress=None) as client:
                for name in names:
                    client.push(seed_folder / "seed.sif", name, sha, {RECEIPT_ANNOTATION: receipt})
            with_registry = [f"registry={server.url('lab')}", "registry_mode=pull"]
            fresh = scratch / "fresh"
            fresh.mkdir()
            noop, noop_registry, plan, plan_registry = [], [], [], []
            for _ in range(args.rounds):
                noop.append(timed(workdir, manifest, "-n")[0])
                seconds, result = timed(workdir, manifest, "-n", config=with_registry)
                if "Nothing to be done" not in result.stdout + result.stderr:
                    sys.exit(f"the no-op run with the registry has something to do:\n{result.stdout[-3000:]}")
                noop_registry.append(seconds)
                plan.append(timed(fresh, manifest, "-n")[0])
                seconds, result = timed(fresh, manifest, "-n", config=with_registry)
                if not re.search(rf"^pull_sif\s+{args.images}$", result.stdout, re.MULTILINE):
                    sys.exit(f"the plan with the registry does not pull {args.images} images:\n{result.stdout[-3000:]}")
                plan_registry.append(seconds)
    finally:
        subprocess.run(["chmod", "-R", "u+w", scratch])
        shutil.rmtree(scratch, ignore_errors=True)

    median = statistics.median
    print(f"{args.images} images; median of {args.rounds} rounds, measures taken alternately")
    print(f"  no-op run (all SIFs here), without a registry   {median(noop):6.2f} s")
    print(f"  no-op run, registry in pull mode                 {median(noop_registry):6.2f} s   "
          f"ratio {median(noop_registry) / median(noop):.2f}x (goal <= 1.5x)")
    print(f"  plan of a fresh results/, without a registry     {median(plan):6.2f} s   ({args.images} builds)")
    print(f"  plan of a fresh results/, with the registry      {median(plan_registry):6.2f} s   "
          f"({args.images} lookups, {args.images} pulls) ratio {median(plan_registry) / median(plan):.2f}x")


if __name__ == "__main__":
    main()
