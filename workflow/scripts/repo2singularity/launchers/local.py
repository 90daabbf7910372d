"""`launch_on: local`: a detached server on this machine, bound to 127.0.0.1."""

import secrets
import shlex
import subprocess
import time
from pathlib import Path

from ..jupyter import POLL_SECONDS, create_owner_only, note, now, status, token_file
from ..processes import LOOPBACK, ProcessIdentity, alive, end_process_group, free_port, listener_in_tree
from ..step import StepError
from ..tools import tail
from .base import Launcher

STOP_WAIT_SECONDS = 20


class LocalLauncher(Launcher):
    kind = "local"

    def launch(self, request):
        token = secrets.token_hex(24)
        port = free_port()
        folder = Path(request.connection_file).parent
        env_file = token_file(folder, token)
        log_handle = open(create_owner_only(request.server_log), "ab")
        command = request.server_command(env_file, port)
        note(request.log, f"$ {shlex.join(command)}")
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            env=self.child_environment(),
        )
        log_handle.close()
        url = f"http://{LOOPBACK}:{port}/"
        try:
            self.wait_until_answering(process, port, token, request.timeout, request.server_log)
        except BaseException as error:
            note(request.log, f"failed: {error}")
            end_process_group(process.pid, STOP_WAIT_SECONDS, child=process)
            raise
        finally:
            env_file.unlink(missing_ok=True)
        # taken once the server answers: the runtime's start-up execs through several programs
        identity = ProcessIdentity.of(process.pid)
        return {
            "launched_on": self.kind,
            "url": url,
            "url_with_token": f"{url}?token={token}",
            "host": LOOPBACK,
            "port": port,
            "token": token,
            "pid": process.pid,
            "process": identity.record() if identity else None,
            "idle_timeout": request.idle_timeout,
            "log": str(Path(request.server_log).resolve()),
            "sandbox": str(Path(request.sandbox).resolve()),
            "started": now(),
            "how_to_connect": f"open {url}?token={token} in a browser on this machine",
        }

    @staticmethod
    def wait_until_answering(process, port, token, timeout, server_log):
        """Until the server answers; the token goes only to a port that the launched process
        (or a child of it: the runtime starts the server) listens on."""
        url = f"http://{LOOPBACK}:{port}/"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise StepError(
                    f"the Jupyter server exited (status {process.returncode}) before it answered; "
                    f"last lines of {server_log}:\n{tail(server_log)}"
                )
            if listener_in_tree(process.pid, LOOPBACK, port) and status(url, token) == 200:
                return
            time.sleep(POLL_SECONDS)
        raise StepError(f"the Jupyter server did not answer within {timeout} s; see {server_log}")

    def running(self, connection):
        """Whether the server this launch started still runs. A record without the process's
        identity (written by an older version) can only say that its pid is in use."""
        identity = ProcessIdentity.from_record(connection.get("process"))
        return identity.still_running() if identity else alive(connection["pid"])

    def stop(self, connection):
        """Only the very process this launch started is signalled: after a reboot or pid reuse,
        the same pid belongs to another process, which is left alone."""
        identity = ProcessIdentity.from_record(connection.get("process"))
        if identity is None or not identity.still_running():
            return False
        end_process_group(identity.pid, STOP_WAIT_SECONDS)
        return True

    def describe(self, connection):
        return f"pid {connection['pid']} on this machine"
