"""The three hosts as the README's commands leave them, for tests/hosts and bench/hosts.py: the
topology up, the login account's checkout and key, the builder made by `setup.sh builder`, the
login node readied as the README says (builder.yaml filled in, known_hosts, `setup.sh login`)."""

import contextlib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import requests

from .topology import (
    ADDRESSES,
    APPTAINER_GROUP,
    BUILD_ACCOUNT,
    LOGIN_ACCOUNT,
    OTHER_LOGIN_ACCOUNT,
    STATE,
    Account,
    GitServer,
    Network,
    SlurmCluster,
    TunnelSshd,
    exclusive,
    run,
)

PROJECT = Path(__file__).resolve().parents[2]
# what a copy of the checkout leaves out: its git folder, environment, results and caches
EXCLUDED = ["--exclude=./.git", "--exclude=./.venv", "--exclude=./results", "--exclude=./.snakemake", "--exclude=./bench/out",
            "--exclude=__pycache__", "--exclude=.pytest_cache"]
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "Test",
    "GIT_AUTHOR_EMAIL": "test@example.invalid",
    "GIT_COMMITTER_NAME": "Test",
    "GIT_COMMITTER_EMAIL": "test@example.invalid",
}


@dataclass
class Lab:
    network: Network
    cluster: SlurmCluster
    git: GitServer
    tunnel_sshd: TunnelSshd
    login_account: Account
    build_account: Account
    # a second user of the login node (no checkout of its own)
    other_account: Account

    @property
    def login(self):
        return self.network["login"]

    @property
    def builder(self):
        return self.network["builder"]

    @property
    def node(self):
        return self.network["node1"]

    @property
    def laptop(self):
        return self.network["laptop"]

    @property
    def checkout(self):
        """The login account's copy of this repository (its results/ stands for the shared file
        system of the cluster)."""
        return self.login_account.home / "repo2singularity"

    def as_login(self, argv, check=True, timeout=1800, env=None, **kwargs):
        """A command of the login account, on the login host, in its checkout, with the checkout's
        environment first on the PATH (as after `source .venv/bin/activate`)."""
        return self.login.run(argv, user=self.login_account, env=self.venv_env(env), cwd=self.checkout, check=check, timeout=timeout, **kwargs)

    def popen_as_login(self, argv, env=None, **kwargs):
        return self.login.popen(argv, user=self.login_account, env=self.venv_env(env), cwd=self.checkout, **kwargs)

    def venv_env(self, env=None):
        path = f"{self.checkout / '.venv' / 'bin'}:/usr/local/bin:/usr/bin:/bin"
        return {"PATH": path, "VIRTUAL_ENV": str(self.checkout / ".venv"), **(env or {})}


