import functools
import sys
from pathlib import Path

from snakemake.utils import min_version, validate

min_version("9.0")

sys.path.insert(0, str(Path(workflow.basedir) / "workflow" / "scripts"))

import builds

RESULTS = "results"
SCRIPTS = "../scripts"


def fail(message):
    """Stop before anything runs, with one line instead of a traceback."""
    sys.exit(f"{builds.PROGRAM}: {message}")


try:
    validate(config, "../schemas/config.schema.yaml")
except WorkflowError as error:
    fail(builds.describe_validation_error(error))

try:
    # a relative repository path means the working directory, else this workflow's folder
    # (where the bundled example lives)
    settings = builds.Settings.from_config(config, base_dirs=(".", workflow.basedir))
except builds.InvalidInput as error:
    fail(str(error))


wildcard_constraints:
    name=builds.NAME_PATTERN,
    sha="[0-9a-f]{40}",


@functools.cache
def get_resolved_builds():
    """Resolve every ref once per run, and only when a target needs the commit."""
    try:
        return builds.resolve(settings, cache_dir=Path(RESULTS, ".cache", "git"))
    except builds.InvalidInput as error:
        fail(str(error))


def get_build(wildcards):
    return settings.builds[wildcards.name]


def get_targets(template):
    def targets(wildcards):
        return [
            template.format(results=RESULTS, name=b.name, sha=b.sha)
            for b in get_resolved_builds()
        ]

    return targets


def get_resolved_build(wildcards):
    """The build as resolved this run; another commit of the same name (a rerun of an
    older target) falls back to the unresolved spec."""
    for build in get_resolved_builds():
        if build.name == wildcards.name and build.sha == wildcards.sha:
            return build
    return get_build(wildcards)


def get_image_labels(wildcards):
    return builds.labels(get_resolved_build(wildcards), wildcards.sha)


def get_step_log(step):
    return f"{RESULTS}/{{name}}/{{sha}}/logs/{step}.log"


def get_step_benchmark(step):
    return f"{RESULTS}/{{name}}/{{sha}}/benchmarks/{step}.tsv"


def get_image_tag(wildcards):
    return builds.image_tag(settings, wildcards.name, wildcards.sha)
