import functools
import json
import os
import sys
import time
from pathlib import Path

from snakemake.utils import min_version, validate

min_version("9.0")

try:
    from repo2singularity import (
        PROGRAM,
        builders,
        builds,
        registry,
        results,
        servers,
        user_work,
    )
except ModuleNotFoundError as error:
    if error.name != "repo2singularity":
        raise
    # a .venv made before the package was installed into it, or another Python's snakemake
    sys.exit(
        f"the repo2singularity package is not installed for {sys.executable}; run `bash setup/python.sh`"
    )
from repo2singularity.repository import redact_url
from repo2singularity.shared_sifs import PULLED, PUSHED
from repo2singularity.step import StepError

RESULTS = "results"
SCRIPTS = "../scripts"
# rules without outputs (`check_builder`, `servers`, `stop`, `prune`): Snakemake counts a log as one, so
# a fixed log name would make every later call "nothing to be done"; each call gets its own
CALL_STAMP = time.strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}"


def fail(message):
    """Stop before anything runs, with one line instead of a traceback."""
    sys.exit(f"{PROGRAM}: {message}")


try:
    builds.check_no_aliases(config)
    # a builder the schema's oneOf refuses (builder=docker) stops its defaults-filling validator
    # with an AttributeError, not a line: named here first
    builders.kind_of(config)
    validate(config, "../schemas/config.schema.yaml")
except (builds.InvalidInput, builders.InvalidBuilder) as error:
    fail(str(error))
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

try:
    # None unless `registry` is set and `registry_mode` is pull or push
    REGISTRY = registry.RegistrySettings.from_config(config)
except registry.RegistryError as error:
    fail(str(error))

try:
    # `builder: local` (the default), `podman`, or a mapping naming a kind (`ssh`: a host over
    # SSH); see docs/remote-builder.md and workflow/scripts/repo2singularity/builders/
    BUILDER = builders.builder_class(config)
    BUILDER.prepare_run(config, os.environ)
except builders.InvalidBuilder as error:
    fail(str(error))
# Settings reach a job as its params, made here once: a typed object (the builder's, the
# registry's) where a change alters no output, since Snakemake records and compares only plain
# params; a plain value where a change must rerun the rule (build_sif's `sif_options`)
BUILDER_SETTINGS = builders.BuilderSettings.from_config(config)
# what the launchers read; sorted, so that the same settings read the same in every run
LAUNCHER_SETTINGS = {
    key: config[key]
    for key in sorted(config)
    if key in ("launch_on", "registry_credentials_env")
    or (config["launch_on"] == "slurm" and key.startswith("slurm_"))
}

# every job's script gets the configuration pickled into .snakemake/scripts/, which a killed
# workflow leaves behind: it keeps the repository without credentials (the clone gets them from
# the build's Repository)
if config.get("repo"):
    config["repo"] = redact_url(str(config["repo"]))


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


@functools.cache
def get_registry_lookup():
    """{(name, sha): what the registry holds} of the resolved images whose SIF is not here yet,
    asked in parallel once per run (so a run with nothing to do asks nothing); empty without a
    registry. A registry that does not answer stops a pull run; a push run builds instead.
    """
    if REGISTRY is None:
        return {}
    missing = [
        (b.name, b.sha)
        for b in get_resolved_builds()
        if not Path(RESULTS, b.name, b.sha, f"{b.name}.sif").exists()
    ]
    if not missing:
        return {}
    from repo2singularity import shared_sifs

    try:
        found, notes = shared_sifs.look_up(REGISTRY, missing)
    except registry.RegistryError as error:
        if REGISTRY.mode == "pull":
            fail(str(error))
        print(
            f"{PROGRAM}: {error}; what is missing is built, and its push tried after",
            file=sys.stderr,
        )
        return {}
    for note in notes:
        print(f"{PROGRAM}: {note}", file=sys.stderr)
    return found


def is_pulled(name, sha):
    """Whether the image's SIF comes from the registry: pulled here before, or to be pulled."""
    return (
        Path(RESULTS, name, sha, PULLED.format(name=name)).exists()
        or (name, sha) in get_registry_lookup()
    )


def get_registry_image(wildcards):
    """Nothing for an image whose SIF comes from the registry. For any other, a file that is
    never there and that nothing makes; Snakemake then cannot use pull_sif and quietly takes
    build_image and build_sif (an exception would do the same, with a warning per image).
    """
    if is_pulled(wildcards.name, wildcards.sha):
        return []
    return f"{RESULTS}/.registry/not-in-registry/{wildcards.name}/{wildcards.sha}"


def get_registry_reference(wildcards):
    """Where the image goes in the registry (push_sif)."""
    if REGISTRY is None:
        fail(
            "push_sif needs a registry: set registry=oras://... and registry_mode=push"
        )
    return REGISTRY.reference(wildcards.name, wildcards.sha)


def get_push_targets(wildcards):
    """In push mode, the push receipt of every image that is not from the registry."""
    if REGISTRY is None or REGISTRY.mode != "push":
        return []
    get_sifs_before_run()
    return [
        f"{RESULTS}/{b.name}/{b.sha}/{PUSHED.format(name=b.name)}"
        for b in get_resolved_builds()
        if not is_pulled(b.name, b.sha)
    ]


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
    ] + get_push_targets(wildcards)


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


def get_launch_inputs(wildcards):
    """What the launch starts from: the sandbox; for a Slurm launch the SIF, which the server's
    own job unpacks on its node first (one Slurm job where there were two, each a round trip
    of submission and status polls), keeping a sandbox that is already there and newer.
    """
    folder = f"{RESULTS}/{wildcards.name}/{wildcards.sha}"
    if config["launch_on"] == "slurm":
        return {
            "sif": f"{folder}/{wildcards.name}.sif",
            "checksum": f"{folder}/{wildcards.name}.sif.sha256",
        }
    return {"unpacked": f"{folder}/sandbox.json"}


def get_work_folder(wildcards):
    """The image's folder for its users' work (`work_dir`), outside every sandbox."""
    try:
        return str(user_work.work_folder(config["work_dir"], wildcards.name))
    except StepError as error:
        fail(str(error))


def get_launch_runtime_args(wildcards):
    """The config's `launch_runtime_args`, then the image's own `runtime_options` (manifest)."""
    return [*config["launch_runtime_args"], *get_build(wildcards).runtime_options]


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
        pushing=bool(REGISTRY and REGISTRY.mode == "push"),
        from_registry={name for name, _ in get_registry_lookup()},
    )
    print(Path(RESULTS, "summary.md").read_text())
    return failed
