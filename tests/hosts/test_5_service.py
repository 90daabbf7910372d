"""The build service (issue 17) in the three-host lab: set up on the builder host as
docs/build-service.md tells a site's administrator (`bash setup.sh build-service`, its printed
fingerprint and add-user command), used from the login host by two accounts with a token each,
over TLS checked against the printed fingerprint:

- the journey with `builder: {kind: http}` in profiles/remote/builder.yaml (docs/http-builder.md):
  `snakemake --profile remote --config repo=... launch_on=slurm` builds on the service and ends
  with Jupyter on node1, which answers with its token and refuses without;
- isolation: a build whose URL carries credentials (a git server with Basic authentication on the
  login host) is its owner's alone: the other account gets 404 for it, its log, SIF and receipt,
  and its own request for the same repository makes a build of its own; a public build is shared
  by commit; the password is in no file of the service;
- headless Chromium on the laptop, through an SSH tunnel to the service, signs in, watches a
  build's log arrive and follows the download link.

The builder host gets the service's own paths (/opt/repo2singularity/service, /etc/repo2singularity,
/srv/repo2singularity-service, /usr/local/bin/repo2singularity-service, ...) in a mount namespace
of its own (BuilderFileSystem): the set-up writes where it always does, and a service this
machine may run itself is left alone."""

import base64
import contextlib
import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from ..chromium import Chromium
from ..git_http_server import GitHttpServer
from .conftest import DEMO_FILES, Watcher, processes_of
from .lab import PROJECT, copy_checkout, jupyter_status, make_repo
from .topology import ADDRESSES, DOMAIN, LAPTOP_LINK, STATE, Account, kill_all, run, wait_for

SERVICE_NAME = f"builder.{DOMAIN}"
SERVICE_PORT = 8443
SERVICE_URL = f"https://{SERVICE_NAME}:{SERVICE_PORT}"
APP = Path("/opt/repo2singularity/service")
WORK = Path("/srv/repo2singularity-service")
# the builder host's own copies of the paths `setup.sh build-service` writes; the program's
# folder (its Python environment, made once where PyPI answers) outlives the session
FILE_SYSTEM = Path("/var/lib/r2s-hosts/builder-fs")
SESSION_FILE_SYSTEM = STATE / "builder-fs"
# the mount namespace of a builder-host command: each folder the set-up writes into is this
# session's own, with what else the machine has there bound into it; then the command
VIEW_SCRIPT = r"""
set -eu
own() {  # own REAL LAB NAME...: LAB over REAL, with REAL's other entries bound into it
    real=$1 lab=$2
    shift 2
    mkdir -p "$real" "$lab"
    for entry in "$real"/* "$real"/.[!.]*; do
        [ -e "$entry" ] || [ -L "$entry" ] || continue
        name=${entry##*/} mine=
        for owned in "$@"; do
            case $name in "$owned" | "$owned.partial") mine=1 ;; esac
        done
        [ -z "$mine" ] || continue
        target=$lab/$name
        if [ -L "$entry" ]; then
            rm -f "$target" && cp -P "$entry" "$target"
        elif [ -d "$entry" ]; then
            [ -d "$target" ] || mkdir "$target"
            mount --rbind "$entry" "$target"
        else
            [ -e "$target" ] || : >"$target"
            mount --bind "$entry" "$target"
        fi
    done
    mount --rbind "$lab" "$real"
}
own_all() {  # own_all REAL LAB: LAB over REAL
    mkdir -p "$1" "$2"
    mount --bind "$2" "$1"
}
own_file() {  # own_file REAL LAB
    [ -e "$1" ] || : >"$1"
    [ -e "$2" ] || : >"$2"
    mount --bind "$2" "$1"
}
mount --make-rprivate /
own /opt/repo2singularity "$R2S_FS/opt" service
own /usr/local/bin "$R2S_SESSION_FS/bin" repo2singularity-service
own /usr/local/lib/repo2singularity "$R2S_SESSION_FS/lib" supervise-service
own_all /etc/repo2singularity "$R2S_SESSION_FS/etc"
own_all /srv/repo2singularity-service "$R2S_SESSION_FS/srv"
own_file /run/repo2singularity-service.pid "$R2S_SESSION_FS/service.pid"
own_file /var/log/repo2singularity-service.log "$R2S_SESSION_FS/service.log"
exec "$@"
"""


