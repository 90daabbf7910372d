"""What to build: the validated configuration as named build specs, and their refs resolved."""

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from . import manifest as manifest_file
from . import naming
from .image import image_labels
from .input_limits import capped, repeated_container, schema_message, shown
from .repo2docker_options import RefusedOption, check_repo2docker_args
from .repository import Repository, RepositoryError, check_ref, check_repository, resolve_ref

NAME_PATTERN = r"[a-z0-9][a-z0-9._-]*"


class InvalidInput(Exception):
    """Bad configuration or input, told in one line."""


def describe_validation_error(error):
    """One line from Snakemake's schema validation error: where, and what is wrong."""
    import jsonschema

    cause = error.__context__  # Snakemake raises its error while handling jsonschema's
    if isinstance(cause, jsonschema.exceptions.ValidationError):
        where = "/".join(str(p) for p in cause.absolute_path)
        return capped(f"invalid config{f' at {shown(where)}' if where else ''}: {schema_message(cause)}")
    return capped(f"invalid config: {str(error).splitlines()[0]}")


def check_no_aliases(config):
    """Refuse a config with a YAML alias of a list or mapping before schema validation walks and
    prints it (nested aliases multiply: 8 levels of 10 are 10**8 values)."""
    where = repeated_container(config)
    if where is not None:
        raise InvalidInput(
            f"invalid config: {shown('/'.join(map(str, where)))} is a YAML alias (*name) of a list or mapping "
            "used before; write each value out"
        )


@dataclass(frozen=True)
class BuildSpec:
    name: str
    repository: Repository
    ref: str
    sha: str = ""
    resolved_ref: str = ""
    repo2docker_args: tuple = ()
    runtime_options: tuple = ()


def check_build(values, base_dirs, default_repo2docker_args=()):
    """One image: repository, ref and name checked; RepositoryError or InvalidName if bad."""
    repository = check_repository(values["repo"], values.get("subdir", ""), base_dirs)
    ref = check_ref(values.get("ref", ""))
    if isinstance(values.get("ref"), int):
        raise InvalidInput(
            f"ref {ref} was read as a number (leading zeros are lost); "
            f"quote a sha made of digits only: ref=\"'{ref}'\""
        )
    name = naming.check_name(values.get("name") or naming.default_name(repository.url, repository.subdir))
    try:
        repo2docker_args = check_repo2docker_args(values.get("repo2docker_args", default_repo2docker_args))
    except RefusedOption as error:
        raise InvalidInput(f"repo2docker_args: {error}") from None
    return BuildSpec(
        name,
        repository,
        ref,
        repo2docker_args=repo2docker_args,
        runtime_options=tuple(values.get("runtime_options", ())),
    )


def builds_from_manifest(path, schema_path, base_dirs, default_repo2docker_args, run_builder="local"):
    """Every image of a manifest, or ManifestError listing every problem with its line.
    `run_builder`: "local" or "remote", what the config's `builder` makes of this run."""
    rows, problems = manifest_file.load_rows(path, manifest_file.load_schema(schema_path))
    found = {}
    first_line = {}
    for row in rows:
        name = row.values["name"]
        if name in first_line:
            problems.append(f"{path}:{row.line}: name {shown(name)} is already used on line {first_line[name]}")
            continue
        first_line[name] = row.line
        wanted = row.values.get("builder") or run_builder
        if wanted != run_builder:
            problems.append(
                f"{path}:{row.line}: builder {shown(wanted)}, but this run builds "
                f"{'on this machine' if run_builder == 'local' else 'on the remote builder of the config'}; "
                "one run has one builder: build such rows in a run of their own"
            )
            continue
        try:
            build = check_build(row.values, base_dirs, default_repo2docker_args)
        except (RepositoryError, naming.InvalidName, InvalidInput) as error:
            problems.append(f"{path}:{row.line}: {error}")
            continue
        found[build.name] = build
    if problems:
        raise manifest_file.ManifestError(sorted((capped(problem) for problem in problems), key=line_number))
    return found


def line_number(problem):
    parts = problem.split(":")
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


@dataclass(frozen=True)
class Settings:
    runtime: str
    image_prefix: str
    user_name: str
    user_id: int | None
    sif_compression: str
    jupyter_command: tuple
    launch_timeout: int
    launch_writable: bool
    resolve_connections: int
    keep_sifs: int
    from_manifest: bool = False
    builds: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, config, base_dirs=(".",), manifest_schema=None):
        default_args = tuple(config["repo2docker_args"])
        try:
            if config.get("manifest"):
                try:
                    check_repo2docker_args(default_args)  # every row's default: once, not on each row
                except RefusedOption as error:
                    raise InvalidInput(capped(f"repo2docker_args of the config: {error}")) from None
                run_builder = "local" if config.get("builder", "local") in (None, "", "local") else "remote"
                builds = builds_from_manifest(config["manifest"], manifest_schema, base_dirs, default_args, run_builder)
            else:
                build = check_build(config, base_dirs, default_args)
                builds = {build.name: build}
        except (RepositoryError, naming.InvalidName) as error:
            raise InvalidInput(capped(str(error))) from None
        except manifest_file.ManifestError as error:
            raise InvalidInput(f"{len(error.problems)} problem(s) in the manifest:\n" + "\n".join(error.problems)) from None
        return cls(
            runtime=config["runtime"],
            image_prefix=config["image_prefix"],
            user_name=config["user_name"],
            user_id=config.get("user_id"),
            sif_compression=config["sif_compression"],
            jupyter_command=tuple(config["jupyter_command"]),
            launch_timeout=config["launch_timeout"],
            launch_writable=config["launch_writable"],
            resolve_connections=config["resolve_connections"],
            keep_sifs=config["keep_sifs"],
            from_manifest=bool(config.get("manifest")),
            builds=builds,
        )


@dataclass(frozen=True)
class Resolution:
    builds: list
    failures: dict  # name -> why its ref could not be resolved


def resolve(settings, cache_dir=None):
    """Every build's ref resolved to a full commit sha, up to `resolve_connections` at once.

    A repository that fails is recorded and the others go on; with a single repository (no
    manifest) its failure is the run's error."""

    def resolve_one(spec):
        try:
            found = resolve_ref(spec.repository, spec.ref, cache_dir)
        except RepositoryError as error:
            return spec, None, str(error)
        return spec, replace(spec, sha=found.sha, resolved_ref=found.ref), None

    specs = list(settings.builds.values())
    with ThreadPoolExecutor(max_workers=min(settings.resolve_connections, max(1, len(specs)))) as pool:
        outcomes = list(pool.map(resolve_one, specs))
    failures = {spec.name: error for spec, _, error in outcomes if error}
    if failures and not settings.from_manifest:
        raise InvalidInput(next(iter(failures.values())))
    return Resolution([build for _, build, _ in outcomes if build], failures)


def labels(spec, sha):
    return image_labels(spec.repository.display_url, spec.resolved_ref or spec.ref or "HEAD", sha, spec.repository.subdir)


def image_tag(settings, name, sha):
    return naming.image_tag(settings.image_prefix, name, sha)
