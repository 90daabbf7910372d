"""The Debian 12 Apptainer route of setup/system.sh: a root-owned entry script that sudo runs for
the members of the group r2s-apptainer, making a private mount namespace with the sid root file
system as / before it drops back to the caller.

Run as root, after `setup/system.sh install` (it makes throw-away accounts and folders):
`pytest tests/root` (`bash setup.sh test` runs it after the account's own suite). Each test
checks what a user would: a non-member gets nothing, and a member gets nothing the account could
not do by itself, whatever its working folder or environment."""

import os
import re
import secrets
import stat
import subprocess
import time
from pathlib import Path

import psutil
import pytest

WRAPPER = Path(os.environ.get("R2S_APPTAINER_WRAPPER", "/usr/local/bin/apptainer"))
GROUP = "r2s-apptainer"
TOKEN = secrets.token_hex(4)
SECRET = f"secret-{secrets.token_hex(8)}"
# the wrapper's folder first: R2S_APPTAINER_WRAPPER may name a trial installation
PATH = f"{WRAPPER.parent}:/usr/local/bin:/usr/bin:/bin"

if os.geteuid() != 0:
    raise RuntimeError("tests/root runs as root: it makes throw-away accounts (pytest tests/root, as root)")
ENTRY = Path(re.search(r"exec sudo -n (\S+)", WRAPPER.read_text()).group(1))
ROOTFS = Path(re.search(r"^ROOTFS=(\S+)$", ENTRY.read_text(), re.MULTILINE).group(1))
NAMESPACE_STAGE = ENTRY.with_name("apptainer-namespace")


def run(*command, check=True, **options):
    result = subprocess.run([str(part) for part in command], capture_output=True, text=True, timeout=300, **options)
    if check and result.returncode != 0:
        raise AssertionError(f"{command} failed ({result.returncode}): {result.stdout}{result.stderr}")
    return result


