"""Benchmark the journey across hosts against the same chain on one host, side by side in one run
(the machine is noisy: only ratios taken in the same run mean anything).

- three hosts: the login account on the login host runs `snakemake --profile remote sandbox`:
  build_image, save_image and build_sif on the builder over SSH (a veth link through a bridge),
  the SIF back to the login node, the sandbox unpacked by a Slurm job on node1;
- one host: the builder's account on the builder host runs `snakemake --cores 2 sandbox` with
  `builder: local`: the same tools on the same Docker engine, no SSH, no Slurm.
With `--target build` both stop at the SIF: the builder over SSH alone, without Slurm.

Both build the same repository from the login host's git daemon; every chain builds a commit of
its own (a fresh word in the repository), so every step runs. One untimed chain of each kind comes
first: repo2docker passes the account's uid to the build, so each kind has layers of its own in
Docker's cache, and both start warm. Then the order alternates (3, 1, 1, 3, ...). The topology is
that of tests/hosts (set up and torn down here), so run it as root:
    .venv/bin/python -m bench.hosts [--rounds 2] [--repo jupyter|tiny] [--target sandbox|build]
"""

import argparse
import csv
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from tests.hosts.lab import commit, make_builder, make_repo, open_lab, ready_login_node
from tests.hosts.topology import STATE, run

PROJECT = Path(__file__).resolve().parent.parent

SNAKEMAKE = Path(sys.executable).with_name("snakemake")
STEPS = ("clone_source", "build_image", "save_image", "build_sif", "unpack_sandbox")
JUPYTER_FILES = ("Dockerfile", "entrypoint", "start", "hello.ipynb", "README.md")


def repository_files(kind, word):
    if kind == "tiny":
        return {"Dockerfile": f"FROM debian:bookworm\nRUN head -c 24000000 /dev/urandom > /blob && echo {word} > /word\n"}
    return {**{name: PROJECT / "example" / name for name in JUPYTER_FILES}, "round.txt": f"{word}\n"}


def step_seconds(folder):
    seconds = {}
    for step in STEPS:
        table = folder / "benchmarks" / f"{step}.tsv"
        if table.exists():
            with open(table) as handle:
                seconds[step] = float(next(csv.DictReader(handle, delimiter="\t"))["s"])
    return seconds


class Chains:
    def __init__(self, lab, kind, target):
        self.lab = lab
        self.kind = kind
        self.target = target
        self.work = STATE / "repos" / "bench"
        make_repo(self.work, repository_files(kind, os.urandom(8).hex()))
        self.url = lab.git.publish("bench", self.work)
        # the one-host chain runs as the builder's account, in a folder of its own
        self.one_host_dir = lab.build_account.home / "bench-one-host"
        shutil.rmtree(self.one_host_dir, ignore_errors=True)
        run(["install", "-d", "-o", lab.build_account.name, "-g", lab.build_account.name, self.one_host_dir])
        self.no_slurm = STATE / "no-slurm"
        self.no_slurm.mkdir(exist_ok=True)
        (self.no_slurm / "scontrol").write_text("#!/bin/sh\nexit 1\n")
        (self.no_slurm / "scontrol").chmod(0o755)

    def new_commit(self):
        commit(self.work, repository_files(self.kind, os.urandom(8).hex()), "round")
        self.lab.git.push("bench", self.work)
        return run(["git", "-C", self.work, "rev-parse", "HEAD"]).stdout.strip()

    def three_hosts(self):
        sha = self.new_commit()
        started = time.monotonic()
        self.lab.as_login(["snakemake", "--profile", "remote", self.target, "--config", f"repo={self.url}", "ref=main"])
        elapsed = time.monotonic() - started
        return elapsed, step_seconds(next((self.lab.checkout / "results").glob(f"*/{sha}")))

    def one_host(self):
        sha = self.new_commit()
        account = self.lab.build_account
        command = [SNAKEMAKE, "--snakefile", PROJECT / "Snakefile", "--directory", self.one_host_dir, "--cores", "2", self.target,
                   "--config", f"repo={self.url}", "ref=main"]
        started = time.monotonic()
        # a builder VM has no Slurm, but this one shares the machine's Slurm commands, and
        # Snakemake's Slurm plugin runs `scontrol show config` at every start: 10 s of retries
        # here, for a controller the builder cannot reach. An scontrol that fails at once stands
        # for "no Slurm here".
        env = {"PATH": f"{self.no_slurm}:{account.environment()['PATH']}"}
        self.lab.builder.run(command, user=account, env=env, cwd=self.one_host_dir, timeout=3600)
        elapsed = time.monotonic() - started
        return elapsed, step_seconds(next((self.one_host_dir / "results").glob(f"*/{sha}")))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="chains of each kind, in alternating order")
    parser.add_argument("--target", choices=("sandbox", "build"), default="sandbox", help="where the chain stops: the sandbox, or the SIF")
    parser.add_argument("--repo", choices=("jupyter", "tiny"), default="jupyter",
                        help="jupyter: the bundled example (Debian's Jupyter, a ~260 MB SIF); tiny: debian + 24 MB of random bytes")
    args = parser.parse_args()
    times = {"three hosts": [], "one host": []}
    steps = {"three hosts": [], "one host": []}
    with open_lab() as lab:
        ready_login_node(lab, make_builder(lab))
        chains = Chains(lab, args.repo, args.target)
        for mode, chain in (("three hosts", chains.three_hosts), ("one host", chains.one_host)):
            print(f"  warm-up, {mode:11s}: {chain()[0]:6.1f} s (not counted)", flush=True)
        for number in range(args.rounds):
            order = ("three hosts", "one host") if number % 2 == 0 else ("one host", "three hosts")
            for mode in order:
                elapsed, seconds = chains.three_hosts() if mode == "three hosts" else chains.one_host()
                times[mode].append(elapsed)
                steps[mode].append(seconds)
                print(f"  round {number + 1}, {mode:11s}: {elapsed:6.1f} s  "
                      + "  ".join(f"{step} {seconds.get(step, 0):.1f}" for step in STEPS), flush=True)
    print(f"\ncold chain (resolve -> {args.target}), repo {args.repo}, median of {args.rounds}:")
    for mode in times:
        print(f"   {mode:11s} {statistics.median(times[mode]):7.1f} s   ({', '.join(f'{t:.1f}' for t in times[mode])})")
        medians = {step: statistics.median(s.get(step, 0) for s in steps[mode]) for step in STEPS}
        print("               " + "  ".join(f"{step} {value:.1f}" for step, value in medians.items()))
    ratio = statistics.median(times["three hosts"]) / statistics.median(times["one host"])
    print(f"   ratio three hosts / one host: {ratio:.2f} (goal <= 1.10)")


if __name__ == "__main__":
    main()
