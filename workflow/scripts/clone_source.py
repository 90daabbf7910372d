"""Rule clone_source: check out exactly the resolved commit."""

from repo2singularity.repository import RepositoryError, clone_logged
from repo2singularity.step import StepError, run_step


def clone():
    try:
        clone_logged(snakemake.params.repository, snakemake.wildcards.sha, snakemake.output.source, snakemake.log[0])
    except RepositoryError as error:
        raise StepError(str(error)) from None


run_step("clone_source", clone)