def make_repo(folder, files, message="first"):
    """A working repository on branch main with the given files committed."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    env = {**os.environ, **GIT_IDENTITY}
    run(["git", "-C", folder, "init", "--quiet", "--initial-branch=main"], env=env)
    return commit(folder, files, message)


def commit(folder, files, message):
    env = {**os.environ, **GIT_IDENTITY}
    for name, text in files.items():
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, Path):
            shutil.copy2(text, target)
        else:
            target.write_text(text)
    run(["git", "-C", folder, "add", "--all"], env=env)
    run(["git", "-C", folder, "commit", "--quiet", "-m", message], env=env)
    return folder


def copy_checkout(account, target):
    """This checkout's files into the account's own copy, afresh each session; its .venv stays
    (setup/python.sh remakes it when requirements.txt changed)."""
    target.mkdir(parents=True, exist_ok=True)
    for entry in target.iterdir():
        if entry.name != ".venv":
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    pack = subprocess.Popen(["tar", "-c", *EXCLUDED, "-C", str(PROJECT), "."], stdout=subprocess.PIPE)
    run(["tar", "-x", "-C", target], stdin=pack.stdout)
    assert pack.wait() == 0
    run(["chown", "-R", f"{account.name}:{account.name}", target])


@contextlib.contextmanager
def open_lab():
    """The topology, its daemons and the login account's checkout; all of it is torn down on
    leaving, also after a failure."""
    assert os.geteuid() == 0, "tests/hosts runs as root (it makes network namespaces): sudo .venv/bin/python -m pytest tests/hosts"
    with exclusive():
        network = Network()
        try:
            network.up()
            login_account = Account(LOGIN_ACCOUNT).ensure(groups=[APPTAINER_GROUP], not_in=["docker"])
            other_account = Account(OTHER_LOGIN_ACCOUNT).ensure(not_in=["docker"])
            cluster = SlurmCluster(network)
            cluster.start()
            git = GitServer(network)
            git.start()
            tunnel_sshd = TunnelSshd(network)
            tunnel_sshd.start()
            lab = Lab(network, cluster, git, tunnel_sshd, login_account, Account(BUILD_ACCOUNT), other_account)
            prepare_login_account(lab)
            yield lab
        finally:
            network.down()


def prepare_login_account(lab):
    account = lab.login_account
    copy_checkout(account, lab.checkout)
    # the environment is made where PyPI answers (this namespace), as on a login node with a
    # proxy; `setup.sh login` in the login host's namespace then finds it up to date
    run([*account.prefix(), "bash", "setup/python.sh"], cwd=lab.checkout, timeout=900)
    ssh = account.home / ".ssh"
    key = ssh / "id_ed25519"
    if not key.exists():
        run([*account.prefix(), "mkdir", "-p", "-m", "0700", ssh])
        run([*account.prefix(), "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{account.name}@login", "-f", key])
    # a known_hosts of this session only: the builder's line is added as the README says
    for name in ("known_hosts", "authorized_keys"):
        (ssh / name).unlink(missing_ok=True)


@dataclass
class BuilderReport:
    """What `bash setup.sh builder ACCOUNT --authorize KEY` printed for the login node."""

    output: str
    host: str
    port: int
    user: str
    fingerprints: list
    known_hosts_lines: list


def parse_builder_report(output):
    yaml_part = output.split("profiles/remote/builder.yaml", 1)[1].split("~/.ssh/known_hosts", 1)[0]
    values = dict(re.findall(r"^\s+(host|port|user): (\S+)\s*$", yaml_part, re.MULTILINE))
    known_part = output.split("~/.ssh/known_hosts (append):", 1)[1].split("\n\n", 1)[0]
    return BuilderReport(
        output=output,
        host=values["host"],
        port=int(values["port"]),
        user=values["user"],
        fingerprints=re.findall(r"host key: \d+ (SHA256:\S+)", output),
        known_hosts_lines=[line.strip() for line in known_part.splitlines() if line.strip()],
    )


def make_builder(lab):
    """The README's builder command, run as root on the builder host with the login account's
    public key (as its administrator would get it: a copy of the .pub file)."""
    pubkey = STATE / "login-key.pub"
    shutil.copy(lab.login_account.home / ".ssh" / "id_ed25519.pub", pubkey)
    result = lab.builder.run(["bash", "setup.sh", "builder", BUILD_ACCOUNT, "--authorize", pubkey], cwd=PROJECT, check=False, timeout=1800)
    assert result.returncode == 0, f"setup.sh builder failed:\n{result.stdout}\n{result.stderr}"
    return parse_builder_report(result.stdout)


def fill_in_builder_yaml(text, report):
    """Edit profiles/remote/builder.yaml as a user would: host, port and user from the builder's
    report, every other line (and comment) as it was."""
    for key in ("host", "port", "user"):
        text, count = re.subn(rf"^(  {key}:).*$", rf"\g<1> {getattr(report, key)}", text, count=1, flags=re.MULTILINE)
        assert count == 1, f"builder.yaml has no '  {key}:' line"
    return text


def ready_login_node(lab, builder_report):
    """The login account's checkout after the README's login steps: builder.yaml filled in, the
    builder's host key in known_hosts, `bash setup.sh login remote` content. Returns what the
    login command printed before and after."""
    before = lab.as_login(["bash", "setup.sh", "login", "remote"], check=False, timeout=900)
    builder_yaml = lab.checkout / "profiles" / "remote" / "builder.yaml"
    builder_yaml.write_text(fill_in_builder_yaml(builder_yaml.read_text(), builder_report))
    known_hosts = lab.login_account.home / ".ssh" / "known_hosts"
    known_hosts.write_text("".join(f"{line}\n" for line in builder_report.known_hosts_lines))
    shutil.chown(known_hosts, LOGIN_ACCOUNT, LOGIN_ACCOUNT)
    known_hosts.chmod(0o600)
    after = lab.as_login(["bash", "setup.sh", "login", "remote"], check=False, timeout=900)
    assert after.returncode == 0, f"setup.sh login remote still finds something missing:\n{after.stdout}\n{after.stderr}"
    return before, after


def builder_sshd_log():
    return Path("/var/log/sshd.log")


def accepted_logins(since, account=BUILD_ACCOUNT, address=ADDRESSES["login"]):
    """Connections the builder's sshd accepted for `account` from `address` after offset `since`."""
    log = builder_sshd_log()
    with open(log, "rb") as handle:
        handle.seek(since)
        text = handle.read().decode(errors="replace")
    return re.findall(rf"Accepted publickey for {re.escape(account)} from {re.escape(address)} port \d+", text)


def log_size():
    log = builder_sshd_log()
    return log.stat().st_size if log.exists() else 0


def jupyter_status(url, token=None):
    """The status code of a Jupyter server's /api/status, asked with `token` or without one."""
    headers = {"Authorization": f"token {token}"} if token else {}
    return requests.get(f"{url}api/status", headers=headers, timeout=10).status_code