def in_builder_file_system(argv):
    """argv in a mount namespace with the builder host's own service paths."""
    return ["env", f"R2S_FS={FILE_SYSTEM}", f"R2S_SESSION_FS={SESSION_FILE_SYSTEM}", "unshare", "--mount", "--", "sh", "-c", VIEW_SCRIPT, "sh",
            *(str(word) for word in argv)]


def on_builder(lab, argv, **kwargs):
    """A root command on the builder host (its network, name, /etc/hosts and service paths)."""
    kwargs.setdefault("check", False)
    return run(in_builder_file_system(lab.builder.command(argv)), **kwargs)


def make_service_environment():
    """The program's copy and its Python environment, made here where PyPI answers, as an
    administrator behind a proxy would: `setup.sh build-service` on the builder host, which has
    no network, then finds the environment up to date."""
    (FILE_SYSTEM / "opt" / APP.name).mkdir(parents=True, exist_ok=True)
    copy_checkout(Account("root"), FILE_SYSTEM / "opt" / APP.name)
    script = f"cd {APP} && exec env -i HOME=/root PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 bash setup/python.sh"
    result = run(in_builder_file_system(["bash", "-c", script]), check=False, timeout=900)
    assert result.returncode == 0, f"the service's python environment:\n{result.stdout}\n{result.stderr}"


@dataclass
class Service:
    """What `bash setup.sh build-service` printed, and each account's token from add-user."""

    output: str
    url: str
    certificate: Path
    fingerprint: str
    add_user: list
    tokens: dict
    seconds: float


def parse_report(output):
    url = re.search(r"^build service ready: (\S+)", output, re.MULTILINE)
    certificate = re.search(r"^\s+certificate: (\S+)", output, re.MULTILINE)
    fingerprint = re.search(r"^\s+SHA-256 fingerprint: ([0-9A-F:]{95})$", output, re.MULTILINE)
    add_user = re.search(r"^\s+(\S+ add-user) NAME$", output, re.MULTILINE)
    assert url and certificate and fingerprint and add_user, f"setup.sh build-service did not end with its report:\n{output}"
    return url.group(1), Path(certificate.group(1)), fingerprint.group(1), add_user.group(1).split()


def colon_hex(digest):
    return ":".join(f"{byte:02X}" for byte in digest)


@pytest.fixture(scope="module")
def service(lab):
    SESSION_FILE_SYSTEM.mkdir(parents=True, exist_ok=True)
    make_service_environment()
    started = time.monotonic()
    # as docs/build-service.md says; the host's name (hostname -f) is builder.r2s.test
    result = on_builder(lab, ["bash", "setup.sh", "build-service"], cwd=PROJECT, timeout=1800)
    assert result.returncode == 0, f"setup.sh build-service failed:\n{result.stdout}\n{result.stderr}"
    seconds = time.monotonic() - started
    url, certificate, fingerprint, add_user = parse_report(result.stdout)
    tokens = {}
    for account in (lab.login_account, lab.other_account):
        added = on_builder(lab, [*add_user, account.name], timeout=120)
        assert added.returncode == 0 and "shown this once" in added.stderr, added.stderr
        tokens[account.name] = added.stdout.strip()
        # the administrator hands out the certificate (it is public; the fingerprint says it is the one)
        copy = account.home / "service.crt"
        copy.write_text(on_builder(lab, ["cat", certificate], check=True).stdout)
        shutil.chown(copy, account.name, account.name)
    try:
        yield Service(result.stdout, url, certificate, fingerprint, add_user, tokens, seconds)
    finally:
        pid_file = SESSION_FILE_SYSTEM / "service.pid"
        supervisor = pid_file.read_text().strip() if pid_file.exists() else ""
        if supervisor.isdigit() and "supervise-service" in Path(f"/proc/{supervisor}/cmdline").read_text(errors="replace"):
            # the supervisor passes SIGTERM on; the service fails its unfinished builds and exits
            kill_all([int(supervisor)], wait=30)


