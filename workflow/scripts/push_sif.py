"""Rule push_sif: a SIF built here, pushed to the registry with its provenance."""

from repo2singularity.shared_sifs import push
from repo2singularity.step import run_step

snakemake = globals()["snakemake"]  # put there by the rule's script: directive before this runs

run_step(
    "push_sif",
    lambda: push(
        snakemake.params.registry,
        snakemake.wildcards.name,
        snakemake.wildcards.sha,
        snakemake.input.sif,
        snakemake.input.checksum,
        snakemake.input.receipt,
        snakemake.output.pushed,
        snakemake.log[0],
        reference=snakemake.params.reference,
    ),
)
