"""A remote builder reached over SSH (paramiko): connect with host key checking, check the
builder, run commands with their output streamed into the rule's log, send folders, and bring
files back with progress, resume, a sha256 check and an atomic rename.

Every remote command is an argument list joined with shlex.quote, never a string with user
text pasted in. No password is ever asked for or stored: keys or the agent only."""

import hashlib
import json
import logging
import os
import posixpath
import shlex
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from steps import StepError, start_heartbeat, tail, write_json_atomic

DEFAULTS = {
    "port": 22,
    "user": "",
    "key_file": "",
    "known_hosts": "~/.ssh/known_hosts",
    "trust_unknown_host": False,
    "workdir": "~/.cache/repo2singularity",
    "runtime": "apptainer",
    "repo2docker": "repo2docker",
    "max_builds": 1,
    "keep_images": 2,
    "min_free_gb": 5,
}
CONNECT_TIMEOUT_SECONDS = 15
PROGRESS_SECONDS = 5
# a connection whose network dies without a word (no FIN, no RST) would keep a step waiting for
# hours: after this long without data the builder is asked for a reply, and given this long
QUIET_SECONDS = 60
REPLY_SECONDS = 30
CHUNK = 1 << 20
# a test aid and a way to share a thin link: cap the download rate (bytes per second)
RATE_LIMIT_VARIABLE = "R2S_DOWNLOAD_LIMIT_BPS"


class InvalidBuilder(Exception):
    """A builder setting that cannot work, told in one line."""


def to_bool(value):
    # `--config builder={...}` hands every value over as a string
    if isinstance(value, str):
        return value.strip().lower() in ("true", "yes", "1", "on")
    return bool(value)


@dataclass(frozen=True)
class BuilderSettings:
    host: str
    port: int = 22
    user: str = ""
    key_file: str = ""
    known_hosts: str = "~/.ssh/known_hosts"
    trust_unknown_host: bool = False
    workdir: str = "~/.cache/repo2singularity"
    runtime: str = "apptainer"
    repo2docker: str = "repo2docker"
    max_builds: int = 1
    keep_images: int = 2
    min_free_gb: float = 5

    @property
    def login(self):
        return self.user or local_user()

    @property
    def display(self):
        return f"{self.login}@{self.host}:{self.port}"

    def describe(self):
        """What a receipt records about the builder: where, never how to log in."""
        return {"host": self.host, "port": self.port, "user": self.login}


def local_user():
    import getpass

    return getpass.getuser()


def settings_from_config(config):
    """None for `builder: local` (today's behaviour), else the builder's settings."""
    value = config.get("builder", "local")
    if value in (None, "", "local"):
        return None
    if not isinstance(value, dict):
        raise InvalidBuilder(f"builder must be 'local' or a mapping with a host, not {value!r}")
    values = {**DEFAULTS, **{k: v for k, v in value.items() if v is not None}}
    host = str(values.get("host") or "")
    if not host or host.startswith("-") or any(c.isspace() for c in host):
        raise InvalidBuilder(f"builder host is not a host name: {host!r}")
    try:
        port = int(values["port"])
        max_builds = int(values["max_builds"])
        keep_images = int(values["keep_images"])
        min_free_gb = float(values["min_free_gb"])
    except (TypeError, ValueError) as error:
        raise InvalidBuilder(f"builder setting is not a number: {error}") from None
    if not 0 < port < 65536:
        raise InvalidBuilder(f"builder port out of range: {port}")
    if max_builds < 1:
        raise InvalidBuilder(f"builder max_builds must be at least 1, not {max_builds}")
    if keep_images < 1:
        raise InvalidBuilder(f"builder keep_images must be at least 1 (the image just built), not {keep_images}")
    return BuilderSettings(
        host=host,
        port=port,
        user=str(values["user"]),
        key_file=str(values["key_file"]),
        known_hosts=str(values["known_hosts"]),
        trust_unknown_host=to_bool(values["trust_unknown_host"]),
        workdir=str(values["workdir"]),
        runtime=str(values["runtime"]),
        repo2docker=str(values["repo2docker"]),
        max_builds=max_builds,
        keep_images=keep_images,
        min_free_gb=min_free_gb,
    )


