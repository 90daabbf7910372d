"""The builder over SSH: an OpenSSH server of the test's own on 127.0.0.1 (run by this account,
with generated host and client keys) makes this machine the builder, reached through paramiko
as a remote host would be. Real sshd, Docker, repo2docker and Apptainer; nothing is skipped."""

import getpass
import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml
from snakemake.utils import validate

from repo2singularity import builders, ssh_transport
from repo2singularity.builders import ssh as ssh_builder
from repo2singularity.processes import free_port
from repo2singularity.step import StepError

from .conftest import GitRepo, processes_running, sif_compression
from .workflow_runner import PROJECT, SNAKEMAKE, snakemake

SSHD = "/usr/sbin/sshd"
RUNTIME = os.environ.get("R2S_RUNTIME") or "apptainer"
REPO2DOCKER = str(Path(sys.executable).with_name("repo2docker"))
NAME = "tiny"
SCHEMA = PROJECT / "workflow" / "schemas" / "config.schema.yaml"


def validated(config):
    """A configuration as the workflow sees it: checked, with the schema's defaults filled in."""
    config = {"repo": "example", **json.loads(json.dumps(config))}
    validate(config, str(SCHEMA))
    return config


def ssh_settings(mapping):
    return ssh_builder.SSHBuilderSettings.from_config(validated({"builder": mapping}))


def settings_of(builder_yaml):
    return ssh_settings(yaml.safe_load(Path(builder_yaml).read_text())["builder"])


# ------------------------------------------------------------------ unit tests of the pure parts


def test_remote_command_quotes_every_argument():
    hostile = ["echo", "$(touch /tmp/pwned)", "a b", "it's", ";rm -rf ~", "`id`", "--", "-x"]
    line = ssh_transport.remote_command(hostile, ["true"])
    assert shlex.split(line.split(" && ")[0]) == hostile
    printed = subprocess.run(["sh", "-c", line], capture_output=True, text=True, check=True).stdout
    assert printed == " ".join(hostile[1:]) + "\n"


