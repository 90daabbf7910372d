"""Rule save_image: the built image as a tarball (or, on a remote builder, a receipt naming it there)."""

from repo2singularity import builders
from repo2singularity.step import run_step

snakemake = globals()["snakemake"]  # put there by the rule's script: directive before this runs

run_step(
    "save_image",
    lambda: builders.from_config(snakemake.params.builder, snakemake.log[0]).save_image(
        snakemake.wildcards.name, snakemake.wildcards.sha, snakemake.input.receipt, snakemake.output.tarball
    ),
)
