"""Benchmark the build service and its client (issue 17), side by side in one run on loopback
(this machine is noisy, so only ratios taken in the same run mean anything):

1. the workflow's cold chain (resolve -> SIF) with `builder: {kind: http}` against a service on
   loopback, against the same chain with the builder over SSH (an sshd of the benchmark's own, as
   bench/remote.py), on the same repository and commit, Docker's build cache emptied before each;
2. the SIF download of the http builder (checksummed, resumable) against `curl` of the same SIF
   from the same service;
3. 200 clients asking for one new commit at once, each then following the build's event stream:
   how many builds ran, how many different sha256 the clients got, the time from each request
   to its first event (p50, p95), and the service's memory while the 200 streams are open.

Run it as the account that runs the workflow:
    .venv/bin/python -m bench.http_builder [--chains N] [--repo tiny|example] [--repeat N] [--clients 200]
"""

import argparse
import concurrent.futures
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

from bench.remote import empty_docker_cache, quiet
from repo2singularity.builders.http import HTTPBuilderSettings, ServiceClient
from tests.conftest import GitRepo
from tests.service_server import Client, ProcessServer, add_user, write_settings
from tests.test_remote import Sshd, builder_config, keygen

PROJECT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

TOKEN_ENV = "R2S_SERVICE_TOKEN"


class Service:
    """A service of the benchmark's own on loopback, with a fresh work folder (nothing cached)."""

    def __init__(self, base, name, **settings):
        self.work = base / f"service-{name}"
        config = write_settings(base / f"service-{name}.yaml", work_dir=str(self.work), port=0, allowed_schemes=["file"], **settings)
        self.token = add_user(self.work, "bench")
        self.server = ProcessServer(config)
        self.url = self.server.url

    def stop(self):
        self.server.stop()


def chain(base, repo, sha, mode, round_number, lab):
    workdir = base / f"chain-{mode}-{round_number}"
    workdir.mkdir()
    command = [BIN / "snakemake", "--snakefile", PROJECT / "Snakefile", "--directory", workdir, "--cores", "2", "build",
               "--config", f"repo=file://{repo.path}", "ref=main", "name=bench"]
    env = dict(os.environ)
    service = None
    if mode == "ssh":
        command += ["--configfile", builder_config(lab, workdir)]
    else:
        service = Service(base, f"chain-{round_number}")
        settings = workdir / "http-builder.yaml"
        settings.write_text(yaml.safe_dump({"builder": {"kind": "http", "url": service.url, "token_env": TOKEN_ENV}}))
        command += ["--configfile", settings]
        env[TOKEN_ENV] = service.token
    empty_docker_cache(f"r2s-bench:{sha}")
    try:
        started = time.monotonic()
        quiet(command, env=env)
        return time.monotonic() - started
    finally:
        if service:
            service.stop()


def run_chains(base, args):
    repo = GitRepo(base / "repo", branch="main")
    if args.repo == "example":
        shutil.copytree(PROJECT / "example", repo.path, dirs_exist_ok=True)
        repo.commit("example")
    else:
        repo.commit("tiny", {"Dockerfile": "FROM debian:bookworm\nRUN head -c 24000000 /dev/urandom > /blob\n"})
    sha = repo.head()
    keys = base / "keys"
    keys.mkdir()
    client_key = keygen(keys / "client")
    sshd = Sshd(base / "sshd", client_key)
    known_hosts = base / "known_hosts"
    known_hosts.write_text(sshd.known_hosts_line())
    lab = {"base": base, "sshd": sshd, "client_key": client_key, "known_hosts": known_hosts}
    results = {"http": [], "ssh": []}
    try:
        for round_number in range(args.chains):
            for mode in ("http", "ssh") if round_number % 2 == 0 else ("ssh", "http"):
                seconds = chain(base, repo, sha, mode, round_number, lab)
                results[mode].append(seconds)
                print(f"   round {round_number + 1}, {mode}: {seconds:.1f} s", flush=True)
    finally:
        sshd.stop()
    medians = {mode: statistics.median(times) for mode, times in results.items()}
    print(f"\n1. cold chain (resolve -> SIF), repo {args.repo}, median of {args.chains}:")
    for mode, times in results.items():
        print(f"   {mode:5s} builder {medians[mode]:7.1f} s   ({', '.join(f'{t:.1f}' for t in times)})")
    print(f"   ratio service / SSH builder: {medians['http'] / medians['ssh']:.2f} (goal <= 1.05)")


def built(service, repo):
    client = Client(service.url, service.token)
    build = client.build(f"file://{repo.path}", "main", image_name="bench").json()
    final = client.events(build["id"])[-1]
    assert final["phase"] == "built", final
    return build, final


