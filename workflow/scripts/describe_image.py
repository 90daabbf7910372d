"""Rule describe_image: a card for `snakemake --report`."""

from repo2singularity.step import run_step
from repo2singularity.summary import write_card

snakemake = globals()["snakemake"]  # put there by the rule's script: directive before this runs

run_step(
    "describe_image",
    lambda: write_card(
        snakemake.wildcards.name, snakemake.wildcards.sha, snakemake.input.receipt, snakemake.input.sif, snakemake.params.benchmarks, snakemake.output.card
    ),
)
