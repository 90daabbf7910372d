"""Benchmark the registry client (issue 12) against a loopback registry, side by side in one run
(this machine is noisy, so only ratios taken in the same run mean anything):

1. pulling a SIF of the example's size (a SIF made by apptainer around random bytes) with the
   client (manifest lookup, sha256 on the way, fsync, rename, checksum file) against `curl` of
   the same blob, and against `apptainer pull oras://`; pushing it against `apptainer push`.
   Side by side, oras-py (the `oras` package, issue 18: take it where it is as fast and as
   safe): its push of the same SIF in the same layout, its pull of the image our client pushed,
   and its pull followed by the sha256 check it lacks. Peak memory (RSS growth) of each
   in-process leg is shown, since oras-py's push reads the whole SIF into memory. Goal: pull >= 0.8x curl's throughput. The client flushes the SIF to disk before it takes
   its name (as every download of the workflow does), curl does not: "curl + fsync" is curl
   with the same guarantee, for reference. Shown as the median and the best of the rounds: on a
   machine shared with other work the best tells what each can do, the median what it did;
2. looking up 100 images that are all present: in parallel (one client, a bounded pool, as the
   workflow would) against one after another, in plain HTTP, with TLS + htpasswd, and with
   bearer tokens (a token per repository, as from GitHub's or Docker Hub's registries).

3. safety, once: what each pull does with a SIF blob that the registry's storage altered
   (the same size, other bytes; then bytes appended), and whether each keeps it; and what of
   the credentials reaches another host that a registry's upload `Location` names (a bearer
   token registry, as GitHub's; the other host answers 403 with a challenge of its own).

The registry is Debian's docker-registry (tests/registry_server.py), on 127.0.0.1. Run it as the
account that runs the workflow (Apptainer runs as itself); oras-py is no dependency of the
project, only of this benchmark (the `bench` extra):
    .venv/bin/pip install -e '.[bench]'   # or: .venv/bin/pip install oras
    .venv/bin/python -m bench.registry [--size-mb 260] [--rounds 5] [--images 100]
"""

import argparse
import base64
import hashlib
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil

from repo2singularity import registry
from repo2singularity.registry.client import EMPTY_CONFIG, SIF_CONFIG_TYPE, SIF_LAYER_TYPE
from tests.registry_server import CertificateAuthority, RegistryServer, TokenService

try:
    import oras.client
    import oras.version
except ModuleNotFoundError:
    sys.exit("bench/registry.py compares with oras-py, which is not installed: .venv/bin/pip install -e '.[bench]'")

PROJECT = Path(__file__).resolve().parent.parent

USER, PASSWORD = "bench", "bench-password"
VARIABLE = "R2S_BENCH_REGISTRY_CREDENTIALS"
SHA = "0" * 40