def remote_command(*commands):
    """One shell line from argument lists, each argument quoted: user text is never code.
    Several lists run one after the other, stopping at the first failure."""
    return " && ".join(shlex.join(str(arg) for arg in command) for command in commands)


SLOT_WAIT_SECONDS = 2


def with_build_slot(command, slots_folder, max_builds):
    """`command` run once it holds one of `max_builds` slots on the builder: a flock on
    `{slots_folder}/{n}`, held by the shell and its children (fd 4) and released when they end,
    however they end. The limit so holds across runs, and for everyone sharing the work folder."""
    folder = shlex.quote(slots_folder)
    return (
        f"mkdir -p -- {folder} && waited= && while :; do "
        f"for slot in $(seq 1 {int(max_builds)}); do exec 4>{folder}/\"$slot\" && flock -n 4 && break 2; done; "
        f"[ -n \"$waited\" ] || echo \"waiting for a build slot on the builder (max_builds: {int(max_builds)}, all in use)\"; "
        f"waited=1; sleep {SLOT_WAIT_SECONDS}; done && "
        f"echo \"build slot $slot of {int(max_builds)}\" && {command}"
    )


def images_to_remove(listing, current_tag, keep):
    """Older images of one name beyond the newest `keep` (the one just built counts among
    them). `listing`: `docker image ls --format '{{.CreatedAt}}\t{{.Repository}}:{{.Tag}}'`
    lines; CreatedAt is the same zone for all, so it sorts as text."""
    images = sorted((line.split("\t", 1) for line in listing.splitlines() if "\t" in line), reverse=True)
    tags = [tag for _, tag in images if tag != current_tag and not tag.endswith(":<none>")]
    return tags[keep - 1 :]


def checked_while(command, path, sha256, found_file):
    """`command`, with `path`'s sha256 taken alongside it into `found_file`; succeeds only when
    both did and the digest is `sha256`."""
    found, expected = shlex.quote(found_file), shlex.quote(sha256)
    return (
        f"{{ sha256sum -- {shlex.quote(path)} >{found} 2>&1 & r2s_hasher=$!; }} && "
        # a failed command still waits for the digest, which may be why it failed
        f"{{ {{ {command}; }} || {{ wait \"$r2s_hasher\"; false; }}; }} && wait \"$r2s_hasher\" && "
        f"read -r r2s_found _ <{found} && {{ [ \"$r2s_found\" = {expected} ] || {{ echo \"sha256 of {shlex.quote(path)[:200]}: $r2s_found, not {expected}\"; false; }}; }}"
    )


def remote_paths(workdir, name, sha):
    folder = posixpath.join(workdir, name, sha)
    return {
        "folder": folder,
        "source": posixpath.join(folder, "source"),
        "tarball": posixpath.join(folder, "image.tar"),
        "tarball_digest": posixpath.join(folder, "image.tar.found-sha256"),
        "sif": posixpath.join(folder, f"{name}.sif"),
        "checksum": posixpath.join(folder, f"{name}.sif.sha256"),
        "build_slots": posixpath.join(workdir, ".build-slots"),
    }


def expand_home(path, home):
    if path == "~":
        return home
    if path.startswith("~/"):
        return posixpath.join(home, path[2:])
    return path


# ------------------------------------------------------------------ receipts and resume


def check_tarball_receipt(receipt, found, receipt_path):
    """`found`: {"size"} of the tarball on the builder, with its "sha256" once known, or None
    when it is gone."""
    rerun = f"rerun it with: snakemake --forcerun save_image (receipt {receipt_path})"
    if found is None:
        raise StepError(f"the saved image {receipt['path']} is gone from builder {receipt['host']}; {rerun}")
    if found["size"] != receipt["size_bytes"] or found.get("sha256", receipt["sha256"]) != receipt["sha256"]:
        raise StepError(f"the saved image {receipt['path']} on builder {receipt['host']} does not match its receipt; {rerun}")


def check_image_receipt(receipt, found_id, builder, receipt_path):
    if found_id != receipt["image_id"]:
        # a receipt written by a local build, or by another builder, names an image this one never had
        where = (receipt.get("builder") or {}).get("host")
        origin = "" if where == builder.host else f" (built {f'on {where}' if where else 'locally'})"
        raise StepError(
            f"builder {builder.host} does not have image {receipt['tag']} ({receipt['image_id'][:19]}) named in "
            f"{receipt_path}{origin}; rebuild it with: snakemake --forcerun build_image"
        )


