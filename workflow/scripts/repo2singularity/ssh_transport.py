"""An SSH connection (paramiko) to another host: host keys checked, commands run with their
output streamed into a log, folders sent as a tar stream, files brought back with progress,
resume and a sha256 check, and a connection that dies in silence noticed by a keepalive. It
knows nothing about images; builders/ssh.py uses it.

Every remote command is an argument list joined with shlex.quote, never a string with user
text pasted in. No password is ever asked for or stored: keys or the agent only."""

import base64
import hashlib
import logging
import os
import posixpath
import shlex
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

# RATE_LIMIT_VARIABLE (a test aid, and a way to share a thin link), progress_line, resume_offset:
# tests and bench name them from here
from .downloads import CHUNK, CONNECT_TIMEOUT_SECONDS, RATE_LIMIT_VARIABLE, Download, progress_line, resume_offset  # noqa: F401
from .step import StepError
from .steplog import AppendingFileHandler, step_log
from .tools import report_progress, say, tail

# a connection whose network dies without a word (no FIN, no RST) would keep a step waiting for
# hours, in any call that waits for the other side: every QUIET_SECONDS it is asked for a reply,
# and a connection whose other side gives none within REPLY_SECONDS is closed, which ends every
# wait on it (as ssh's ServerAliveInterval does)
QUIET_SECONDS = 60
REPLY_SECONDS = 30


@dataclass(frozen=True)
class SSHTarget:
    """Where to log in, and how the host is recognised. `role` names the host in messages
    (e.g. "builder"): what it is to the user, not how it is reached."""

    host: str
    port: int
    user: str
    key_file: str
    known_hosts: str
    trust_unknown_host: bool
    role: str = "host"

    @property
    def login(self):
        import getpass

        return self.user or getpass.getuser()

    @property
    def display(self):
        return f"{self.login}@{self.host}:{self.port}"

    @property
    def named(self):
        """The host as messages name it, e.g. `builder ci@build.example.org:22`."""
        return f"{self.role} {self.display}"

    def describe(self):
        """What a receipt records about the host: where, never how to log in."""
        return {"host": self.host, "port": self.port, "user": self.login}


def remote_command(*commands):
    """One shell line from argument lists, each argument quoted: user text is never code.
    Several lists run one after the other, stopping at the first failure."""
    return " && ".join(shlex.join(str(arg) for arg in command) for command in commands)


def expand_home(path, home):
    if path == "~":
        return home
    if path.startswith("~/"):
        return posixpath.join(home, path[2:])
    return path


def last_line(text, default=""):
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else default


# ------------------------------------------------------------------ connecting


class UnknownHostKey(Exception):
    def __init__(self, fingerprint):
        super().__init__(fingerprint)
        self.fingerprint = fingerprint


def fingerprint(key):
    digest = hashlib.sha256(key.asbytes()).digest()
    return f"{key.get_name()} SHA256:{base64.b64encode(digest).decode().rstrip('=')}"


def describe_connect_error(target, error):
    import paramiko

    where = target.named
    if isinstance(error, paramiko.BadHostKeyException):
        return (
            f"{where}: the host key CHANGED (known_hosts {target.known_hosts} has another key); "
            f"if the {target.role} was reinstalled, remove its old line from known_hosts"
        )
    if isinstance(error, UnknownHostKey):
        return (
            f"{where}: unknown host key ({error.fingerprint}), not in {target.known_hosts}; "
            "add it (ssh-keyscan, after checking the fingerprint) or set trust_unknown_host: true once"
        )
    if isinstance(error, paramiko.PasswordRequiredException):
        return f"{where}: the key {target.key_file} has a passphrase; load it into ssh-agent and leave key_file empty"
    if isinstance(error, paramiko.AuthenticationException):
        how = f"key {target.key_file}" if target.key_file else "the agent's keys and ~/.ssh/id_*"
        return f"{where}: the {target.role} refused {how} for user {target.login}"
    if isinstance(error, paramiko.SSHException) and "No authentication methods available" in str(error):
        return (
            f"{where}: no key to offer: key_file is empty, no ssh-agent answers (SSH_AUTH_SOCK) and there is "
            "no ~/.ssh/id_*; set key_file or load a key into ssh-agent"
        )
    if isinstance(error, paramiko.ssh_exception.NoValidConnectionsError):
        return f"{where}: connection refused (nothing listens on port {target.port}?)"
    if isinstance(error, (socket.timeout, TimeoutError)):
        return f"{where}: no answer within {CONNECT_TIMEOUT_SECONDS} s (no route, or a firewall)"
    if isinstance(error, socket.gaierror):
        return f"{where}: unknown host name ({error.strerror})"
    if isinstance(error, OSError):
        return f"{where}: cannot connect: {error.strerror or error}"
    return f"{where}: SSH failed: {last_line(str(error), type(error).__name__)}"


