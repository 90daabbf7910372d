"""A Jupyter server started from the sandbox: its command line, its token kept off every command
line, its idle shutdown, and the status check that tells it answers."""

import os
from pathlib import Path

import requests

from . import user_work
from .files import now
from .steplog import step_log

OWNER_ONLY = 0o600
POLL_SECONDS = 0.5


def culling_arguments(jupyter_command, idle_timeout):
    """Jupyter's own idle shutdown, as JupyterHub's culler does it for Binder: idle kernels are
    shut down, and the server ends itself once it has had no kernels, terminals or requests
    for `idle_timeout` seconds (notebook 6 checks that once a minute). JupyterLab and Jupyter
    Server take these settings under ServerApp, the classic notebook under NotebookApp."""
    if not idle_timeout:
        return []
    words = {Path(word).name for word in jupyter_command}
    app = "ServerApp" if words & {"lab", "server", "jupyter-lab", "jupyter-server"} else "NotebookApp"
    interval = max(1, min(60, idle_timeout // 2))
    return [
        f"--{app}.shutdown_no_activity_timeout={idle_timeout}",
        f"--MappingKernelManager.cull_idle_timeout={idle_timeout}",
        f"--MappingKernelManager.cull_interval={interval}",
    ]


def server_command(
    runtime,
    sandbox,
    image,
    env_file,
    jupyter_command,
    port,
    writable=True,
    host="127.0.0.1",
    runtime_args=(),
    jupyter_args=(),
    binds=(),
    unpacked=True,
    work_folder=None,
):
    """`run` keeps the image's entrypoint, so repo2docker's start script runs first; --pwd
    makes the repository the working folder; the token travels in an owner-only env file,
    never on a command line that `ps` shows.

    A writable sandbox has no overlay, so the runtime would mount the user's home over the
    image's /home and hide the repository there; instead the image's own home folder inside
    the sandbox is the home, as on Binder.

    Binds (site scratch, project folders) are "source[:destination[:options]]" as the runtime
    takes them; in a writable sandbox a destination must already exist in the image. The
    users' work folder comes first, at <working folder>/work (its mount point is made when the
    sandbox is unpacked): what users keep there outlives every sandbox.

    port None leaves out address and port: a Slurm job adds them on its node. Either way the
    server takes that port or ends (port_retries 0). unpacked False: the sandbox is not there
    yet (a Slurm job unpacks it first, then drops a --home it lacks)."""
    sandbox = Path(sandbox).resolve()
    command = [runtime, "run", *runtime_args, "--cleanenv", "--env-file", str(env_file), "--pwd", image["working_folder"]]
    if work_folder:
        command += ["--bind", user_work.bind(work_folder, image)]
    for bind in binds:
        command += ["--bind", bind]
    image_home = image.get("home", "")
    if writable:
        command.append("--writable")
        # a home with ".." parts would bind a folder outside the sandbox
        inside = (sandbox / image_home.lstrip("/")).resolve()
        if image_home.startswith("/") and inside.is_relative_to(sandbox) and (not unpacked or inside.is_dir()):
            command += ["--home", f"{sandbox}{image_home}:{image_home}"]
    command.append(str(sandbox))
    command += [*jupyter_command, *jupyter_args]
    if port is not None:
        command += [f"--ip={host}", f"--port={port}"]
    # Jupyter would otherwise move to another port unsaid when its port was taken meanwhile,
    # while the launch goes on sending the token to the first one, to whoever holds it
    return command + ["--port-retries=0", "--no-browser"]


def create_owner_only(path, text=""):
    path = Path(path)
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, OWNER_ONLY)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    return path


def token_file(folder, token):
    """The owner-only environment file that hands the token to the server."""
    return create_owner_only(Path(folder) / ".jupyter.env", f"JUPYTER_TOKEN={token}\n")


def status(url, token, timeout=2.0):
    """HTTP status of GET {url}api/status, with the token if one is given (None if no answer)."""
    headers = {"Authorization": f"token {token}"} if token else {}
    try:
        return requests.get(f"{url}api/status", headers=headers, timeout=timeout).status_code
    except requests.RequestException:
        return None


def note(log, text):
    """A line with its time in the launch step's log (never the token: it is in no command or
    message): the launch's lines tell how long each wait took."""
    step_log(log).info(f"{now()} {text}")