def resume_offset(partial_size, partial_meta, remote_size, remote_sha256):
    """Where to resume a download: the partial file's size when it belongs to the same remote
    file (same digest and size) and is not longer than it, else 0 (start over)."""
    if not partial_meta or partial_size <= 0:
        return 0
    if partial_meta.get("sha256") != remote_sha256 or partial_meta.get("size") != remote_size:
        return 0
    if partial_size > remote_size:
        return 0
    return partial_size


def progress_line(name, done, total, started_bytes, elapsed, width=24):
    """One progress line (a log is no terminal, so a line every few seconds, not a redrawn bar)."""
    rate = (done - started_bytes) / elapsed if elapsed > 0 else 0.0
    fraction = done / total if total else 1.0
    bar = "#" * round(width * fraction) + "." * (width - round(width * fraction))
    left = f", {(total - done) / rate:.0f} s left" if rate > 0 else ""
    return f"  download {name} [{bar}] {100 * fraction:3.0f}%  {done / 1e6:.1f} of {total / 1e6:.1f} MB, {rate / 1e6:.1f} MB/s{left}"


def parse_checks(output):
    """The preflight script's output: {check: (exit status, text)}."""
    found = {}
    current = None
    lines = []
    for line in output.splitlines():
        if line.startswith("@@check "):
            current, lines = line.split(" ", 1)[1], []
        elif line.startswith("@@rc ") and current:
            found[current] = (int(line.split()[1]), "\n".join(lines).strip())
            current = None
        elif current:
            lines.append(line)
    return found


def last_line(text, default=""):
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else default


TOOLS = ("docker", "buildx", "repo2docker", "runtime", "flock")
# what each builder step needs: a step checks its own tools, so a rerun that starts at a later
# step is still checked first, and the cheap steps do not wait for repo2docker to start
STEP_TOOLS = {"build_image": TOOLS, "save_image": ("docker",), "build_sif": ("runtime",)}


def preflight_problems(settings, workdir, checks, needs=TOOLS):
    """One line per problem found by the preflight script; an empty list when all is well."""
    problems = []
    where = f"builder {settings.display}"
    rc, text = checks.get("docker", (127, ""))
    if "docker" not in needs:
        pass
    elif rc == 127 or "not found" in text and "docker" in text.split(":")[0]:
        problems.append(f"{where}: docker is not installed (or not on the PATH of {settings.login}'s SSH sessions)")
    elif rc != 0:
        problems.append(f"{where}: the Docker engine does not answer `docker version`: {last_line(text)}")
    elif "buildx" in needs:
        rc, text = checks.get("buildx", (1, ""))
        if rc != 0:
            problems.append(f"{where}: docker buildx is missing (repo2docker needs it): {last_line(text)}")
    rc, text = checks.get("repo2docker", (127, ""))
    if "repo2docker" in needs and rc != 0:
        problems.append(f"{where}: {settings.repo2docker} does not run: {last_line(text, 'not found')}")
    rc, text = checks.get("runtime", (127, ""))
    if "runtime" in needs and rc != 0:
        problems.append(f"{where}: {settings.runtime} does not run: {last_line(text, 'not found')}")
    rc, text = checks.get("flock", (127, ""))
    if "flock" in needs and rc != 0:
        problems.append(f"{where}: flock (util-linux) does not run, and max_builds needs it: {last_line(text, 'not found')}")
    rc, text = checks.get("space", (1, ""))
    free_kb = parse_df(text) if rc == 0 else None
    if free_kb is None:
        problems.append(f"{where}: cannot create or measure the work folder {workdir}: {last_line(text)}")
    elif free_kb < settings.min_free_gb * 1e6:
        problems.append(
            f"{where}: only {free_kb / 1e6:.1f} GB free in {workdir} (min_free_gb: {settings.min_free_gb}); "
            "free some space (docker image prune, old folders in the work folder)"
        )
    return problems


def parse_df(text):
    lines = text.splitlines()
    try:
        return int(lines[-1].split()[3])
    except (IndexError, ValueError):
        return None


