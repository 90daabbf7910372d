"""Rule servers: one line per recorded Jupyter server."""

from repo2singularity.servers import report_servers
from repo2singularity.step import run_step

snakemake = globals()["snakemake"]  # put there by the rule's script: directive before this runs

run_step("servers", lambda: report_servers(snakemake.params.results, snakemake.log[0]))