def test_checked_while_prints_a_hostile_path_as_it_is(tmp_path):
    # the path reaches the builder's shell inside a message: it must stay text there
    marker = tmp_path / "pwned"
    path = tmp_path / 'a "$(touch pwned)" `touch pwned` it\'s'
    path.write_text("x")
    line = ssh_builder.checked_while("true", str(path), "0" * 64, str(tmp_path / "found"))
    result = subprocess.run(["sh", "-c", line], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode != 0 and not marker.exists()
    assert result.stdout == f"sha256 of {path}: {hashlib.sha256(b'x').hexdigest()}, not {'0' * 64}\n"


def fake_docker(folder, script):
    (folder / "docker").write_text("#!/bin/sh\n" + script)
    (folder / "docker").chmod(0o755)
    return {**os.environ, "PATH": f"{folder}:{os.environ['PATH']}"}


def test_saved_while_hashed_names_the_tarball_and_its_digest_only_when_docker_and_tee_did_their_part(tmp_path):
    env = fake_docker(tmp_path, "head -c 3000000 /dev/zero\n")
    folder = tmp_path / "w o"
    tarball, digest = folder / "image.tar", folder / "image.tar.sha256"
    line = ssh_builder.saved_while_hashed("r2s-x:abc", str(folder), f"{tarball}.partial", str(tarball), str(digest))
    subprocess.run(["sh", "-c", line], check=True, env=env)
    assert digest.read_text().split()[0] == hashlib.sha256(tarball.read_bytes()).hexdigest() == hashlib.sha256(bytes(3000000)).hexdigest()
    for broken, how in (("exit 1", "docker fails"), ("head -c 100 /dev/zero; exit 1", "docker fails midway")):
        tarball.unlink(missing_ok=True)
        digest.unlink(missing_ok=True)
        env = fake_docker(tmp_path, broken + "\n")
        assert subprocess.run(["sh", "-c", line], env=env).returncode != 0, how
        assert not tarball.exists() and not digest.exists(), how
    # tee cannot write the tarball: a folder stands where the partial file goes
    env = fake_docker(tmp_path, "head -c 100 /dev/zero\n")
    Path(f"{tarball}.partial").unlink(missing_ok=True)
    Path(f"{tarball}.partial").mkdir()
    assert subprocess.run(["sh", "-c", line], env=env, capture_output=True).returncode != 0
    assert not tarball.exists() and not digest.exists()


def test_ask_script_answers_each_question_with_its_status_and_keeps_paths_text(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / 'a "$(touch pwned)" `touch pwned` it\'s'
    path.write_text("12 words")
    line = ssh_builder.ask_script({"there": ["cat", "--", str(path)], "gone": ["cat", "--", str(tmp_path / "none")], "size": ["stat", "-c", "%s", "--", str(path)]})
    found = ssh_builder.parse_checks(subprocess.run(["sh", "-c", line], capture_output=True, text=True, cwd=tmp_path).stdout)
    assert not marker.exists()
    assert ssh_builder.answer(found, "there") == "12 words" and ssh_builder.first_word(ssh_builder.answer(found, "there")) == "12"
    assert ssh_builder.answer(found, "gone") is None and found["gone"][0] != 0
    assert ssh_builder.answer(found, "size") == "8"


def test_each_login_account_has_its_own_folder_and_image_names_on_the_builder():
    alice, odd = (ssh_builder.login_scope(user) for user in ("alice", "Alice Smith"))
    assert alice == "alice" and odd != alice and odd == odd.lower() and "/" not in odd and " " not in odd
    assert ssh_builder.remote_paths("/w", alice, "x", "abc")["folder"] == "/w/alice/x/abc"
    # what all accounts share: the build slots (the builder's capacity) and the checked tools
    assert ssh_builder.remote_paths("/w", alice, "x", "abc")["build_slots"] == "/w/.build-slots"
    assert ssh_builder.scoped_tag(alice, "r2s-x:abc") == "alice/r2s-x:abc"


def test_the_conversion_script_runs_only_with_the_content_it_was_sent_with(tmp_path):
    script = tmp_path / "archive to sif.py"
    script.write_text("print('converted')\n")
    digest = hashlib.sha256(script.read_bytes()).hexdigest()
    command = ssh_builder.run_if_unchanged(str(script), digest, shlex.join([sys.executable, str(script)]))
    ran = subprocess.run(["sh", "-c", command], capture_output=True, text=True)
    assert (ran.returncode, ran.stdout) == (0, "converted\n")
    # another account's file in its place (same name, other content) is not run
    script.write_text("print('planted')\n")
    refused = subprocess.run(["sh", "-c", command], capture_output=True, text=True)
    assert refused.returncode != 0 and "planted" not in refused.stdout
    assert refused.stdout.splitlines() == [f"{script} was changed on the builder since it was sent (sha256 {hashlib.sha256(script.read_bytes()).hexdigest()}); not run"]


def test_preflight_expands_a_workdir_under_home_on_the_builder(tmp_path):
    line = ssh_builder.preflight_script(ssh_settings({"host": "h"}), "~/it's here", ())
    out = subprocess.run(["sh", "-c", line], capture_output=True, text=True, env={**os.environ, "HOME": str(tmp_path)}).stdout
    checks = ssh_builder.parse_checks(out)
    assert checks["home"] == (0, str(tmp_path)) and checks["space"][0] == 0
    assert (tmp_path / "it's here").is_dir()


def test_settings_default_to_local_and_fill_defaults():
    assert builders.kind_of({}) == "local" and builders.kind_of({"builder": "local"}) == "local"
    assert builders.builder_class(validated({})).kind == "local"
    config = validated({"builder": {"host": "b.example.org", "port": "2222", "trust_unknown_host": "false"}})
    assert builders.builder_class(config).kind == "ssh"
    settings = ssh_builder.SSHBuilderSettings.from_config(config)
    assert (settings.target.port, settings.target.trust_unknown_host, settings.workdir) == (2222, False, "~/.cache/repo2singularity")
    assert settings.target.describe() == {"host": "b.example.org", "port": 2222, "user": settings.target.login}
    for bad in ({"host": "-oProxyCommand=x"}, {"host": "a b"}, {"host": "h", "port": 70000}, {"host": "h", "max_builds": "0"}):
        with pytest.raises(builders.InvalidBuilder):
            ssh_builder.SSHBuilderSettings.from_config({"builder": {**validated({"builder": {"host": "h"}})["builder"], **bad}})
    with pytest.raises(builders.InvalidBuilder):
        builders.kind_of({"builder": "elsewhere"})


def test_schema_refuses_a_password_and_unknown_keys(tmp_path):
    for extra in ("password=secret", "colour=blue"):
        result = snakemake(tmp_path, "-n", config={"repo": PROJECT / "example", "builder": f"{{host: h, {extra.replace('=', ': ')}}}"}, check=False)
        assert result.returncode != 0
        assert "invalid config at 'builder'" in result.stderr


def test_tarball_receipt_checks():
    receipt = {"host": "b", "path": "/w/n/s/image.tar", "size_bytes": 10, "sha256": "ab"}
    ssh_builder.check_tarball_receipt(receipt, {"size": 10, "sha256": "ab"}, "r.json")
    with pytest.raises(StepError, match="is gone from builder b; rerun it with: snakemake --forcerun save_image"):
        ssh_builder.check_tarball_receipt(receipt, None, "r.json")
    with pytest.raises(StepError, match="does not match its receipt"):
        ssh_builder.check_tarball_receipt(receipt, {"size": 10, "sha256": "cd"}, "r.json")


def test_image_receipt_check_names_the_rule_to_rerun():
    receipt = {"image_id": "sha256:" + "1" * 64, "tag": "r2s-x:y", "builder": {"host": "b"}}
    ssh_builder.check_image_receipt(receipt, receipt["image_id"], "b", "image.json")
    with pytest.raises(StepError, match="--forcerun build_image"):
        ssh_builder.check_image_receipt(receipt, None, "b", "image.json")
    local = {**receipt, "builder": None}
    with pytest.raises(StepError, match=r"\(built locally\); rebuild it with: snakemake --forcerun build_image"):
        ssh_builder.check_image_receipt(local, "sha256:other", "b", "image.json")


def test_progress_line():
    line = ssh_transport.progress_line("x.sif", 50_000_000, 200_000_000, 0, 5.0)
    assert line == "  download x.sif [######..................]  25%  50.0 of 200.0 MB, 10.0 MB/s, 15 s left"
    # resumed at 100 MB: the rate counts only what came in this run
    assert "20.0 MB/s" in ssh_transport.progress_line("x.sif", 200_000_000, 200_000_000, 100_000_000, 5.0)


def test_resume_offset():
    meta = {"sha256": "ab", "size": 100}
    assert ssh_transport.resume_offset(40, meta, 100, "ab") == 40
    assert ssh_transport.resume_offset(100, meta, 100, "ab") == 100
    assert ssh_transport.resume_offset(0, meta, 100, "ab") == 0
    assert ssh_transport.resume_offset(40, None, 100, "ab") == 0  # nothing says what the partial is
    assert ssh_transport.resume_offset(40, meta, 100, "cd") == 0  # another SIF was built since
    assert ssh_transport.resume_offset(40, {"sha256": "ab", "size": 90}, 100, "ab") == 0
    assert ssh_transport.resume_offset(140, {"sha256": "ab", "size": 100}, 100, "ab") == 0


def test_images_to_remove_keeps_the_newest():
    listing = (
        "2026-11-28 10:00:00 +0000 UTC\tr2s-x:aaa\n"
        "2026-11-28 12:00:00 +0000 UTC\tr2s-x:ccc\n"
        "2026-11-28 11:00:00 +0000 UTC\tr2s-x:bbb\n"
        "2026-11-28 09:00:00 +0000 UTC\tr2s-x:<none>\n"
    )
    assert ssh_builder.images_to_remove(listing, "r2s-x:ccc", 2) == ["r2s-x:bbb", "r2s-x:aaa"][1:]
    assert ssh_builder.images_to_remove(listing, "r2s-x:ccc", 1) == ["r2s-x:bbb", "r2s-x:aaa"]
    assert ssh_builder.images_to_remove(listing, "r2s-x:ccc", 5) == []
    assert ssh_builder.images_to_remove("", "r2s-x:ccc", 1) == []


def test_preflight_problems_are_one_line_each():
    settings = ssh_settings({"host": "b", "min_free_gb": 5})
    df = "Filesystem 1024-blocks Used Available Capacity Mounted on\n/dev/x 100 50 {} 50% /"
    good = {
        "docker": (0, "20.10.24"),
        "buildx": (0, "github.com/docker/buildx 0.13.1"),
        "repo2docker": (0, "2026.4.0"),
        "runtime": (0, "1.4.5"),
        "flock": (0, "flock from util-linux 2.38.1"),
        "python": (0, "Python 3.11.2"),
        "mksquashfs": (0, "mksquashfs version 4.5.1 (2022/03/17)\ncopyright ..."),
        "space": (0, df.format(9_000_000)),
    }
    assert ssh_builder.preflight_problems(settings, "/w", good) == []
    assert ssh_builder.parse_checks("@@check docker\n20.10\n@@rc 0\n@@check buildx\nnope\n@@rc 1\n") == {
        "docker": (0, "20.10"),
        "buildx": (1, "nope"),
    }
    cases = {
        "docker": ((127, "sh: 1: docker: not found"), "docker is not installed"),
        "buildx": ((1, "docker: 'buildx' is not a docker command."), "docker buildx is missing"),
        "space": ((0, df.format(1_000_000)), "only 1.0 GB free in /w"),
        "flock": ((127, "sh: 1: flock: not found"), "max_builds needs it"),
        "python": ((0, "Python 3.9.2"), "python3 (>= 3.11) does not run, and the fast SIF conversion needs it"),
        "mksquashfs": ((0, "mksquashfs version 4.4 (2019/08/29)"), "mksquashfs >= 4.5 (squashfs-tools) does not run"),
    }
    for check, (value, expected) in cases.items():
        problems = ssh_builder.preflight_problems(settings, "/w", {**good, check: value})
        assert len(problems) == 1 and expected in problems[0] and "\n" not in problems[0]
    # a step checks only the tools it needs (and always the space)
    no_docker = {**good, "docker": (127, "sh: 1: docker: not found")}
    assert ssh_builder.preflight_problems(settings, "/w", no_docker, needs=ssh_builder.STEP_TOOLS["build_sif"]) == []
    assert ssh_builder.preflight_problems(settings, "/w", no_docker, needs=ssh_builder.STEP_TOOLS["save_image"])
    assert "--version" in ssh_builder.preflight_script(settings, "/w") and "--version" not in ssh_builder.preflight_script(settings, "/w", ("runtime",))


def test_image_details_read_from_an_answer_with_a_warning_first():
    details = [{"Id": "sha256:abc", "Config": {"Labels": {"a": "[b]"}}}]
    assert ssh_builder.image_details("WARNING: [x] y\n" + json.dumps(details, indent=4)) == details[0]
    assert ssh_builder.image_details(json.dumps(details)) == details[0]
    assert ssh_builder.image_details("[]") is None and ssh_builder.image_details(None) is None
    assert ssh_builder.image_details("Error: No such image: x") is None


def test_a_later_step_trusts_only_a_fresh_preflight_of_the_same_settings_that_checked_what_it_needs(tmp_path):
    settings = ssh_settings({"host": "b", "workdir": "~/w"})
    receipt = tmp_path / ssh_builder.PREFLIGHT_RECEIPT
    session = ssh_builder.BuilderSession(settings, None, ssh_builder.STEP_TOOLS["build_image"])
    session.workdir, session.versions = "/home/u/w", {"docker": "29.0", "mksquashfs_args": True}
    session.record_preflight(receipt)
    assert not receipt.exists(), "only a session that ran its own preflight records one"
    session.checked_at = 1000.0
    session.record_preflight(receipt)
    needs = ssh_builder.STEP_TOOLS["build_sif"]
    assert ssh_builder.trusted_preflight(receipt, settings, needs, now=1010.0) == ("/home/u/w", session.versions, 10.0)
    stale = 1000.0 + ssh_builder.PREFLIGHT_TRUST_SECONDS + 1
    assert ssh_builder.trusted_preflight(receipt, settings, needs, now=stale) is None
    assert ssh_builder.trusted_preflight(receipt, settings, needs, now=999.0) is None, "a receipt from the future"
    other = ssh_settings({"host": "b", "workdir": "~/w", "runtime": "singularity"})
    assert ssh_builder.trusted_preflight(receipt, other, needs, now=1010.0) is None
    session.needs = ("docker",)
    session.record_preflight(receipt)
    assert ssh_builder.trusted_preflight(receipt, settings, needs, now=1010.0) is None, "it did not check the runtime"
    receipt.write_text("{")
    assert ssh_builder.trusted_preflight(receipt, settings, needs, now=1010.0) is None
    assert ssh_builder.trusted_preflight(tmp_path / "none.json", settings, needs) is None


# ------------------------------------------------------------------ an sshd of the test's own


def keygen(path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)], check=True)
    return path


