"""SIFs shared through an OCI registry, as BinderHub shares images: which images the registry
already has for their commit, one pulled into results/ (with the image.json a build would have
written), one pushed from there, each with a receipt of the registry's digests."""

import json
from dataclasses import asdict
from pathlib import Path

from .files import now, write_json_atomic
from .image import check_receipt
from .registry import RegistryClient, RegistryError, push_annotations
from .step import StepError
from .steplog import step_log
from .tools import say

# the pushed image's image.json, so that a pull can write it without Docker
RECEIPT_ANNOTATION = "org.repo2singularity.image"
PULLED = "{name}.sif.pulled.json"
PUSHED = "{name}.sif.pushed.json"


def look_up(settings, images):
    """({(name, sha): found as a dict} of the images the registry holds with our image receipt,
    [one line per image that cannot be used, and why]). A registry that does not answer or
    refuses the credentials raises RegistryError."""
    usable, notes = {}, []
    with RegistryClient(settings) as client:
        for (name, sha), found in client.lookup(images).items():
            if isinstance(found, RegistryError):
                notes.append(f"{found}: it is built instead")
            elif found is not None and RECEIPT_ANNOTATION not in found.annotations:
                notes.append(f"oras://{found.reference} was not pushed by repo2singularity (no image receipt): it is built instead")
            elif found is not None and (problem := receipt_problem(found)):
                notes.append(f"oras://{found.reference}: {problem}: it is built instead")
            elif found is not None:
                usable[(name, sha)] = asdict(found)
    return usable, notes


def receipt_problem(found):
    """Why the image receipt in a manifest's annotation cannot be used, else None: it becomes
    image.json, whose folders the server is started in (checked before anything is pulled)."""
    try:
        check_receipt(json.loads(found.annotations[RECEIPT_ANNOTATION]))
    except ValueError as error:
        return f"its image receipt is not valid ({error})"
    return None


def pull(settings, name, sha, sif, checksum, image_receipt, pulled_receipt, log):
    """The image's SIF from the registry, verified, at `sif` with its checksum, and the
    image.json that was pushed with it. The manifest is asked for again: the SIF pulled is the
    one the registry holds now."""
    reference = settings.reference(name, sha)
    try:
        with RegistryClient(settings) as client:
            found = client.lookup_one(name, sha)
            if found is None or RECEIPT_ANNOTATION not in found.annotations:
                raise StepError(f"oras://{reference} is no longer in the registry (or has no image receipt); run again to build it")
            problem = receipt_problem(found)
            if problem:
                raise StepError(f"oras://{reference}: {problem}; nothing pulled")
            step_log(log).info(f"pulling oras://{found.reference} ({found.size} bytes, {found.sif_digest})")
            client.pull(found, sif, checksum)
    except RegistryError as error:
        raise StepError(str(error)) from None
    receipt = json.loads(found.annotations[RECEIPT_ANNOTATION])
    write_json_atomic(image_receipt, {**receipt, "registry": found.reference, "manifest_digest": found.manifest_digest})
    write_json_atomic(
        pulled_receipt,
        {"reference": found.reference, "manifest_digest": found.manifest_digest, "sif_digest": found.sif_digest, "pulled": now()},
    )
    step_log(log).info(f"pulled {sif}, sha256 verified")
    say(f"  pull_sif: {Path(sif).name} from oras://{found.reference}")


def push(settings, name, sha, sif, checksum, image_receipt, pushed_receipt, log, *, reference):
    """Push the SIF with its provenance (repository, ref, commit, repo2docker's version) and
    its image.json as manifest annotations; the receipt records the registry's digest.
    `reference` is push_sif's param (what a change of the registry setting reruns it for): the
    one the settings push to, or the receipt would name another image than the one pushed."""
    if reference != settings.reference(name, sha):
        raise StepError(f"push_sif: asked to push to oras://{reference}, but the registry setting pushes to oras://{settings.reference(name, sha)}")
    receipt = json.loads(Path(image_receipt).read_text())
    labels = receipt.get("labels") or {}
    annotations = {
        **push_annotations(labels.get("repo2singularity.repo", ""), labels.get("repo2singularity.ref", ""), sha, receipt.get("repo2docker_version", "")),
        RECEIPT_ANNOTATION: json.dumps({k: v for k, v in receipt.items() if k not in ("builder", "registry", "manifest_digest")}, sort_keys=True),
    }
    sif_sha256 = Path(checksum).read_text().split()[0]
    try:
        with RegistryClient(settings) as client:
            digest = client.push(sif, name, sha, annotations, sif_sha256=sif_sha256)
    except RegistryError as error:
        step_log(log).info(str(error))
        raise StepError(str(error)) from None
    write_json_atomic(pushed_receipt, {"reference": reference, "manifest_digest": digest, "sif_digest": f"sha256:{sif_sha256}", "pushed": now()})
    step_log(log).info(f"pushed {sif} to oras://{reference} ({digest})")
    say(f"  push_sif: oras://{reference} ({digest[:19]}…)")
