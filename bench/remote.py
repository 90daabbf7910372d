"""Benchmark the remote builder, side by side in one run on loopback (this machine is noisy, so
only ratios taken in the same run mean anything):

1. a SIF-sized file brought back through the builder transport (a paramiko exec stream, with the sha256
   and rename the workflow does) against OpenSSH `scp` of the same file from the same sshd;
2. the workflow's cold chain (resolve -> SIF) with the builder over SSH against the same chain
   with `builder: local`, on the same repository and commit, Docker's build cache emptied
   before each.

An sshd of the benchmark's own runs as this account on 127.0.0.1 (as in tests/test_remote.py).
Run it as the account that runs the workflow:
    .venv/bin/python -m bench.remote [--repeat N] [--chains N] [--size-mb 300] [--repo tiny|example] [--sif-conversion fast|apptainer]
With `--against CHECKOUT` (another checkout of the project, e.g. main's), the chains also run that
checkout's workflow over SSH, in the same rounds: a change's before and after from one run.
"""

import argparse
import csv
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from repo2singularity.files import sha256_file
from repo2singularity.ssh_transport import SSHTransport
from tests.conftest import GitRepo
from tests.test_remote import RUNTIME, Sshd, builder_config, keygen, ssh_settings

PROJECT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def quiet(command, **kwargs):
    subprocess.run([str(c) for c in command], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs)


def transfer(lab, source, size, repeat):
    target = ssh_settings({
        "host": "127.0.0.1", "port": lab["sshd"].port, "key_file": str(lab["client_key"]),
        "known_hosts": str(lab["known_hosts"]),
    }).target
    digest = sha256_file(source)
    rows = {"builder transport (stream + sha256)": [], "scp": [], "scp -O (reference)": [], "paramiko SFTP get (reference)": []}
    for _ in range(repeat):
        destination = lab["base"] / "down" / "bench.sif"
        destination.parent.mkdir(exist_ok=True)
        destination.unlink(missing_ok=True)
        started = time.monotonic()
        with SSHTransport(target) as connection:
            connection.download(str(source), destination, digest)
        rows["builder transport (stream + sha256)"].append(time.monotonic() - started)
        copy = lab["base"] / "down" / "scp.sif"
        copy.unlink(missing_ok=True)
        started = time.monotonic()
        quiet(["scp", "-q", "-P", lab["sshd"].port, "-i", lab["client_key"], "-o", f"UserKnownHostsFile={lab['known_hosts']}",
               "-o", "BatchMode=yes", f"127.0.0.1:{source}", copy])
        rows["scp"].append(time.monotonic() - started)
        # OpenSSH 9 scp speaks SFTP; -O is its old protocol, for reference
        copy.unlink()
        started = time.monotonic()
        quiet(["scp", "-O", "-q", "-P", lab["sshd"].port, "-i", lab["client_key"], "-o", f"UserKnownHostsFile={lab['known_hosts']}",
               "-o", "BatchMode=yes", f"127.0.0.1:{source}", copy])
        rows["scp -O (reference)"].append(time.monotonic() - started)
        # what the transport used before: paramiko's SFTP with prefetch (no hashing), for reference
        copy.unlink()
        started = time.monotonic()
        with SSHTransport(target) as connection:
            connection.client.open_sftp().get(str(source), str(copy), prefetch=True)
        rows["paramiko SFTP get (reference)"].append(time.monotonic() - started)
    return {name: size / statistics.median(times) / 1e6 for name, times in rows.items()}, rows


def empty_docker_cache(tag):
    subprocess.run(["docker", "image", "rm", "--force", tag], capture_output=True)
    quiet(["docker", "builder", "prune", "--all", "--force"])