class Sshd:
    """/usr/sbin/sshd run by this account on 127.0.0.1: public keys only, its own host key, no SFTP
    unless asked."""

    def __init__(self, folder, client_key, env_path=None, sftp=False):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.host_key = keygen(self.folder / "host_key")
        authorized = self.folder / "authorized_keys"
        authorized.write_text(Path(f"{client_key}.pub").read_text())
        authorized.chmod(0o600)
        self.log = self.folder / "sshd.log"
        self.pid_file = self.folder / "sshd.pid"
        lines = [
            "ListenAddress 127.0.0.1",
            f"Port {self.port}",
            f"HostKey {self.host_key}",
            f"AuthorizedKeysFile {authorized}",
            "UsePAM no",
            # the test's folders live under /tmp (sticky, world-writable): StrictModes would refuse them
            "StrictModes no",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            f"PidFile {self.pid_file}",
            "LogLevel VERBOSE",
        ]
        # the builder needs a shell, not SFTP: the tests' sshd offers none unless asked
        if sftp:
            lines.append("Subsystem sftp internal-sftp")
        if env_path:
            lines.append(f"SetEnv PATH={env_path}")
        self.config = self.folder / "sshd_config"
        self.config.write_text("\n".join(lines) + "\n")
        self.start()

    def start(self):
        subprocess.run([SSHD, "-f", str(self.config), "-E", str(self.log)], check=True)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, f"sshd did not start; see {self.log}"
                time.sleep(0.1)

    @property
    def pid(self):
        return int(self.pid_file.read_text())

    def known_hosts_line(self):
        kind, key = Path(f"{self.host_key}.pub").read_text().split()[:2]
        return f"[127.0.0.1]:{self.port} {kind} {key}\n"

    def connections(self):
        # logins, not mere connections: the readiness probe of start() connects too, and its
        # line may reach the log late
        return self.log.read_text().count("Accepted publickey for ") if self.log.exists() else 0

    def cut_sessions(self):
        """Kill every session of this sshd (the listener stays): the connection drops as if
        the network had gone."""
        for pid in descendants(self.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self):
        self.cut_sessions()
        try:
            os.kill(self.pid, signal.SIGTERM)
        except (ProcessLookupError, FileNotFoundError):
            pass


