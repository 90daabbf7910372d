"""Benchmark the journey across hosts against the same chain on one host, side by side in one run
(the machine is noisy: only ratios taken in the same run mean anything).

- three hosts: the login account on the login host runs `snakemake --profile remote sandbox`:
  build_image, save_image and build_sif on the builder over SSH (a veth link through a bridge),
  the SIF back to the login node, the sandbox unpacked by a Slurm job on node1;
- one host: the builder's account on the builder host runs `snakemake --cores 2 sandbox` with
  `builder: local`: the same tools on the same Docker engine, no SSH, no Slurm.
With `--target build` both stop at the SIF: the builder over SSH alone, without Slurm.

With `--cached`, the time to a notebook for a commit the registry already holds: a registry on
the login host (Debian's docker-registry), the commit built and pushed once (not timed), then
each round removes the commit's folder from the login account's results/ and times
`snakemake --profile remote --config repo=... ref=main launch_on=slurm registry_mode=pull ...`
until the run ends (the launch rule ends when the URL answers with the token), with where the
time went: Snakemake's own, each step's (the workflow's benchmark files) and the launch's phases.

`--against CHECKOUT` (another checkout of the project, e.g. main's) adds that checkout's workflow
as a second login-node copy, run in the same rounds (the three-host chain, or the cached launch):
a change's before and after from one run.

Both build the same repository from the login host's git daemon; every chain builds a commit of
its own (a fresh word in the repository), so every step runs. One untimed chain of each kind comes
first: repo2docker passes the account's uid to the build, so each kind has layers of its own in
Docker's cache, and both start warm. Then the order alternates (3, 1, 1, 3, ...). The topology is
that of tests/hosts (set up and torn down here), so run it as root:
    .venv/bin/python -m bench.hosts [--rounds 2] [--repo jupyter|tiny] [--target sandbox|build] [--cached] [--against CHECKOUT]
"""

import argparse
import csv
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tests.hosts.lab import EXCLUDED, commit, make_builder, make_repo, open_lab, ready_login_node
from tests.hosts.topology import STATE, LabRegistry, run

PROJECT = Path(__file__).resolve().parent.parent

SNAKEMAKE = Path(sys.executable).with_name("snakemake")
STEPS = ("clone_source", "build_image", "save_image", "build_sif", "unpack_sandbox")
CACHED_STEPS = ("pull_sif", "unpack_sandbox", "launch_jupyter")
JUPYTER_FILES = ("Dockerfile", "entrypoint", "start", "hello.ipynb", "README.md")


def repository_files(kind, word):
    if kind == "tiny":
        return {"Dockerfile": f"FROM debian:bookworm\nRUN head -c 24000000 /dev/urandom > /blob && echo {word} > /word\n"}
    return {**{name: PROJECT / "example" / name for name in JUPYTER_FILES}, "round.txt": f"{word}\n"}


def step_seconds(folder, steps=STEPS):
    seconds = {}
    for step in steps:
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

    def three_hosts(self, checkout=None):
        checkout = checkout or self.lab.checkout
        sha = self.new_commit()
        started = time.monotonic()
        as_login(self.lab, checkout, ["snakemake", "--profile", "remote", self.target, "--config", f"repo={self.url}", "ref=main"])
        elapsed = time.monotonic() - started
        return elapsed, step_seconds(next((checkout / "results").glob(f"*/{sha}")))

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


def as_login(lab, checkout, argv, **kwargs):
    """A command of the login account in one of its checkouts (lab.as_login runs in lab.checkout).
    The --against checkout shares the .venv, with the Slurm plugin as it is (as before
    setup/site/r2s_slurm_plugin.py)."""
    # the venv's repo2singularity is the lab checkout's (an editable install): the other
    # checkout's own package goes first on the path
    env = {"R2S_SLURM_PLUGIN_AS_IS": "1", "PYTHONPATH": str(checkout / "workflow" / "scripts")} if checkout.name.endswith("-against") else {}
    return lab.login.run(argv, user=lab.login_account, env=lab.venv_env(env), cwd=checkout, timeout=3600, **kwargs)


def against_checkout(lab, source):
    """A second copy of the project for the login account: `source`'s files, the lab checkout's
    .venv and filled-in builder.yaml (so only the workflow differs)."""
    target = lab.login_account.home / "repo2singularity-against"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    pack = subprocess.Popen(["tar", "-c", *EXCLUDED, "-C", str(source), "."], stdout=subprocess.PIPE)
    run(["tar", "-x", "-C", target], stdin=pack.stdout)
    assert pack.wait() == 0
    (target / ".venv").symlink_to(lab.checkout / ".venv")
    shutil.copy(lab.checkout / "profiles" / "remote" / "builder.yaml", target / "profiles" / "remote" / "builder.yaml")
    run(["chown", "-R", "-h", f"{lab.login_account.name}:{lab.login_account.name}", target])
    return target


LAUNCH_NOTE = re.compile(r"^\d{4}-\d\d-\d\dT[\d:]+\S* (?P<what>Slurm job \d+ .*)$")


def launch_phases(log):
    """The launch log's notes about its job (submitted, running, the sandbox, the answer)."""
    return [match["what"] for line in (Path(log).read_text().splitlines() if Path(log).exists() else []) if (match := LAUNCH_NOTE.match(line))]