def curl(lab, account, path, token=None, body=None, timeout=60):
    """(status, body) of an API request as `account` on the login host, with curl and the
    certificate the administrator handed out; the token goes through curl's config on stdin, so it
    is on no command line."""
    config = [f'header = "Authorization: token {token}"'] if token else []
    if body is not None:
        config += ['header = "Content-Type: application/json"', f"data-binary = {json.dumps(json.dumps(body))}"]
    argv = ["curl", "-sS", "--max-time", timeout, "--cacert", account.home / "service.crt", "-K", "-", "-w", "\n%{http_code}", SERVICE_URL + path]
    result = lab.login.run(argv, user=account, input="\n".join(config) + "\n", check=False, timeout=timeout + 10)
    text, _, status = result.stdout.rpartition("\n")
    assert status.isdigit() and status != "000", f"curl {path} as {account.name}: {result.stderr}"
    return int(status), text


def api(lab, account, service, path, body=None, status=200, timeout=60):
    code, text = curl(lab, account, path, service.tokens[account.name], body, timeout)
    assert code == status, f"{path} as {account.name}: {code} {text}"
    return json.loads(text) if text.startswith(("{", "[")) else text


def test_set_up_prints_the_fingerprint_of_the_certificate_the_service_presents(lab, service):
    assert service.url == SERVICE_URL, service.output
    for account in (lab.login_account, lab.other_account):
        # what a user compares: the certificate handed out, and the fingerprint the administrator read out
        printed = lab.login.run(["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", account.home / "service.crt"], user=account)
        assert printed.stdout.strip().split("=", 1)[1] == service.fingerprint
    presented = lab.login.call(ssl.get_server_certificate, (ADDRESSES["builder"], SERVICE_PORT))
    assert colon_hex(hashlib.sha256(ssl.PEM_cert_to_DER_cert(presented)).digest()) == service.fingerprint
    # the service listens on the builder's address, and nothing else than the one handed out is trusted
    assert any(port == SERVICE_PORT for _, port, _ in lab.builder.listening())
    untrusted = lab.login.run(["curl", "-sS", "-o", "/dev/null", f"{SERVICE_URL}/badge.svg"], user=lab.login_account, check=False)
    assert untrusted.returncode == 60, untrusted.stderr


def test_each_account_signs_in_with_its_own_token(lab, service):
    assert set(service.tokens) == {lab.login_account.name, lab.other_account.name}
    assert len(set(service.tokens.values())) == 2
    for account in (lab.login_account, lab.other_account):
        assert api(lab, account, service, "/api/users/me") == {"name": account.name}
    assert curl(lab, lab.other_account, "/api/users/me")[0] == 401
    assert curl(lab, lab.other_account, "/api/users/me", token="0" * 64)[0] == 401
    # the service keeps only the tokens' hashes
    users = on_builder(lab, ["cat", WORK / "users.json"], check=True).stdout
    assert not any(token in users for token in service.tokens.values())


HTTP_BUILDER_YAML = f"""\
# a build service as the builder (docs/http-builder.md)
builder:
  kind: http
  url: {SERVICE_URL}
  token_env: R2S_SERVICE_TOKEN
  ca_file: ~/service.crt
"""


@contextlib.contextmanager
def builder_yaml(lab, text=HTTP_BUILDER_YAML):
    """profiles/remote/builder.yaml of the login account's checkout as docs/http-builder.md says
    (the other journeys of tests/hosts find theirs again afterwards)."""
    path = lab.checkout / "profiles" / "remote" / "builder.yaml"
    original = path.read_text()
    path.write_text(text)
    try:
        yield path
    finally:
        path.write_text(original)


def test_check_builder_from_the_login_host(lab, service):
    """`snakemake --profile remote check_builder` checks the URL, the certificate and the token,
    each failure in one line."""
    # a repository to name: the lab's checkout is a copy without .git, where the bundled example
    # (the default repo) is not a git repository and every command without repo= stops on it
    repo = f"repo=git://{ADDRESSES['login']}/none.git"

    def check(token, text=HTTP_BUILDER_YAML):
        with builder_yaml(lab, text):
            result = lab.as_login(["snakemake", "--profile", "remote", "check_builder", "--config", repo], env={"R2S_SERVICE_TOKEN": token},
                                  check=False, timeout=300)
        return result.returncode, result.stdout + result.stderr

    code, output = check(service.tokens[lab.login_account.name])
    signed_in = re.compile(rf"build service {re.escape(SERVICE_URL)} answers; signed in as '?{lab.login_account.name}'?$", re.MULTILINE)
    assert code == 0 and signed_in.search(output), output[-3000:]
    code, output = check("0" * 64)
    assert code != 0 and f"the build service {SERVICE_URL} refused the token in $R2S_SERVICE_TOKEN" in output, output[-3000:]
    code, output = check(service.tokens[lab.login_account.name], HTTP_BUILDER_YAML.replace("  ca_file: ~/service.crt\n", ""))
    assert code != 0 and f"the build service {SERVICE_URL}: TLS certificate not accepted: self-signed certificate" in output, output[-3000:]


