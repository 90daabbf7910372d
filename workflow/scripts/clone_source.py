"""Rule clone_source: check out exactly the resolved commit."""

from repository import Repository, RepositoryError, clone_commit
from steps import StepError, main


def clone(url, sha, destination):
    try:
        clone_commit(Repository(url), sha, destination)
    except RepositoryError as error:
        raise StepError(str(error)) from None


if "snakemake" in globals():
    main(
        "clone_source",
        lambda: clone(snakemake.params.url, snakemake.wildcards.sha, snakemake.output.source),
    )