def descendants(pid):
    return [child.pid for child in psutil.Process(pid).children(recursive=True)]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """Keys, a running sshd, a known_hosts file that knows it, and a small Dockerfile repository."""
    for tool in (SSHD, shutil.which("ssh-keygen"), shutil.which("docker"), shutil.which(RUNTIME), REPO2DOCKER):
        assert tool and Path(tool).exists(), f"{tool} is missing: bash setup.sh test installs it"
    base = tmp_path_factory.mktemp("remote")
    keys = base / "keys"
    keys.mkdir()
    client_key = keygen(keys / "client")
    wrong_key = keygen(keys / "wrong")
    sshd = Sshd(base / "sshd", client_key)
    known_hosts = base / "known_hosts"
    known_hosts.write_text(sshd.known_hosts_line())
    repo = GitRepo(base / "tiny-repo", branch="main")
    # incompressible bytes, so that the SIF is big enough to cut its download midway
    repo.commit("first", {"Dockerfile": "FROM debian:bookworm\nRUN head -c 24000000 /dev/urandom > /blob\n"})
    yield {
        "base": base,
        "sshd": sshd,
        "client_key": client_key,
        "wrong_key": wrong_key,
        "known_hosts": known_hosts,
        "repo": repo,
    }
    sshd.stop()


def builder_config(lab, workdir, **overrides):
    settings = {
        "host": "127.0.0.1",
        "port": lab["sshd"].port,
        "user": os.environ.get("USER") or getpass.getuser(),
        "key_file": str(lab["client_key"]),
        "known_hosts": str(lab["known_hosts"]),
        "workdir": str(lab["base"] / "builder-work"),
        "runtime": RUNTIME if "/" in RUNTIME else shutil.which(RUNTIME),
        "repo2docker": REPO2DOCKER,
        "min_free_gb": 1,
        **overrides,
    }
    path = Path(workdir) / "builder.yaml"
    Path(workdir).mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"builder": settings}))
    return path


def run_config(lab):
    return {"repo": lab["repo"].path, "ref": "main", "name": NAME}


def folder_of(workdir, sha):
    return Path(workdir) / "results" / NAME / sha


def sif_labels(sif):
    result = subprocess.run([RUNTIME, "inspect", "--json", "--labels", str(sif)], capture_output=True, text=True, check=True)
    labels = json.loads(result.stdout)["data"]["attributes"]["labels"]
    return {k: v for k, v in labels.items() if k.startswith(("repo2docker.", "repo2singularity."))}


def sha256sum(path):
    return subprocess.run(["sha256sum", str(path)], capture_output=True, text=True, check=True).stdout.split()[0]


@pytest.fixture(scope="module")
def remote_build(lab):
    workdir = lab["base"] / "remote"
    # one image per name stays on the builder: the next commit's build removes this one
    configfile = builder_config(lab, workdir, keep_images=1)
    before = lab["sshd"].connections()
    result = snakemake(workdir, "build", "--configfile", configfile, config=run_config(lab))
    return workdir, configfile, lab["repo"].head(), result, lab["sshd"].connections() - before


@pytest.mark.integration
def test_remote_chain_gives_the_same_labels_as_a_local_build(lab, remote_build):
    workdir, _, sha, result, connections = remote_build
    folder = folder_of(workdir, sha)
    sif = folder / f"{NAME}.sif"
    assert sha256sum(sif) == (folder / f"{NAME}.sif.sha256").read_text().split()[0]
    receipt = json.loads((folder / "image.json").read_text())
    assert receipt["builder"] == {"host": "127.0.0.1", "port": lab["sshd"].port, "user": getpass.getuser()}
    assert {"image_id", "tag", "repo2docker_version", "working_folder", "home"} <= set(receipt)
    assert connections == 3, "one connection per builder step"
    logs = folder / "logs"
    assert "builder preflight" in (logs / "build_image.log").read_text()
    assert "sha256 verified" in (logs / "build_sif.log").read_text()
    # nothing looks finished that is not, and the builder keeps nothing of the build
    assert not (folder / "image.tar.receipt.json").exists()
    assert not list(folder.glob(".*partial*"))
    # each login account has a folder and image names of its own on the builder
    assert (lab["base"] / "builder-work" / getpass.getuser()).is_dir()
    assert not (lab["base"] / "builder-work" / getpass.getuser() / NAME / sha).exists()
    assert receipt["tag"] == f"{getpass.getuser()}/r2s-{NAME}:{sha}"

    # the other conversion here, with another compression: the same provenance either way
    local = lab["base"] / "local"
    snakemake(local, "build", config={**run_config(lab), "sif_conversion": "apptainer", "sif_compression": "gzip"})
    local_sif = folder_of(local, sha) / f"{NAME}.sif"
    local_labels = sif_labels(local_sif)
    assert local_labels["repo2singularity.sha"] == sha
    assert sif_labels(sif) == local_labels
    assert (sif_compression(sif, RUNTIME), sif_compression(local_sif, RUNTIME)) == ("zstd", "gzip")
    assert "archive_to_sif." in (logs / "build_sif.log").read_text() and "docker-archive://" not in (logs / "build_sif.log").read_text()


