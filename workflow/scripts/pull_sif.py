"""Rule pull_sif: an image the registry has for this commit, pulled instead of built."""

from repo2singularity.results import mark_latest
from repo2singularity.shared_sifs import pull
from repo2singularity.step import run_step

snakemake = globals()["snakemake"]  # put there by the rule's script: directive before this runs


def pull_sif():
    pull(
        snakemake.params.registry,
        snakemake.wildcards.name,
        snakemake.wildcards.sha,
        snakemake.output.sif,
        snakemake.output.checksum,
        snakemake.output.receipt,
        snakemake.output.pulled,
        snakemake.log[0],
    )
    mark_latest(snakemake.output.sif)


run_step("pull_sif", pull_sif)
