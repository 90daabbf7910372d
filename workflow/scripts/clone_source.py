"""Rule clone_source: check out exactly the resolved commit."""

from pathlib import Path

from repo2singularity.repository import RepositoryError, clone_logged
from repo2singularity.step import StepError, run_step
from repo2singularity.steplog import step_log

snakemake = globals()["snakemake"]  # put there by the rule's script: directive before this runs


def clone():
    if snakemake.params.fetched_by:
        # the builder (a build service) fetches the commit itself
        Path(snakemake.output.source).mkdir(parents=True, exist_ok=True)
        step_log(snakemake.log[0]).info(f"not cloned here: the {snakemake.params.fetched_by} builder fetches {snakemake.wildcards.sha} itself")
        return
    try:
        clone_logged(snakemake.params.repository, snakemake.wildcards.sha, snakemake.output.source, snakemake.log[0])
    except RepositoryError as error:
        raise StepError(str(error)) from None


run_step("clone_source", clone)