@pytest.mark.integration
def test_a_conversion_script_planted_on_the_builder_is_replaced_not_run(lab, remote_build, tmp_path):
    """Another user of the builder account writes its own file under the name of our script's
    hash; a new run (the image is in Docker's cache there) sends ours again and runs ours."""
    _, _, sha, *_ = remote_build
    content, digest = ssh_builder.conversion_script()
    tools = lab["base"] / "builder-work" / ".tools"
    planted = tools / f"archive_to_sif.{digest[:16]}.py"
    marker = tmp_path / "planted-ran"
    assert planted.exists(), sorted(p.name for p in tools.iterdir())
    planted.write_text(f"import pathlib, sys\npathlib.Path({str(marker)!r}).touch()\nsys.exit(0)\n")
    workdir = tmp_path / "again"
    snakemake(workdir, "build", "--configfile", builder_config(lab, workdir), config=run_config(lab))
    assert not marker.exists(), "the planted script ran"
    assert planted.read_bytes() == content
    sif = folder_of(workdir, sha) / f"{NAME}.sif"
    assert sif_labels(sif)["repo2singularity.sha"] == sha


@pytest.mark.integration
def test_second_run_makes_no_ssh_connection(lab, remote_build):
    workdir, configfile, *_ = remote_build
    before = lab["sshd"].connections()
    plan = snakemake(workdir, "build", "-n", "--configfile", configfile, config=run_config(lab))
    assert "Nothing to be done" in plan.stdout + plan.stderr
    snakemake(workdir, "build", "--configfile", configfile, config=run_config(lab))
    assert lab["sshd"].connections() == before


@pytest.mark.integration
def test_cut_download_resumes_and_verifies(lab, remote_build):
    workdir, configfile, first_sha, *_ = remote_build
    first_tag = json.loads((folder_of(workdir, first_sha) / "image.json").read_text())["tag"]
    # a second commit on a branch of its own: main stays where the other tests, in any order, expect it
    repo = lab["repo"]
    repo.git("checkout", "--quiet", "-b", "cut-download")
    try:
        sha = repo.commit("second", {"notes.md": "a second commit\n"})
    finally:
        repo.git("checkout", "--quiet", "main")
    # apptainer's own conversion on the builder, this time (the other tests convert fast)
    config = {**run_config(lab), "ref": "cut-download", "sif_conversion": "apptainer"}
    folder = folder_of(workdir, sha)
    partial = folder / f".{NAME}.sif.partial"
    command = [SNAKEMAKE, "--snakefile", str(PROJECT / "Snakefile"), "--directory", str(workdir), "--cores", "2", "build",
               "--configfile", str(configfile), "--config", *(f"{key}={value}" for key, value in config.items())]
    # slow enough to be cut midway on loopback
    env = {**os.environ, ssh_transport.RATE_LIMIT_VARIABLE: str(4_000_000)}
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 900
    while not (partial.exists() and partial.stat().st_size > 2_000_000):
        assert run.poll() is None, f"the run ended before the download:\n{run.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    lab["sshd"].cut_sessions()
    _, stderr = run.communicate(timeout=300)
    assert run.returncode != 0
    assert "Traceback" not in stderr
    assert "the connection to builder" in stderr and "run again" in stderr
    cut_at = partial.stat().st_size
    assert 0 < cut_at
    assert not (folder / f"{NAME}.sif").exists() and not (folder / f"{NAME}.sif.sha256").exists()
    # apptainer's conversion ran on the builder (the rerun's log has only the resumed download)
    assert "docker-archive://" in (folder / "logs" / "build_sif.log").read_text()

    snakemake(workdir, "--unlock", "--configfile", configfile, config=config)
    resumed = snakemake(workdir, "build", "--configfile", configfile, config=config)
    assert "rule build_image" not in resumed.stderr and "rule save_image" not in resumed.stderr
    log = (folder / "logs" / "build_sif.log").read_text()
    resumed_at = float(log.split("resuming at ")[1].split()[0])
    assert resumed_at * 1e6 >= cut_at - 1e5, "the partial file was not reused"
    assert "sha256 verified" in log
    sif = folder / f"{NAME}.sif"
    assert sha256sum(sif) == (folder / f"{NAME}.sif.sha256").read_text().split()[0]
    assert not partial.exists()
    # keep_images: 1, so the builder removed the first commit's image after building this one
    second_tag = json.loads((folder / "image.json").read_text())["tag"]
    assert subprocess.run(["docker", "image", "inspect", second_tag], capture_output=True).returncode == 0
    assert subprocess.run(["docker", "image", "inspect", first_tag], capture_output=True).returncode != 0
    assert f"removed older images of {first_tag.split(':')[0]}" in (folder / "logs" / "build_image.log").read_text()


@pytest.mark.integration
def test_build_sif_checks_the_saved_image_against_its_receipt(lab, tmp_path):
    workdir = tmp_path / "receipt"
    configfile = builder_config(lab, workdir)
    repo = GitRepo(tmp_path / "receipt-repo", branch="main")
    repo.commit("first", {"Dockerfile": "FROM debian:bookworm\nRUN head -c 24000000 /dev/urandom > /blob\n"})
    sha = repo.head()
    config = {"repo": repo.path, "ref": "main", "name": NAME}
    folder = folder_of(workdir, sha)
    receipt_path = folder / "image.tar.receipt.json"
    snakemake(workdir, str(receipt_path.relative_to(workdir)), "--configfile", configfile, config=config)
    tarball = Path(json.loads(receipt_path.read_text())["path"])

    # changed in place, same size: only the digest, taken while the SIF is built, can tell
    with open(tarball, "r+b") as handle:
        handle.seek(tarball.stat().st_size // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))
    changed = snakemake(workdir, "build", "--configfile", configfile, config=config, check=False)
    assert changed.returncode != 0 and "Traceback" not in changed.stderr
    assert "does not match its receipt" in changed.stderr and "snakemake --forcerun save_image" in changed.stderr
    assert not (folder / f"{NAME}.sif").exists() and not (folder / f"{NAME}.sif.sha256").exists()
    assert not (tarball.parent / f"{NAME}.sif").exists(), "a SIF from the changed tarball took its name on the builder"

    tarball.unlink()
    gone = snakemake(workdir, "build", "--configfile", configfile, config=config, check=False)
    assert gone.returncode != 0 and "is gone from builder 127.0.0.1" in gone.stderr
    assert "snakemake --forcerun save_image" in gone.stderr

    # what the message says to do works
    snakemake(workdir, "build", "--forcerun", "save_image", "--configfile", configfile, config=config)
    assert sha256sum(folder / f"{NAME}.sif") == (folder / f"{NAME}.sif.sha256").read_text().split()[0]


def expect_one_line_failure(lab, name, expected, **overrides):
    workdir = lab["base"] / f"fail-{name}"
    configfile = builder_config(lab, workdir, **overrides)
    result = snakemake(workdir, "build", "--configfile", configfile, config=run_config(lab), check=False)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if expected in line]
    assert lines, f"no line says {expected!r}:\n{result.stderr[-4000:]}"
    assert lines[0].startswith("build_image: builder ")
    folder = folder_of(workdir, lab["repo"].head())
    leftovers = [p.name for p in folder.iterdir() if p.name not in ("logs", "benchmarks", "source")] if folder.exists() else []
    assert leftovers == [], "a failed builder step left an output"
    return lines[0]


