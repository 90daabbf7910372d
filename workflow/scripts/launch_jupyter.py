"""Rule launch_jupyter: a Jupyter server from the sandbox, where `launch_on` says; launch.json records it."""

import json
from pathlib import Path

from repo2singularity import launchers, servers
from repo2singularity.step import run_step

snakemake = globals()["snakemake"]  # put there by the rule's script: directive before this runs

request = launchers.LaunchRequest(
    runtime=snakemake.params.runtime,
    sandbox=snakemake.params.sandbox,
    # a Slurm launch starts from the SIF and unpacks it in the server's job
    sif=snakemake.input.get("sif"),
    checksum=snakemake.input.get("checksum"),
    unpack_log=snakemake.params.unpack_log,
    image=json.loads(Path(snakemake.input.receipt).read_text()),
    connection_file=snakemake.output.connection,
    server_log=snakemake.params.server_log,
    jupyter_command=tuple(snakemake.params.jupyter_command),
    timeout=snakemake.params.timeout,
    writable=snakemake.params.writable,
    idle_timeout=snakemake.params.idle_timeout,
    log=snakemake.log[0],
    runtime_args=tuple(snakemake.params.runtime_args),
    binds=tuple(snakemake.params.binds),
    work_folder=snakemake.params.work_folder,
    receipt=snakemake.input.receipt,
)
run_step("launch_jupyter", lambda: servers.launch(launchers.from_config(snakemake.params.launcher), request))
