"""Three hosts on one machine, made of network namespaces, for the tests and the benchmark of
tests/hosts (run as root):

- `login`   10.233.0.1: the accounts LOGIN_ACCOUNT and OTHER_LOGIN_ACCOUNT (no Docker), the Slurm controller of a cluster of
            its own, a git daemon serving the test repositories, an sshd for the user's tunnel;
- `builder` 10.233.0.2: made a builder for BUILD_ACCOUNT by the README's `setup.sh builder`
            (Docker through the machine's engine, its sshd on port 22);
- `node1`   10.233.0.3: a Slurm compute node (slurmd -N node1);
- `laptop`  10.233.1.2: "the user's own machine", linked to the login node only (10.233.1.1), so
            that it reaches a compute node through an SSH tunnel or not at all.

The three hosts hang off a bridge in a namespace of its own (LAN): a bridge in the root
namespace would be filtered by Docker's iptables rules (FORWARD policy DROP, bridge-nf-call on).
Each host has its own name (a UTS namespace per command), and its own /etc/hosts and
/etc/slurm from /etc/netns/NAME/, with the stock Debian line mapping its own name to 127.0.1.1.
The root namespace's single-node cluster is left alone: this cluster has its own slurm.conf,
state, spool, pid and log files, and its daemons live in the namespaces (so the same ports).
"""

import contextlib
import ctypes
import fcntl
import grp
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import textwrap
import threading
import time
from pathlib import Path

LAN = "r2s-lan"
DOMAIN = "r2s.test"
ADDRESSES = {"login": "10.233.0.1", "builder": "10.233.0.2", "node1": "10.233.0.3"}
LAPTOP_LINK = {"login": "10.233.1.1", "laptop": "10.233.1.2"}
NAMESPACES = (*ADDRESSES, "laptop", LAN)
LOGIN_ACCOUNT = "r2s-login"
# a second user of the login node, for what one user must not see of another's (the build service)
OTHER_LOGIN_ACCOUNT = "r2s-login2"
BUILD_ACCOUNT = "r2s-build"
APPTAINER_GROUP = "r2s-apptainer"
STATE = Path("/run/r2s-hosts")
LOCK = Path("/run/r2s-hosts.lock")
NETNS_ETC = Path("/etc/netns")
SLURM_STATE = Path("/var/lib/slurm/r2s-hosts")
SLURM_LOGS = Path("/var/log/slurm/r2s-hosts")
PARTITION = "compute"
GIT_PORT = 9418
SESSION_PATH = "/usr/local/bin:/usr/bin:/bin"
CLONE_NEWNET = 0x40000000