def preflight_script(settings, workdir, needs=TOOLS):
    """One shell line that runs the checks `needs` names at once (each tool's start-up, such as
    repo2docker's Python, is paid in parallel) and prints them in order between markers."""
    checks = [
        ("docker", ["docker", "version", "--format", "{{.Server.Version}}"]),
        ("buildx", ["docker", "buildx", "version"]),
        ("repo2docker", [settings.repo2docker, "--version"]),
        ("runtime", [settings.runtime, "version"]),
        # which SIF compression the runtime can be told (runtime.choose_compression)
        ("runtime_build_help", [settings.runtime, "build", "--help"]),
        ("flock", ["flock", "--version"]),
    ]
    commands = [(name, shlex.join(command)) for name, command in checks if name.split("_")[0] in needs]
    commands.append(("space", remote_command(["mkdir", "-p", "--", workdir], ["df", "-Pk", "--", workdir])))
    started = " ".join(f'{{ {{ {command}; }} >"$r2s_checks/{name}" 2>&1; echo $? >"$r2s_checks/{name}.rc"; }} &' for name, command in commands)
    names = " ".join(name for name, _ in commands)
    return (
        'r2s_checks=$(mktemp -d) || exit 1; '
        f"{started} wait; "
        f'for name in {names}; do printf \'@@check %s\\n\' "$name"; cat "$r2s_checks/$name"; '
        'printf \'@@rc %s\\n\' "$(cat "$r2s_checks/$name.rc")"; done; rm -rf "$r2s_checks"'
    )


# ------------------------------------------------------------------ the connection


def describe_connect_error(settings, error):
    import paramiko

    where = f"builder {settings.display}"
    if isinstance(error, paramiko.BadHostKeyException):
        return (
            f"{where}: the host key CHANGED (known_hosts {settings.known_hosts} has another key); "
            "if the builder was reinstalled, remove its old line from known_hosts"
        )
    if isinstance(error, UnknownHostKey):
        return (
            f"{where}: unknown host key ({error.fingerprint}), not in {settings.known_hosts}; "
            "add it (ssh-keyscan, after checking the fingerprint) or set trust_unknown_host: true once"
        )
    if isinstance(error, paramiko.PasswordRequiredException):
        return f"{where}: the key {settings.key_file} has a passphrase; load it into ssh-agent and leave key_file empty"
    if isinstance(error, paramiko.AuthenticationException):
        how = f"key {settings.key_file}" if settings.key_file else "the agent's keys and ~/.ssh/id_*"
        return f"{where}: the builder refused {how} for user {settings.login}"
    if isinstance(error, paramiko.SSHException) and "No authentication methods available" in str(error):
        return (
            f"{where}: no key to offer: key_file is empty, no ssh-agent answers (SSH_AUTH_SOCK) and there is "
            "no ~/.ssh/id_*; set key_file or load a key into ssh-agent"
        )
    if isinstance(error, paramiko.ssh_exception.NoValidConnectionsError):
        return f"{where}: connection refused (nothing listens on port {settings.port}?)"
    if isinstance(error, (socket.timeout, TimeoutError)):
        return f"{where}: no answer within {CONNECT_TIMEOUT_SECONDS} s (no route, or a firewall)"
    if isinstance(error, socket.gaierror):
        return f"{where}: unknown host name ({error.strerror})"
    if isinstance(error, OSError):
        return f"{where}: cannot connect: {error.strerror or error}"
    return f"{where}: SSH failed: {last_line(str(error), type(error).__name__)}"


class UnknownHostKey(Exception):
    def __init__(self, fingerprint):
        super().__init__(fingerprint)
        self.fingerprint = fingerprint


def fingerprint(key):
    import base64

    digest = hashlib.sha256(key.asbytes()).digest()
    return f"{key.get_name()} SHA256:{base64.b64encode(digest).decode().rstrip('=')}"


def host_key_policy(settings, known_hosts):
    import paramiko

    class Policy(paramiko.MissingHostKeyPolicy):
        def missing_host_key(self, client, hostname, key):
            if not settings.trust_unknown_host:
                raise UnknownHostKey(fingerprint(key))
            # trusted once, as ssh's accept-new: recorded, and checked from now on
            client.get_host_keys().add(hostname, key.get_name(), key)
            known_hosts.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with open(known_hosts, "a") as handle:
                handle.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
            print(f"  builder {settings.display}: trusted new host key {fingerprint(key)}", file=sys.stderr)

    return Policy()