@dataclass
class HttpJourney:
    url: str
    sha: str
    result: subprocess.CompletedProcess
    watcher: Watcher
    folder: Path
    seconds: float

    @property
    def output(self):
        return self.result.stdout + self.result.stderr

    def connection(self):
        path = self.folder / "launch.json"
        assert path.exists(), f"no Jupyter server: the run failed ({self.result.returncode}): {self.result.stderr[-3000:]}"
        return json.loads(path.read_text())


@pytest.fixture(scope="module")
def http_journey(lab, service):
    """The demo repository (the example's Dockerfile, Debian's Jupyter), one commit of this module's
    own so that nothing of tests/hosts' other journeys is reused, built on the service and launched
    on node1 by the login account as docs/http-builder.md says."""
    work = STATE / "repos" / "service-demo"
    files = {name: PROJECT / "example" / name for name in DEMO_FILES}
    make_repo(work, {**files, "BUILT_BY": f"the build service, session {secrets.token_hex(4)}\n"})
    url = lab.git.publish("service-demo", work)
    sha = run(["git", "-C", work, "rev-parse", "HEAD"]).stdout.strip()
    token = {"R2S_SERVICE_TOKEN": service.tokens[lab.login_account.name]}
    command = ["snakemake", "--profile", "remote", "--config", f"repo={url}", "ref=main", "launch_on=slurm"]
    with builder_yaml(lab):
        ready = lab.as_login(["bash", "setup.sh", "login", "remote"], env=token, check=False, timeout=900)
        assert ready.returncode == 0 and f"ok: build service {SERVICE_URL}" in ready.stdout, f"{ready.stdout}\n{ready.stderr}"
        started = time.monotonic()
        with Watcher(lab) as watcher:
            result = lab.as_login(command, env=token, check=False, timeout=2400)
        seconds = time.monotonic() - started
        folders = list((lab.checkout / "results").glob(f"*/{sha}"))
        assert len(folders) == 1, f"no results/*/{sha} folder; the run said:\n{result.stdout}\n{result.stderr[-4000:]}"
        yield HttpJourney(url, sha, result, watcher, folders[0], seconds)
        lab.as_login(["snakemake", "--profile", "remote", "stop", "--config", f"repo={url}", "ref=main"], check=False)


def test_the_journey_builds_on_the_service_and_ends_with_jupyter_on_node1(lab, service, http_journey):
    assert http_journey.result.returncode == 0, http_journey.output[-4000:]
    folder = http_journey.folder
    name = folder.parent.name
    receipt = json.loads((folder / "image.json").read_text())
    assert {key: receipt["builder"][key] for key in ("kind", "url")} == {"kind": "http", "url": SERVICE_URL}, receipt["builder"]
    build = api(lab, lab.login_account, service, f"/api/builds/{receipt['builder']['build_id']}")
    sif_sha256 = (folder / f"{name}.sif.sha256").read_text().split()[0]
    assert (build["phase"], build["sha"], build["sif_sha256"]) == ("built", http_journey.sha, sif_sha256)
    assert run(["sha256sum", folder / f"{name}.sif"]).stdout.split()[0] == sif_sha256
    # the service's phases reached the terminal
    assert re.search(r"\bbuilding\b", http_journey.output) and re.search(r"\bbuilt\b", http_journey.output), http_journey.output[-3000:]
    # the login account never ran Docker; Jupyter ran on node1 as its job
    assert http_journey.watcher.docker_processes == set()
    connection = http_journey.connection()
    assert connection["host"] == ADDRESSES["node1"] and connection["node"] == "node1"
    record = lab.cluster.job(connection["slurm_job_id"])
    assert (record["NodeList"], record["UserId"].split("(")[0]) == ("node1", lab.login_account.name), record