def run(command, check=True, **kwargs):
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    result = subprocess.run([str(word) for word in command], **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(str(w) for w in command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def wait_for(condition, timeout, what, interval=0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} (waited {timeout} s)"
        time.sleep(interval)


class Account:
    """An ordinary account of the machine, as the hosts share one /etc/passwd."""

    def __init__(self, name):
        self.name = name

    @property
    def entry(self):
        return pwd.getpwnam(self.name)

    @property
    def uid(self):
        return self.entry.pw_uid

    @property
    def home(self):
        return Path(self.entry.pw_dir)

    def exists(self):
        try:
            return self.entry is not None
        except KeyError:
            return False

    def groups(self):
        return {group.gr_name for group in grp.getgrall() if self.name in group.gr_mem}

    def ensure(self, groups=(), not_in=()):
        """Create the account if missing: home 0700, no password but not locked (an sshd without
        PAM refuses locked accounts), exactly in `groups` among those named."""
        for group in groups:
            if run(["getent", "group", group], check=False).returncode != 0:
                run(["groupadd", "--system", group])
        if not self.exists():
            run(["useradd", "--create-home", "--shell", "/bin/bash", "--password", "*", self.name])
        for group in groups:
            if group not in self.groups():
                run(["usermod", "-aG", group, self.name])
        for group in not_in:
            if group in self.groups():
                run(["gpasswd", "-d", self.name, group])
        self.home.chmod(0o700)
        return self

    def environment(self, extra=None, path=SESSION_PATH):
        """A login-like environment, as a shell of this account would have."""
        env = {"HOME": str(self.home), "USER": self.name, "LOGNAME": self.name, "PATH": path, "LANG": "C.UTF-8", "SHELL": "/bin/bash"}
        return {**env, **(extra or {})}

    def prefix(self, env=None):
        """The words that run a command as this account, in a clean environment."""
        words = [f"{key}={value}" for key, value in self.environment(env).items()]
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.entry.pw_gid}", "--init-groups", "--", "env", "-i", *words]


# Enters a host as `ip netns exec` does (its network namespace, a mount namespace that follows the
# machine's, /etc/netns/NAME/* bound over /etc) but keeps the machine's /sys: `ip netns exec`
# mounts a fresh /sys without /sys/fs/cgroup, where slurmd stops, and where a rootless Podman
# pause process started (by the login host's `setup.sh login` check) leaves every later build of
# that account, node1's jobs included, with "runc create failed: no cgroup mount found in mountinfo".
ENTER_HOST = (
    'for file in "/etc/netns/$0"/*; do [ ! -e "$file" ] || mount --bind "$file" "/etc/${file##*/}" || exit 1; done; '
    'hostname "$0" && exec "$@"'
)


class Host:
    """A host of its own: a network namespace, and for every command a mount namespace with
    /etc/netns/NAME/* over /etc (hosts, slurm) and a UTS namespace with the host's name."""

    def __init__(self, name, address=None):
        self.name = name
        self.address = address

    def command(self, argv, user=None, env=None):
        words = [*self.entry(), "sh", "-c", ENTER_HOST, self.name]
        if user:
            words += user.prefix(env)
        elif env:
            words += ["env", *(f"{key}={value}" for key, value in env.items())]
        return [*words, *(str(word) for word in argv)]

    def entry(self):
        return ["nsenter", f"--net=/run/netns/{self.name}", "unshare", "--mount", "--propagation", "slave", "--uts", "--"]

    def run(self, argv, user=None, env=None, check=True, **kwargs):
        return run(self.command(argv, user, env), check=check, **kwargs)

    def popen(self, argv, user=None, env=None, **kwargs):
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.Popen(self.command(argv, user, env), **kwargs)

    def pids(self):
        result = run(["ip", "netns", "pids", self.name], check=False)
        return [int(pid) for pid in result.stdout.split()] if result.returncode == 0 else []

    def call(self, function, *args, **kwargs):
        """function(*args) in a thread that has entered this host's network namespace: sockets it
        opens are this host's (setns changes only the calling thread's namespace)."""
        outcome = {}

        def target():
            descriptor = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
            try:
                if ctypes.CDLL(None, use_errno=True).setns(descriptor, CLONE_NEWNET) != 0:
                    outcome["error"] = OSError(ctypes.get_errno(), f"setns into {self.name} failed")
                    return
            finally:
                os.close(descriptor)
            try:
                outcome["value"] = function(*args, **kwargs)
            except BaseException as error:  # handed over to the calling thread
                outcome["error"] = error

        thread = threading.Thread(target=target, name=f"in-{self.name}")
        thread.start()
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome.get("value")

    def connects(self, address, port, timeout=2):
        def attempt():
            try:
                socket.create_connection((address, port), timeout=timeout).close()
                return True
            except OSError:
                return False

        return self.call(attempt)

    def listening(self):
        """(address, port, pids) of every listening TCP socket of this host."""
        found = []
        for line in run(["ip", "netns", "exec", self.name, "ss", "-Hltnp"]).stdout.splitlines():
            fields = line.split()
            address, _, port = fields[3].rpartition(":")
            pids = [int(word.split("=")[1]) for word in line.replace(",", " ").replace(")", " ").split() if word.startswith("pid=")]
            found.append((address.strip("[]"), int(port), pids))
        return found


def hosts_file(own, entries):
    """/etc/hosts as Debian's installer writes it (own name on 127.0.1.1), plus the others."""
    lines = ["127.0.0.1\tlocalhost", f"127.0.1.1\t{own}.{DOMAIN} {own}"] if own else ["127.0.0.1\tlocalhost"]
    lines += [f"{address}\t{name}.{DOMAIN} {name}" for name, address in entries.items()]
    return "\n".join(lines) + "\n"


def kill_all(pids, wait=10):
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for pid in pids:
            try:
                os.kill(pid, sig)
                alive.append(pid)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while alive and time.monotonic() < deadline:
            alive = [pid for pid in alive if Path(f"/proc/{pid}").exists() and not zombie(pid)]
            time.sleep(0.1)
        pids = alive
        if not pids:
            return


def zombie(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


class Network:
    """The namespaces, the links and the per-host files; `down` removes all of it, also what a
    run that died left behind."""

    def __init__(self):
        self.hosts = {name: Host(name, address) for name, address in ADDRESSES.items()}
        self.laptop = Host("laptop", LAPTOP_LINK["laptop"])

    def __getitem__(self, name):
        return self.laptop if name == "laptop" else self.hosts[name]

    def up(self):
        self.down()
        STATE.mkdir(mode=0o755, parents=True, exist_ok=True)
        for name in NAMESPACES:
            run(["ip", "netns", "add", name])
            run(["ip", "-n", name, "link", "set", "lo", "up"])
        run(["ip", "-n", LAN, "link", "add", "br0", "type", "bridge"])
        run(["ip", "-n", LAN, "link", "set", "br0", "up"])
        for name, address in ADDRESSES.items():
            port = f"port-{name}"
            run(["ip", "link", "add", "name", "eth0", "netns", name, "type", "veth", "peer", "name", port, "netns", LAN])
            run(["ip", "-n", LAN, "link", "set", port, "master", "br0", "up"])
            run(["ip", "-n", name, "addr", "add", f"{address}/24", "dev", "eth0"])
            run(["ip", "-n", name, "link", "set", "eth0", "up"])
        run(["ip", "link", "add", "name", "eth0", "netns", "laptop", "type", "veth", "peer", "name", "eth1", "netns", "login"])
        for name, address in LAPTOP_LINK.items():
            device = "eth1" if name == "login" else "eth0"
            run(["ip", "-n", name, "addr", "add", f"{address}/24", "dev", device])
            run(["ip", "-n", name, "link", "set", device, "up"])
        for name in ADDRESSES:
            folder = NETNS_ETC / name
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "hosts").write_text(hosts_file(name, {other: address for other, address in ADDRESSES.items() if other != name}))
        (NETNS_ETC / "laptop").mkdir(parents=True, exist_ok=True)
        (NETNS_ETC / "laptop" / "hosts").write_text(hosts_file("laptop", {"login": LAPTOP_LINK["login"]}))

    def set_link(self, name, up):
        """The host's cable at the switch: its bridge port goes down or up."""
        run(["ip", "-n", LAN, "link", "set", f"port-{name}", "up" if up else "down"])

    def down(self):
        existing = set(run(["ip", "netns", "list"]).stdout.split())
        for name in NAMESPACES:
            if name in existing:
                kill_all(Host(name).pids())
        for name in NAMESPACES:
            if name in existing:
                if run(["ip", "netns", "del", name], check=False).returncode != 0:
                    time.sleep(1)
                    run(["ip", "netns", "del", name], check=False)
            shutil.rmtree(NETNS_ETC / name, ignore_errors=True)
        with contextlib.suppress(OSError):
            NETNS_ETC.rmdir()
        shutil.rmtree(STATE, ignore_errors=True)
        # the cluster's state goes too; its logs (SLURM_LOGS) stay for a look after a failure
        shutil.rmtree(SLURM_STATE, ignore_errors=True)


class SlurmCluster:
    """A second Slurm cluster: slurmctld on the login host, slurmd on node1, its own slurm.conf
    (in /etc/netns/{login,node1}/slurm/), state, spool, pid and log files. munged is the machine's."""

    def __init__(self, network):
        self.network = network
        self.login = network["login"]
        self.node = network["node1"]

    # what this cluster sets itself; every other setting is the machine's cluster's (setup/slurm.sh:
    # no cgroups, no accounting database), read from /etc/slurm/slurm.conf
    OWN_SETTINGS = {"ClusterName", "SlurmctldHost", "StateSaveLocation", "SlurmdSpoolDir", "SlurmctldPidFile", "SlurmdPidFile",
                    "SlurmctldLogFile", "SlurmdLogFile", "SlurmdTimeout", "JobRequeue", "MinJobAge", "NodeName", "PartitionName"}

    def config(self, machine_config=Path("/etc/slurm/slurm.conf")):
        run_dir = STATE / "slurm"
        shared = [
            line for line in machine_config.read_text().splitlines()
            if line.strip() and not line.startswith("#") and line.split("=", 1)[0].strip() not in self.OWN_SETTINGS
        ]
        own = textwrap.dedent(
            f"""\
            ClusterName=r2s-hosts
            SlurmctldHost=login({ADDRESSES['login']})
            StateSaveLocation={SLURM_STATE}/ctld
            SlurmdSpoolDir={SLURM_STATE}/slurmd-%n
            SlurmctldPidFile={run_dir}/slurmctld.pid
            SlurmdPidFile={run_dir}/slurmd-%n.pid
            SlurmctldLogFile={SLURM_LOGS}/slurmctld.log
            SlurmdLogFile={SLURM_LOGS}/slurmd-%n.log
            # a node whose slurmd is gone is DOWN within seconds, and its jobs are not requeued
            SlurmdTimeout=10
            JobRequeue=0
            MinJobAge=600
            NodeName=node1 NodeAddr={ADDRESSES['node1']} NodeHostname=node1 CPUs=2 RealMemory=6000 State=UNKNOWN
            PartitionName={PARTITION} Nodes=node1 Default=YES MaxTime=INFINITE State=UP
            """
        )
        return "# repo2singularity tests/hosts: controller on login, one compute node node1\n" + "\n".join(shared) + "\n" + own

    def start(self):
        assert Path("/run/munge/munge.socket.2").exists(), "munged is not running: as root run `bash setup/slurm.sh`"
        assert Path("/etc/slurm/slurm.conf").exists(), "no Slurm cluster on this machine: as root run `bash setup/slurm.sh`"
        for tool in ("slurmctld", "slurmd", "sbatch"):
            assert shutil.which(tool), f"{tool} is missing: as root run `bash setup/slurm.sh`"
        shutil.rmtree(SLURM_STATE, ignore_errors=True)
        for folder in (SLURM_STATE / "ctld", SLURM_LOGS, STATE / "slurm"):
            folder.mkdir(parents=True, exist_ok=True)
            shutil.chown(folder, "slurm", "slurm")
        for name in ("login", "node1"):
            folder = NETNS_ETC / name / "slurm"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "slurm.conf").write_text(self.config())
        self.login.run(["/usr/sbin/slurmctld"])
        self.start_node()

    def start_node(self):
        """slurmd as node1, entered as every command of a host is (ENTER_HOST), detached."""
        self.node.run(["/usr/sbin/slurmd", "-N", "node1"])
        self.wait_idle()

    def wait_idle(self, timeout=60):
        def idle():
            state = self.login.run(["sinfo", "--noheader", "--nodes=node1", "--format=%T"], check=False).stdout.strip()
            if state.startswith(("down", "drain")):
                self.login.run(["scontrol", "update", "NodeName=node1", "State=RESUME"], check=False)
            return state in ("idle", "mixed", "allocated")

        wait_for(idle, timeout, f"node1 did not become idle; see {SLURM_LOGS}")

    def slurmd_pids(self):
        return [pid for pid in self.node.pids() if Path(f"/proc/{pid}/comm").read_text().strip() == "slurmd"]

    def job(self, job_id):
        """Slurm's own record of a job (scontrol show job), as a dict."""
        text = self.login.run(["scontrol", "show", "job", "--oneliner", str(job_id)], check=False).stdout
        return dict(word.split("=", 1) for word in text.split() if "=" in word)