@pytest.mark.integration
def test_check_builder_names_what_it_found_or_what_is_wrong(lab, tmp_path):
    workdir = tmp_path / "check"
    configfile = builder_config(lab, workdir)
    result = snakemake(workdir, "check_builder", "--configfile", configfile, config=run_config(lab))
    ready = [line for line in result.stderr.splitlines() if " is ready: " in line]
    assert ready and ready[0].startswith(f"builder {getpass.getuser()}@127.0.0.1:{lab['sshd'].port} is ready: docker ")
    for part in ("buildx github.com/docker/buildx", "repo2docker ", "runtime ", "flock from util-linux", "GB free in", "max_builds 1"):
        assert part in ready[0], ready[0]
    # each call runs again (its log is its own), and needs no repository resolved
    again = snakemake(workdir, "check_builder", "--configfile", builder_config(lab, workdir, port=free_port()), config=run_config(lab), check=False)
    assert again.returncode != 0 and "Traceback" not in again.stderr
    assert any(line.startswith("check_builder: builder ") and "connection refused" in line for line in again.stderr.splitlines())
    local = snakemake(workdir, "check_builder", config=run_config(lab))
    assert "builder: local (this machine)" in local.stderr


@pytest.mark.integration
def test_unknown_host_key_is_refused(lab):
    empty = lab["base"] / "empty_known_hosts"
    empty.write_text("")
    line = expect_one_line_failure(lab, "unknown-host", "unknown host key", known_hosts=str(empty))
    assert "SHA256:" in line and "trust_unknown_host" in line


@pytest.mark.integration
def test_changed_host_key_is_refused_even_when_trusting_unknown_hosts(lab):
    other = lab["base"] / "other_known_hosts"
    kind, key = Path(f"{lab['wrong_key']}.pub").read_text().split()[:2]
    other.write_text(f"[127.0.0.1]:{lab['sshd'].port} {kind} {key}\n")
    expect_one_line_failure(lab, "changed-host", "host key CHANGED", known_hosts=str(other), trust_unknown_host=True)


@pytest.mark.integration
def test_wrong_key_is_refused(lab):
    expect_one_line_failure(lab, "wrong-key", "the builder refused key", key_file=str(lab["wrong_key"]))


@pytest.mark.integration
def test_closed_port(lab):
    expect_one_line_failure(lab, "closed-port", "connection refused", port=free_port())


@pytest.mark.integration
def test_builder_without_docker(lab):
    # every tool of /usr/bin but docker, and nothing else, on the PATH of that builder's SSH sessions
    tools = lab["base"] / "no-docker-bin"
    tools.mkdir()
    for entry in Path("/usr/bin").iterdir():
        if not entry.name.startswith("docker"):
            (tools / entry.name).symlink_to(entry)
    sshd = Sshd(lab["base"] / "sshd-no-docker", lab["client_key"], env_path=str(tools))
    known_hosts = lab["base"] / "no_docker_known_hosts"
    known_hosts.write_text(sshd.known_hosts_line())
    try:
        expect_one_line_failure(lab, "no-docker", "docker is not installed", port=sshd.port, known_hosts=str(known_hosts))
    finally:
        sshd.stop()


def test_process_group_mark():
    assert ssh_transport.parse_pgid(b"@@r2s-pgid 4242") == 4242
    assert ssh_transport.parse_pgid(b"Step 1/2 : FROM debian") is None
    assert ssh_transport.parse_pgid(b"@@r2s-pgid x") is None


def step_on_builder(lab, tmp_path, body, settings_lines=""):
    """A Python script that connects to the builder as a rule's script would, then runs `body`
    (with `t` the connection)."""
    target = settings_of(builder_config(lab, tmp_path)).target
    script = tmp_path / "step.py"
    script.write_text(
        "import sys\n"
        "from repo2singularity import ssh_transport\n"
        "from repo2singularity.step import run_step\n"
        f"{settings_lines}"
        f"target = ssh_transport.SSHTarget(**{target.__dict__!r})\n"
        f"with ssh_transport.SSHTransport(target, {str(tmp_path / 'step.log')!r}) as t:\n"
        f"    {body}\n"
    )
    return subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def start_remote_step(lab, tmp_path, command, settings_lines=""):
    """A step process that runs `command` on the builder; returned once the command runs there."""
    log = str(tmp_path / "step.log")
    body = f"run_step('step', lambda: t.run_logged(ssh_transport.remote_command({command!r}), {log!r}, 'step'))"
    step = step_on_builder(lab, tmp_path, body, settings_lines)
    deadline = time.monotonic() + 30
    while not processes_running(shlex.join(command)):
        assert step.poll() is None, step.stderr.read()
        assert time.monotonic() < deadline, "the remote command did not start"
        time.sleep(0.1)
    return step


# keepalives every 2 s, answered within 3 s
QUICK_KEEPALIVE = "ssh_transport.QUIET_SECONDS, ssh_transport.REPLY_SECONDS = 2, 3\n"


def communicate_while_frozen(step, sshd, timeout=60):
    """The network dead in silence: the sshd's sessions stopped (SIGSTOP) while the kernel keeps
    TCP up, until the step has ended."""
    frozen = descendants(sshd.pid)
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        return step.communicate(timeout=timeout)
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)


def wait_until_ended(command, seconds, why):
    deadline = time.monotonic() + seconds
    while processes_running(shlex.join(command)):
        assert time.monotonic() < deadline, why
        time.sleep(0.1)


