"""Rule build_sif: the saved image made into a SIF on the builder, and the SIF here with its sha256."""

from repo2singularity import builders
from repo2singularity.step import run_step

run_step(
    "build_sif",
    lambda: builders.from_config(snakemake.config, snakemake.log[0]).build_sif(
        snakemake.wildcards.name, snakemake.wildcards.sha, snakemake.input.tarball, snakemake.output.sif, snakemake.output.checksum
    ),
)