def chain(lab, repo, sha, mode, round_number, sif_conversion, against=None):
    """Seconds of a cold chain, and each step's seconds from the workflow's own benchmark files."""
    workdir = lab["base"] / f"chain-{mode.replace(' (against)', '-against')}-{round_number}"
    workdir.mkdir()
    project = against if mode == "remote (against)" else PROJECT
    command = [BIN / "snakemake", "--snakefile", project / "Snakefile", "--directory", workdir, "--cores", "2", "build",
               "--config", f"repo={repo.path}", "ref=main", "name=bench", f"sif_conversion={sif_conversion}"]
    if mode.startswith("remote"):
        command += ["--configfile", builder_config(lab, workdir)]
    # the venv's editable install puts this checkout's library ahead of the path Snakemake adds
    # for a rule's script: the other checkout's library must come first, or both run this one's
    env = {**os.environ, "PYTHONPATH": str(project / "workflow" / "scripts")} if mode == "remote (against)" else None
    empty_docker_cache(f"r2s-bench:{sha}")
    started = time.monotonic()
    quiet(command, env=env)
    seconds = time.monotonic() - started
    steps = {}
    for tsv in (workdir / "results").glob("*/*/benchmarks/*.tsv"):
        with open(tsv) as handle:
            steps[tsv.stem] = float(next(csv.DictReader(handle, delimiter="\t"))["s"])
    return seconds, steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="transfers of each kind (median taken)")
    parser.add_argument("--chains", type=int, default=1, help="cold chains of each kind, alternating")
    parser.add_argument("--size-mb", type=int, default=300, help="size of the transferred file")
    parser.add_argument("--repo", choices=("tiny", "example"), default="tiny",
                        help="tiny: FROM debian:bookworm + 24 MB of random bytes; example: the bundled Jupyter example")
    parser.add_argument("--only", choices=("transfer", "chain"), help="run one part only")
    parser.add_argument("--sif-conversion", choices=("fast", "apptainer"), default="fast", help="the chains' SIF conversion")
    parser.add_argument("--against", type=Path, help="another checkout whose workflow also runs the remote chain, in the same rounds")
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="r2s-bench-remote-"))
    keys = base / "keys"
    keys.mkdir()
    client_key = keygen(keys / "client")
    sshd = Sshd(base / "sshd", client_key, sftp=True)  # SFTP only for the reference row
    known_hosts = base / "known_hosts"
    known_hosts.write_text(sshd.known_hosts_line())
    lab = {"base": base, "sshd": sshd, "client_key": client_key, "known_hosts": known_hosts}
    try:
        if args.only != "chain":
            run_transfer(lab, base, args)
        if args.only != "transfer":
            run_chains(lab, base, args)
    finally:
        sshd.stop()
        subprocess.run(["rm", "-rf", str(base)], check=False)


def run_transfer(lab, base, args):
    source = base / "payload.bin"
    with open(source, "wb") as handle:
        for _ in range(args.size_mb):
            handle.write(os.urandom(1 << 20))
    size = source.stat().st_size
    rates, times = transfer(lab, source, size, args.repeat)
    print(f"\n1. {size / 1e6:.0f} MB from the builder over loopback, median of {args.repeat}:")
    for name, rate in rates.items():
        print(f"   {name:36s} {rate:7.1f} MB/s   ({', '.join(f'{t:.2f}' for t in times[name])} s)")
    print(f"   ratio transport / scp: {rates['builder transport (stream + sha256)'] / rates['scp']:.2f} (goal >= 0.8)")


def run_chains(lab, base, args):
    repo = GitRepo(base / "repo", branch="main")
    if args.repo == "example":
        shutil.copytree(PROJECT / "example", repo.path, dirs_exist_ok=True)
        repo.commit("example")
    else:
        repo.commit("tiny", {"Dockerfile": "FROM debian:bookworm\nRUN head -c 24000000 /dev/urandom > /blob\n"})
    sha = repo.head()
    modes = ("local", "remote", "remote (against)") if args.against else ("local", "remote")
    results = {mode: [] for mode in modes}
    steps = {mode: [] for mode in modes}
    for round_number in range(args.chains):
        for mode in modes if round_number % 2 == 0 else reversed(modes):
            seconds, step_seconds = chain(lab, repo, sha, mode, round_number, args.sif_conversion, args.against)
            results[mode].append(seconds)
            steps[mode].append(step_seconds)
            print(f"   round {round_number + 1}, {mode}: {seconds:.1f} s", flush=True)
    medians = {mode: statistics.median(results[mode]) for mode in modes}
    print(f"\n2. cold chain (resolve -> SIF), repo {args.repo}, {RUNTIME}, {args.sif_conversion} SIF conversion, median of {args.chains}:")
    for mode in modes:
        print(f"   {mode:16s} {medians[mode]:7.1f} s   ({', '.join(f'{t:.1f}' for t in results[mode])})")
    print(f"   ratio remote / local: {medians['remote'] / medians['local']:.2f} (goal <= 1.10)")
    if args.against:
        print(f"   ratio remote ({args.against}) / local: {medians['remote (against)'] / medians['local']:.2f}")
    print("   each step, median (the workflow's benchmark files):")
    for step in sorted({name for runs in steps.values() for run in runs for name in run}):
        values = "   ".join(f"{mode} {statistics.median(run.get(step, 0.0) for run in steps[mode]):6.1f} s" for mode in modes)
        print(f"     {step:16s} {values}")


if __name__ == "__main__":
    main()