def run_download(base, args, repo):
    service = Service(base, "download")
    try:
        build, final = built(service, repo)
        client = ServiceClient(HTTPBuilderSettings(service.url, TOKEN_ENV, ""), environ={TOKEN_ENV: service.token})
        times = {"http builder (sha256, resumable)": [], "curl": []}
        for _ in range(args.repeat):
            target = base / "down" / "builder.sif"
            target.parent.mkdir(exist_ok=True)
            target.unlink(missing_ok=True)
            started = time.monotonic()
            client.download(build["id"], target, final["sif_sha256"], final["sif_size"])
            times["http builder (sha256, resumable)"].append(time.monotonic() - started)
            copy = base / "down" / "curl.sif"
            copy.unlink(missing_ok=True)
            started = time.monotonic()
            quiet(["curl", "-fsS", "-H", f"Authorization: token {service.token}", "-o", copy, service.url + build["sif_url"]])
            times["curl"].append(time.monotonic() - started)
        rates = {name: final["sif_size"] / 1e6 / statistics.median(values) for name, values in times.items()}
        print(f"\n2. the SIF ({final['sif_size'] / 1e6:.0f} MB) from the service on loopback, median of {args.repeat}:")
        for name, rate in rates.items():
            print(f"   {name:34s} {rate:7.1f} MB/s   ({', '.join(f'{t:.2f}' for t in times[name])} s)")
        print(f"   ratio http builder / curl: {rates['http builder (sha256, resumable)'] / rates['curl']:.2f} (goal >= 0.9)")
    finally:
        service.stop()


def run_crowd(base, args, repo):
    repo.commit("crowd", {"crowd.txt": str(time.time())})
    service = Service(base, "crowd", max_builds=1)
    process = psutil.Process(service.server.process.pid)
    first_event = []
    finals = []
    ids = set()
    barrier = threading.Barrier(args.clients)
    lock = threading.Lock()

    def client(_):
        session = Client(service.url, service.token)
        barrier.wait()
        started = time.monotonic()
        build = session.build(f"file://{repo.path}", "main", image_name="bench").json()
        last = None
        with session.session.get(service.url + build["events_url"], stream=True, timeout=900) as answer:
            for line in answer.iter_lines(decode_unicode=True):
                if line.startswith("data: "):
                    if last is None:
                        with lock:
                            first_event.append(time.monotonic() - started)
                    last = json.loads(line[6:])
        with lock:
            ids.add(build["id"])
            finals.append(last)

    memory = []
    done = threading.Event()

    def sample():
        while not done.is_set():
            connections = len([c for c in process.net_connections("tcp") if c.status == psutil.CONN_ESTABLISHED])
            memory.append((process.memory_info().rss, connections))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    rss_before = process.memory_info().rss
    sampler.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(client, range(args.clients)))
    finally:
        done.set()
        sampler.join()
        service.stop()
    builds = len(list((service.work / "builds").iterdir()))
    streaming = [rss for rss, connections in memory if connections >= args.clients]
    ordered = sorted(first_event)
    p95 = ordered[max(0, int(round(0.95 * len(ordered))) - 1)]
    print(f"\n3. {args.clients} clients asking for one new commit at once, then following its events:")
    print(f"   builds run: {builds}   build ids answered: {len(ids)}   final phases: {sorted({f['phase'] for f in finals})}")
    print(f"   different sha256 received: {len({f.get('sif_sha256') for f in finals})}")
    print(f"   request -> first event: p50 {statistics.median(ordered):.3f} s, p95 {p95:.3f} s, max {ordered[-1]:.3f} s (goal p95 <= 1 s)")
    if streaming:
        print(f"   service memory (RSS): {rss_before / 1e6:.0f} MB idle, {max(streaming) / 1e6:.0f} MB at most "
              f"while {args.clients} event streams were open")
    else:
        print(f"   service memory (RSS): {rss_before / 1e6:.0f} MB idle, {max(r for r, _ in memory) / 1e6:.0f} MB at most")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chains", type=int, default=1, help="cold chains of each kind, alternating")
    parser.add_argument("--repo", choices=("tiny", "example"), default="tiny",
                        help="tiny: FROM debian:bookworm + 24 MB of random bytes; example: the bundled Jupyter example")
    parser.add_argument("--repeat", type=int, default=3, help="downloads of each kind (median taken)")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--only", choices=("chain", "download", "crowd"), help="run one part only")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="r2s-bench-http-"))
    try:
        if args.only in (None, "chain"):
            run_chains(base, args)
        if args.only in (None, "download", "crowd"):
            repo = GitRepo(base / "served", branch="main")
            shutil.copytree(PROJECT / "example", repo.path, dirs_exist_ok=True)
            repo.commit("example")
            if args.only in (None, "download"):
                run_download(base, args, repo)
            if args.only in (None, "crowd"):
                run_crowd(base, args, repo)
    finally:
        subprocess.run(["rm", "-rf", str(base)], check=False)


if __name__ == "__main__":
    main()
