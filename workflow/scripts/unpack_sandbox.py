"""Rule unpack_sandbox: the SIF, checked against its sha256, unpacked into a writable folder; the
files users changed in the sandbox it replaces go to the image's work folder first."""

import json
from pathlib import Path

from repo2singularity.runtime import unpack_sandbox
from repo2singularity.step import run_step

snakemake = globals()["snakemake"]  # put there by the rule's script: directive before this runs

run_step(
    "unpack_sandbox",
    lambda: unpack_sandbox(
        snakemake.params.runtime,
        snakemake.input.sif,
        snakemake.input.checksum,
        snakemake.params.sandbox,
        snakemake.log[0],
        json.loads(Path(snakemake.input.receipt).read_text()),
        snakemake.params.work_folder,
        record=snakemake.output.unpacked,
    ),
)