def host_key_policy(target, known_hosts):
    import paramiko

    class Policy(paramiko.MissingHostKeyPolicy):
        def missing_host_key(self, client, hostname, key):
            if not target.trust_unknown_host:
                raise UnknownHostKey(fingerprint(key))
            # trusted once, as ssh's accept-new: recorded, and checked from now on
            client.get_host_keys().add(hostname, key.get_name(), key)
            known_hosts.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with open(known_hosts, "a") as handle:
                handle.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
            say(f"  {target.named}: trusted new host key {fingerprint(key)}")

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


def quiet_paramiko(log_path):
    """paramiko logs its own errors (with tracebacks) to stderr; keep them in the rule's log."""
    logger = logging.getLogger("paramiko")
    logger.propagate = False
    logger.handlers.clear()
    if log_path:
        handler = AppendingFileHandler(log_path)
        handler.setFormatter(logging.Formatter("paramiko: %(message)s"))
        handler.setLevel(logging.WARNING)
        logger.addHandler(handler)
    else:
        logger.addHandler(logging.NullHandler())


# ------------------------------------------------------------------ commands that end with the connection

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


class ConnectionGuard:
    """Turn a connection lost midway (or any SSH failure) into one line instead of a traceback."""

    def __init__(self, transport, doing):
        self.transport = transport
        self.doing = doing

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        import paramiko

        if error is None or isinstance(error, (StepError, KeyboardInterrupt, SystemExit)):
            return False
        if isinstance(error, (paramiko.SSHException, EOFError, OSError)) and not isinstance(error, FileNotFoundError):
            raise self.transport.lost(self.doing, last_line(str(error), type(error).__name__)) from None
        return False