class GitServer:
    """git daemon on the login host's address, serving bare repositories from STATE/git."""

    def __init__(self, network):
        self.login = network["login"]
        self.base = STATE / "git"
        self.process = None

    def start(self):
        self.base.mkdir(parents=True, exist_ok=True)
        self.process = self.login.popen(
            ["git", "daemon", "--reuseaddr", "--export-all", "--informative-errors", f"--base-path={self.base}",
             f"--listen={self.login.address}", f"--port={GIT_PORT}", str(self.base)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: self.login.connects(self.login.address, GIT_PORT), 20, "git daemon did not start")

    def publish(self, name, working_repo):
        """A bare copy of a working repository, served as git://LOGIN/NAME.git."""
        target = self.base / f"{name}.git"
        shutil.rmtree(target, ignore_errors=True)
        run(["git", "clone", "--quiet", "--bare", working_repo, target])
        (target / "git-daemon-export-ok").touch()
        return f"git://{self.login.address}/{name}.git"

    def push(self, name, working_repo):
        run(["git", "-C", working_repo, "push", "--quiet", "--force", str(self.base / f"{name}.git"), "HEAD:main"])


class LabRegistry:
    """Debian's docker-registry on the login host's address, in plain HTTP, storage in STATE: the
    registry a cached commit's SIF is pulled from (`registry_plain_http`, the lab has no CA)."""

    PORT = 5000

    def __init__(self, network):
        self.login = network["login"]
        self.folder = STATE / "registry"

    @property
    def url(self):
        return f"oras://{self.login.address}:{self.PORT}/lab"

    def config(self):
        return [f"registry={self.url}", "registry_plain_http=true"]

    def start(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        config = self.folder / "config.yml"
        # JSON is YAML
        config.write_text(json.dumps({
            "version": 0.1,
            "log": {"level": "warn"},
            "storage": {"filesystem": {"rootdirectory": str(self.folder / "storage")}},
            "http": {"addr": f"{self.login.address}:{self.PORT}"},
        }))
        with open(self.folder / "registry.log", "ab") as log:
            self.login.popen(["/usr/bin/docker-registry", "serve", config], stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: self.login.connects(self.login.address, self.PORT), 20, "docker-registry did not start")
        return self


class TunnelSshd:
    """An sshd on the login host (port 22, all its addresses) through which the user's own machine
    opens the tunnel the workflow prints; keys only, a host key of its own."""

    def __init__(self, network):
        self.login = network["login"]
        self.folder = STATE / "login-sshd"

    def start(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        self.folder.chmod(0o700)
        self.host_key = self.folder / "host_key"
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", self.host_key])
        self.log = self.folder / "sshd.log"
        config = self.folder / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    "Port 22",
                    f"HostKey {self.host_key}",
                    "AuthorizedKeysFile .ssh/authorized_keys",
                    "UsePAM no",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PubkeyAuthentication yes",
                    "AllowTcpForwarding yes",
                    f"PidFile {self.folder / 'sshd.pid'}",
                    "LogLevel VERBOSE",
                ]
            )
            + "\n"
        )
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        self.login.run(["/usr/sbin/sshd", "-f", config, "-E", self.log])
        wait_for(lambda: self.login.connects(LAPTOP_LINK["login"], 22), 20, f"the login host's sshd did not start; see {self.log}")

    def known_hosts_line(self, name):
        kind, key = Path(f"{self.host_key}.pub").read_text().split()[:2]
        return f"{name} {kind} {key}\n"


@contextlib.contextmanager
def exclusive():
    """One user of the topology at a time on this machine (its names and addresses are fixed)."""
    LOCK.touch()
    with open(LOCK) as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
