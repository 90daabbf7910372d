"""The Launcher interface: where a Jupyter server runs, how to tell it still runs, how to stop
it and how to say where it is. One file per place in this package (this machine, a Slurm job);
a kind registers itself by subclassing Launcher and is chosen by the `launch_on` setting."""

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from ..jupyter import culling_arguments, server_command
from ..repository import without_secrets


@dataclass(frozen=True)
class LaunchRequest:
    """One server to start from a sandbox. `image` is the image's receipt (image.json)."""

    runtime: str
    sandbox: str
    image: dict
    connection_file: str
    server_log: str
    jupyter_command: tuple
    timeout: int
    writable: bool = True
    idle_timeout: int = 0
    log: str | None = None
    runtime_args: tuple = ()
    binds: tuple = ()
    # the users' work folder of this image (`work_dir`), bound at <working folder>/work
    work_folder: str | None = None
    # set when the launch unpacks the sandbox itself (a Slurm launch, in the server's job)
    sif: str | None = None
    checksum: str | None = None
    unpack_log: str | None = None
    receipt: str | None = None

    def server_command(self, env_file, port, runtime_args=(), unpacked=True):
        """The runtime's command for this server, with the idle shutdown asked for; `port` None
        leaves address and port to the node (a Slurm job); `runtime_args` come first."""
        return server_command(
            self.runtime,
            self.sandbox,
            self.image,
            env_file,
            self.jupyter_command,
            port,
            self.writable,
            runtime_args=[*runtime_args, *self.runtime_args],
            jupyter_args=culling_arguments(self.jupyter_command, self.idle_timeout),
            binds=self.binds,
            unpacked=unpacked,
            work_folder=self.work_folder,
        )


class Launcher(ABC):
    kind: ClassVar[str]
    kinds: ClassVar[dict] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        Launcher.kinds[cls.kind] = cls

    def __init__(self, config=None):
        """`config`: the workflow's validated configuration; only `launch` needs it."""
        self.config = config or {}

    def child_environment(self):
        """The environment of the server (or of sbatch, which hands it to the job): this
        process's, without the registry credential, which no server needs; a long-lived server
        would otherwise keep it in /proc/PID/environ, and Slurm in its job records."""
        variable = self.config.get("registry_credentials_env")
        return without_secrets(os.environ, [variable] if variable else [])

    @abstractmethod
    def launch(self, request):
        """Start the server and wait until it answers with its token; the connection record
        (written to launch.json by the caller), with "launched_on" set to this kind."""

    @abstractmethod
    def running(self, connection):
        """Whether the server a connection record names may still serve."""

    @abstractmethod
    def stop(self, connection):
        """End that server; True if it was still running."""

    @abstractmethod
    def describe(self, connection):
        """Where it runs, in a few words ("pid 12 on this machine", "Slurm job 7 on node1")."""
