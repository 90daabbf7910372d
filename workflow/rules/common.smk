import functools
import os
import sys
import time
from pathlib import Path

from snakemake.utils import min_version, validate

min_version("9.0")

sys.path.insert(0, str(Path(workflow.basedir) / "workflow" / "scripts"))

from repo2singularity import PROGRAM, builders, builds, servers

RESULTS = "results"
SCRIPTS = "../scripts"
# rules without outputs (`check_builder`, `servers`, `stop`, `prune`): Snakemake counts a log as one, so
# a fixed log name would make every later call "nothing to be done"; each call gets its own
CALL_STAMP = time.strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}"


def fail(message):
    """Stop before anything runs, with one line instead of a traceback."""
    sys.exit(f"{PROGRAM}: {message}")


try:
    validate(config, "../schemas/config.schema.yaml")
except WorkflowError as error:
    fail(builds.describe_validation_error(error))

try:
    # a relative repository path means the working directory, else this workflow's folder
    # (where the bundled example lives)
    settings = builds.Settings.from_config(
        config,
        base_dirs=(".", workflow.basedir),
        manifest_schema=Path(
            workflow.basedir, "workflow", "schemas", "manifest.schema.yaml"
        ),
    )
except builds.InvalidInput as error:
    fail(str(error))


wildcard_constraints:
    name=builds.NAME_PATTERN,
    sha="[0-9a-f]{40}",


RUN_STARTED = time.time()


@functools.cache
def get_resolution():
    """Resolve every ref once per run, and only when a target needs the commit."""
    try:
        return builds.resolve(settings, cache_dir=Path(RESULTS, ".cache", "git"))
    except builds.InvalidInput as error:
        fail(str(error))


@functools.cache
def get_resolved_builds():
    return get_resolution().builds


@functools.cache
def get_sifs_before_run():
    """Names whose SIF for the resolved commit existed when the run began: up to date."""
    return {
        b.name
        for b in get_resolved_builds()
        if Path(RESULTS, b.name, b.sha, f"{b.name}.sif").exists()
    }


def get_build(wildcards):
    return settings.builds[wildcards.name]


def get_targets(template):
    def targets(wildcards):
        get_sifs_before_run()
        return [
            template.format(results=RESULTS, name=b.name, sha=b.sha)
            for b in get_resolved_builds()
        ]

    return targets


def get_default_targets(wildcards):
    """A manifest builds SIFs (launching hundreds of servers helps nobody); one repository
    goes all the way to a running Jupyter server."""
    steps = ["{name}.card.html"] if settings.from_manifest else ["launch.json"]
    return [
        target
        for step in steps
        for target in get_targets(f"{{results}}/{{name}}/{{sha}}/{step}")(wildcards)
    ]


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


def write_run_summary():
    """After a manifest run, successful or not: results/summary.{json,md}; the number of
    images that failed."""
    if not (settings.from_manifest and get_resolution.cache_info().currsize):
        return 0
    from repo2singularity import summary

    failed = summary.write_summary(
        RESULTS,
        get_resolution(),
        get_sifs_before_run(),
        RUN_STARTED,
        BUILDER.saved_image_file,
    )
    print(Path(RESULTS, "summary.md").read_text())
    return failed
