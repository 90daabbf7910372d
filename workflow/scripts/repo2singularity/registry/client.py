"""Look up, pull and push SIFs in apptainer's ORAS layout (see the package's docstring)."""

import hashlib
import io
import json
import os
import sys
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import requests

from ..downloads import CHUNK, CONNECT_TIMEOUT_SECONDS, TransferMeter
from ..files import HashingWriter, checksum_line, sha256_file, temporary_sibling, write_text_atomic
from ..repository import redact_url
from .errors import DigestMismatchError, RegistryError, UnreachableError
from .session import (
    LOOKUP_WORKERS,
    READ_TIMEOUT_SECONDS,
    RegistrySession,
    describe_connection_error,
    error_reason,
)
from .settings import DIGEST_PATTERN, TAG_PATTERN

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
SIF_CONFIG_TYPE = "application/vnd.sylabs.sif.config.v1+json"
SIF_LAYER_TYPE = "application/vnd.sylabs.sif.layer.v1.sif"
TITLE_ANNOTATION = "org.opencontainers.image.title"
# apptainer's config blob: an empty JSON object
EMPTY_CONFIG = b"{}"
MAX_MANIFEST_BYTES = 4 << 20
# the same test aid (and way to share a thin link) as the builder's downloads: bytes per second


@dataclass(frozen=True)
class Found:
    """An image the registry holds: where, and the digests that vouch for its SIF."""

    name: str
    sha: str
    reference: str
    manifest_digest: str
    sif_digest: str
    size: int
    title: str = ""
    # the manifest's own annotations (what push_annotations and the pusher wrote)
    annotations: dict = field(default_factory=dict, compare=False)

    @property
    def sif_sha256(self):
        return self.sif_digest.split(":", 1)[1]


# ---------------------------------------------------------------- transfers


class FileSlice(io.RawIOBase):
    """`length` bytes of a file from `offset`, read in chunks: an upload body that requests
    streams (it has a length) instead of reading the file into memory."""

    def __init__(self, path, offset, length, meter=None):
        self.handle = open(path, "rb")
        self.handle.seek(offset)
        self.left = length
        self.length = length
        self.meter = meter
        if meter:
            # a retried upload starts again from where the registry says it has the blob
            meter.done = offset

    def __len__(self):
        return self.length

    def tell(self):
        # requests takes the body's length as len() - tell()
        return self.length - self.left

    def readable(self):
        return True

    def read(self, size=-1):
        if self.left <= 0:
            return b""
        data = self.handle.read(self.left if size is None or size < 0 else min(size, self.left))
        self.left -= len(data)
        if self.meter:
            self.meter.advance(len(data))
        return data

    def close(self):
        self.handle.close()
        super().close()


# ---------------------------------------------------------------- the client