def make_sif(path, size):
    data = path.with_suffix(".data")
    with open(data, "wb") as handle:
        for _ in range(size // (1 << 20)):
            handle.write(os.urandom(1 << 20))
        handle.write(os.urandom(size % (1 << 20)))
    subprocess.run(["apptainer", "sif", "new", str(path)], check=True, capture_output=True)
    subprocess.run(["apptainer", "sif", "add", "--datatype", "4", "--parttype", "3", "--partfs", "1", "--partarch", "2", "--groupid", "1", str(path), str(data)], check=True, capture_output=True)
    data.unlink()
    return path


def curl_synced(url, path):
    subprocess.run(["curl", "-sSf", "-o", str(path), url], check=True)
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def timed(function):
    started = time.monotonic()
    function()
    return time.monotonic() - started


def cpu_seconds():
    """CPU time (user + system) of this process and of its finished children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class PeakMemory:
    """The growth of this process's resident memory while a block runs, sampled every 10 ms."""

    def __init__(self):
        self.process = psutil.Process()
        self.growth = 0

    def __enter__(self):
        self.baseline = self.process.memory_info().rss
        self.done = threading.Event()
        self.sampler = threading.Thread(target=self.sample, daemon=True)
        self.sampler.start()
        return self

    def sample(self):
        while not self.done.wait(0.01):
            self.growth = max(self.growth, self.process.memory_info().rss - self.baseline)

    def __exit__(self, *exc):
        self.done.set()
        self.sampler.join()


def measured(times, cpu, label, function, memory=None):
    """Wall and CPU seconds of `function`: the CPU time tells the cost apart from the waiting,
    which other work on a shared machine stretches; with `memory`, the peak RSS growth too."""
    before = cpu_seconds()
    with PeakMemory() as peak:
        times[label].append(timed(function))
    cpu[label].append(cpu_seconds() - before)
    if memory is not None:
        memory[label].append(peak.growth)


def oras_client():
    """oras-py as its README shows it: plain HTTP to this registry (insecure), no credentials
    needed (the transfer registry is open). A fresh client each time, as ours."""
    return oras.client.OrasClient(insecure=True, auth_backend="basic")


def oras_push(host, sif, name, config):
    """The SIF in apptainer's layout (ours too): a SIF layer titled with the file's name, and an
    empty JSON config of the SIF config type; oras-py's default, monolithic upload."""
    oras_client().push(
        target=f"{host}/bench/{name}:{SHA}",
        files=[f"{sif}:{SIF_LAYER_TYPE}"],
        manifest_config=f"{config}:{SIF_CONFIG_TYPE}",
        disable_path_validation=True,
        quiet=True,
    )


def oras_pull(host, name, folder):
    return Path(oras_client().pull(target=f"{host}/bench/{name}:{SHA}", outdir=str(folder))[0])


def oras_pull_checked(host, name, folder, digest):
    """oras-py's pull, then the sha256 check it does not make (reading the SIF again)."""
    pulled = oras_pull(host, name, folder)
    if hashlib.sha256(pulled.read_bytes()).hexdigest() != digest:
        pulled.unlink()
        sys.exit("oras-py pulled another SIF than the one pushed")


def client_for(host, ca=None, workers=registry.LOOKUP_WORKERS, namespace="lab"):
    settings = registry.RegistrySettings.from_url(
        f"oras://{host}/{namespace}", mode="push", credentials_variable=VARIABLE, ca_file=str(ca.ca_file) if ca else ""
    )
    return registry.RegistryClient(settings, environ={"HOME": "/nonexistent", VARIABLE: f"{USER}:{PASSWORD}"}, workers=workers, progress=None)


def transfers(scratch, size, rounds):
    """Seconds of each way to move the SIF, measured alternately, `rounds` times each."""
    sif = make_sif(scratch / "example.sif", size)
    digest = hashlib.sha256(sif.read_bytes()).hexdigest()
    server = RegistryServer(scratch / "transfer-registry").start()
    env = {**os.environ, "HOME": str(scratch / "home"), "APPTAINER_CACHEDIR": str(scratch / "cache")}
    out = scratch / "out"
    times = {
        "client pull": [], "oras pull": [], "oras pull+sha": [], "curl": [], "curl + fsync": [], "apptainer pull": [],
        "client push": [], "oras push": [], "apptainer push": [],
    }
    cpu = {label: [] for label in times}
    memory = {label: [] for label in ("client pull", "oras pull", "client push", "oras push")}
    config = scratch / "config.json"
    config.write_bytes(EMPTY_CONFIG)
    try:
        for index in range(rounds):
            for folder in (out, scratch / "cache"):
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir()
            name = f"pushed{index}"
            # a fresh client each time, as a workflow step would have
            measured(times, cpu, "client push", lambda: client_for(server.host, namespace="bench").push(sif, name, SHA), memory)
            measured(times, cpu, "oras push", lambda: oras_push(server.host, sif, f"by-oras{index}", config), memory)
            apptainer_push = ["apptainer", "push", str(sif), f"{server.url('bench')}/by-apptainer{index}:{SHA}"]
            measured(times, cpu, "apptainer push", lambda: subprocess.run(apptainer_push, env=env, check=True, capture_output=True))
            blob_url = f"{server.base_url}/v2/bench/{name}/blobs/sha256:{digest}"
            measured(times, cpu, "curl", lambda: subprocess.run(["curl", "-sSf", "-o", str(out / "curl.sif"), blob_url], check=True))
            measured(times, cpu, "curl + fsync", lambda: curl_synced(blob_url, out / "curl-synced.sif"))
            pull = client_for(server.host, namespace="bench").pull_image
            measured(times, cpu, "client pull", lambda: pull(name, SHA, out / "client.sif", out / "client.sif.sha256"), memory)
            measured(times, cpu, "oras pull", lambda: oras_pull(server.host, name, out / "oras"), memory)
            measured(times, cpu, "oras pull+sha", lambda: oras_pull_checked(server.host, name, out / "oras-checked", digest))
            apptainer_pull = ["apptainer", "pull", "--disable-cache", str(out / "apptainer.sif"), f"{server.url('bench')}/{name}:{SHA}"]
            measured(times, cpu, "apptainer pull", lambda: subprocess.run(apptainer_pull, env=env, check=True, capture_output=True))
            for copy in ("curl.sif", "curl-synced.sif", "client.sif", "apptainer.sif", "oras/example.sif"):
                if hashlib.sha256((out / copy).read_bytes()).hexdigest() != digest:
                    sys.exit(f"{copy} is not the pushed SIF")
        # each reads what the other pushed: the same layout
        client_for(server.host, namespace="bench").pull_image("by-oras0", SHA, out / "interop.sif", out / "interop.sif.sha256")
        if hashlib.sha256((out / "interop.sif").read_bytes()).hexdigest() != digest:
            sys.exit("our client pulled another SIF than the one oras-py pushed")
        safety = altered_blob_pulls(server, scratch, sif, digest)
    finally:
        server.stop()
    return times, cpu, memory, safety


def altered_blob_pulls(server, scratch, sif, digest):
    """What each client does with the SIF blob of `pushed0` once the registry's storage holds
    other bytes for it: of the same size, then more. {case: (ours, oras-py's)}, each a line."""
    blob = server.blob_file(f"sha256:{digest}")
    original = blob.read_bytes()
    cases = {
        "same size, one byte changed": original[: len(original) // 2] + bytes([original[len(original) // 2] ^ 1]) + original[len(original) // 2 + 1 :],
        "1 MB appended": original + os.urandom(1 << 20),
    }
    outcomes = {}
    for case, content in cases.items():
        blob.write_bytes(content)
        folder = scratch / "altered" / case.split()[0]
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        try:
            client_for(server.host, namespace="bench").pull_image("pushed0", SHA, folder / "client.sif", folder / "client.sif.sha256")
            ours = "kept it"
        except registry.RegistryError as error:
            kept = sorted(path.name for path in folder.iterdir())
            ours = f"refused ({str(error).split(': ', 1)[-1]}), kept {kept or 'nothing'}"
        try:
            pulled = oras_pull(server.host, "pushed0", folder / "oras")
            same = hashlib.sha256(pulled.read_bytes()).hexdigest() == digest
            theirs = f"kept {pulled.name} ({pulled.stat().st_size} bytes, {'the pushed SIF' if same else 'NOT the pushed SIF'}), no error"
        except Exception as error:  # whatever oras-py raises: it is reported, not judged here
            kept = sorted(str(path.relative_to(folder / "oras")) for path in (folder / "oras").rglob("*") if path.is_file())
            theirs = f"failed ({type(error).__name__}: {str(error)[:60]}), kept {kept or 'nothing'}"
        outcomes[case] = (ours, theirs)
    blob.write_bytes(original)
    return outcomes


class DelayRelay:
    """A TCP relay on 127.0.0.1 that holds what it forwards for `delay` seconds each way: the
    registry as if it were a round trip of 2 x delay away (lookups only; it is no bulk pipe)."""

    def __init__(self, target_port, delay):
        self.target_port, self.delay = target_port, delay
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for source, target in ((client, upstream), (upstream, client)):
                threading.Thread(target=self.pipe, args=(source, target), daemon=True).start()

    def pipe(self, source, target):
        try:
            while data := source.recv(1 << 16):
                time.sleep(self.delay)
                target.sendall(data)
            target.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self):
        self.listener.close()


def lookups(scratch, images, rounds, rtt):
    """Median seconds of looking up all images, in parallel and one after another, per set-up,
    straight on loopback and through a relay that adds a round-trip time."""
    ca = CertificateAuthority(scratch / "ca")
    token_service = TokenService(scratch / "token", {USER: PASSWORD}, thread=False)
    token_process = token_service.serve_in_process()
    tiny = make_sif(scratch / "tiny.sif", 1000)
    setups = {
        "plain HTTP": (RegistryServer(scratch / "plain"), None),
        "TLS + htpasswd": (RegistryServer(scratch / "tls", tls=ca, users={USER: PASSWORD}), ca),
        "bearer tokens": (RegistryServer(scratch / "token-registry", token_service=token_service), None),
    }
    names = [(f"image{index:03d}", SHA) for index in range(images)]
    results = {}
    try:
        for label, (server, trusted) in setups.items():
            server.start()
            pusher = client_for(server.host, trusted)
            for name, sha in names:
                pusher.push(tiny, name, sha)
            relay = DelayRelay(server.port, rtt / 2)
            hosts = {"loopback": server.host, f"+{rtt * 1000:.0f} ms RTT": f"127.0.0.1:{relay.port}"}
            if label == "bearer tokens":
                del hosts[f"+{rtt * 1000:.0f} ms RTT"]  # the token service is not behind the relay
            for where, host in hosts.items():
                parallel, sequential = [], []
                for _ in range(rounds):
                    # a fresh client each time: the connection, the auth check and the tokens count
                    client = client_for(host, trusted)
                    parallel.append(timed(lambda: check_all_found(client.lookup(names), images)))
                    client = client_for(host, trusted, workers=1)
                    sequential.append(timed(lambda: check_all_found({image: client.lookup_one(*image) for image in names}, images)))
                results[f"{label}, {where}"] = (statistics.median(parallel), statistics.median(sequential))
            relay.close()
            server.stop()
    finally:
        for server, _ in setups.values():
            server.stop()
        token_process.terminate()
        token_service.stop()
    return results


class ForeignLocation:
    """A registry with bearer tokens (its token service at /token, Basic USER:PASSWORD) whose
    upload sessions are on another host (127.0.0.2, a port of its own), which answers 403 with
    a bearer challenge of its own and records every Authorization header it gets."""

    TOKEN = "bench-bearer-token"

    def __init__(self):
        self.seen = []
        outer = self

        class Registry(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path.startswith("/token"):
                    expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
                    if self.headers.get("Authorization") == expected:
                        return self.answer(200, b'{"token": "%s"}' % outer.TOKEN.encode())
                    return self.answer(401)
                if self.authorized() and self.path == "/v2/":
                    return self.answer(200, b"{}")
                self.answer(404)

            def do_HEAD(self):
                if self.authorized():
                    self.answer(404)

            def do_POST(self):
                if self.authorized():
                    self.answer(202, headers={"Location": f"http://127.0.0.2:{outer.elsewhere.server_port}/upload/1"})

            def authorized(self):
                if self.headers.get("Authorization") == f"Bearer {outer.TOKEN}":
                    return True
                realm = f"http://127.0.0.1:{outer.registry.server_port}/token"
                self.answer(401, headers={"WWW-Authenticate": f'Bearer realm="{realm}",service="bench",scope="repository:lab/leak:pull,push"'})
                return False

            def answer(self, status, body=b"", headers=None):
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        class Elsewhere(Registry):
            def do_any(self):
                outer.seen.append(self.headers.get("Authorization") or "")
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                realm = f"http://127.0.0.2:{outer.elsewhere.server_port}/token"
                self.answer(403, headers={"WWW-Authenticate": f'Bearer realm="{realm}",service="elsewhere"'})

            do_GET = do_PUT = do_PATCH = do_POST = do_HEAD = do_any

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass  # a client that hangs up early (ours, trying TLS first on loopback) is no news

        self.registry = Server(("127.0.0.1", 0), Registry)
        self.elsewhere = Server(("127.0.0.2", 0), Elsewhere)
        for server in (self.registry, self.elsewhere):
            threading.Thread(target=server.serve_forever, daemon=True).start()

    @property
    def host(self):
        return f"127.0.0.1:{self.registry.server_port}"

    def what_reached_elsewhere(self):
        password = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        kinds = {"the password" if seen == password else "the bearer token" if seen == f"Bearer {self.TOKEN}" else seen[:20] for seen in self.seen if seen}
        self.seen.clear()
        return ", ".join(sorted(kinds)) or "nothing"

    def stop(self):
        for server in (self.registry, self.elsewhere):
            server.shutdown()
            server.server_close()


def foreign_location_pushes(scratch):
    """{client: (what reached the other host, how the push ended)} for a push to ForeignLocation."""
    tiny = make_sif(scratch / "leak.sif", 1000)
    registry_ = ForeignLocation()
    outcomes = {}
    try:
        try:
            client_for(registry_.host).push(tiny, "leak", SHA)
            ended = "pushed"
        except registry.RegistryError as error:
            ended = f"failed: {str(error).split(': ', 1)[-1][:90]}"
        outcomes["client"] = (registry_.what_reached_elsewhere(), ended)
        theirs = oras.client.OrasClient(insecure=True)  # the default backend: tokens
        theirs.auth.set_basic_auth(USER, PASSWORD)
        try:
            theirs.push(target=f"{registry_.host}/lab/leak:{SHA}", files=[f"{tiny}:{SIF_LAYER_TYPE}"], disable_path_validation=True, quiet=True)
            ended = "pushed"
        except Exception as error:  # whatever oras-py raises: it is reported, not judged here
            ended = f"failed: {type(error).__name__}: {str(error)[:70]}"
        outcomes["oras-py"] = (registry_.what_reached_elsewhere(), ended)
    finally:
        registry_.stop()
    return outcomes


def check_all_found(found, expected):
    if sum(1 for result in found.values() if isinstance(result, registry.Found)) != expected:
        sys.exit(f"not all images were found: {[result for result in found.values() if not isinstance(result, registry.Found)][:3]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=260)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--rtt-ms", type=float, default=20, help="round-trip time the relay adds for the lookups")
    args = parser.parse_args()
    size = int(args.size_mb * 1e6)

    scratch = Path(tempfile.mkdtemp(prefix="r2s-bench-registry-"))
    try:
        moved, cpu, memory, safety = transfers(scratch, size, args.rounds)
        leaks = foreign_location_pushes(scratch)
        looked_up = lookups(scratch, args.images, args.rounds, args.rtt_ms / 1000)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print(f"SIF of {size / 1e6:.0f} MB over a loopback registry (plain HTTP); {args.rounds} rounds, taken alternately")
    print(f"oras-py {oras.version.__version__}")
    print(f"  {'':16} {'median':>8} {'best':>8} {'CPU':>7} {'peak RSS':>9}")
    for label, values in moved.items():
        peak = f"{max(memory[label]) / 1e6:7.0f}MB" if label in memory else f"{'':9}"
        print(
            f"  {label:16} {statistics.median(values):7.2f}s {min(values):7.2f}s {statistics.median(cpu[label]):6.2f}s {peak}"
            f"  ({size / statistics.median(values) / 1e6:.0f} MB/s median)"
        )
    for measure in (statistics.median, min):
        seconds = {label: measure(values) for label, values in moved.items()}
        print(
            f"  {measure.__name__:6}: client pull {seconds['curl'] / seconds['client pull']:.2f}x curl's throughput (goal >= 0.80x), "
            f"{seconds['curl + fsync'] / seconds['client pull']:.2f}x curl + fsync's, "
            f"{seconds['apptainer pull'] / seconds['client pull']:.2f}x apptainer pull's; "
            f"client push {seconds['apptainer push'] / seconds['client push']:.2f}x apptainer push's"
        )
        print(
            f"  {'':6}  client pull {seconds['oras pull'] / seconds['client pull']:.2f}x oras-py pull's throughput, "
            f"{seconds['oras pull+sha'] / seconds['client pull']:.2f}x oras-py pull + sha256's; "
            f"client push {seconds['oras push'] / seconds['client push']:.2f}x oras-py push's"
        )
    print("\na SIF blob altered in the registry's storage, pulled by each")
    for case, (ours, theirs) in safety.items():
        print(f"  {case}:\n    client:  {ours}\n    oras-py: {theirs}")
    print("\na push whose upload Location is another host (127.0.0.2), which answers 403 with a challenge of its own")
    for label, (reached, ended) in leaks.items():
        print(f"  {label + ':':8} reached the other host: {reached}; {ended}")
    print(f"\nlooking up {args.images} images that are all present (a fresh client each round, {registry.LOOKUP_WORKERS} workers)")
    print(f"  {'':34} {'parallel':>9} {'one by one':>11} {'ratio':>6}")
    for label, (parallel, sequential) in looked_up.items():
        print(f"  {label:34} {parallel:8.2f}s {sequential:10.2f}s {sequential / parallel:5.1f}x")


if __name__ == "__main__":
    main()
