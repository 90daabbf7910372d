"""Rule build_sif: the saved image made into a SIF on the builder, the SIF here with its sha256,
and results/{name}/latest pointing at it."""

from repo2singularity import builders
from repo2singularity.results import mark_latest
from repo2singularity.step import run_step

snakemake = globals()["snakemake"]  # put there by the rule's script: directive before this runs


def build_sif():
    builder = builders.from_config(snakemake.params.builder.with_sif_options(snakemake.params.sif_options), snakemake.log[0])
    builder.build_sif(snakemake.wildcards.name, snakemake.wildcards.sha, snakemake.input.tarball, snakemake.output.sif, snakemake.output.checksum)
    mark_latest(snakemake.output.sif)


run_step("build_sif", build_sif)
