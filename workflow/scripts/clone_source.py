"""Rule clone_source: check out exactly the resolved commit."""

from repository import RepositoryError, clone_commit
from steps import StepError, main


def clone(repository, sha, destination, log):
    with open(log, "a") as handle:
        print(f"cloning {repository.display_url} at {sha}", file=handle, flush=True)
        try:
            clone_commit(repository, sha, destination)
        except RepositoryError as error:
            print(error, file=handle)
            raise StepError(str(error)) from None
        print(f"checked out into {destination}", file=handle)


if "snakemake" in globals():
    main(
        "clone_source",
        lambda: clone(snakemake.params.repository, snakemake.wildcards.sha, snakemake.output.source, snakemake.log[0]),
    )
