"""SIFs in an OCI registry, stored the way `apptainer push oras://` stores them, so that
`apptainer pull oras://...` fetches what is pushed here and the other way round.

An image {name} at commit {sha} lives at {namespace}/{name}:{sha}: an OCI image manifest with an
empty config of type application/vnd.sylabs.sif.config.v1+json and one layer of type
application/vnd.sylabs.sif.layer.v1.sif whose digest is the SIF's sha256.

- lookup: many images at once, a manifest request each, on a bounded thread pool (BinderHub's
  "is it in the registry?");
- pull: the SIF blob streamed into a temporary sibling, its sha256 checked on the way, then
  renamed into place, then its checksum file written;
- push: the config and SIF blobs (streamed from the file, skipped when the registry has them),
  then the manifest, with annotations.

Credentials are read at run time from where users keep them (see CredentialFinder), never from
the config: a RegistrySettings carries no secret and may be pickled by Snakemake.
Beside the package's own files and repository helpers, only `requests` and the standard library
are used.

The package: errors, settings (the config's registry settings), credentials (where they are found),
session (HTTP, auth and retries) and client (lookup, pull, push)."""

from ..downloads import PROGRESS_SECONDS, RATE_LIMIT_VARIABLE
from .client import (
    EMPTY_CONFIG,
    MANIFEST_TYPE,
    MAX_MANIFEST_BYTES,
    SIF_CONFIG_TYPE,
    SIF_LAYER_TYPE,
    TITLE_ANNOTATION,
    FileSlice,
    Found,
    RegistryClient,
    push_annotations,
    with_query,
)
from .credentials import Credential, CredentialFinder, credential_from_entry, normal_auth_key, parse_secret
from .errors import AuthenticationError, DigestMismatchError, InvalidRegistrySetting, RegistryError, UnreachableError
from .session import (
    ATTEMPTS,
    CHUNK,
    CONNECT_TIMEOUT_SECONDS,
    LOOKUP_WORKERS,
    READ_TIMEOUT_SECONDS,
    RETRY_PAUSE_SECONDS,
    HeaderAuth,
    RegistrySession,
    describe_connection_error,
    error_reason,
    is_loopback_host,
    parse_challenge,
)
from .settings import COMPONENT_PATTERN, DIGEST_PATTERN, HOST_PATTERN, MODES, TAG_PATTERN, RegistrySettings

__all__ = [
    "ATTEMPTS",
    "AuthenticationError",
    "CHUNK",
    "COMPONENT_PATTERN",
    "CONNECT_TIMEOUT_SECONDS",
    "Credential",
    "CredentialFinder",
    "DIGEST_PATTERN",
    "DigestMismatchError",
    "EMPTY_CONFIG",
    "FileSlice",
    "Found",
    "HOST_PATTERN",
    "HeaderAuth",
    "InvalidRegistrySetting",
    "LOOKUP_WORKERS",
    "MANIFEST_TYPE",
    "MAX_MANIFEST_BYTES",
    "MODES",
    "PROGRESS_SECONDS",
    "RATE_LIMIT_VARIABLE",
    "READ_TIMEOUT_SECONDS",
    "RETRY_PAUSE_SECONDS",
    "RegistryClient",
    "RegistryError",
    "RegistrySession",
    "RegistrySettings",
    "SIF_CONFIG_TYPE",
    "SIF_LAYER_TYPE",
    "TAG_PATTERN",
    "TITLE_ANNOTATION",
    "UnreachableError",
    "credential_from_entry",
    "describe_connection_error",
    "error_reason",
    "is_loopback_host",
    "normal_auth_key",
    "parse_challenge",
    "parse_secret",
    "push_annotations",
    "with_query",
]
