"""Rule prune: keep the newest SIFs of each name, remove older commits' folders."""

from repo2singularity.retention import prune_with_log
from repo2singularity.step import run_step

snakemake = globals()["snakemake"]  # put there by the rule's script: directive before this runs

run_step("prune", lambda: prune_with_log(snakemake.params.results, snakemake.params.keep, snakemake.params.names, snakemake.log[0], snakemake.params.work_dir))