def test_jupyter_answers_the_login_host_with_its_token_only(lab, http_journey):
    connection = http_journey.connection()
    assert lab.login.call(jupyter_status, connection["url"], connection["token"]) == 200
    assert lab.login.call(jupyter_status, connection["url"]) == 403


def test_the_service_token_stays_on_the_login_host(lab, service, http_journey):
    """Not in the run's output, results/, or the environment of the Jupyter job's processes."""
    token = service.tokens[lab.login_account.name]
    assert token not in http_journey.output
    leaked = run(["grep", "-rlF", "--exclude=*.sif", "--exclude-dir=sandbox", token, lab.checkout / "results"], check=False)
    assert leaked.stdout == "", leaked.stdout
    environments = [Path(f"/proc/{pid}/environ").read_bytes() for pid, cmdline in processes_of(lab.login_account.uid) if "jupyter" in cmdline]
    assert environments, "no Jupyter process of the login account"
    assert not any(token.encode() in environment for environment in environments)


PRIVATE_DOCKERFILE = "FROM debian:bookworm\nRUN echo {word} > /private-word\n"


@dataclass
class PrivateRepo:
    server: GitHttpServer
    sha: str
    passwords: dict

    def url(self, user=None):
        return self.server.url("secret.git", user, self.passwords.get(user))


@pytest.fixture(scope="module")
def private_repo(lab):
    """A repository over HTTP with Basic authentication on the login host; each account has its own
    password for it."""
    work = STATE / "repos" / "secret"
    make_repo(work, {"Dockerfile": PRIVATE_DOCKERFILE.format(word=secrets.token_hex(8))})
    bare = STATE / "private-git" / "secret.git"
    shutil.rmtree(bare, ignore_errors=True)
    run(["git", "clone", "--quiet", "--bare", work, bare])
    passwords = {lab.login_account.name: secrets.token_hex(12), lab.other_account.name: secrets.token_hex(12)}
    server = lab.login.call(GitHttpServer, bare.parent, passwords, address=ADDRESSES["login"])
    try:
        yield PrivateRepo(server, run(["git", "-C", work, "rev-parse", "HEAD"]).stdout.strip(), passwords)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def private_build(lab, service, private_repo):
    """The login account builds the private repository through the workflow (`build`, with the
    credentials in the URL, given in a manifest); the other account then tries what it
    can."""
    # in a manifest of the account's, not on the command line, which Snakemake prints (docs/security.md)
    manifest = lab.login_account.home / "private.tsv"
    manifest.write_text(f"name\trepo\tref\nsecret\t{private_repo.url(lab.login_account.name)}\tmain\n")
    shutil.chown(manifest, lab.login_account.name, lab.login_account.name)
    manifest.chmod(0o600)
    with builder_yaml(lab):
        result = lab.as_login(["snakemake", "--profile", "remote", "--config", f"manifest={manifest}"],
                              env={"R2S_SERVICE_TOKEN": service.tokens[lab.login_account.name]}, check=False, timeout=1200)
    assert result.returncode == 0, f"the private build failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    folders = list((lab.checkout / "results").glob(f"*/{private_repo.sha}"))
    assert len(folders) == 1, result.stderr[-3000:]
    receipt = json.loads((folders[0] / "image.json").read_text())
    return receipt["builder"]["build_id"], result


def test_a_private_build_is_its_owners_alone(lab, service, private_repo, private_build):
    build_id, _ = private_build
    owner, other = lab.login_account, lab.other_account
    assert api(lab, owner, service, f"/api/builds/{build_id}")["phase"] == "built"
    # another user sees neither the build nor its log, SIF or receipt: 404, as for no build at all
    for path in ("", "/events", "/sif", "/image"):
        assert api(lab, other, service, f"/api/builds/{build_id}{path}", status=404) == {"error": f"no build {build_id}"}
    # the service lends nobody the owner's credentials
    refused = api(lab, other, service, "/api/builds", {"url": private_repo.url(), "ref": "main"}, status=400)
    assert "git ls-remote failed" in refused["error"]
    # with credentials of its own, the other user gets a build of its own, not the owner's cache
    own = api(lab, other, service, "/api/builds", {"url": private_repo.url(other.name), "ref": private_repo.sha})
    assert own["id"] != build_id and own["phase"] != "built" and own["sha"] == private_repo.sha
    again = api(lab, owner, service, "/api/builds", {"url": private_repo.url(owner.name), "ref": private_repo.sha})
    assert (again["id"], again["phase"]) == (build_id, "built")
    # the other user's build runs to its end (its event stream ends there), and is as hidden from the owner
    events = api(lab, other, service, f"/api/builds/{own['id']}/events", timeout=600)
    assert '"phase": "built"' in events or '"phase":"built"' in events, events[-2000:]
    assert api(lab, owner, service, f"/api/builds/{own['id']}", status=404) == {"error": f"no build {own['id']}"}