# measured on loopback (bench/remote.py): paramiko decrypts AES-GCM about 1.5x faster than its
# default AES-CTR + HMAC; only the order of preference changes, so a server without GCM still works
GCM_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")


def prefer_gcm(sock, **kwargs):
    import paramiko

    transport = paramiko.Transport(sock, **kwargs)
    options = transport.get_security_options()
    options.ciphers = tuple(c for c in GCM_CIPHERS if c in options.ciphers) + tuple(c for c in options.ciphers if c not in GCM_CIPHERS)
    return transport


PGID_MARK = "@@r2s-pgid "


def watched_command(command):
    """`command` wrapped so that it ends with the SSH connection. sshd starts each command in a
    session of its own, so the shell's pid names the process group: printed first, it lets a
    cancelled step stop the group. A connection that drops (the step killed outright, the
    network gone) closes the command's stdin, which a watcher reads (fd 3, since a background
    job's own stdin is /dev/null) to stop the group then; without a pty, nothing else would."""
    return (
        f"printf '{PGID_MARK}%s\\n' \"$$\"; exec 3<&0 </dev/null; "
        "{ while read -r _ <&3; do :; done; kill -TERM 0; } >/dev/null 2>&1 & watcher=$!; "
        f"{{ {command}\n}}; status=$?; kill \"$watcher\" 2>/dev/null; exit \"$status\""
    )


def parse_pgid(line):
    text = line.decode("ascii", "replace").strip()
    if text.startswith(PGID_MARK.strip()):
        number = text[len(PGID_MARK.strip()) :].strip()
        return int(number) if number.isdigit() else None
    return None


