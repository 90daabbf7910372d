"""Rule unpack_sandbox: the SIF, checked against its sha256, unpacked into a writable folder."""

from repo2singularity.runtime import unpack_sandbox
from repo2singularity.step import run_step

snakemake = globals()["snakemake"]  # put there by the rule's script: directive before this runs

run_step(
    "unpack_sandbox",
    lambda: unpack_sandbox(snakemake.params.runtime, snakemake.input.sif, snakemake.input.checksum, snakemake.output.sandbox, snakemake.log[0]),
)
