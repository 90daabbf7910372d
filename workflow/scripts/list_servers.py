"""Rule servers: one line per recorded Jupyter server."""

from repo2singularity.servers import report_servers
from repo2singularity.step import run_step

run_step("servers", lambda: report_servers(snakemake.params.results, snakemake.log[0]))