class Builder:
    """One SSH connection to the builder; a context manager."""

    def __init__(self, settings, log_path=None):
        self.settings = settings
        self.log_path = log_path
        self.client = None
        self.workdir = settings.workdir

    def __enter__(self):
        if self.client is None:
            self.connect()
        return self

    def __exit__(self, *exc):
        self.close()

    def log(self, text):
        if self.log_path:
            with open(self.log_path, "a") as handle:
                handle.write(text.rstrip("\n") + "\n")

    def connect(self):
        import paramiko

        quiet_paramiko(self.log_path)
        settings = self.settings
        known_hosts = Path(os.path.expanduser(settings.known_hosts))
        client = paramiko.SSHClient()
        try:
            if known_hosts.exists():
                client.load_host_keys(str(known_hosts))
            client.set_missing_host_key_policy(host_key_policy(settings, known_hosts))
            client.connect(
                settings.host,
                port=settings.port,
                username=settings.login,
                key_filename=os.path.expanduser(settings.key_file) if settings.key_file else None,
                allow_agent=not settings.key_file,
                look_for_keys=not settings.key_file,
                timeout=CONNECT_TIMEOUT_SECONDS,
                banner_timeout=CONNECT_TIMEOUT_SECONDS,
                auth_timeout=CONNECT_TIMEOUT_SECONDS,
                transport_factory=prefer_gcm,
            )
        except Exception as error:  # every way SSH can fail becomes one line
            client.close()
            raise StepError(describe_connect_error(settings, error)) from None
        self.client = client
        self.log(f"connected to builder {settings.display} ({client.get_transport().remote_cipher})")
        if settings.workdir.startswith("~"):
            home = self.check_output("printf '%s\\n' \"$HOME\"", "resolving the work folder").strip()
            if not home.startswith("/"):
                raise StepError(f"builder {settings.display}: the account has no home folder for workdir {settings.workdir}; set an absolute workdir")
            self.workdir = expand_home(settings.workdir, home)
        return self

    def close(self):
        if self.client:
            self.client.close()
            self.client = None

    def guard(self, doing):
        return ConnectionGuard(self, doing)

    def capture(self, command, timeout=120):
        """Run a remote command line; (exit status, stdout, stderr) as text."""
        with self.guard(f"running {command[:60]}"):
            stdin, stdout, stderr = self.client.exec_command(command, timeout=timeout)
            stdin.close()
            out = stdout.read().decode("utf-8", "replace")
            err = stderr.read().decode("utf-8", "replace")
            return stdout.channel.recv_exit_status(), out, err

    def check_output(self, command, what):
        status, out, err = self.capture(command)
        if status != 0:
            raise StepError(f"builder {self.settings.display}: {what} failed: {last_line(err or out, f'exit status {status}')}")
        return out

    def run_logged(self, command, log_path, step):
        """Run a remote command line with its output streamed live into `log_path`, a heartbeat
        on the terminal, and StepError naming the log when it fails."""
        started = time.monotonic()
        finished = start_heartbeat(step, log_path, where=f" on {self.settings.host}")
        pgid = None
        try:
            with open(log_path, "ab") as log, self.guard(step):
                log.write(f"$ [{self.settings.display}] {command}\n".encode())
                log.flush()
                channel = self.client.get_transport().open_session()
                channel.set_combine_stderr(True)
                # stdin stays open and unused: the builder's side ends the command when it closes
                channel.exec_command(watched_command(command))
                pending = b""
                while True:
                    data = self.receive(channel, 32768, step)
                    if not data:
                        break
                    if pgid is None:
                        pending += data
                        if b"\n" not in pending:
                            continue
                        first, _, data = pending.partition(b"\n")
                        pgid = parse_pgid(first)
                        if pgid is None:  # not our mark after all: keep the line, stop nothing
                            pgid, data = 0, first + b"\n" + data
                    log.write(data)
                    log.flush()
                status = channel.recv_exit_status()
        except BaseException:
            # cancelled (SIGTERM becomes SystemExit) or the connection failed: stop the
            # command on the builder too, so it does not run on for nobody
            if pgid:
                self.stop_remote(pgid)
            raise
        finally:
            finished.set()
        if status == -1:
            raise StepError(f"{step}: the connection to builder {self.settings.display} was lost; run again")
        if status != 0:
            raise StepError(f"{step} failed on builder {self.settings.host} (exit status {status}); see {log_path}:\n{tail(log_path)}")
        print(f"  {step}: done on {self.settings.host} in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)

    def receive(self, channel, size, doing):
        """channel.recv that does not wait forever on a connection that died in silence: a quiet
        spell is fine (a build may print nothing for minutes) while the builder still answers."""
        channel.settimeout(QUIET_SECONDS)
        while True:
            try:
                return channel.recv(size)
            except socket.timeout:
                if not self.answers(REPLY_SECONDS):
                    raise StepError(
                        f"{doing}: builder {self.settings.display} sent nothing for {QUIET_SECONDS} s and has not "
                        f"answered a keepalive for {REPLY_SECONDS} s (the network is gone?); run again"
                    ) from None

    def answers(self, within):
        """Whether the builder answers a keepalive request within `within` seconds."""
        transport = self.client.get_transport()
        answered = threading.Event()

        def ask():
            # OpenSSH refuses the unknown request, and the refusal is the answer
            transport.global_request("keepalive@openssh.com", wait=True)
            if transport.is_active():
                answered.set()

        threading.Thread(target=ask, daemon=True).start()
        return answered.wait(within)

    def stop_remote(self, pgid):
        try:
            self.client.exec_command(remote_command(["kill", "-TERM", "--", f"-{pgid}"]), timeout=10)[1].channel.recv_exit_status()
        except Exception:  # the connection may be what failed; nothing more can be done
            pass

    def stat(self, path):
        """Size of a remote file, or None when it does not exist (the builder needs a shell,
        not SFTP)."""
        status, out, _ = self.capture(remote_command(["stat", "-L", "-c", "%s", "--", path]))
        return int(out) if status == 0 and out.strip().isdigit() else None

    def existing(self, paths):
        """Those of `paths` that exist on the builder."""
        paths = list(paths)
        test = "; ".join(f"[ -e {shlex.quote(path)} ] && printf '%s\\n' {shlex.quote(path)}" for path in paths)
        return set(self.capture(f"{test}; true")[1].splitlines()) & set(paths)

    def sha256(self, path):
        """The builder's own sha256sum of a file, or None when it does not exist."""
        status, out, _ = self.capture(remote_command(["sha256sum", "--", path]), timeout=3600)
        if status != 0:
            return None
        return out.split()[0]

    def send_folder(self, folder, remote_folder):
        """Put a copy of a local folder at `remote_folder` on the builder (replacing what is
        there): packed as a tar stream straight into `tar -x` there, with no file on either side.
        A cut stream makes tar fail, and the next run starts the folder over."""
        import tarfile

        with self.guard(f"sending {folder}"):
            channel = self.client.get_transport().open_session()
            channel.set_combine_stderr(True)
            channel.exec_command(
                remote_command(["rm", "-rf", "--", remote_folder], ["mkdir", "-p", "--", remote_folder], ["tar", "-x", "-f", "-", "-C", remote_folder])
            )
            try:
                with tarfile.open(fileobj=ChannelWriter(channel), mode="w|", format=tarfile.PAX_FORMAT) as archive:
                    archive.add(str(folder), arcname=".")
                channel.shutdown_write()
            except OSError:
                if not channel.exit_status_ready():
                    raise
                # tar there stopped reading (disk full, say): its own words follow
            output = b""
            while data := channel.recv(32768):
                output += data[: 65536 - len(output)]
            status = channel.recv_exit_status()
        if status != 0:
            output = output.decode("utf-8", "replace")
            raise StepError(f"builder {self.settings.display}: unpacking the source in {remote_folder} failed: {last_line(output, f'exit status {status}')}")

    def download(self, remote_path, local_path, remote_sha256, before_rename=None):
        """Bring a remote file to `local_path`: into a dot-partial file beside it, resumed from
        that file when an earlier transfer was cut, checked against the builder's sha256, then
        renamed into place."""
        local_path = Path(local_path)
        partial = local_path.with_name(f".{local_path.name}.partial")
        meta_path = partial.with_name(partial.name + ".json")
        size = self.stat(remote_path)
        if size is None:
            raise StepError(f"builder {self.settings.host} has no {remote_path}")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            meta = None
        offset = resume_offset(partial.stat().st_size if partial.exists() else 0, meta, size, remote_sha256)
        digest = hashlib.sha256()
        if offset:
            with open(partial, "rb") as handle:
                while chunk := handle.read(4 << 20):
                    digest.update(chunk)
            message = f"  download {local_path.name}: resuming at {offset / 1e6:.1f} of {size / 1e6:.1f} MB from {partial.name}"
        else:
            partial.unlink(missing_ok=True)
            message = f"  download {local_path.name}: {size / 1e6:.1f} MB from {self.settings.host}"
        print(message, file=sys.stderr, flush=True)
        self.log(message)
        write_json_atomic(meta_path, {"sha256": remote_sha256, "size": size, "remote": remote_path, "host": self.settings.host})
        limit = float(os.environ.get(RATE_LIMIT_VARIABLE) or 0)
        started = time.monotonic()
        last_report = started
        done = offset
        with self.guard(f"downloading {remote_path}"):
            # a plain stream on an exec channel, not SFTP: SFTP's request per 32 KB costs paramiko
            # half its throughput (bench/remote.py); `tail -c +N` seeks, so resuming reads no more
            channel = self.client.get_transport().open_session()
            channel.exec_command(remote_command(["tail", "-c", f"+{offset + 1}", "--", remote_path]))
            channel.shutdown_write()
            with open(partial, "r+b" if offset else "wb") as target:
                target.seek(offset)
                while True:
                    chunk = self.receive(channel, CHUNK, f"downloading {remote_path}")
                    if not chunk:
                        break
                    target.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    now = time.monotonic()
                    if limit:
                        # sleep to stay under the rate, measured from the start of this transfer
                        ahead = (done - offset) / limit - (now - started)
                        if ahead > 0:
                            target.flush()
                            time.sleep(ahead)
                            now = time.monotonic()
                    if now - last_report >= PROGRESS_SECONDS:
                        target.flush()
                        line = progress_line(local_path.name, done, size, offset, now - started)
                        print(line, file=sys.stderr, flush=True)
                        self.log(line)
                        last_report = now
                target.flush()
                os.fsync(target.fileno())
            status = channel.recv_exit_status()
            error = channel.recv_stderr(4096).decode("utf-8", "replace")
        if status == -1:  # the channel closed without an exit status: the connection is gone
            raise StepError(
                f"the connection to builder {self.settings.display} failed while downloading {remote_path} "
                f"at {done / 1e6:.1f} of {size / 1e6:.1f} MB; run again to resume"
            )
        if status != 0:
            raise StepError(f"builder {self.settings.host} could not send {remote_path}: {last_line(error, f'exit status {status}')}")
        if done != size:
            raise StepError(f"download of {remote_path} ended at {done} of {size} bytes; run again to resume")
        if digest.hexdigest() != remote_sha256:
            partial.unlink(missing_ok=True)
            meta_path.unlink(missing_ok=True)
            raise StepError(f"the downloaded {local_path.name} does not match the builder's sha256; run again to fetch it anew")
        os.chmod(partial, 0o644)
        if before_rename:
            before_rename()
        os.replace(partial, local_path)
        meta_path.unlink(missing_ok=True)
        elapsed = time.monotonic() - started
        line = f"  download {local_path.name}: done, {(size - offset) / 1e6:.1f} MB in {elapsed:.1f} s, sha256 verified"
        print(line, file=sys.stderr, flush=True)
        self.log(line)


class ChannelWriter:
    """The write end of an exec channel as a file, for tarfile's stream mode."""

    def __init__(self, channel):
        self.channel = channel

    def write(self, data):
        self.channel.sendall(data)
        return len(data)


class ConnectionGuard:
    """Turn a connection lost midway (or any SSH failure) into one line instead of a traceback."""

    def __init__(self, builder, doing):
        self.builder = builder
        self.doing = doing

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        import paramiko

        if error is None or isinstance(error, (StepError, KeyboardInterrupt, SystemExit)):
            return False
        if isinstance(error, (paramiko.SSHException, EOFError, OSError)) and not isinstance(error, FileNotFoundError):
            raise StepError(
                f"the connection to builder {self.builder.settings.display} failed while {self.doing}: "
                f"{last_line(str(error), type(error).__name__)}; run again"
            ) from None
        return False


def quiet_paramiko(log_path):
    """paramiko logs its own errors (with tracebacks) to stderr; keep them in the rule's log."""
    logger = logging.getLogger("paramiko")
    logger.propagate = False
    logger.handlers.clear()
    if log_path:
        handler = logging.FileHandler(log_path)
        handler.setFormatter(logging.Formatter("paramiko: %(message)s"))
        handler.setLevel(logging.WARNING)
        logger.addHandler(handler)
    else:
        logger.addHandler(logging.NullHandler())


def preflight(builder, needs=TOOLS):
    """Check the builder: the tools a step needs (Docker, buildx, repo2docker, the runtime,
    flock; versions into the log) and free space in the work folder. Raises StepError with one
    line per problem."""
    _, out, _ = builder.capture(preflight_script(builder.settings, builder.workdir, needs))
    checks = parse_checks(out)
    problems = preflight_problems(builder.settings, builder.workdir, checks, needs)
    if problems:
        builder.log("\n".join(problems))
        raise StepError("\n".join(problems))
    versions = {name: last_line(text) for name, (_, text) in checks.items() if name not in ("space", "runtime_build_help")}
    versions["free_gb"] = round(parse_df(checks["space"][1]) / 1e6, 1)
    if "runtime_build_help" in checks:
        versions["mksquashfs_args"] = "--mksquashfs-args" in checks["runtime_build_help"][1]
    builder.log("builder preflight: " + json.dumps(versions, sort_keys=True))
    return versions


def connect(settings, log_path, needs=TOOLS):
    """A connected builder, checked for the tools `needs` names."""
    builder = Builder(settings, log_path).connect()
    try:
        builder.versions = preflight(builder, needs)
    except BaseException:
        builder.close()
        raise
    return builder


def readiness(settings, workdir, versions):
    """What `check_builder` prints when the builder is ready."""
    tools = ", ".join(f"{name} {versions[name]}" for name in TOOLS if name in versions)
    return (
        f"builder {settings.display} is ready: {tools}; {versions['free_gb']} GB free in {workdir}; "
        f"max_builds {settings.max_builds}, keep_images {settings.keep_images}"
    )


def check_builder(config, log_path):
    settings = settings_from_config(config)
    if settings is None:
        print("builder: local (this machine); `bash setup.sh check` says what it lacks", file=sys.stderr)
        return
    with connect(settings, log_path) as builder:
        line = readiness(settings, builder.workdir, builder.versions)
    builder.log(line)
    print(line, file=sys.stderr)


if "snakemake" in globals():
    from steps import main

    main("check_builder", lambda: check_builder(snakemake.config, snakemake.log[0]))