@pytest.mark.integration
@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["cancelled", "killed"])
def test_a_stopped_step_stops_its_command_on_the_builder(lab, tmp_path, how):
    """Snakemake cancels a job with SIGTERM; SIGKILL leaves the step no time to say anything, and
    the builder only sees the connection drop. Either way the command there must end with it."""
    command = ["sleep", "321.5"]
    step = start_remote_step(lab, tmp_path, command)
    step.send_signal(how)
    step.wait(timeout=30)
    wait_until_ended(command, 10, "the command on the builder outlived its stopped step")


@pytest.mark.integration
def test_a_tool_on_the_builder_reports_where_it_is(lab, tmp_path):
    """Issue 14: the progress line of a remote step says where its tool is, as a local one's."""
    script = "echo '#5 [2/3] RUN make all'; sleep 2; echo '#6 [3/3] COPY . /srv'; sleep 2"
    log = str(tmp_path / "step.log")
    body = f"run_step('build_image', lambda: t.run_logged(ssh_transport.remote_command(['sh', '-c', {script!r}]), {log!r}, 'build_image'))"
    step = step_on_builder(lab, tmp_path, body, "from repo2singularity import tools\ntools.TOOL_PROGRESS_SECONDS = 0.2\n")
    _, stderr = step.communicate(timeout=60)
    assert step.returncode == 0, stderr
    lines = stderr.splitlines()
    assert any(line.startswith("  build_image on 127.0.0.1: build step 2/3: RUN make all (0m") for line in lines), lines
    assert any(line.startswith("  build_image on 127.0.0.1: build step 3/3: COPY . /srv (0m") for line in lines), lines


@pytest.mark.integration
def test_a_builder_gone_silent_ends_the_step_and_then_its_command(lab, tmp_path):
    """The network dies without a word: no FIN, no RST, the builder simply stops answering (its
    sshd is frozen with SIGSTOP, while the kernel keeps the TCP connection up)."""
    command = ["sleep", "321.9"]
    step = start_remote_step(lab, tmp_path, command, QUICK_KEEPALIVE)
    time.sleep(3)  # quiet for longer than QUIET_SECONDS, with the builder answering: no failure
    assert step.poll() is None, step.stderr.read()
    _, stderr = communicate_while_frozen(step, lab["sshd"])
    assert step.returncode != 0 and "Traceback" not in stderr
    assert "has not answered a keepalive for 3 s (the network is gone?); run again" in stderr
    # once the builder's side sees the connection closed, its watcher stops the command
    wait_until_ended(command, 20, "the command on the builder outlived its connection")


class HeldBuild(threading.Thread):
    """A build step on a connection of its own (as another run's would be) whose command, once it
    holds a build slot, says so in a file and then waits until the test lets it end."""

    def __init__(self, settings, folder, number):
        super().__init__(daemon=True)
        self.settings, self.number = settings, number
        self.holds_slot = folder / f"holds-slot-{number}"
        self.release = folder / f"release-{number}"
        self.log = folder / f"build-{number}.log"
        self.error = None

    def run(self):
        command = ssh_transport.remote_command(
            ["touch", "--", self.holds_slot], ["sh", "-c", 'while [ ! -e "$1" ]; do sleep 0.1; done', "wait", self.release]
        )
        slots = ssh_builder.remote_paths(self.settings.workdir, self.settings.scope, NAME, "slots")["build_slots"]
        try:
            with ssh_transport.SSHTransport(self.settings.target, self.log) as connection:
                connection.run_logged(ssh_builder.with_build_slot(command, slots, self.settings.max_builds), self.log, f"build {self.number}")
        except BaseException as error:  # reported by the test, not lost in the thread
            self.error = error

    def waited(self):
        # a line of the command's output (the log's first line is the command, which holds the words too)
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return any(line.startswith("waiting for a build slot") for line in lines)

    def wait_for(self, condition, what, seconds=60):
        deadline = time.monotonic() + seconds
        while not condition():
            assert self.error is None and self.is_alive(), f"build {self.number} ended before {what}: {self.error}"
            assert time.monotonic() < deadline, f"build {self.number}: no sign of {what} within {seconds} s"
            time.sleep(0.05)


@pytest.mark.integration
@pytest.mark.parametrize("max_builds", [1, 2])
def test_the_builder_runs_at_most_max_builds_at_once(lab, tmp_path, max_builds):
    """The first build holds its slot until the test releases it; only then does the test decide
    what the second one must have done: with max_builds 1 it waits (and says so in its log) and
    starts once the first has ended; with 2 it runs alongside the first."""
    settings = settings_of(builder_config(lab, tmp_path, max_builds=max_builds))
    first, second = HeldBuild(settings, tmp_path, 1), HeldBuild(settings, tmp_path, 2)
    try:
        first.start()
        first.wait_for(first.holds_slot.exists, "holding a slot")
        second.start()
        if max_builds == 1:
            second.wait_for(lambda: second.waited() or second.holds_slot.exists(), "waiting for a build slot")
            assert not second.holds_slot.exists(), "the second build started while the first held the only slot"
            assert second.waited()
            first.release.touch()
            first.join(timeout=60)
            second.wait_for(second.holds_slot.exists, "taking the slot the first build left")
        else:
            second.wait_for(second.holds_slot.exists, "starting while the first build still runs")
            assert first.is_alive() and not first.release.exists()
            assert not second.waited()
    finally:
        first.release.touch()
        second.release.touch()
        first.join(timeout=60)
        second.join(timeout=60)
    assert first.error is None and second.error is None, (first.error, second.error)
    assert not first.waited(), "the first build found no free slot: a slot is still held from elsewhere"
    assert f"build slot 1 of {max_builds}" in first.log.read_text().splitlines()


@pytest.mark.integration
def test_without_key_file_the_agent_holds_the_key(lab, tmp_path, monkeypatch):
    settings = settings_of(builder_config(lab, tmp_path, key_file=""))
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ssh/id_* to fall back on
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    with pytest.raises(StepError, match="no key to offer: key_file is empty, no ssh-agent answers"):
        ssh_transport.SSHTransport(settings.target).connect()
    socket_path = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(socket_path)], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not socket_path.exists():
            assert time.monotonic() < deadline, "ssh-agent did not start"
            time.sleep(0.05)
        monkeypatch.setenv("SSH_AUTH_SOCK", str(socket_path))
        subprocess.run(["ssh-add", "-q", str(lab["client_key"])], check=True, env={**os.environ})
        with ssh_transport.SSHTransport(settings.target) as connection:
            assert connection.capture("echo agent")[1] == "agent\n"
    finally:
        agent.terminate()
        agent.wait()


