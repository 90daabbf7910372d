"""The fast SIF conversion (repo2singularity/archive_to_sif.py) against `apptainer build`, from the
same `docker save` tarball, with the real Docker engine, repo2docker, mksquashfs and Apptainer.

Both SIFs are listed from the SIFs themselves (unsquashfs of the primary partition, with every
file's content hashed) and must hold the same files with the same type, mode, size, link target,
content and hard-link groups. The differences allowed are the deliberate ones, and each is
checked for what it is:
- owners: apptainer 1.4 building as an ordinary user records every file as root (-all-root);
  the fast SIF keeps the image's owners;
- device nodes: apptainer building without root writes an empty file in place of each device
  node (it warns "creating empty file in place of device"); the fast SIF keeps the device node;
- labels.json: its build date (the moment of each build).
Apptainer without root also drops a security.capability xattr, which the fast SIF keeps.
"""

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path

import psutil
import pytest

from repo2singularity import archive_to_sif

from .conftest import PROJECT, GitRepo
from .jupyter_client import api, execute

pytestmark = pytest.mark.integration

SCRIPT = PROJECT / "workflow" / "scripts" / "repo2singularity" / "archive_to_sif.py"
BIN = Path(sys.executable).parent
RUNTIME = "apptainer"
APPTAINER_ZSTD = ["--mksquashfs-args", "-comp zstd -Xcompression-level 3"]
BUILD_TIME_LABELS = {"org.label-schema.build-date"}
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
SMALL_DISK = Path("/mnt/r2s-small")

# Made to be hard: every RUN is a layer, and each undoes or bends something of the ones before.
HARD_DOCKERFILE = r"""
FROM debian:bookworm
RUN apt-get update && apt-get install -y --no-install-recommends libcap2-bin && rm -rf /var/lib/apt/lists/*
RUN set -e; mkdir -p /t/wh /t/opq/sub /t/swap/dir_then_file /t/links /t/dev; \
    echo gone > /t/wh/gone; echo kept > /t/wh/kept; mkdir /t/wh/gonedir; echo inner > /t/wh/gonedir/inner; \
    echo old > /t/opq/old; echo old2 > /t/opq/sub/old2; \
    echo file > /t/swap/file_then_dir; echo inside > /t/swap/dir_then_file/inside; \
    echo target > /t/links/target; ln /t/links/target /t/links/same_layer; echo lower > /t/links/lower; \
    echo grouped > /t/links/first; ln /t/links/first /t/links/second; ln /t/links/first /t/links/third
RUN set -e; rm -rf /t/wh/gone /t/wh/gonedir /t/opq; mkdir -p /t/opq; echo new > /t/opq/new; \
    rm /t/swap/file_then_dir; mkdir /t/swap/file_then_dir; echo child > /t/swap/file_then_dir/child; \
    rm -rf /t/swap/dir_then_file; echo now-a-file > /t/swap/dir_then_file
RUN set -e; rm -rf /t/swap/file_then_dir; echo file-again > /t/swap/file_then_dir; \
    rm /t/swap/dir_then_file; mkdir /t/swap/dir_then_file; echo dir-again > /t/swap/dir_then_file/again
RUN ln /t/links/lower /t/links/cross_layer
RUN rm /t/links/first
RUN set -e; ln -s /nonexistent/target /t/dangling_abs; ln -s nowhere /t/dangling_rel; \
    ln -s ../links/target /t/links/relative; ln -s /t/links/target /t/absolute; \
    long=$(printf '%0150d' 0 | tr 0 l); mkdir -p /t/names/$long; echo long > /t/names/$long/$long.txt; \
    ln -s /t/names/$long/$long.txt /t/names/long-target; ln /t/names/$long/$long.txt /t/names/$long/hard-$long; \
    echo grüße > "/t/names/grüße-日本語-€"; mkdir /t/names/ünïcödé; echo x > "/t/names/ünïcödé/a b"
RUN set -e; cp /bin/true /t/suid; chmod 4755 /t/suid; cp /bin/true /t/sgid; chmod 2755 /t/sgid; \
    mkdir /t/sticky; chmod 1777 /t/sticky; cp /bin/true /t/cap; setcap cap_net_raw+ep /t/cap; \
    mknod /t/dev/char c 1 3; mkfifo /t/dev/fifo; \
    echo owned > /t/owned; chown 1234:4321 /t/owned; mkdir /t/owned-dir; chown 4242:4243 /t/owned-dir; chmod 0750 /t/owned-dir
RUN set -e; mkdir /t/many; cd /t/many; seq 1 50000 | split -l 1000 - part-; \
    write='{ f = sprintf("f%05d", $1); for (i = 0; i <= $1 % 97; i++) print $1 > f; close(f) }'; \
    for part in part-*; do mkdir "d$part"; (cd "d$part" && awk "$write" "../$part"); rm "$part"; done
RUN truncate -s 1G /t/big
RUN set -e; rm /t/many/dpart-aa/f00001; echo changed > /t/many/dpart-aa/f00002
ENV A=1 B="two words" PATH=/t/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
LABEL org.example.test="hard" other="x & <y>"
ENTRYPOINT ["/bin/echo"]
CMD ["hello", "from the hard image"]
"""