def cached(args):
    """The time to a notebook for a commit the registry holds, with where the seconds went."""
    with open_lab() as lab:
        ready_login_node(lab, make_builder(lab))
        registry = LabRegistry(lab.network).start()
        checkouts = {"this": lab.checkout}
        if args.against:
            checkouts["against"] = against_checkout(lab, args.against)
        work = STATE / "repos" / "cached"
        make_repo(work, repository_files(args.repo, os.urandom(8).hex()))
        url = lab.git.publish("cached", work)
        sha = run(["git", "-C", work, "rev-parse", "HEAD"]).stdout.strip()
        config = [f"repo={url}", "ref=main", *registry.config()]
        started = time.monotonic()
        as_login(lab, lab.checkout, ["snakemake", "--profile", "remote", "build", "--config", *config, "registry_mode=push"])
        print(f"  built on the builder and pushed: {time.monotonic() - started:.1f} s (not counted)", flush=True)
        times = {name: [] for name in checkouts}
        steps = {name: [] for name in checkouts}
        for number in range(args.rounds):
            for name in checkouts if number % 2 == 0 else reversed(checkouts):
                checkout = checkouts[name]
                for folder in (checkout / "results").glob(f"*/{sha}"):
                    shutil.rmtree(folder)
                started = time.monotonic()
                result = as_login(lab, checkout, ["snakemake", "--profile", "remote", "--config", *config, "registry_mode=pull", "launch_on=slurm"],
                                  check=False)
                elapsed = time.monotonic() - started
                folder = next((checkout / "results").glob(f"*/{sha}"), None)
                connection = folder / "launch.json" if folder else None
                if result.returncode != 0 or not connection or not connection.exists():
                    raise SystemExit(f"the cached launch failed ({name}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
                answered = json.loads(connection.read_text())["url_with_token"]
                seconds = step_seconds(folder, CACHED_STEPS)
                times[name].append(elapsed)
                steps[name].append(seconds)
                print(f"  round {number + 1}, {name:7s}: {elapsed:5.1f} s to {answered.split('?')[0]}  "
                      + "  ".join(f"{step} {seconds.get(step, 0):.1f}" for step in CACHED_STEPS)
                      + f"  Snakemake and the rest {elapsed - sum(seconds.values()):.1f}", flush=True)
                for what in launch_phases(folder / "logs" / "launch_jupyter.log"):
                    print(f"      launch_jupyter: {what}", flush=True)
                as_login(lab, checkout, ["snakemake", "--profile", "remote", "stop", "--config", *config])
    print(f"\ncached commit -> URL answering with the token (launch_on=slurm), repo {args.repo}, median of {args.rounds}:")
    for name in checkouts:
        medians = {step: statistics.median(s.get(step, 0) for s in steps[name]) for step in CACHED_STEPS}
        total = statistics.median(times[name])
        print(f"   {name} ({args.against if name == 'against' else PROJECT}): {total:.1f} s (goal <= 15)  ({', '.join(f'{t:.1f}' for t in times[name])})")
        print("      " + "  ".join(f"{step} {value:.1f}" for step, value in medians.items())
              + f"  Snakemake and the rest {total - sum(medians.values()):.1f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="chains of each kind, in alternating order")
    parser.add_argument("--target", choices=("sandbox", "build"), default="sandbox", help="where the chain stops: the sandbox, or the SIF")
    parser.add_argument("--repo", choices=("jupyter", "tiny"), default="jupyter",
                        help="jupyter: the bundled example (Debian's Jupyter, a ~260 MB SIF); tiny: debian + 24 MB of random bytes")
    parser.add_argument("--cached", action="store_true", help="time a cached commit's launch on Slurm instead of the cold chain")
    parser.add_argument("--against", type=Path, help="another checkout run in the same rounds (before and after)")
    args = parser.parse_args()
    if args.cached:
        return cached(args)
    modes = ("three hosts", "one host", "three (against)") if args.against else ("three hosts", "one host")
    times = {mode: [] for mode in modes}
    steps = {mode: [] for mode in modes}
    with open_lab() as lab:
        ready_login_node(lab, make_builder(lab))
        chains = Chains(lab, args.repo, args.target)
        against = against_checkout(lab, args.against) if args.against else None
        run_chain = {"three hosts": chains.three_hosts, "one host": chains.one_host, "three (against)": lambda: chains.three_hosts(against)}
        for mode in modes:
            print(f"  warm-up, {mode:15s}: {run_chain[mode]()[0]:6.1f} s (not counted)", flush=True)
        for number in range(args.rounds):
            order = modes if number % 2 == 0 else tuple(reversed(modes))
            for mode in order:
                elapsed, seconds = run_chain[mode]()
                times[mode].append(elapsed)
                steps[mode].append(seconds)
                print(f"  round {number + 1}, {mode:15s}: {elapsed:6.1f} s  "
                      + "  ".join(f"{step} {seconds.get(step, 0):.1f}" for step in STEPS), flush=True)
    print(f"\ncold chain (resolve -> {args.target}), repo {args.repo}, median of {args.rounds}:")
    for mode in times:
        print(f"   {mode:15s} {statistics.median(times[mode]):7.1f} s   ({', '.join(f'{t:.1f}' for t in times[mode])})")
        medians = {step: statistics.median(s.get(step, 0) for s in steps[mode]) for step in STEPS}
        print("               " + "  ".join(f"{step} {value:.1f}" for step, value in medians.items()))
    ratio = statistics.median(times["three hosts"]) / statistics.median(times["one host"])
    print(f"   ratio three hosts / one host: {ratio:.2f} (goal <= 1.3)")
    if args.against:
        ratio = statistics.median(times["three (against)"]) / statistics.median(times["one host"])
        print(f"   ratio three hosts ({args.against}) / one host: {ratio:.2f}")


if __name__ == "__main__":
    main()