def test_no_password_reaches_the_service_or_the_login_accounts_files(lab, service, private_repo, private_build):
    _, result = private_build
    for password in private_repo.passwords.values():
        assert password not in result.stdout + result.stderr
        found = on_builder(lab, ["grep", "-rlF", "--exclude=*.sif", password, WORK, "/var/log/repo2singularity-service.log"], timeout=120)
        assert found.returncode == 1 and found.stdout == "", f"the password is in {found.stdout}{found.stderr}"
        leaked = run(["grep", "-rlF", "--exclude=*.sif", "--exclude-dir=sandbox", password, lab.checkout / "results", lab.checkout / ".snakemake"],
                     check=False)
        assert leaked.stdout == "", leaked.stdout
    # the git server saw each account's own credentials, the service's fetches included
    assert {user for _, _, user, _ in private_repo.server.seen if user} == set(private_repo.passwords)


def test_a_public_build_is_shared_by_commit(lab, service, http_journey):
    receipt = json.loads((http_journey.folder / "image.json").read_text())
    shared = api(lab, lab.other_account, service, "/api/builds", {"url": http_journey.url, "ref": http_journey.sha})
    assert (shared["id"], shared["phase"]) == (receipt["builder"]["build_id"], "built")
    assert api(lab, lab.other_account, service, f"/api/builds/{shared['id']}")["sif_sha256"] == receipt["builder"]["sif_sha256"]


LIVE_DOCKERFILE = "FROM debian:bookworm\nRUN echo first-{word} && sleep 4\nRUN echo second-{word} && sleep 4\n"


@pytest.fixture(scope="module")
def service_tunnel(lab):
    """On the laptop, which reaches the login host only: `ssh -N -L 8443:BUILDER:8443` through the
    login host, as the login account, with a key it authorized and the login host's key known."""
    folder = Path(tempfile.mkdtemp(prefix="laptop-service-", dir=STATE))
    key = folder / "id_ed25519"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key])
    authorized = lab.login_account.home / ".ssh" / "authorized_keys"
    with open(authorized, "a") as handle:
        handle.write(Path(f"{key}.pub").read_text())
    shutil.chown(authorized, lab.login_account.name, lab.login_account.name)
    authorized.chmod(0o600)
    login = LAPTOP_LINK["login"]
    (folder / "known_hosts").write_text(lab.tunnel_sshd.known_hosts_line(login))
    (folder / "config").write_text(
        f"IdentityFile {key}\nUserKnownHostsFile {folder / 'known_hosts'}\nStrictHostKeyChecking yes\nBatchMode yes\nExitOnForwardFailure yes\n"
    )
    command = ["ssh", "-F", folder / "config", "-N", "-L", f"{SERVICE_PORT}:{ADDRESSES['builder']}:{SERVICE_PORT}", f"{lab.login_account.name}@{login}"]
    process = lab.laptop.popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: process.poll() is not None or lab.laptop.connects("127.0.0.1", SERVICE_PORT), 30, "the tunnel did not open")
        assert process.poll() is None, f"the tunnel command ended: {process.stderr.read()}"
        yield folder
    finally:
        process.terminate()
        process.wait(timeout=10)