class RegistryClient:
    """Look up, pull and push SIFs of one registry (see the module's docstring).

    Every error is a RegistryError (or a subclass) whose message is one line naming the registry
    and the image, and never a secret."""

    def __init__(
        self,
        settings,
        environ=None,
        workers=LOOKUP_WORKERS,
        progress=sys.stderr,
        connect_timeout=CONNECT_TIMEOUT_SECONDS,
        read_timeout=READ_TIMEOUT_SECONDS,
        upload_chunk=0,
    ):
        self.settings = settings
        self.environ = os.environ if environ is None else environ
        self.workers = workers
        self.progress = progress
        # 0: one PUT per blob; else PATCH chunks of this many bytes (and on a 413 to a PUT)
        self.upload_chunk = upload_chunk
        self.session = RegistrySession(settings, self.environ, connect_timeout, read_timeout, workers)

    def report(self, line):
        """A transfer's progress line, on the `progress` stream (None: silent)."""
        if self.progress is not None:
            print(line, file=self.progress, flush=True)

    def close(self):
        self.session.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def failure(self, error, action, reference):
        """The one line for a failed operation: what, on which image of which registry, why."""
        return type(error)(f"{action} oras://{reference}: {error}")

    # -- lookup

    def lookup(self, images):
        """{(name, sha): Found, or None when the registry does not have it, or a RegistryError
        for this image alone}, asked in parallel. A registry that does not answer, or refuses
        the credentials, raises instead (it would for every image alike)."""
        images = list(dict.fromkeys((str(name), str(sha)) for name, sha in images))
        if not images:
            return {}
        try:
            self.session.connect()
        except RegistryError as error:
            if len(images) == 1:
                raise self.failure(error, "lookup of", self.settings.reference(*images[0])) from None
            raise type(error)(f"lookup of {len(images)} images in oras://{self.settings.display}: {error}") from None

        def one(image):
            try:
                return image, self.lookup_one(*image)
            except RegistryError as error:
                return image, error

        with ThreadPoolExecutor(max_workers=min(self.workers, len(images))) as pool:
            return dict(pool.map(one, images))

    def lookup_one(self, name, sha):
        """Found, or None when the registry has no such tag."""
        reference = self.settings.reference(name, sha)
        try:
            return self.fetch_manifest(name, sha)
        except RegistryError as error:
            raise self.failure(error, "lookup of", reference) from None

    def fetch_manifest(self, name, sha):
        repository = self.settings.repository(name)
        if not TAG_PATTERN.fullmatch(sha):
            raise RegistryError(f"{sha!r} is not a valid tag")
        response = self.session.send(
            "GET", f"/v2/{repository}/manifests/{sha}", f"repository:{repository}:pull", headers={"Accept": MANIFEST_TYPE}, stream=True
        )
        with response:
            if response.status_code == 404:
                return None
            if response.status_code != 200:
                raise RegistryError(f"the manifest request answered {error_reason(response)}")
            body = response.raw.read(MAX_MANIFEST_BYTES + 1, decode_content=True)
            announced = response.headers.get("Docker-Content-Digest", "")
            content_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        if len(body) > MAX_MANIFEST_BYTES:
            raise RegistryError(f"the manifest is larger than {MAX_MANIFEST_BYTES} bytes: not a SIF")
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if announced and announced != digest:
            raise DigestMismatchError(f"the manifest does not match its digest {announced} (it is {digest}): refused")
        return self.sif_of(name, sha, body, digest, content_type)

    def sif_of(self, name, sha, body, digest, content_type):
        try:
            manifest = json.loads(body)
            media_type = manifest.get("mediaType") or content_type
            config_type = (manifest.get("config") or {}).get("mediaType")
            layers = manifest.get("layers") or []
        except (ValueError, AttributeError):
            raise RegistryError("the manifest is not JSON: not a SIF") from None
        if media_type != MANIFEST_TYPE or config_type != SIF_CONFIG_TYPE:
            raise RegistryError(f"not a SIF (manifest {media_type or 'of no type'}, config {config_type or 'of no type'})")
        sifs = [layer for layer in layers if isinstance(layer, dict) and layer.get("mediaType") == SIF_LAYER_TYPE]
        if len(layers) != 1 or len(sifs) != 1:
            raise RegistryError(f"not a SIF: {len(layers)} layers, {len(sifs)} of type {SIF_LAYER_TYPE}")
        layer = sifs[0]
        size = layer.get("size")
        if not DIGEST_PATTERN.fullmatch(str(layer.get("digest"))) or not isinstance(size, int) or size < 0:
            raise RegistryError("the SIF layer has no valid sha256 digest and size")
        title = (layer.get("annotations") or {}).get(TITLE_ANNOTATION, "")
        annotations = manifest.get("annotations") if isinstance(manifest.get("annotations"), dict) else {}
        return Found(name, sha, self.settings.reference(name, sha), digest, layer["digest"], size, str(title), annotations)

    # -- pull

    def pull(self, found, sif, checksum):
        """Bring `found`'s SIF to `sif` and write `checksum` ("{sha256}  {file name}\\n").

        The blob streams into a temporary sibling and is hashed on the way; only a complete blob
        whose sha256 is the layer's digest is renamed into place. A checksum left by an older
        SIF is removed first, and the new one is written after the SIF is in place: a kill at
        any point leaves no checksum without its SIF and no checksum vouching for another SIF.
        A SIF already in place with the right digest (a kill before its checksum) is kept."""
        sif, checksum = Path(sif), Path(checksum)
        try:
            sif.parent.mkdir(parents=True, exist_ok=True)
            if sif.is_file() and sha256_file(sif) == found.sif_sha256:
                if not checksum.is_file() or checksum.read_text() != checksum_line(found.sif_sha256, sif):
                    write_text_atomic(checksum, checksum_line(found.sif_sha256, sif))
                return found
            partial = temporary_sibling(sif, ".sif")
            try:
                with open(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "wb") as handle:
                    self.download(found, handle)
                checksum.unlink(missing_ok=True)
                os.replace(partial, sif)
            finally:
                partial.unlink(missing_ok=True)
            write_text_atomic(checksum, checksum_line(found.sif_sha256, sif))
        except RegistryError as error:
            raise self.failure(error, "pull of", found.reference) from None
        except OSError as error:
            raise RegistryError(f"pull of oras://{found.reference}: cannot write {error.filename or sif}: {error.strerror}") from None
        return found

    def pull_image(self, name, sha, sif, checksum):
        """Look `name` at `sha` up and pull it; RegistryError when the registry lacks it."""
        found = self.lookup_one(name, sha)
        if found is None:
            raise RegistryError(f"pull of oras://{self.settings.reference(name, sha)}: the registry has no such image")
        return self.pull(found, sif, checksum)

    def download(self, found, handle):
        repository = self.settings.repository(found.name)
        response = self.session.send("GET", f"/v2/{repository}/blobs/{found.sif_digest}", f"repository:{repository}:pull", stream=True)
        meter = TransferMeter("pull", f"{found.name}:{found.sha[:12]}", found.size, report=self.report, environ=self.environ)
        with response:
            if response.status_code != 200:
                raise RegistryError(f"the SIF blob request answered {error_reason(response)}")
            with HashingWriter(handle) as target:
                try:
                    for chunk in response.iter_content(CHUNK):
                        target.write(chunk)
                        meter.advance(len(chunk))
                        if meter.done > found.size:
                            break
                except (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError, requests.exceptions.Timeout) as error:
                    raise UnreachableError(
                        f"the registry stopped sending at {meter.done / 1e6:.1f} of {found.size / 1e6:.1f} MB "
                        f"({describe_connection_error(error)}); nothing kept, run again"
                    ) from None
                if meter.done != found.size:
                    raise DigestMismatchError(f"the SIF blob has {meter.done} bytes, its manifest says {found.size}: refused, nothing kept")
                if "sha256:" + target.finish() != found.sif_digest:
                    raise DigestMismatchError(f"the SIF blob does not match its digest {found.sif_digest}: refused, nothing kept")

    # -- push

    def push(self, sif, name, sha, annotations=None, sif_sha256=None):
        """Push `sif` as {namespace}/{name}:{sha}, in apptainer's ORAS layout, with the manifest
        `annotations` (e.g. from push_annotations). `sif_sha256` (e.g. from the SIF's checksum
        file) saves hashing the file again; the registry checks it. Returns the manifest digest."""
        sif = Path(sif)
        reference = self.settings.reference(name, sha)
        try:
            if not TAG_PATTERN.fullmatch(sha):
                raise RegistryError(f"{sha!r} is not a valid tag")
            repository = self.settings.repository(name)
            scope = f"repository:{repository}:pull,push"
            size = sif.stat().st_size
            layer_digest = "sha256:" + (sif_sha256 or sha256_file(sif))
            config_digest = "sha256:" + hashlib.sha256(EMPTY_CONFIG).hexdigest()
            self.ensure_blob(repository, scope, config_digest, len(EMPTY_CONFIG), lambda offset, length: EMPTY_CONFIG[offset : offset + length])
            meter = TransferMeter("push", f"{name}:{sha[:12]}", size, report=self.report, limited=False)
            self.ensure_blob(repository, scope, layer_digest, size, lambda offset, length: FileSlice(sif, offset, length, meter))
            manifest = {
                "schemaVersion": 2,
                "mediaType": MANIFEST_TYPE,
                "config": {"mediaType": SIF_CONFIG_TYPE, "size": len(EMPTY_CONFIG), "digest": config_digest},
                "layers": [{"mediaType": SIF_LAYER_TYPE, "size": size, "digest": layer_digest, "annotations": {TITLE_ANNOTATION: sif.name}}],
            }
            if annotations:
                manifest["annotations"] = {str(key): str(value) for key, value in annotations.items()}
            body = json.dumps(manifest, separators=(",", ":")).encode()
            digest = "sha256:" + hashlib.sha256(body).hexdigest()
            response = self.session.send(
                "PUT", f"/v2/{repository}/manifests/{sha}", scope, body=body, headers={"Content-Type": MANIFEST_TYPE}, retry=False
            )
            with response:
                if response.status_code not in (200, 201):
                    raise RegistryError(f"the manifest upload answered {error_reason(response)}")
                announced = response.headers.get("Docker-Content-Digest")
            if announced and announced != digest:
                raise DigestMismatchError(f"the registry stored the manifest as {announced}, not {digest}")
            return digest
        except RegistryError as error:
            raise self.failure(error, "push of", reference) from None
        except OSError as error:
            raise RegistryError(f"push of oras://{reference}: cannot read {error.filename or sif}: {error.strerror}") from None

    def ensure_blob(self, repository, scope, digest, size, open_part):
        """Upload a blob unless the registry has it. `open_part(offset, length)` gives a body."""
        with self.session.send("HEAD", f"/v2/{repository}/blobs/{digest}", scope) as response:
            if response.status_code == 200:
                return
        if not self.upload_chunk or size <= self.upload_chunk:
            location = self.start_upload(repository, scope)
            put = self.session.send(
                "PUT",
                with_query(location, digest=digest),
                scope,
                body=lambda: open_part(0, size),
                headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
                retry=False,
            )
            with put:
                if put.status_code in (200, 201):
                    return
                if put.status_code != 413:
                    raise RegistryError(f"the upload of blob {digest[:19]}… answered {error_reason(put)}")
        self.chunked_upload(repository, scope, digest, size, open_part, self.upload_chunk or 64 << 20)

    def start_upload(self, repository, scope):
        with self.session.send("POST", f"/v2/{repository}/blobs/uploads/", scope, body=b"", retry=False) as response:
            location = response.headers.get("Location")
            if response.status_code != 202 or not location:
                raise RegistryError(f"starting an upload answered {error_reason(response)}")
        return urllib.parse.urljoin(self.session.base + "/", location)

    def chunked_upload(self, repository, scope, digest, size, open_part, chunk):
        location = self.start_upload(repository, scope)
        for offset in range(0, size, chunk):
            length = min(chunk, size - offset)
            patch = self.session.send(
                "PATCH",
                location,
                scope,
                body=lambda offset=offset, length=length: open_part(offset, length),
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Length": str(length),
                    "Content-Range": f"{offset}-{offset + length - 1}",
                },
                retry=False,
            )
            with patch:
                if patch.status_code != 202 or not patch.headers.get("Location"):
                    raise RegistryError(f"uploading a chunk of blob {digest[:19]}… answered {error_reason(patch)}")
                location = urllib.parse.urljoin(self.session.base + "/", patch.headers["Location"])
        with self.session.send("PUT", with_query(location, digest=digest), scope, body=b"", retry=False) as put:
            if put.status_code not in (200, 201):
                raise RegistryError(f"finishing the upload of blob {digest[:19]}… answered {error_reason(put)}")


def with_query(url, **parameters):
    parsed = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parsed.query, keep_blank_values=True) + list(parameters.items())
    return urllib.parse.urlunsplit(parsed._replace(query=urllib.parse.urlencode(query)))


def push_annotations(repo_url, ref, sha, repo2docker_version):
    """The manifest annotations of a pushed SIF: OCI's standard keys where they exist, and
    repo2docker's own label names for the rest."""
    return {
        "org.opencontainers.image.source": redact_url(repo_url),
        "org.opencontainers.image.revision": sha,
        "org.opencontainers.image.created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "repo2docker.ref": str(ref),
        "repo2docker.version": str(repo2docker_version),
    }
