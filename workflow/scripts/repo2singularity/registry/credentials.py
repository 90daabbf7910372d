"""Credentials for one registry, read at run time from where users keep them, never from the config."""

import base64
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import AuthenticationError


@dataclass(frozen=True)
class Credential:
    """A user name and password, or a token; `source` says where it was found (for messages)."""

    source: str
    username: str = ""
    password: str = field(default="", repr=False)
    token: str = field(default="", repr=False)

    def basic_header(self):
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()


class CredentialFinder:
    """Credentials for one registry, from where users already keep them, first found wins:

    1. the environment variable named by registry_credentials_env: `user:password`, or a token
       (no colon) that is sent as a bearer token as it is;
    2. `apptainer registry login`: Apptainer 1.4 writes $APPTAINER_CONFIGDIR/docker-config.json
       or ~/.apptainer/docker-config.json when that file exists, else ~/.docker/config.json;
    3. a docker-style auth file: $REGISTRY_AUTH_FILE, podman's $XDG_RUNTIME_DIR/containers/auth.json,
       $DOCKER_CONFIG/config.json or ~/.docker/config.json.

    Entries are matched on host[:port]/namespace, then its parent paths, then host[:port]."""

    def __init__(self, settings, environ=None):
        self.settings = settings
        self.environ = os.environ if environ is None else environ

    def home(self):
        return Path(self.environ.get("HOME") or os.path.expanduser("~"))

    def auth_files(self):
        files = []
        apptainer_dir = self.environ.get("APPTAINER_CONFIGDIR") or self.environ.get("SINGULARITY_CONFIGDIR")
        files.append(Path(apptainer_dir) / "docker-config.json" if apptainer_dir else self.home() / ".apptainer" / "docker-config.json")
        if self.environ.get("REGISTRY_AUTH_FILE"):
            files.append(Path(self.environ["REGISTRY_AUTH_FILE"]))
        if self.environ.get("XDG_RUNTIME_DIR"):
            files.append(Path(self.environ["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
        docker_dir = self.environ.get("DOCKER_CONFIG")
        files.append(Path(docker_dir) / "config.json" if docker_dir else self.home() / ".docker" / "config.json")
        return files

    def searched(self):
        """Where was looked, for the message when nothing was found."""
        places = [f"${self.settings.credentials_variable}"] if self.settings.credentials_variable else []
        return ", ".join(places + [str(path) for path in self.auth_files()])

    def keys(self):
        """Auth file keys for this registry, most specific first."""
        parts = self.settings.namespace.split("/") if self.settings.namespace else []
        return [f"{self.settings.host}/{'/'.join(parts[:end])}" for end in range(len(parts), 0, -1)] + [self.settings.host]

    def find(self):
        variable = self.settings.credentials_variable
        if variable and self.environ.get(variable):
            return parse_secret(self.environ[variable], f"${variable}")
        for path in self.auth_files():
            credential = self.from_auth_file(path)
            if credential:
                return credential
        return None

    def from_auth_file(self, path):
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except OSError as error:
            raise AuthenticationError(f"cannot read the auth file {path}: {error.strerror}") from None
        try:
            auths = json.loads(text).get("auths") or {}
        except (ValueError, AttributeError):
            raise AuthenticationError(f"the auth file {path} is not a JSON object with 'auths'") from None
        entries = {normal_auth_key(key): entry for key, entry in auths.items() if isinstance(entry, dict)}
        for key in self.keys():
            entry = entries.get(key)
            if entry:
                return credential_from_entry(entry, f"{path} ({key})")
        return None


def normal_auth_key(key):
    """Auth files name registries as host, https://host, host/v1/, https://host/v2/ ..."""
    key = re.sub(r"^[a-z]+://", "", key.strip().lower()).rstrip("/")
    return re.sub(r"/v[12]$", "", key)


def parse_secret(value, source):
    value = value.strip()
    if ":" in value:
        username, _, password = value.partition(":")
        return Credential(source, username=username, password=password)
    return Credential(source, token=value)


def credential_from_entry(entry, source):
    if entry.get("registrytoken"):
        return Credential(source, token=entry["registrytoken"])
    if entry.get("auth"):
        try:
            decoded = base64.b64decode(entry["auth"], validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            raise AuthenticationError(f"the 'auth' entry in {source} is not base64 of user:password") from None
        username, colon, password = decoded.partition(":")
        if not colon:
            raise AuthenticationError(f"the 'auth' entry in {source} is not base64 of user:password")
        return Credential(source, username=username, password=password)
    if entry.get("username") and entry.get("password"):
        return Credential(source, username=entry["username"], password=entry["password"])
    return None