@pytest.mark.integration
def test_old_images_go_but_not_one_another_run_still_makes_a_sif_of(lab, tmp_path):
    name = f"keep{os.getpid()}"
    tags = [f"r2s-{name}:{word}" for word in ("aaa", "bbb", "ccc")]
    for tag in tags:
        subprocess.run(["docker", "tag", "debian:bookworm", tag], check=True)
    config = validated(yaml.safe_load(builder_config(lab, tmp_path, keep_images=1).read_text()))
    remote = builders.from_config(config, tmp_path / "log")
    try:
        with remote.session("save_image") as session:
            under_way = session.paths(name, "aaa")["folder"]
            Path(under_way).mkdir(parents=True)
            assert session.transport.existing([under_way, under_way + "-not"]) == {under_way}
            listing = ssh_builder.answer(session.ask(listing=ssh_builder.image_listing(tags[2])), "listing")
            remote.remove_old_images(session, name, tags[2], listing)
        left = subprocess.run(["docker", "image", "ls", "--format", "{{.Tag}}", f"r2s-{name}"], capture_output=True, text=True).stdout.split()
        assert sorted(left) == ["aaa", "ccc"]
        assert "still being made into SIFs: r2s-" in (tmp_path / "log").read_text()
    finally:
        subprocess.run(["docker", "image", "rm", *tags], capture_output=True)


@pytest.mark.integration
def test_trusting_an_unknown_host_records_its_key(lab, tmp_path):
    known_hosts = tmp_path / "known_hosts"
    config = yaml.safe_load(builder_config(lab, tmp_path, known_hosts=str(known_hosts), trust_unknown_host=True).read_text())
    with ssh_transport.SSHTransport(ssh_settings(config["builder"]).target):
        pass
    assert known_hosts.read_text().split()[1:] == lab["sshd"].known_hosts_line().split()[1:]
    config["builder"]["trust_unknown_host"] = False
    with ssh_transport.SSHTransport(ssh_settings(config["builder"]).target):
        pass  # known now: no trust needed


@pytest.mark.integration
def test_builder_without_enough_space(lab):
    # more free space than any disk has: the preflight's df check must refuse, in one line
    line = expect_one_line_failure(lab, "disk-full", "GB free in", min_free_gb=10**9)
    assert "min_free_gb: 1000000000" in line


@pytest.mark.integration
def test_connection_dropped_during_the_remote_build_is_one_line_and_the_rerun_completes(lab, tmp_path):
    workdir = tmp_path / "dropped"
    configfile = builder_config(lab, workdir)
    repo = GitRepo(tmp_path / "slow-repo", branch="main")
    # a build step that takes a while (a fresh word, so Docker's cache cannot skip it)
    repo.commit("slow", {"Dockerfile": f"FROM debian:bookworm\nRUN sleep 15 && echo {os.urandom(8).hex()} > /slow\n"})
    sha = repo.head()
    folder = folder_of(workdir, sha)
    config = {"repo": repo.path, "ref": "main", "name": NAME}
    command = [SNAKEMAKE, "--snakefile", str(PROJECT / "Snakefile"), "--directory", str(workdir), "--cores", "2", "build",
               "--configfile", str(configfile), "--config", f"repo={repo.path}", "ref=main", f"name={NAME}"]
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    build_log = folder / "logs" / "build_image.log"
    deadline = time.monotonic() + 600
    while "sleep 15" not in (build_log.read_text() if build_log.exists() else ""):
        assert run.poll() is None, f"the run ended before the build:\n{run.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.1)
    building = f"{NAME}:{sha}"
    assert processes_running(building), "repo2docker should be running on the builder"
    lab["sshd"].cut_sessions()
    _, stderr = run.communicate(timeout=300)
    assert run.returncode != 0
    assert "Traceback" not in stderr
    assert "the connection to builder" in stderr
    assert not (folder / "image.json").exists()
    # the builder saw its connection drop: the build there must not run on for nobody
    deadline = time.monotonic() + 20
    while processes_running(building):
        assert time.monotonic() < deadline, "repo2docker outlived the dropped connection on the builder"
        time.sleep(0.2)

    snakemake(workdir, "--unlock", "--configfile", configfile, config=config)
    snakemake(workdir, "build", "--configfile", configfile, config=config)
    sif = folder / f"{NAME}.sif"
    assert sha256sum(sif) == (folder / f"{NAME}.sif.sha256").read_text().split()[0]


@pytest.mark.integration
def test_an_upload_to_a_builder_gone_silent_ends_in_one_line(lab, tmp_path):
    """Issue 13 item 4: the source upload had no timeout and no keepalive, so a network that
    died in silence during it hung the step for good. Freeze the builder's sshd (the kernel keeps
    TCP up) once the source has begun to arrive there."""
    source = tmp_path / "source"
    source.mkdir()
    for index in range(16):
        (source / f"blob-{index:02d}").write_bytes(os.urandom(16 << 20))
    arrived = tmp_path / "remote-source" / "blob-00"
    body = f"run_step('build_image', lambda: t.send_folder({str(source)!r}, {str(arrived.parent)!r}))"
    step = step_on_builder(lab, tmp_path, body, QUICK_KEEPALIVE)
    deadline = time.monotonic() + 60
    while not (arrived.exists() and arrived.stat().st_size > 0):
        assert step.poll() is None, step.stderr.read()
        assert time.monotonic() < deadline, "the upload did not begin"
        time.sleep(0.005)
    _, stderr = communicate_while_frozen(step, lab["sshd"])
    assert step.returncode != 0 and "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(f"build_image: sending {source}: builder ") and lines[-1].endswith(
        "has not answered a keepalive for 3 s (the network is gone?); run again"
    ), stderr
    assert not (tmp_path / "remote-source" / "blob-15").exists(), "the upload finished before the freeze"
