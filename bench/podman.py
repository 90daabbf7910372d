"""Benchmark `builder: podman` against the Docker builder (`builder: local`) on the bundled
example, cold, side by side in one run (this machine is noisy: only ratios taken in the same
run mean anything). Each round makes a new commit whose first build step is new, so neither
engine has a layer of it cached, and runs the workflow up to the SIF once with each builder, in
alternating order. Each step's time comes from the workflow's own benchmark files; the total is
the whole `snakemake build`.

Run it as the account that runs the workflow (in the docker group for the Docker side; the
Podman side runs with DOCKER_HOST pointing nowhere):
    .venv/bin/python -m bench.podman [--repeat N]
"""

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from tests.conftest import GitRepo

PROJECT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

STEPS = ("clone_source", "build_image", "save_image", "build_sif")
BUILDERS = ("local", "podman")
NO_DOCKER = {**os.environ, "DOCKER_HOST": "unix:///nonexistent/docker.sock"}


def cold_commit(repo):
    """The example with a first build step no engine has seen: every later layer is rebuilt."""
    dockerfile = (PROJECT / "example" / "Dockerfile").read_text()
    nonce = uuid.uuid4().hex[:12]
    first, rest = dockerfile.split("\nFROM debian:bookworm\n", 1)
    (repo.path / "Dockerfile").write_text(f"{first}\nFROM debian:bookworm\nRUN echo {nonce} > /bench-nonce\n{rest}")
    return repo.commit(f"bench {nonce}")


def build(repo, workdir, builder):
    command = [
        BIN / "snakemake", "--snakefile", PROJECT / "Snakefile", "--directory", workdir, "--cores", "2", "build",
        "--config", f"repo={repo.path}", "ref=main", "name=bench", f"builder={builder}",
    ]
    started = time.monotonic()
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, env=NO_DOCKER if builder == "podman" else None)
    total = time.monotonic() - started
    if result.returncode != 0:
        sys.exit(f"bench: the {builder} build failed:\n{result.stderr[-3000:]}")
    folder = workdir / "results" / "bench" / repo.head()
    seconds = {}
    for step in STEPS:
        with open(folder / "benchmarks" / f"{step}.tsv") as handle:
            seconds[step] = float(next(csv.DictReader(handle, delimiter="\t"))["s"])
    seconds["total"] = total
    sizes = {"SIF MB": (folder / "bench.sif").stat().st_size / 1e6}
    return seconds, sizes


def forget(builder, sha):
    tag = f"r2s-bench:{sha}"
    if builder == "podman":
        subprocess.run(["podman", "image", "rm", "--force", tag], capture_output=True, env=NO_DOCKER)
        subprocess.run(["podman", "image", "prune", "--force"], capture_output=True, env=NO_DOCKER)
    else:
        subprocess.run(["docker", "image", "rm", "--force", tag], capture_output=True)
        subprocess.run(["docker", "builder", "prune", "--all", "--force"], capture_output=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=1, help="rounds, each one cold build per builder (default 1)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args()
    driver = subprocess.run(["podman", "info", "--format", "{{.Store.GraphDriverName}}"], capture_output=True, text=True, env=NO_DOCKER).stdout.strip()

    scratch = Path(tempfile.mkdtemp(prefix="r2s-bench-podman-"))
    repo = GitRepo(scratch / "example", branch="main")
    shutil.copytree(PROJECT / "example", repo.path, dirs_exist_ok=True)
    results = {builder: [] for builder in BUILDERS}
    try:
        for round_ in range(args.repeat):
            sha = cold_commit(repo)
            order = BUILDERS if round_ % 2 == 0 else BUILDERS[::-1]
            for builder in order:
                seconds, sizes = build(repo, scratch / f"{builder}-{round_}", builder)
                results[builder].append({**seconds, **sizes})
                forget(builder, sha)
    finally:
        if not args.keep:
            subprocess.run(["chmod", "-R", "u+w", scratch])
            shutil.rmtree(scratch, ignore_errors=True)

    print(f"the example, cold, best of {args.repeat} round(s); Podman's storage driver: {driver}")
    print(f"{'step':14} {'docker':>9} {'podman':>9} {'podman/docker':>14}")
    for key in (*STEPS, "total", "SIF MB"):
        docker, podman = (min(run[key] for run in results[builder]) for builder in BUILDERS)
        unit = "" if key == "SIF MB" else "s"
        print(f"{key:14} {docker:8.1f}{unit or ' '} {podman:8.1f}{unit or ' '} {podman / docker:13.2f}x")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
