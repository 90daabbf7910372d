"""Benchmark Snakemake's start-up (`snakemake --version`) on a host whose Slurm controller cannot be
reached against one without Slurm, side by side in one run (the machine is noisy: only figures
taken in the same run mean anything).

- unreachable: the machine's own Slurm commands and configuration in a network namespace of its
  own (`unshare -n`: no interface but a loopback that is down), so scontrol finds no controller;
- no Slurm: an scontrol that fails at once first on the PATH (as bench/hosts.py's one-host side).
Each checkout's .venv is timed (give several to compare, e.g. main's and a work tree's), in
alternating order:
    .venv/bin/python -m bench.startup [--rounds 3] [CHECKOUT ...]
"""

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent


def seconds(command, env):
    started = time.monotonic()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkouts", nargs="*", type=Path, default=[PROJECT], help="project checkouts whose .venv to time")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    isolate = ["unshare", "-n"] if os.geteuid() == 0 else ["unshare", "-rn"]
    times = {}
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "scontrol").write_text("#!/bin/sh\nexit 1\n")
        (Path(folder) / "scontrol").chmod(0o755)
        kinds = {
            "unreachable": dict(os.environ),
            "no Slurm": {**os.environ, "PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"},
        }
        for number in range(args.rounds):
            for checkout in args.checkouts if number % 2 == 0 else reversed(args.checkouts):
                for kind, env in kinds.items() if number % 2 == 0 else reversed(kinds.items()):
                    elapsed = seconds([*isolate, checkout / ".venv" / "bin" / "snakemake", "--version"], env)
                    times.setdefault((checkout, kind), []).append(elapsed)
                    print(f"  round {number + 1}, {checkout}, {kind:11s}: {elapsed:5.2f} s", flush=True)
    print(f"\nsnakemake --version, median of {args.rounds}:")
    for checkout in args.checkouts:
        unreachable = statistics.median(times[checkout, "unreachable"])
        none = statistics.median(times[checkout, "no Slurm"])
        print(f"   {checkout}: unreachable controller {unreachable:.2f} s, no Slurm {none:.2f} s, "
              f"difference {unreachable - none:+.2f} s (goal <= 1 s)")


if __name__ == "__main__":
    main()
