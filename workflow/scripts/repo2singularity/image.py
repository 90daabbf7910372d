"""The Docker image a builder makes: what repo2docker is told, and what image.json records."""

import os
from dataclasses import dataclass, field
from pathlib import Path

LABEL_PREFIX = "repo2singularity"


@dataclass(frozen=True)
class ImageSpec:
    """One image to build: where its commit's files are in the results, and how to build it."""

    name: str
    sha: str
    tag: str
    labels: dict
    user_name: str
    user_id: int | None = None
    subdir: str = ""
    repo2docker_args: tuple = ()
    # the repository.Repository, for a builder that fetches the commit itself; its URL may hold
    # credentials, so it is left out of the spec's repr
    repository: object = field(default=None, repr=False, compare=False)


def image_labels(display_url, ref, sha, subdir=""):
    """Provenance that survives into the SIF: repo2docker's own labels and ours."""
    labels = {
        "repo2docker.repo": display_url,
        "repo2docker.ref": sha,
        f"{LABEL_PREFIX}.repo": display_url,
        f"{LABEL_PREFIX}.ref": ref,
        f"{LABEL_PREFIX}.sha": sha,
    }
    if subdir:
        labels[f"{LABEL_PREFIX}.subdir"] = subdir
    return labels


def default_user_id():
    uid = os.getuid()
    return uid if uid != 0 else 1000


def repo2docker_command(repo2docker, source, spec):
    command = [
        repo2docker,
        "--no-run",
        "--image-name",
        spec.tag,
        "--user-name",
        spec.user_name,
        "--user-id",
        str(spec.user_id or default_user_id()),
    ]
    for key, value in spec.labels.items():
        command += ["--label", f"{key}={value}"]
    if spec.subdir:
        command += ["--subdir", spec.subdir]
    command += list(spec.repo2docker_args)
    # "--" keeps a source path from ever being read as an option
    return command + ["--", str(source)]


RECEIPT_SCHEMA = Path(__file__).resolve().parents[2] / "schemas" / "image.schema.yaml"


def check_receipt(receipt):
    """ValueError in one line unless `receipt` is an image.json as the schema describes it."""
    import jsonschema
    import yaml

    schema = yaml.safe_load(RECEIPT_SCHEMA.read_text())
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(receipt))
    if error is not None:
        where = "/".join(str(part) for part in error.absolute_path) or "the receipt"
        raise ValueError(f"{where}: {error.message[:200]}")
    return receipt


def image_environment(image_config):
    return dict(item.partition("=")[::2] for item in image_config.get("Env") or [])


def working_folder(image_config):
    """Where the repository lives in the image: repo2docker's REPO_DIR, else WORKDIR."""
    return image_environment(image_config).get("REPO_DIR") or image_config.get("WorkingDir") or "/"


def image_receipt(details, tag, user_name, repo2docker_version, engine="docker"):
    """What image.json records of a built image (`details`: docker image inspect's, or Podman's
    in the same terms); `engine`: what built it ("docker", "podman 4.3.1")."""
    config = details.get("Config") or {}
    return {
        "image_id": details["Id"],
        "tag": tag,
        "repo2docker_version": repo2docker_version,
        "engine": engine,
        "labels": config.get("Labels") or {},
        "working_folder": working_folder(config),
        "home": image_environment(config).get("HOME") or f"/home/{user_name}",
        "created": details.get("Created"),
        "size_bytes": details.get("Size"),
    }


def image_missing(receipt, receipt_path, where="Docker"):
    return (
        f"{where} no longer has image {receipt['tag']} ({receipt['image_id'][:19]}) named in {receipt_path}; "
        "rebuild it with: snakemake --forcerun build_image"
    )