class SSHTransport:
    """One SSH connection; a context manager."""

    def __init__(self, target, log_path=None):
        self.target = target
        self.log_path = log_path
        self.step_log = step_log(log_path)
        self.client = None
        self.silent = False
        self.closing = threading.Event()

    def __enter__(self):
        if self.client is None:
            self.connect()
        return self

    def __exit__(self, *exc):
        self.close()

    def connect(self):
        import paramiko

        quiet_paramiko(self.log_path)
        target = self.target
        known_hosts = Path(os.path.expanduser(target.known_hosts))
        client = paramiko.SSHClient()
        try:
            if known_hosts.exists():
                client.load_host_keys(str(known_hosts))
            client.set_missing_host_key_policy(host_key_policy(target, known_hosts))
            client.connect(
                target.host,
                port=target.port,
                username=target.login,
                key_filename=os.path.expanduser(target.key_file) if target.key_file else None,
                allow_agent=not target.key_file,
                look_for_keys=not target.key_file,
                timeout=CONNECT_TIMEOUT_SECONDS,
                banner_timeout=CONNECT_TIMEOUT_SECONDS,
                auth_timeout=CONNECT_TIMEOUT_SECONDS,
                transport_factory=prefer_gcm,
            )
        except Exception as error:  # every way SSH can fail becomes one line
            client.close()
            raise StepError(describe_connect_error(target, error)) from None
        self.client = client
        self.step_log.info(f"connected to {target.named} ({client.get_transport().remote_cipher})")
        threading.Thread(target=self.watch, args=(client.get_transport(),), daemon=True).start()
        return self

    def close(self):
        self.closing.set()
        if self.client:
            self.client.close()
            self.client = None

    def watch(self, transport):
        """Ask the other side for a reply every QUIET_SECONDS; close the connection when it gives
        none within REPLY_SECONDS, so that no call waits on a dead network for good."""
        while not self.closing.wait(QUIET_SECONDS) and transport.is_active():
            if not self.answers(transport, REPLY_SECONDS) and not self.closing.is_set():
                self.silent = True
                self.step_log.info(f"{self.target.named} has not answered a keepalive for {REPLY_SECONDS} s: closing the connection")
                transport.close()
                return

    @staticmethod
    def answers(transport, within):
        """Whether the other side answers a keepalive request within `within` seconds."""
        answered = threading.Event()

        def ask():
            # OpenSSH refuses the unknown request, and the refusal is the answer
            transport.global_request("keepalive@openssh.com", wait=True)
            if transport.is_active():
                answered.set()

        threading.Thread(target=ask, daemon=True).start()
        return answered.wait(within)

    def lost(self, doing, detail=""):
        """The one line for a connection that failed while `doing`."""
        if self.silent:
            return StepError(
                f"{doing}: {self.target.named} has not answered a keepalive for {REPLY_SECONDS} s "
                "(the network is gone?); run again"
            )
        return StepError(f"the connection to {self.target.named} failed while {doing}{f': {detail}' if detail else ''}; run again")

    def connected(self):
        transport = self.client.get_transport() if self.client else None
        return bool(transport and transport.is_active()) and not self.silent

    def guard(self, doing):
        return ConnectionGuard(self, doing)

    def home(self):
        """The account's home folder on the other side."""
        home = self.check_output("printf '%s\\n' \"$HOME\"", "resolving the home folder").strip()
        if not home.startswith("/"):
            raise StepError(f"{self.target.named}: the account has no home folder")
        return home

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
            raise StepError(f"{self.target.named}: {what} failed: {last_line(err or out, f'exit status {status}')}")
        return out

    def run_logged(self, command, log_path, step):
        """Run a remote command line with its output streamed live into `log_path`, a heartbeat
        on the terminal, and StepError naming the log when it fails."""
        started = time.monotonic()
        finished = report_progress(step, log_path, where=f" on {self.target.host}")
        pgid = None
        try:
            with open(log_path, "ab") as log, self.guard(step):
                log.write(f"$ [{self.target.display}] {command}\n".encode())
                log.flush()
                channel = self.client.get_transport().open_session()
                channel.set_combine_stderr(True)
                # stdin stays open and unused: the other side ends the command when it closes
                channel.exec_command(watched_command(command))
                pending = b""
                while True:
                    data = channel.recv(32768)
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
            # command on the other side too, so it does not run on for nobody
            if pgid:
                self.stop_remote(pgid)
            raise
        finally:
            finished.set()
        if status == -1:
            raise self.lost(step, "the connection was lost")
        if status != 0:
            raise StepError(f"{step} failed on {self.target.role} {self.target.host} (exit status {status}); see {log_path}:\n{tail(log_path)}")
        say(f"  {step}: done on {self.target.host} in {time.monotonic() - started:.0f} s")

    def stop_remote(self, pgid):
        try:
            self.client.exec_command(remote_command(["kill", "-TERM", "--", f"-{pgid}"]), timeout=10)[1].channel.recv_exit_status()
        except Exception:  # the connection may be what failed; nothing more can be done
            pass

    def stat(self, path):
        """Size of a remote file, or None when it does not exist (a shell is needed, not SFTP)."""
        status, out, _ = self.capture(remote_command(["stat", "-L", "-c", "%s", "--", path]))
        return int(out) if status == 0 and out.strip().isdigit() else None

    def existing(self, paths):
        """Those of `paths` that exist on the other side."""
        paths = list(paths)
        test = "; ".join(f"[ -e {shlex.quote(path)} ] && printf '%s\\n' {shlex.quote(path)}" for path in paths)
        return set(self.capture(f"{test}; true")[1].splitlines()) & set(paths)

    def sha256(self, path):
        """The other side's own sha256sum of a file, or None when it does not exist."""
        status, out, _ = self.capture(remote_command(["sha256sum", "--", path]), timeout=3600)
        if status != 0:
            return None
        return out.split()[0]

    def read_text(self, path):
        """A small remote file's text, or None when it cannot be read."""
        status, out, _ = self.capture(remote_command(["cat", "--", path]))
        return out if status == 0 else None

    def put_file(self, data, remote_path):
        """`data` (bytes) as a file on the other side: written beside it, then renamed."""
        partial = f"{remote_path}.partial"
        command = remote_command(["mkdir", "-p", "--", posixpath.dirname(remote_path)]) + f" && cat > {shlex.quote(partial)} && " + remote_command(
            ["mv", "-f", "--", partial, remote_path]
        )
        with self.guard(f"sending {posixpath.basename(remote_path)}"):
            channel = self.client.get_transport().open_session()
            channel.set_combine_stderr(True)
            channel.exec_command(command)
            channel.sendall(data)
            channel.shutdown_write()
            output = b""
            while chunk := channel.recv(32768):
                output += chunk[: 4096 - len(output)]
            status = channel.recv_exit_status()
        if status != 0:
            raise StepError(f"{self.target.named}: writing {remote_path} failed: {last_line(output.decode('utf-8', 'replace'), f'exit status {status}')}")

    def send_folder(self, folder, remote_folder):
        """Put a copy of a local folder at `remote_folder` (replacing what is there): packed as a
        tar stream straight into `tar -x` there, with no file on either side. A cut stream makes
        tar fail, and the next run starts the folder over."""
        import tarfile

        doing = f"sending {folder}"
        with self.guard(doing):
            channel = self.client.get_transport().open_session()
            channel.set_combine_stderr(True)
            # stdin carries the tar stream, so no watcher: a dropped connection ends it for tar
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
        output = output.decode("utf-8", "replace")
        if status == -1:
            raise self.lost(doing, "the connection was lost")
        if status != 0:
            raise StepError(f"{self.target.named}: unpacking {folder} in {remote_folder} failed: {last_line(output, f'exit status {status}')}")

    def download(self, remote_path, local_path, remote_sha256, after_rename=None, size=None):
        """Bring a remote file to `local_path` (downloads.Download: a dot-partial file beside
        it, resumed when an earlier transfer was cut, checked against the other side's sha256,
        then renamed into place). `size`: the remote file's, when the caller already asked."""
        size = self.stat(remote_path) if size is None else size
        if size is None:
            raise StepError(f"{self.target.role} {self.target.host} has no {remote_path}")
        download = Download(local_path, size, remote_sha256, self.step_log, {"remote": remote_path, "host": self.target.host})
        offset = download.begin(self.target.host)
        with self.guard(f"downloading {remote_path}"):
            # a plain stream on an exec channel, not SFTP: SFTP's request per 32 KB costs paramiko
            # half its throughput (bench/remote.py); `tail -c +N` seeks, so resuming reads no more
            channel = self.client.get_transport().open_session()
            channel.exec_command(remote_command(["tail", "-c", f"+{offset + 1}", "--", remote_path]))
            channel.shutdown_write()
            with download.receiving() as write:
                while chunk := channel.recv(CHUNK):
                    write(chunk)
            status = channel.recv_exit_status()
            error = channel.recv_stderr(4096).decode("utf-8", "replace")
        if status == -1:  # the channel closed without an exit status: the connection is gone
            raise self.lost(f"downloading {remote_path}", f"at {download.done / 1e6:.1f} of {size / 1e6:.1f} MB (a rerun resumes)")
        if status != 0:
            raise StepError(f"{self.target.role} {self.target.host} could not send {remote_path}: {last_line(error, f'exit status {status}')}")
        download.finish(remote_path, self.target.role, after_rename)


class ChannelWriter:
    """The write end of an exec channel as a file, for tarfile's stream mode."""

    def __init__(self, channel):
        self.channel = channel

    def write(self, data):
        self.channel.sendall(data)
        return len(data)