class Account:
    """A throw-away account, removed with its home and processes at the end."""

    def __init__(self, role, groups=()):
        self.name = f"r2st{TOKEN}{role}"
        run("useradd", "--create-home", "--shell", "/bin/bash", *(["--groups", ",".join(groups)] if groups else []), self.name)
        self.home = Path(f"/home/{self.name}")
        self.uid = int(run("id", "-u", self.name).stdout)

    def shell(self, script, *args, env=None, check=False):
        """`bash -c script` as the account in a login-like environment (runuser sets its groups)."""
        variables = {"HOME": str(self.home), "USER": self.name, "PATH": PATH, "LANG": "C.UTF-8", **(env or {})}
        return run(
            "runuser", "-u", self.name, "--", "env", "-i", *(f"{k}={v}" for k, v in variables.items()),
            "bash", "-c", script, "r2s-test", *args, check=check, cwd="/",
        )  # fmt: skip

    def popen(self, script, *args, env=None):
        variables = {"HOME": str(self.home), "USER": self.name, "PATH": PATH, "LANG": "C.UTF-8", **(env or {})}
        return subprocess.Popen(
            ["runuser", "-u", self.name, "--", "env", "-i", *(f"{k}={v}" for k, v in variables.items()),
             "bash", "-c", script, "r2s-test", *map(str, args)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/",
        )  # fmt: skip

    def processes(self):
        return [p for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.info["uids"].real == self.uid]

    def remove(self):
        for process in self.processes():
            process.kill()
        run("userdel", "--remove", self.name, check=False)


@pytest.fixture(scope="module")
def accounts():
    made = {}
    try:
        made["member"] = Account("m", groups=[GROUP])
        made["outsider"] = Account("o")
        made["victim"] = Account("v")
        yield made
    finally:
        for account in made.values():
            account.remove()


@pytest.fixture(scope="module")
def place(accounts):
    """Folders of the test: the victim's private data, a root-only folder, the member's own."""
    base = Path(f"/tmp/r2s-root-test-{TOKEN}")
    victim, member = accounts["victim"], accounts["member"]
    try:
        base.mkdir(mode=0o755)
        # an open folder with a readable file, inside a home the member may not enter
        victim.home.chmod(0o700)
        (victim.home / "open").mkdir(mode=0o755)
        (victim.home / "open" / "secret").write_text(SECRET)
        (base / "root-only").mkdir(mode=0o700)
        (base / "work").mkdir()
        os.chown(base / "work", member.uid, member.uid)
        # a Debian tree as the image (apptainer takes a folder as a sandbox image)
        sandbox = base / "sandbox"
        sandbox.mkdir()
        container = run("docker", "create", "debian:bookworm").stdout.strip()
        try:
            export = subprocess.Popen(["docker", "export", container], stdout=subprocess.PIPE)
            run("tar", "-x", "-C", sandbox, stdin=export.stdout)
            export.wait()
        finally:
            run("docker", "rm", container, check=False)
        yield {"base": base, "sandbox": sandbox, "work": base / "work", "root-only": base / "root-only"}
    finally:
        run("rm", "-rf", "--one-file-system", base, check=False)


def rootfs_state():
    """Every path, type and mode in the root file system (nothing is mounted on it outside the
    entry's private namespaces)."""
    state = set()
    for folder, subfolders, files in os.walk(ROOTFS):
        for name in subfolders + files:
            info = os.lstat(os.path.join(folder, name))
            state.add((os.path.join(folder, name), stat.S_IFMT(info.st_mode), info.st_mode & 0o7777))
    return state


def machine_mounts_of(*paths):
    """Mounts in the machine's own namespace at or below any of `paths`."""
    found = []
    for line in Path("/proc/1/mountinfo").read_text().splitlines():
        mountpoint = line.split()[4]
        if any(mountpoint == str(p) or mountpoint.startswith(f"{p}/") for p in paths):
            found.append(mountpoint)
    return found


def error_lines(result):
    return [line for line in result.stderr.splitlines() if line.strip()]


def test_a_non_member_is_refused_in_one_line_and_nothing_runs(accounts, place):
    outsider = accounts["outsider"]
    before = rootfs_state()
    result = outsider.shell('cd "$1" && exec apptainer version', place["base"])
    assert result.returncode != 0 and result.stdout == ""
    assert len(error_lines(result)) == 1 and GROUP in result.stderr, result.stderr
    # the wrapper's check is for the user; the refusal is sudo's, also when called directly
    direct = outsider.shell('cd "$1" && exec sudo -n "$2" version', place["base"], ENTRY)
    assert direct.returncode != 0 and direct.stdout == "", direct.stdout + direct.stderr
    assert rootfs_state() == before
    assert machine_mounts_of(ROOTFS, place["base"]) == []


def test_a_member_runs_apptainer_as_itself(accounts, place):
    member = accounts["member"]
    before = rootfs_state()
    result = member.shell('cd "$1" && apptainer exec "$2" id -un', place["work"], place["sandbox"], check=True)
    assert result.stdout.strip() == member.name
    assert rootfs_state() == before
    assert machine_mounts_of(ROOTFS, place["base"]) == []


def test_the_environment_cannot_skip_the_private_namespace(accounts, place):
    member = accounts["member"]
    # sudo keeps only the variables its rule lists; asking it to set another one is refused
    refused = member.shell('cd "$1" && exec sudo -n R2S_APPTAINER_NS=1 "$2" version', place["work"], ENTRY)
    assert refused.returncode != 0 and refused.stdout == ""
    # set in the caller's environment, it changes nothing: the run is as usual, in a namespace of its own
    result = member.shell('cd "$1" && apptainer exec "$2" id -un', place["work"], place["sandbox"], env={"R2S_APPTAINER_NS": "1"}, check=True)
    assert result.stdout.strip() == member.name
    assert machine_mounts_of(ROOTFS, place["base"]) == []


ENVIRONMENTS = {
    "APPTAINER_BIND": lambda victim, place: {"APPTAINER_BIND": f"{victim.home / 'open'}:/x"},
    "APPTAINER_BINDPATH": lambda victim, place: {"APPTAINER_BINDPATH": f"{victim.home / 'open'}:/x"},
    "SINGULARITY_BIND": lambda victim, place: {"SINGULARITY_BIND": f"{victim.home / 'open'}:/x"},
    "APPTAINER_CONFIGDIR": lambda victim, place: {"APPTAINER_CONFIGDIR": f"{victim.home}/.apptainer"},
    "APPTAINER_CACHEDIR": lambda victim, place: {"APPTAINER_CACHEDIR": str(place["root-only"])},
    "APPTAINER_TMPDIR": lambda victim, place: {"APPTAINER_TMPDIR": str(place["root-only"])},
    "HOME of another account": lambda victim, place: {"HOME": str(victim.home)},
    "HOME=/root": lambda victim, place: {"HOME": "/root"},
    "TMPDIR": lambda victim, place: {"TMPDIR": str(place["root-only"])},
    "R2S_CALLER_TMPDIR": lambda victim, place: {"R2S_CALLER_TMPDIR": str(place["root-only"])},
}


@pytest.mark.parametrize("case", list(ENVIRONMENTS))
def test_variables_reach_only_what_the_member_may_read(accounts, place, case):
    member, victim = accounts["member"], accounts["victim"]
    env = ENVIRONMENTS[case](victim, place)
    victim_before = sorted(os.listdir(victim.home))
    # the entry directly (as the wrapper does): sudo keeps these variables
    script = 'cd "$1" && exec sudo -n "$2" exec "$3" sh -c "cat /x/secret $4/open/secret; ls -a ~ $4"'
    result = member.shell(script, place["work"], ENTRY, place["sandbox"], victim.home, env=env)
    assert SECRET not in result.stdout + result.stderr
    assert os.listdir(place["root-only"]) == []
    assert sorted(os.listdir(victim.home)) == victim_before


@pytest.fixture
def odd_folder(accounts, place):
    """Folders outside the ones the namespace shows from this machine, removed afterwards."""
    made = []

    def make(path, mode=0o755, owner=None):
        path = Path(path)
        missing = [p for p in (path, *path.parents) if not p.exists()]
        made.append(missing[-1])  # the outermost folder this makes
        path.mkdir(mode=mode, parents=True)
        path.chmod(mode)
        if owner:
            os.chown(path, owner.uid, owner.uid)
        return path

    yield make
    for path in reversed(made):
        run("rm", "-rf", "--one-file-system", path, check=False)


def test_a_folder_the_member_cannot_read(accounts, place, odd_folder):
    member, victim = accounts["member"], accounts["victim"]
    folder = odd_folder(place["base"] / "no-reading", mode=0o711, owner=victim)
    (folder / f"hidden-{TOKEN}").write_text(SECRET)
    before = rootfs_state()
    result = member.shell('cd "$1" && apptainer exec "$2" ls -a .', folder, place["sandbox"])
    assert f"hidden-{TOKEN}" not in result.stdout + result.stderr
    assert rootfs_state() == before


def test_a_folder_reached_through_symbolic_links(accounts, place, odd_folder):
    member = accounts["member"]
    real = odd_folder(place["work"] / "real", owner=member)
    (place["work"] / "link").symlink_to(real)
    before = rootfs_state()
    result = member.shell('cd "$1" && apptainer exec "$2" pwd', place["work"] / "link", place["sandbox"], check=True)
    assert result.stdout.strip() == str(real)
    assert rootfs_state() == before


def test_a_folder_in_a_system_folder_of_the_root_file_system(accounts, place, odd_folder):
    # root would make the folder in the shared root file system, which the member could not
    member = accounts["member"]
    folder = odd_folder(f"/usr/lib/r2s-root-test-{TOKEN}")
    before = rootfs_state()
    result = member.shell('cd "$1" && apptainer exec "$2" true', folder, place["sandbox"])
    assert rootfs_state() == before, "the entry changed the root file system"
    assert machine_mounts_of(ROOTFS, folder) == []
    # the folder is not in the root file system and root makes none: the member is told so, once
    assert result.returncode != 0 and result.stdout == ""
    assert len(error_lines(result)) == 1, result.stderr
    assert result.stderr.startswith(f"apptainer (repo2singularity entry): {folder} is not visible to apptainer here;"), result.stderr


def test_a_deleted_working_folder(accounts, place, odd_folder):
    member = accounts["member"]
    folder = odd_folder(place["work"] / "gone", owner=member)
    before = rootfs_state()
    result = member.shell('cd "$1" && rmdir "$1" && exec apptainer exec "$2" true', folder, place["sandbox"])
    # (a shell started in a deleted folder says so itself first: the wrapper's does)
    assert result.returncode != 0
    assert "no longer exists" in error_lines(result)[-1], result.stderr
    assert rootfs_state() == before


def test_the_member_enters_its_folder_as_itself_not_as_root(accounts, place, odd_folder):
    """A working folder whose copy in the root file system lies below a folder only root may
    enter: had root entered it for the member, the member's processes would sit there, and
    /proc/PID/cwd would let the member read below it."""
    member = accounts["member"]
    outer = f"/var/lib/r2s-root-test-{TOKEN}"
    odd_folder(ROOTFS / outer.lstrip("/"), mode=0o700)
    inside = odd_folder(ROOTFS / outer.lstrip("/") / "open")
    (inside / "secret").write_text(SECRET)
    folder = odd_folder(Path(outer) / "open")
    started = member.popen('cd "$1" && exec apptainer exec "$2" sleep 30', folder, place["sandbox"])
    try:
        deadline, leaked, slept = time.monotonic() + 60, "", False
        # look into every process of the member while the run lasts, until sleep runs or it ends
        while started.poll() is None and not slept:
            assert time.monotonic() < deadline, "the run neither started sleep nor ended"
            slept = any(p.name() == "sleep" for p in member.processes())
            pids = [str(p.pid) for p in member.processes() if p.pid != started.pid]
            leaked += member.shell('for pid; do cat "/proc/$pid/cwd/secret" 2>/dev/null; done; true', *pids).stdout
            time.sleep(0.05)
        assert SECRET not in leaked, "a process of the member sits in a folder only root may enter"
    finally:
        for process in member.processes():
            process.kill()
        _, stderr = started.communicate()
    # the member may not enter the root file system's copy of the folder, and nothing else
    # would do: the run ends there, said in one line
    assert not slept, "apptainer ran in a folder of the root file system that only root may enter"
    assert started.returncode == 255
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith(f"apptainer (repo2singularity entry): {folder} is not visible to apptainer here;"), stderr


def test_no_setuid_program_or_capability_of_the_root_file_system_works_for_a_member(accounts, place):
    member = accounts["member"]
    # the sid package of apptainer has no setuid starter, nor any file capability
    listed = (ROOTFS / "var/lib/dpkg/info/apptainer.list").read_text().split()
    privileged = []
    for name in listed:
        path = ROOTFS / name.lstrip("/")
        if path.is_file() and not path.is_symlink():
            mode = path.lstat().st_mode
            if mode & (stat.S_ISUID | stat.S_ISGID) or has_file_capabilities(path):
                privileged.append(name)
    assert privileged == []
    # the root file system's other setuid programs (newuidmap, su, passwd, chsh, mount...) act
    # on the root file system's /etc and the machine's /etc/passwd and /etc/subuid: none of them
    # may work for a member; here newuidmap, which --fakeroot uses to map subordinate ids
    subordinate = [line.split(":")[1] for line in Path("/etc/subuid").read_text().splitlines() if line.startswith(f"{member.name}:")]
    assert subordinate, "useradd gave the member no subordinate ids to test with"
    result = member.shell('cd "$1" && apptainer exec --fakeroot "$2" cat /proc/self/uid_map', place["work"], place["sandbox"])
    assert subordinate[0] not in result.stdout, f"a setuid newuidmap mapped the member's subordinate ids: {result.stdout}"
    # and nothing of the member's runs with a capability outside its own user namespaces
    started = member.popen('cd "$1" && exec apptainer exec "$2" sleep 30', place["work"], place["sandbox"])
    try:
        deadline = time.monotonic() + 60
        while not any(p.name() == "sleep" for p in member.processes()):
            assert started.poll() is None and time.monotonic() < deadline, started.communicate()
            time.sleep(0.2)
        machine_users = os.readlink("/proc/self/ns/user")
        for process in member.processes():
            status = Path(f"/proc/{process.pid}/status").read_text()
            if os.readlink(f"/proc/{process.pid}/ns/user") == machine_users:
                for field in ("CapPrm", "CapEff", "CapAmb"):
                    assert re.search(rf"^{field}:\s+0+$", status, re.MULTILINE), f"{process.name()}: {field}"
    finally:
        for process in member.processes():
            process.kill()
        started.communicate()


def has_file_capabilities(path):
    try:
        os.getxattr(path, "security.capability", follow_symlinks=False)
    except OSError:
        return False
    return True


def mount_table(pid):
    """(mount point, device, per-mount options) of each mount that process `pid` sees."""
    table = []
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        table.append((fields[4].replace("\\040", " "), fields[2], set(fields[5].split(","))))
    return table


def test_the_namespace_gives_a_member_no_more_than_the_machine_does(accounts, place):
    """The private namespace a member's apptainer runs in has the machine's own /proc (its
    options, hidepid among them, come with it: a fresh proc mount would drop them), the machine's
    device modes (but /dev/fuse: 0666, as udev makes it), and nosuid,nodev on every folder bound from the machine:
    a setuid program or a device node in a folder a member can write to gives nothing there.
    Apptainer's starter keeps a copy of that namespace's mounts, flags and devices included."""
    member = accounts["member"]
    bound = re.search(r"^BOUND_FOLDERS=\((.*)\)$", NAMESPACE_STAGE.read_text(), re.MULTILINE).group(1).split()
    started = member.popen('cd "$1" && exec apptainer exec "$2" sleep 30', place["work"], place["sandbox"])
    try:
        deadline = time.monotonic() + 60
        seen = None
        while seen is None:
            assert started.poll() is None and time.monotonic() < deadline, started.communicate()
            time.sleep(0.2)
            for starter in (p.pid for p in member.processes() if p.name() == "starter"):
                try:  # a starter of an earlier test may be ending
                    seen = mount_table(starter)
                    fuse_mode = stat.S_IMODE(Path(f"/proc/{starter}/root/dev/fuse").stat().st_mode) if Path("/dev/fuse").exists() else None
                    break
                except OSError:
                    seen = None
        machine_proc = [device for point, device, _ in mount_table("self") if point == "/proc"]
        assert [device for point, device, _ in seen if point == "/proc"] == machine_proc[-1:]
        if fuse_mode is not None:
            # the one device the namespace opens wider than a udev-less machine: 0666, as udev
            # makes it on a usual Debian system (squashfuse needs it to run a SIF)
            assert fuse_mode in (stat.S_IMODE(os.stat("/dev/fuse").st_mode), 0o666)
        from_machine = [(point, options) for point, _, options in seen if any(point == d or point.startswith(f"{d}/") for d in bound)]
        assert {"/tmp", "/home"} <= {point for point, _ in from_machine}, seen
        assert [point for point, options in from_machine if not {"nosuid", "nodev"} <= options] == []
    finally:
        for process in member.processes():
            process.kill()
        started.communicate()