def spki_sha256(certificate_pem):
    """The base64 SHA-256 of a certificate's public key, as Chromium pins it."""
    key = run(["openssl", "x509", "-pubkey", "-noout"], input=certificate_pem).stdout
    der = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "der"], input=key.encode(), capture_output=True, check=True).stdout
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def test_chromium_on_the_laptop_watches_the_log_arrive_and_downloads_the_sif(lab, service, service_tunnel):
    from repo2singularity.service.web import launch_path

    word = secrets.token_hex(6)
    work = STATE / "repos" / "live"
    make_repo(work, {"Dockerfile": LIVE_DOCKERFILE.format(word=word)})
    url = lab.git.publish("live", work)
    # the laptop trusts the certificate whose fingerprint the administrator printed, and no other
    certificate = (lab.login_account.home / "service.crt").read_text()
    assert colon_hex(hashlib.sha256(ssl.PEM_cert_to_DER_cert(certificate)).digest()) == service.fingerprint
    flags = [f"--host-resolver-rules=MAP {SERVICE_NAME} 127.0.0.1", f"--ignore-certificate-errors-spki-list={spki_sha256(certificate)}"]
    browser = lab.laptop.call(Chromium, service_tunnel / "chromium-profile", flags)
    try:
        browser.navigate(SERVICE_URL + launch_path(url, "main"))
        assert browser.evaluate("location.protocol") == "https:"
        assert browser.evaluate("!!document.getElementById('token')"), "no sign-in form"
        token = service.tokens[lab.login_account.name]
        browser.evaluate(f"document.getElementById('token').value = {json.dumps(token)}; document.querySelector('form').submit(); true")
        browser.wait_for(f"document.getElementById('user') && document.getElementById('user').textContent === {json.dumps(lab.login_account.name)}",
                         30, "not signed in")
        # the launch URL started the build: its log arrives while it runs
        log = "document.getElementById('log').textContent"
        browser.wait_for(f"{log}.includes('first-{word}')", 300, "the first step's line never arrived")
        early = browser.evaluate(log)
        assert browser.evaluate("document.getElementById('result').hidden") is True
        assert browser.evaluate("document.querySelector('#phases span.current').dataset.phase") != "built"
        browser.wait_for("!document.getElementById('result').hidden", 300, "no download link")
        late = browser.evaluate(log)
        assert f"second-{word}" not in early and f"second-{word}" in late and len(late) > len(early), (early[-1000:], late[-1000:])
        assert browser.evaluate("document.querySelector('#phases span.current').dataset.phase") == "built"
        href = browser.evaluate("document.getElementById('download').getAttribute('href')")
        build_id = re.fullmatch(r"/api/builds/([0-9a-f]+)/sif", href).group(1)
        # the link downloads the SIF with the sign-in cookie, through the tunnel
        fetched = browser.evaluate("fetch(document.getElementById('download').href).then(r => r.status + ' ' + r.headers.get('X-Sif-Sha256'))")
        build = api(lab, lab.login_account, service, f"/api/builds/{build_id}")
        assert fetched == f"200 {build['sif_sha256']}"
        command = browser.evaluate("document.getElementById('launch-command').textContent")
        # the certificate is set-up's self-signed one: the page names it, with the printed fingerprint
        assert browser.evaluate("document.getElementById('certificate-fingerprint').textContent") == service.fingerprint
        assert " --ca-file service.crt " in command, command
    finally:
        browser.close()
    # the page's command, as the login account in its home (where it keeps the service's
    # certificate) with its token: without --run --slurm (this image has no Jupyter) it fetches
    # the SIF the service built (without --ca-file, which the page once left out, it stopped on
    # the self-signed certificate)
    words = shlex.split(command)
    assert words[:2] == ["repo2singularity", "--remote"] and words[-3:-1] == ["--run", "--slurm"], command
    home = lab.login_account.home
    shutil.rmtree(home / "results", ignore_errors=True)
    try:
        fetched = lab.login.run([lab.checkout / ".venv" / "bin" / words[0], *words[1:-3], words[-1]], user=lab.login_account, cwd=home,
                                env={"R2S_SERVICE_TOKEN": service.tokens[lab.login_account.name]}, check=False, timeout=600)
        assert fetched.returncode == 0, f"{command}\n{fetched.stdout[-2000:]}\n{fetched.stderr[-3000:]}"
        sif = next((home / "results").glob("*/*/*.sif"))
        assert run(["sha256sum", sif]).stdout.split()[0] == build["sif_sha256"]
    finally:
        shutil.rmtree(home / "results", ignore_errors=True)
        shutil.rmtree(home / ".snakemake", ignore_errors=True)


RESTART_DOCKERFILE = "FROM debian:bookworm\nRUN echo {word} && sleep 8\n"


def service_processes(lab):
    """{pid: command line} of the builder host's processes of the service's account."""
    account = Account("r2s-service").uid
    found = {}
    for pid in lab.builder.pids():
        try:
            if Path(f"/proc/{pid}").stat().st_uid == account:
                found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").replace("\0", " ")
        except OSError:
            continue
    return found


