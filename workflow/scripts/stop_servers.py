"""Rule stop: stop the recorded Jupyter servers of the configured images."""

from repo2singularity.servers import report_stopped
from repo2singularity.step import run_step

snakemake = globals()["snakemake"]  # put there by the rule's script: directive before this runs

run_step("stop", lambda: report_stopped(snakemake.params.results, snakemake.params.names, snakemake.log[0]))