def run(command, **kwargs):
    result = subprocess.run([str(part) for part in command], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def runtime(*args):
    return run([RUNTIME, *args], cwd="/")


# ------------------------------------------------------------------------------------ listing a SIF


def partition_offset(sif):
    for line in runtime("sif", "list", sif).splitlines():
        if "FS (Squashfs/*System" in line:
            return int(line.split("|")[3].split("-")[0])
    raise AssertionError(f"{sif} has no primary system partition")


ESCAPED = re.compile(rb"\\(.)")


def pseudo_name(line):
    """unsquashfs -pf writes a name with backslash escapes, then a space and the definition."""
    position = 0
    while True:
        space = line.index(b" ", position)
        backslashes = len(line[:space]) - len(line[:space].rstrip(b"\\"))
        if backslashes % 2 == 0:
            return ESCAPED.sub(rb"\1", line[:space]), line[space + 1 :]
        position = space + 1


class Listing:
    """Every entry of a SIF's root file system, read from the SIF with `unsquashfs -pf`: type,
    mode, owner, size, link target, device numbers, content hash, and hard-link groups."""

    def __init__(self, sif):
        command = ["unsquashfs", "-no-progress", "-o", str(partition_offset(sif)), "-pf", "/dev/stdout", str(sif)]
        process = subprocess.Popen(command, stdout=subprocess.PIPE)
        self.entries, links, data = {}, {}, []
        for line in process.stdout:
            if line == b"# START OF DATA - DO NOT MODIFY\n":
                process.stdout.readline()
                break
            if line.startswith(b"#"):
                continue
            name, definition = pseudo_name(line.rstrip(b"\n"))
            fields = definition.split(b" ")
            kind = fields[0].decode()
            if kind == "L":
                links[name] = ESCAPED.sub(rb"\1", definition[2:])
                continue
            entry = {"type": kind, "mode": int(fields[2], 8), "uid": int(fields[3]), "gid": int(fields[4])}
            if kind == "R":
                entry["size"] = int(fields[5])
                data.append((int(fields[6]), entry["size"], name))
            elif kind == "S":
                entry["target"] = ESCAPED.sub(rb"\1", definition.split(b" ", 5)[5])
            elif kind in ("C", "B"):
                entry["device"] = (int(fields[5]), int(fields[6]))
            self.entries[name] = entry
        position = 0
        for offset, size, name in sorted(data):  # an empty file shares the offset of the next one
            assert offset == position, f"unsquashfs -pf of {sif}: data of {name} at {offset}, expected {position}"
            position += size
            digest, left = hashlib.sha256(), size
            while left:
                chunk = process.stdout.read(min(left, 1 << 20))
                assert chunk, f"unsquashfs -pf of {sif} ended early"
                digest.update(chunk)
                left -= len(chunk)
            self.entries[name]["sha256"] = digest.hexdigest()
        process.stdout.read()
        assert process.wait() == 0, f"unsquashfs -pf {sif} failed"
        groups = {}
        for name, target in links.items():
            self.entries[name] = dict(self.entries[target])
            groups.setdefault(target, {target}).add(name)
        self.link_groups = {frozenset(group) for group in groups.values()}

    def __getitem__(self, name):
        return self.entries[name.encode() if isinstance(name, str) else name]

    def __contains__(self, name):
        return (name.encode() if isinstance(name, str) else name) in self.entries


def compare(fast, slow):
    """{name: {field: (fast, apptainer)}} for every entry that differs, and what is in one only."""
    only = set(fast.entries) ^ set(slow.entries)
    differences = {}
    for name in set(fast.entries) & set(slow.entries):
        a, b = fast.entries[name], slow.entries[name]
        fields = {key: (a.get(key), b.get(key)) for key in set(a) | set(b) if a.get(key) != b.get(key)}
        if fields:
            differences[name] = fields
    return only, differences


def assert_equivalent(fast_sif, apptainer_sif):
    """The two SIFs hold the same files; returns the fast listing and the owners it kept."""
    fast, slow = Listing(fast_sif), Listing(apptainer_sif)
    only, differences = compare(fast, slow)
    assert not only, f"entries in one SIF only: {sorted(only)[:20]}"
    assert fast.link_groups == slow.link_groups
    owners_kept = {}
    for name, fields in differences.items():
        if name == b".singularity.d/labels.json":
            assert set(fields) <= {"sha256", "size"}  # the build date: compared below without it
            continue
        if set(fields) <= {"uid", "gid"}:
            # apptainer without root: everything is root's; the fast SIF keeps the image's owner
            assert (slow.entries[name]["uid"], slow.entries[name]["gid"]) == (0, 0), name
            owners_kept[name] = (fast.entries[name]["uid"], fast.entries[name]["gid"])
            continue
        # apptainer without root: an empty regular file in place of a device node
        entry = fast.entries[name]
        assert entry["type"] in ("C", "B") and set(fields) <= {"type", "size", "sha256", "device", "uid", "gid"}, (name, fields)
        assert slow.entries[name]["type"] == "R" and slow.entries[name]["sha256"] == EMPTY_SHA256, (name, fields)
    labels = [json.loads(extract_file(sif, ".singularity.d/labels.json")) for sif in (fast_sif, apptainer_sif)]
    assert [without_build_time(label) for label in labels] == [without_build_time(labels[1])] * 2
    return fast, owners_kept


def extract_file(sif, name):
    return run(["unsquashfs", "-o", partition_offset(sif), "-cat", sif, name])


def without_build_time(labels):
    return {key: value for key, value in labels.items() if key not in BUILD_TIME_LABELS}


def assert_same_metadata(fast_sif, apptainer_sif):
    """apptainer inspect: labels (build time aside), environment, runscript, deffile; and the SIF's
    descriptors: the same objects in the same order, names and groups."""
    inspected = [json.loads(runtime("inspect", "--all", "--json", sif))["data"]["attributes"] for sif in (fast_sif, apptainer_sif)]
    for attributes in inspected:
        attributes["labels"] = without_build_time(attributes["labels"])
    assert inspected[0] == inspected[1]
    assert inspected[0]["environment"] and inspected[0]["runscript"]
    descriptors = [descriptor_table(sif) for sif in (fast_sif, apptainer_sif)]
    assert descriptors[0] == descriptors[1]


def descriptor_table(sif):
    rows = []
    for line in runtime("sif", "list", sif).splitlines():
        cells = [cell.strip() for cell in line.split("|")]
        if len(cells) == 5 and cells[0].isdigit():
            info = runtime("sif", "info", cells[0], sif)
            name = re.search(r"Name:\s+(\S+)", info)
            rows.append((cells[0], cells[1], cells[2], cells[4], name.group(1) if name else ""))
    return rows


# ------------------------------------------------------------------------------------ images


def docker_save(tag, tarball):
    run(["docker", "save", "--output", tarball, tag])
    return tarball


def remove_image(tag):
    subprocess.run(["docker", "image", "rm", "--force", tag], capture_output=True)


def build_both(tarball, folder, cli=False):
    """The fast SIF and apptainer's, at the same compression (zstd, as the project builds)."""
    fast, slow = folder / "fast.sif", folder / "apptainer.sif"
    lines = []
    if cli:
        # the script on its own with the system's python, no site-packages: the standard library only
        run(["/usr/bin/python3", "-I", "-S", SCRIPT, "--compression", "zstd", tarball, fast])
    else:
        archive_to_sif.convert(tarball, fast, "zstd", RUNTIME, progress=lines.append)
    runtime("build", *APPTAINER_ZSTD, slow, f"docker-archive://{tarball}")
    return fast, slow, lines


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    folder = tmp_path_factory.mktemp("archive-to-sif")
    yield folder
    subprocess.run(["chmod", "-R", "u+w", folder], capture_output=True)


@pytest.fixture(scope="module")
def hard(scratch):
    tag = f"r2s-test-sif-hard:{uuid.uuid4().hex[:8]}"
    context = scratch / "hard-context"
    context.mkdir()
    (context / "Dockerfile").write_text(HARD_DOCKERFILE)
    try:
        run(["docker", "build", "--quiet", "--tag", tag, context])
        tarball = docker_save(tag, scratch / "hard.tar")
        folder = scratch / "hard"
        folder.mkdir()
        fast, slow, lines = build_both(tarball, folder)
        yield {"tarball": tarball, "fast": fast, "apptainer": slow, "progress": lines}
    finally:
        remove_image(tag)


@pytest.fixture(scope="module")
def example(scratch):
    """The bundled example, built with repo2docker as the workflow builds it."""
    repo = GitRepo(scratch / "example-repo", branch="main")
    shutil.copytree(PROJECT / "example", repo.path, dirs_exist_ok=True)
    sha = repo.commit("example")
    tag = f"r2s-test-sif-example:{sha[:12]}"
    try:
        run([BIN / "repo2docker", "--no-run", "--image-name", tag, "--user-name", "jovyan", "--user-id", "1000", "--", repo.path])
        tarball = docker_save(tag, scratch / "example.tar")
        folder = scratch / "example"
        folder.mkdir()
        fast, slow, _ = build_both(tarball, folder)
        yield {"tarball": tarball, "fast": fast, "apptainer": slow}
    finally:
        remove_image(tag)


@pytest.fixture(scope="module")
def base_tarball(scratch):
    """debian:bookworm as docker saves it: the raw material of the crafted and broken tarballs."""
    return docker_save("debian:bookworm", scratch / "base.tar")


# ------------------------------------------------------------------------------------ the hard image


def test_hard_image_matches_apptainer_but_for_owners_and_device_nodes(hard):
    fast, owners = assert_equivalent(hard["fast"], hard["apptainer"])
    assert owners[b"t/owned"] == (1234, 4321)
    assert owners[b"t/owned-dir"] == (4242, 4243)
    assert owners[b"etc/shadow"] == (0, 42)
    assert fast["t/dev/char"] == {"type": "C", "mode": 0o644, "uid": 0, "gid": 0, "device": (1, 3)}


def test_hard_image_layers_are_applied_in_order(hard):
    fast = Listing(hard["fast"])
    long = "l" * 150
    assert "t/wh/gone" not in fast and "t/wh/gonedir" not in fast and fast["t/wh/kept"]["type"] == "R"
    assert [name for name in fast.entries if name.startswith(b"t/opq/")] == [b"t/opq/new"]
    assert fast["t/swap/file_then_dir"]["type"] == "R" and fast["t/swap/dir_then_file"]["type"] == "D"
    assert "t/swap/dir_then_file/inside" not in fast and fast["t/swap/dir_then_file/again"]["type"] == "R"
    # hard links: within a layer, to a file of a lower layer, and a group whose first name was deleted
    groups = fast.link_groups
    assert frozenset({b"t/links/same_layer", b"t/links/target"}) in groups
    assert frozenset({b"t/links/cross_layer", b"t/links/lower"}) in groups
    assert frozenset({b"t/links/second", b"t/links/third"}) in groups and "t/links/first" not in fast
    assert fast["t/links/second"]["sha256"] == hashlib.sha256(b"grouped\n").hexdigest()
    assert frozenset({f"t/names/{long}/{long}.txt".encode(), f"t/names/{long}/hard-{long}".encode()}) in groups
    assert fast["t/dangling_abs"]["target"] == b"/nonexistent/target" and fast["t/dangling_rel"]["target"] == b"nowhere"
    assert fast["t/names/long-target"]["target"] == f"/t/names/{long}/{long}.txt".encode()
    assert fast["t/names/grüße-日本語-€"]["sha256"] == hashlib.sha256("grüße\n".encode()).hexdigest()
    assert fast["t/names/ünïcödé/a b"]["type"] == "R"
    assert fast["t/suid"]["mode"] == 0o4755 and fast["t/sgid"]["mode"] == 0o2755 and fast["t/sticky"]["mode"] == 0o1777
    assert fast["t/dev/fifo"]["type"] == "I"
    many = [name for name in fast.entries if name.startswith(b"t/many/") and fast.entries[name]["type"] == "R"]
    assert len(many) == 49_999 and fast["t/many/dpart-aa/f00002"]["sha256"] == hashlib.sha256(b"changed\n").hexdigest()
    zeros = hashlib.sha256()
    for _ in range(1024):
        zeros.update(bytes(1 << 20))
    assert fast["t/big"]["size"] == 1 << 30 and fast["t/big"]["sha256"] == zeros.hexdigest()


def test_hard_image_keeps_the_file_capability_that_apptainer_drops(hard, tmp_path):
    def capability_in(sif):
        target = tmp_path / Path(sif).stem
        result = subprocess.run(
            ["unsquashfs", "-o", str(partition_offset(sif)), "-d", str(target), str(sif), "t/cap"], capture_output=True, text=True
        )
        # an ordinary user cannot set security.* xattrs: unsquashfs says so when the SIF has one
        return "could not write xattr security.capability" in result.stderr

    assert capability_in(hard["fast"])
    assert not capability_in(hard["apptainer"])


def test_hard_image_metadata_matches_apptainer(hard):
    assert_same_metadata(hard["fast"], hard["apptainer"])
    for sif in (hard["fast"], hard["apptainer"]):
        assert runtime("run", sif).strip() == "hello from the hard image"
        assert runtime("exec", "--cleanenv", sif, "sh", "-c", 'echo "$A|$B|$PATH"').strip() == (
            "1|two words|/t/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        )
    labels = json.loads(runtime("inspect", "--json", "--labels", hard["fast"]))["data"]["attributes"]["labels"]
    assert labels["other"] == "x & <y>"
    assert labels["org.label-schema.usage.singularity.deffile.from"] == str(hard["tarball"])


def test_a_terminated_conversion_leaves_nothing(hard, tmp_path):
    output, probes = tmp_path / "out", tmp_path / "probes"
    output.mkdir()
    probes.mkdir()
    command = ["/usr/bin/python3", "-I", "-S", SCRIPT, "--tmpdir", probes, "--compression", "zstd", hard["tarball"], output / "x.sif"]
    process = subprocess.Popen([str(part) for part in command], stderr=subprocess.PIPE, text=True)
    for line in process.stderr:
        if "streaming:" in line:  # mksquashfs runs, the partial SIF exists
            break
    assert list(output.iterdir()), "no partial SIF while streaming"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 143
    assert not list(output.iterdir()) and not list(probes.iterdir())
    left = [proc.info["cmdline"] for proc in psutil.process_iter(["cmdline"]) if str(output) in " ".join(proc.info["cmdline"] or [])]
    assert not left, left


def test_progress_says_how_far_it_is(hard):
    assert any(re.search(r"\b\d{1,3}% \(", line) for line in hard["progress"]), hard["progress"]
    assert hard["progress"][-1].startswith(f"wrote {hard['fast']}")


# ------------------------------------------------------------------------------------ the example


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_example_matches_apptainer(example):
    fast, owners = assert_equivalent(example["fast"], example["apptainer"])
    assert owners[b"home/jovyan"] == (1000, 1000)
    assert_same_metadata(example["fast"], example["apptainer"])


def test_example_runs_jupyter_and_a_kernel(example, tmp_path):
    token = uuid.uuid4().hex
    env_file = tmp_path / "env"
    env_file.write_text(f"JUPYTER_TOKEN={token}\n")
    env_file.chmod(0o600)
    home = tmp_path / "home"
    home.mkdir()
    port = free_port()
    command = [RUNTIME, "run", "--cleanenv", "--env-file", env_file, "--home", home, "--pwd", "/home/jovyan"]
    command += [example["fast"], "jupyter", "notebook", "--ip=127.0.0.1", f"--port={port}", "--no-browser"]
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([str(part) for part in command], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if api(url, "api/status", token).status_code == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(1)
        assert api(url, "api/status").status_code == 403
        assert execute(url, token, "import numpy, os; print(numpy.arange(7).sum() * 2, os.path.exists('hello.ipynb'))") == "42 True"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def test_example_unpacks_into_a_sandbox(example, tmp_path):
    sandbox = tmp_path / "sandbox"
    runtime("build", "--sandbox", sandbox, example["fast"])
    try:
        assert (sandbox / "home/jovyan/hello.ipynb").is_file()
        assert runtime("exec", sandbox, "python3", "-c", "import notebook, numpy; print('ok')").strip() == "ok"
    finally:
        subprocess.run(["chmod", "-R", "u+w", sandbox], capture_output=True)
        shutil.rmtree(sandbox, ignore_errors=True)


# ------------------------------------------------------------------------------------ crafted archives


def tar_bytes(members):
    """An uncompressed tar of (TarInfo, data) pairs."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def entry(name, type_=tarfile.REGTYPE, data=None, mode=0o644, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname, info.mtime = type_, mode, linkname, 1_700_000_000
    info.size = len(data) if data is not None else 0
    return info, data


def read_saved(tarball):
    """(manifest entry, config, [uncompressed layer tars]) of a legacy docker save tarball."""
    with tarfile.open(tarball) as archive:
        manifest = json.load(archive.extractfile("manifest.json"))[0]
        config = json.load(archive.extractfile(manifest["Config"]))
        layers = [archive.extractfile(name).read() for name in manifest["Layers"]]
    return manifest, config, layers


def write_oci_layout(tarball, config, layers, compress):
    """A tarball as newer Docker engines save one: an OCI image layout plus manifest.json, whose
    layers may be gzip-compressed blobs."""
    blobs, descriptors = [], []
    for layer in layers:
        blob = gzip.compress(layer, compresslevel=1, mtime=0) if compress else layer
        blobs.append(blob)
        media = "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if compress else "")
        descriptors.append({"mediaType": media, "digest": "sha256:" + hashlib.sha256(blob).hexdigest(), "size": len(blob)})
    config = dict(config, rootfs={"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest() for layer in layers]})
    config_data = json.dumps(config).encode()
    config_digest = hashlib.sha256(config_data).hexdigest()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": f"sha256:{config_digest}", "size": len(config_data)},
        "layers": descriptors,
    }
    manifest_data = json.dumps(manifest).encode()
    manifest_digest = hashlib.sha256(manifest_data).hexdigest()
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": manifest["mediaType"], "digest": f"sha256:{manifest_digest}", "size": len(manifest_data)}],
    }
    docker_manifest = [
        {
            "Config": f"blobs/sha256/{config_digest}",
            "RepoTags": ["r2s-test-sif-crafted:latest"],
            "Layers": [f"blobs/sha256/{d['digest'].split(':')[1]}" for d in descriptors],
        }
    ]
    members = [entry("oci-layout", data=b'{"imageLayoutVersion":"1.0.0"}'), entry("index.json", data=json.dumps(index).encode())]
    members.append(entry("manifest.json", data=json.dumps(docker_manifest).encode()))
    members += [entry("blobs/", tarfile.DIRTYPE, mode=0o755), entry("blobs/sha256/", tarfile.DIRTYPE, mode=0o755)]
    for blob in [config_data, manifest_data, *blobs]:
        members.append(entry(f"blobs/sha256/{hashlib.sha256(blob).hexdigest()}", data=blob))
    Path(tarball).write_bytes(tar_bytes(members))
    return tarball


def test_oci_layout_with_gzip_layers_and_a_hard_link_to_a_lower_layer(base_tarball, scratch):
    """A layer that hard-links a file of the layer below (not one docker build makes, but valid),
    hides a file and a folder's content, in the OCI layout newer engines save, with gzip
    layers; converted by the script alone, with the system's python."""
    _, config, layers = read_saved(base_tarball)
    top = tar_bytes(
        [
            entry("usr/", tarfile.DIRTYPE, mode=0o755),
            entry("usr/bin/", tarfile.DIRTYPE, mode=0o755),
            entry("usr/bin/bash-again", tarfile.LNKTYPE, linkname="usr/bin/bash"),
            entry("usr/bin/.wh.dash"),
            entry("etc/", tarfile.DIRTYPE, mode=0o755),
            entry("etc/apt/", tarfile.DIRTYPE, mode=0o755),
            entry("etc/apt/.wh..wh..opq"),
            entry("etc/apt/only-this", data=b"only\n"),
        ]
    )
    tarball = write_oci_layout(scratch / "crafted-oci.tar", config, [*layers, top], compress=True)
    folder = scratch / "crafted"
    folder.mkdir()
    fast, slow, _ = build_both(tarball, folder, cli=True)
    listing, _ = assert_equivalent(fast, slow)
    assert frozenset({b"usr/bin/bash", b"usr/bin/bash-again"}) in listing.link_groups
    assert "usr/bin/dash" not in listing
    assert [name for name in listing.entries if name.startswith(b"etc/apt/")] == [b"etc/apt/only-this"]


# ------------------------------------------------------------------------------------ bad input


def run_cli(tarball, sif, tmpdir):
    return subprocess.run(
        ["/usr/bin/python3", "-I", "-S", str(SCRIPT), "--tmpdir", str(tmpdir), str(tarball), str(sif)], capture_output=True, text=True
    )


def assert_refused(tarball, folder, expected, probes=None):
    """One line of error, exit status 1, and nothing left: no SIF, no partial file, no probe."""
    folder.mkdir(parents=True, exist_ok=True)
    probes = probes or folder / "probes"
    probes.mkdir(exist_ok=True)
    before = set(folder.iterdir())
    result = run_cli(tarball, folder / "out.sif", probes)
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert result.returncode == 1, result.stderr
    assert len(errors) == 1 and re.search(expected, errors[0]), result.stderr
    assert errors[0].startswith("archive_to_sif: error: ")
    assert set(folder.iterdir()) == before and not list(probes.iterdir())
    return errors[0]


def copy_with(source, target, transform):
    data = bytearray(Path(source).read_bytes())
    Path(target).write_bytes(transform(data))
    return target


def test_truncated_tarball(base_tarball, scratch):
    tarball = copy_with(base_tarball, scratch / "truncated.tar", lambda data: data[: len(data) * 3 // 5])
    assert_refused(tarball, scratch / "out-truncated", r"corrupt or truncated|no manifest\.json")


def flipped_in_the_middle(width):
    def flip(data):
        middle = len(data) // 2
        data[middle : middle + width] = bytes(byte ^ 0x5A for byte in data[middle : middle + width])
        return data

    return flip


def test_corrupt_layer_data(base_tarball, scratch):
    tarball = copy_with(base_tarball, scratch / "corrupt.tar", flipped_in_the_middle(4096))
    assert_refused(tarball, scratch / "out-corrupt", r"does not match its digest|corrupt")


def test_corrupt_gzip_layer(base_tarball, scratch):
    _, config, layers = read_saved(base_tarball)
    tarball = write_oci_layout(scratch / "gzip.tar", config, layers, compress=True)
    broken = copy_with(tarball, scratch / "corrupt-gzip.tar", flipped_in_the_middle(64))
    assert_refused(broken, scratch / "out-corrupt-gzip", r"gzip data is corrupt or truncated|corrupt")


def test_layer_listed_but_missing(base_tarball, scratch):
    manifest, _, _ = read_saved(base_tarball)
    target = scratch / "missing-layer.tar"
    with tarfile.open(base_tarball) as source, tarfile.open(target, "w") as out:
        for member in source:
            if member.name != manifest["Layers"][0]:
                out.addfile(member, source.extractfile(member) if member.isfile() else None)
    assert_refused(target, scratch / "out-missing", re.escape(f"lacks {manifest['Layers'][0]}, layer 1"))


def test_not_a_docker_save_tarball(scratch):
    tarball = scratch / "plain.tar"
    tarball.write_bytes(tar_bytes([entry("hello.txt", data=b"hello\n")]))
    assert_refused(tarball, scratch / "out-plain", r"no manifest\.json")
    text = scratch / "text.tar"
    text.write_text("not a tar at all\n" * 100)
    assert_refused(text, scratch / "out-text", r"corrupt or truncated: bad header checksum")


def test_zstd_layers_are_refused_in_one_line(base_tarball, scratch):
    _, config, layers = read_saved(base_tarball)
    # a zstd frame starts with 28 b5 2f fd; refusing happens on that magic, before decoding
    tarball = write_oci_layout(scratch / "zstd.tar", config, [b"\x28\xb5\x2f\xfd" + layers[0][:4096]], compress=False)
    assert_refused(tarball, scratch / "out-zstd", r"zstd-compressed, which this converter cannot read")


def test_full_disk(base_tarball, tmp_path):
    """A SIF that does not fit: mksquashfs's own words in one line, and nothing left behind.
    The small disk may be shared with other test runs: if one frees space while this runs, the
    SIF fits; that attempt is discarded and the disk filled again."""
    folder = SMALL_DISK / f"archive-to-sif-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    try:
        for attempt in range(3):
            filler = folder / f"filler-{attempt}"
            with open(filler, "wb") as out:
                os.posix_fallocate(out.fileno(), 0, max(shutil.disk_usage(SMALL_DISK).free - (8 << 20), 1))
            output = folder / f"out-{attempt}"
            output.mkdir()
            result = run_cli(base_tarball, output / "out.sif", tmp_path)
            if result.returncode == 0 and shutil.disk_usage(SMALL_DISK).free > (8 << 20):
                shutil.rmtree(output)  # someone freed space meanwhile
                continue
            errors = [line for line in result.stderr.splitlines() if "error" in line]
            assert result.returncode == 1 and len(errors) == 1, result.stderr
            assert re.search(r"mksquashfs failed: .*No space left on device", errors[0]), errors[0]
            assert not list(output.iterdir()) and not list(tmp_path.iterdir())
            break
        else:
            raise AssertionError("the small disk never stayed full")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