def test_a_killed_service_is_restarted_and_fails_the_build_it_had_running(lab, service):
    """No systemd here: set-up's supervisor restarts the service killed outright; the build it ran
    is failed from its record, its workflow ended, and asking again builds anew."""
    other = lab.other_account
    work = STATE / "repos" / "restart"
    make_repo(work, {"Dockerfile": RESTART_DOCKERFILE.format(word=secrets.token_hex(6))})
    body = {"url": lab.git.publish("restart", work), "ref": "main"}
    build = api(lab, other, service, "/api/builds", body)
    wait_for(lambda: api(lab, other, service, f"/api/builds/{build['id']}")["phase"] == "building", 120, "the build never reached building",
             interval=0.5)
    before = service_processes(lab)
    servers = [pid for pid, command in before.items() if "repo2singularity.service" in command and command.rstrip().endswith(" serve")]
    workflow = [pid for pid, command in before.items() if "snakemake" in command and build["id"] in command]
    assert len(servers) == 1 and workflow, before
    os.kill(servers[0], signal.SIGKILL)

    def answers_again():
        """A new service process (the supervisor starts one after 2 s) answers on the same port."""
        if not [pid for pid, command in service_processes(lab).items() if command.rstrip().endswith(" serve") and pid != servers[0]]:
            return False
        try:
            return curl(lab, other, "/api/users/me", service.tokens[other.name], timeout=5)[0] == 200
        except AssertionError:  # not listening yet
            return False

    wait_for(answers_again, 60, "the service did not come back")
    failed = api(lab, other, service, f"/api/builds/{build['id']}")
    assert failed["phase"] == "failed" and "restarted" in failed["error"], failed
    events = api(lab, other, service, f"/api/builds/{build['id']}/events")
    assert '"failed"' in events.strip().splitlines()[-1], events[-1000:]
    # the new service SIGTERMs the old build's process group; Snakemake then stops its job, which
    # stops repo2docker: on two cores busy with the rest of CI that took more than 30 s once
    commands = {pid: before[pid][:300] for pid in workflow}
    wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workflow), 90, f"the build's workflow outlived the service: {commands}")
    assert "supervisor: the service ended" in (SESSION_FILE_SYSTEM / "service.log").read_text()
    again = api(lab, other, service, "/api/builds", body)
    assert again["id"] != build["id"], again
    events = api(lab, other, service, f"/api/builds/{again['id']}/events", timeout=600)
    assert '"built"' in events.strip().splitlines()[-1], events[-2000:]


def fingerprint_of(lab, path):
    return on_builder(lab, ["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", path], check=True).stdout.strip().split("=", 1)[1]


def test_set_up_again_with_another_name_makes_a_certificate_for_that_name(lab, service):
    """(Last: it restarts the service.) The self-signed certificate made for the first name would be
    refused under the new one: a new one is made and printed, the old pair kept beside it; run
    once more with the same name, the certificate stays."""
    tls = Path("/etc/repo2singularity/tls")
    result = on_builder(lab, ["bash", "setup.sh", "build-service", "--name", "builder"], cwd=PROJECT, timeout=600)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    url, certificate, fingerprint, _ = parse_report(result.stdout)
    assert (url, certificate) == ("https://builder:8443", tls / "service.crt")
    assert "did not name builder" in result.stdout and fingerprint != service.fingerprint
    assert fingerprint_of(lab, tls / "service.crt.replaced") == service.fingerprint
    checked = on_builder(lab, ["openssl", "x509", "-noout", "-checkhost", "builder", "-in", certificate], check=True).stdout
    assert "does match" in checked, checked
    presented = lab.login.call(ssl.get_server_certificate, (ADDRESSES["builder"], SERVICE_PORT))
    assert colon_hex(hashlib.sha256(ssl.PEM_cert_to_DER_cert(presented)).digest()) == fingerprint
    again = on_builder(lab, ["bash", "setup.sh", "build-service", "--name", "builder"], cwd=PROJECT, timeout=600)
    assert again.returncode == 0 and "TLS: present" in again.stdout, f"{again.stdout}\n{again.stderr}"
    assert parse_report(again.stdout)[2] == fingerprint
