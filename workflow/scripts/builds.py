"""What to build: the validated configuration as named build specs, and their refs resolved."""

import os
from dataclasses import dataclass, field
from pathlib import Path

import naming
from image import image_labels
from repository import Repository, RepositoryError, check_ref, check_repository, resolve_ref

PROGRAM = "repo2singularity"
NAME_PATTERN = r"[a-z0-9][a-z0-9._-]*"


class InvalidInput(Exception):
    """Bad configuration or input, told in one line."""


def describe_validation_error(error):
    """One line from Snakemake's schema validation error: where, and what is wrong."""
    import jsonschema

    cause = error.__context__  # Snakemake raises its error while handling jsonschema's
    if isinstance(cause, jsonschema.exceptions.ValidationError):
        where = "/".join(str(p) for p in cause.absolute_path)
        return f"invalid config{f' at {where!r}' if where else ''}: {cause.message}"
    return f"invalid config: {str(error).splitlines()[0]}"


@dataclass(frozen=True)
class BuildSpec:
    name: str
    repository: Repository
    ref: str
    sha: str = ""
    resolved_ref: str = ""


@dataclass(frozen=True)
class Settings:
    runtime: str
    image_prefix: str
    user_name: str
    user_id: int | None
    repo2docker_args: tuple
    sif_compression: str
    jupyter_command: tuple
    launch_timeout: int
    launch_writable: bool
    builds: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, config, base_dirs=(".",)):
        try:
            repository = check_repository(config["repo"], config.get("subdir", ""), base_dirs)
            ref = check_ref(config.get("ref", ""))
            if isinstance(config.get("ref"), int):
                raise InvalidInput(
                    f"ref {ref} was read as a number (leading zeros are lost); "
                    f"quote a sha made of digits only: ref=\"'{ref}'\""
                )
            name = config.get("name") or naming.default_name(repository.url, repository.subdir)
            name = naming.check_name(name)
        except (RepositoryError, naming.InvalidName) as error:
            raise InvalidInput(str(error)) from None
        return cls(
            runtime=config["runtime"],
            image_prefix=config["image_prefix"],
            user_name=config["user_name"],
            user_id=config.get("user_id"),
            repo2docker_args=tuple(config["repo2docker_args"]),
            sif_compression=config["sif_compression"],
            jupyter_command=tuple(config["jupyter_command"]),
            launch_timeout=config["launch_timeout"],
            launch_writable=config["launch_writable"],
            builds={name: BuildSpec(name, repository, ref)},
        )


def resolve(settings, cache_dir=None):
    """Each build with its ref resolved to a full commit sha."""
    resolved = []
    for spec in settings.builds.values():
        try:
            found = resolve_ref(spec.repository, spec.ref, cache_dir)
        except RepositoryError as error:
            raise InvalidInput(str(error)) from None
        resolved.append(BuildSpec(spec.name, spec.repository, spec.ref, found.sha, found.ref))
    return resolved


def labels(spec, sha):
    return image_labels(spec.repository.display_url, spec.resolved_ref or spec.ref or "HEAD", sha, spec.repository.subdir)


def image_tag(settings, name, sha):
    return naming.image_tag(settings.image_prefix, name, sha)
