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
are used."""

import base64
import hashlib
import io
import ipaddress
import json
import os
import re
import ssl
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import requests

from .config_values import truthy
from .files import HashingWriter, checksum_line, sha256_file, temporary_sibling, write_text_atomic
from .repository import redact_url

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
SIF_CONFIG_TYPE = "application/vnd.sylabs.sif.config.v1+json"
SIF_LAYER_TYPE = "application/vnd.sylabs.sif.layer.v1.sif"
TITLE_ANNOTATION = "org.opencontainers.image.title"
# apptainer's config blob: an empty JSON object
EMPTY_CONFIG = b"{}"
MODES = ("off", "pull", "push")

# OCI distribution spec: repository path components and tags
COMPONENT_PATTERN = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
TAG_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
DIGEST_PATTERN = re.compile(r"sha256:[0-9a-f]{64}")
HOST_PATTERN = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?")
CHALLENGE_PARAMETER = re.compile(r'([A-Za-z_]+)=(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))')

CONNECT_TIMEOUT_SECONDS = 15
# a registry that stops sending mid-transfer is given up after this long without a byte
READ_TIMEOUT_SECONDS = 60
# connection errors of idempotent requests are retried this often, as BinderHub does
ATTEMPTS = 3
RETRY_PAUSE_SECONDS = 0.5
LOOKUP_WORKERS = 8
CHUNK = 1 << 20
MAX_MANIFEST_BYTES = 4 << 20
PROGRESS_SECONDS = 5
# the same test aid (and way to share a thin link) as the builder's downloads: bytes per second
RATE_LIMIT_VARIABLE = "R2S_DOWNLOAD_LIMIT_BPS"


class RegistryError(Exception):
    """A registry operation failed; the message is one line and names the registry and image."""


class AuthenticationError(RegistryError):
    """The registry wants credentials that were not found, or refused the ones given."""


class UnreachableError(RegistryError):
    """The registry does not answer: connection refused, timed out, or TLS failed."""


class DigestMismatchError(RegistryError):
    """Content that does not match its digest; nothing of it was kept."""


class InvalidRegistrySetting(RegistryError):
    """A registry setting that cannot work."""


# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class RegistrySettings:
    """What the config says about the registry. Holds no secret (Snakemake may pickle it):
    credentials_variable is the NAME of an environment variable, read at run time."""

    host: str
    namespace: str = ""
    mode: str = "off"
    credentials_variable: str = ""
    ca_file: str = ""
    plain_http: bool = False

    @classmethod
    def from_url(cls, url, **settings):
        """Parse a `registry` setting such as oras://registry.example.org:5000/lab/binder."""
        url = str(url).strip()
        scheme, separator, rest = url.partition("://")
        if not separator or scheme != "oras":
            raise InvalidRegistrySetting("registry: give an oras:// URL, e.g. oras://registry.example.org/lab/binder")
        authority, _, path = rest.partition("/")
        if "@" in rest:
            # said without echoing the URL: the part before @ may be a password
            raise InvalidRegistrySetting(
                "registry: the URL may not hold credentials (user:password@); use `apptainer registry login`, "
                "a docker-style auth file, or registry_credentials_env"
            )
        if not HOST_PATTERN.fullmatch(authority):
            raise InvalidRegistrySetting(f"registry: {authority!r} is not a host[:port]")
        if "?" in path or "#" in path:
            raise InvalidRegistrySetting("registry: the URL may not have a query or fragment")
        namespace = path.strip("/")
        for component in namespace.split("/") if namespace else []:
            if not COMPONENT_PATTERN.fullmatch(component):
                raise InvalidRegistrySetting(
                    f"registry: the namespace part {component!r} is not a valid repository name (lowercase letters, digits, . _ -)"
                )
        mode = settings.pop("mode", "off")
        if mode not in MODES:
            raise InvalidRegistrySetting(f"registry_mode: {mode!r} is not one of {', '.join(MODES)}")
        variable = settings.get("credentials_variable", "")
        if variable and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", variable):
            raise InvalidRegistrySetting(f"registry_credentials_env: {variable!r} is not an environment variable name")
        return cls(host=authority.lower(), namespace=namespace, mode=mode, **settings)

    @classmethod
    def from_config(cls, config):
        """The settings of a workflow config, or None when the registry is off or not set."""
        if not config.get("registry") or config.get("registry_mode", "off") == "off":
            return None
        return cls.from_url(
            config["registry"],
            mode=config.get("registry_mode", "off"),
            credentials_variable=config.get("registry_credentials_env", ""),
            ca_file=os.path.expanduser(config.get("registry_ca_file", "")),
            plain_http=truthy(config.get("registry_plain_http", False)),
        )

    @property
    def display(self):
        return f"{self.host}/{self.namespace}" if self.namespace else self.host

    def repository(self, name):
        if not COMPONENT_PATTERN.fullmatch(name):
            raise InvalidRegistrySetting(f"{name!r} is not a valid repository name (lowercase letters, digits, . _ -)")
        return f"{self.namespace}/{name}" if self.namespace else name

    def reference(self, name, tag):
        return f"{self.host}/{self.repository(name)}:{tag}"

    @property
    def hostname(self):
        if self.host.startswith("["):
            return self.host[1:].split("]", 1)[0]
        return self.host.rsplit(":", 1)[0]


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


# ---------------------------------------------------------------- credentials


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


# ---------------------------------------------------------------- the HTTP session


def parse_challenge(header):
    """(scheme, parameters) of a WWW-Authenticate header, e.g. ('bearer', {'realm': ...})."""
    scheme, _, rest = (header or "").strip().partition(" ")
    parameters = {}
    for match in CHALLENGE_PARAMETER.finditer(rest):
        value = match.group(2) if match.group(2) is not None else match.group(3)
        parameters[match.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
    return scheme.lower(), parameters


def describe_connection_error(error):
    """A short reason for a requests connection error, without its URL and object dumps."""
    if isinstance(error, requests.exceptions.SSLError):
        text = str(error)
        for inner in iter_causes(error):
            if getattr(inner, "verify_message", None):
                return f"TLS certificate not accepted: {inner.verify_message} (is registry_ca_file set?)"
        if "WRONG_VERSION_NUMBER" in text or "record layer failure" in text:
            return "TLS handshake failed: the registry does not speak HTTPS (registry_plain_http?)"
        return "TLS handshake failed"
    if isinstance(error, requests.exceptions.Timeout):
        return "timed out"
    text = str(error)
    for reason, words in (
        ("connection refused", "Connection refused"),
        ("connection reset", "Connection reset"),
        ("name not known", "Name or service not known"),
        ("no route to host", "No route to host"),
        ("connection closed", "RemoteDisconnected"),
        ("connection broken", "Connection broken"),
    ):
        if words in text:
            return reason
    return "connection failed"


def iter_causes(error, depth=8):
    seen = error
    for _ in range(depth):
        if seen is None:
            return
        yield seen
        nested = getattr(seen, "reason", None)
        if not isinstance(nested, BaseException):
            nested = next((arg for arg in getattr(seen, "args", ()) if isinstance(arg, BaseException)), None)
        seen = nested or seen.__cause__ or seen.__context__


def is_loopback_host(hostname):
    if hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


class HeaderAuth(requests.auth.AuthBase):
    """Sets the Authorization header we chose (or none). Passing any auth object also keeps
    requests from adding credentials of its own from ~/.netrc."""

    def __init__(self, value):
        self.value = value

    def __call__(self, request):
        if self.value:
            request.headers["Authorization"] = self.value
        else:
            request.headers.pop("Authorization", None)
        return request


class LargeBlockAdapter(requests.adapters.HTTPAdapter):
    """Request bodies are sent in blocks of CHUNK bytes: urllib3's 16 KB blocks would cost a
    SIF upload a system call per 16 KB."""

    def init_poolmanager(self, *args, **kwargs):
        kwargs["blocksize"] = CHUNK
        super().init_poolmanager(*args, **kwargs)


class RegistrySession:
    """HTTP to one registry: TLS or plain HTTP as configured, the auth challenge (Basic or a
    bearer token per scope, fetched from the registry's token realm), retries of idempotent
    requests on connection errors. Errors raised here are reasons; the caller names the image."""

    def __init__(self, settings, environ=None, connect_timeout=CONNECT_TIMEOUT_SECONDS, read_timeout=READ_TIMEOUT_SECONDS, workers=LOOKUP_WORKERS):
        self.settings = settings
        self.environ = os.environ if environ is None else environ
        self.timeout = (connect_timeout, read_timeout)
        self.http = requests.Session()
        adapter = LargeBlockAdapter(pool_connections=2, pool_maxsize=max(workers, 2))
        self.http.mount("https://", adapter)
        self.http.mount("http://", adapter)
        # given with each request: a session's own would lose to $REQUESTS_CA_BUNDLE
        self.verify = self.trust()
        self.lock = threading.Lock()
        self.connect_lock = threading.Lock()
        self.base = None  # scheme://host, once connected
        self.challenge = None  # (scheme, parameters) of the registry's 401
        self.credential = None
        self.credential_loaded = False
        self.tokens = {}  # scope -> (token, expires at)

    def trust(self):
        """registry_ca_file, else SSL_CERT_FILE (as apptainer, a Go program, reads it), else the
        system trust store (not certifi's copy, which requests would take)."""
        if self.settings.ca_file:
            if not os.path.isfile(self.settings.ca_file):
                raise InvalidRegistrySetting(f"registry_ca_file: {self.settings.ca_file} is not a file")
            return self.settings.ca_file
        if self.environ.get("SSL_CERT_FILE") and os.path.isfile(self.environ["SSL_CERT_FILE"]):
            return self.environ["SSL_CERT_FILE"]
        paths = ssl.get_default_verify_paths()
        for candidate in (paths.cafile, paths.capath):
            if candidate and os.path.exists(candidate):
                return candidate
        return True

    def finder(self):
        return CredentialFinder(self.settings, self.environ)

    def load_credential(self):
        with self.lock:
            if not self.credential_loaded:
                self.credential = self.finder().find()
                self.credential_loaded = True
        return self.credential

    # -- connecting

    def connect(self):
        """Find the registry's scheme and challenge with GET /v2/ (once), and check the
        credentials as `docker login` does: Basic at /v2/, a token from the realm otherwise."""
        with self.connect_lock:
            if self.base is not None:
                return
            base, response = self.first_answer()
            if response.status_code == 401:
                self.challenge = parse_challenge(response.headers.get("WWW-Authenticate"))
                self.check_credential(base)
            elif response.status_code == 400 and base.startswith("http:"):
                raise RegistryError("GET /v2/ in plain HTTP answered HTTP 400: does the registry speak HTTPS? (registry_plain_http)")
            elif response.status_code != 200:
                raise RegistryError(f"GET /v2/ answered HTTP {response.status_code}: not an OCI registry (API v2)?")
            self.base = base

    def check_credential(self, base):
        credential = self.load_credential()
        scheme = self.challenge[0]
        if scheme == "basic":
            if credential is None:
                raise AuthenticationError(f"the registry asks for a user name and password, and none was found (looked in: {self.finder().searched()})")
            if credential.token:
                raise AuthenticationError(f"the registry asks for a user name and password, but {credential.source} holds a token")
            checked = self.request_with_retries("GET", f"{base}/v2/", auth=HeaderAuth(credential.basic_header()))
            if checked.status_code == 401:
                raise AuthenticationError(f"the registry refused the credentials from {credential.source}")
        elif scheme == "bearer":
            if credential is not None and not credential.token:
                self.token(None)  # refused credentials fail here, as with docker login
        else:
            raise RegistryError(f"the registry asks for {scheme or 'an unknown'} authentication, which is not supported")

    def first_answer(self):
        host = self.settings.host
        if self.settings.plain_http:
            return f"http://{host}", self.request_with_retries("GET", f"http://{host}/v2/")
        try:
            return f"https://{host}", self.request_with_retries("GET", f"https://{host}/v2/")
        except requests.exceptions.SSLError as tls_error:
            # loopback may speak plain HTTP, as apptainer and docker allow; a registry that
            # speaks TLS with an untrusted certificate is not talked to in plain HTTP
            if not is_loopback_host(self.settings.hostname):
                raise UnreachableError(describe_connection_error(tls_error)) from None
            try:
                response = self.request_with_retries("GET", f"http://{host}/v2/")
            except requests.RequestException:
                raise UnreachableError(describe_connection_error(tls_error)) from None
            if "Docker-Distribution-Api-Version" not in response.headers and response.status_code not in (200, 401):
                raise UnreachableError(describe_connection_error(tls_error)) from None
            return f"http://{host}", response

    def request_with_retries(self, method, url, **kwargs):
        kwargs.setdefault("timeout", self.timeout)
        kwargs.setdefault("verify", self.verify)
        kwargs.setdefault("auth", HeaderAuth(None))
        for attempt in range(ATTEMPTS):
            try:
                return self.http.request(method, url, **kwargs)
            except requests.exceptions.SSLError:
                raise
            except requests.exceptions.ConnectionError as error:
                if attempt + 1 == ATTEMPTS:
                    raise UnreachableError(f"does not answer ({describe_connection_error(error)})") from None
            except requests.exceptions.Timeout:
                if attempt + 1 == ATTEMPTS:
                    raise UnreachableError("does not answer (timed out)") from None
            time.sleep(RETRY_PAUSE_SECONDS * 2**attempt)

    # -- authentication

    def authorization(self, scope):
        if self.challenge is None:
            return None
        credential = self.load_credential()
        if credential is not None and credential.token:
            return f"Bearer {credential.token}"
        if self.challenge[0] == "basic":
            return credential.basic_header() if credential else None
        return f"Bearer {self.token(scope)}"

    def token(self, scope, refresh=False):
        """A bearer token for `scope` from the registry's token realm (cached until it expires)."""
        with self.lock:
            cached = self.tokens.get(scope)
        if cached and not refresh and cached[1] > time.monotonic():
            return cached[0]
        parameters = self.challenge[1]
        realm = parameters.get("realm", "")
        parsed = urllib.parse.urlsplit(realm)
        if parsed.scheme not in ("https", "http") or not parsed.hostname:
            raise RegistryError("the registry's token realm is not an http(s) URL")
        credential = self.load_credential()
        if parsed.scheme == "http" and credential and not (self.settings.plain_http or is_loopback_host(parsed.hostname)):
            raise RegistryError(f"the registry's token realm {parsed.hostname} is plain HTTP: credentials are not sent there")
        query = {"service": parameters["service"]} if parameters.get("service") else {}
        if scope:
            query["scope"] = scope
        headers = {"Authorization": credential.basic_header()} if credential else {}
        try:
            response = self.request_with_retries("GET", realm, params=query, auth=HeaderAuth(headers.get("Authorization")))
        except requests.exceptions.SSLError as error:
            raise UnreachableError(f"the token realm {parsed.hostname}: {describe_connection_error(error)}") from None
        if response.status_code in (401, 403):
            if credential:
                raise AuthenticationError(f"the registry's token service refused the credentials from {credential.source}")
            raise AuthenticationError(f"the registry's token service wants credentials, and none were found (looked in: {self.finder().searched()})")
        if response.status_code != 200:
            raise RegistryError(f"the registry's token service answered HTTP {response.status_code}")
        try:
            answer = response.json()
            token = answer.get("token") or answer.get("access_token")
            lifetime = int(answer.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError):
            token = None
        if not token:
            raise RegistryError("the registry's token service answered without a token")
        with self.lock:
            # renewed a little early, so that a token does not expire between check and use
            self.tokens[scope] = (token, time.monotonic() + max(lifetime - 10, 5))
        return token

    # -- requests

    def send(self, method, path, scope, body=None, headers=None, stream=False, retry=True):
        """One request to the registry, authorized for `scope` (e.g. repository:lab/x:pull);
        once more on a 401 with fresh authorization. `body` is bytes or a callable that opens
        a fresh body (so a refused upload can be sent again)."""
        self.connect()
        url = path if path.startswith(("http://", "https://")) else self.base + path
        for renewed in (False, True):
            if renewed and self.challenge and self.challenge[0] == "bearer":
                self.token(scope, refresh=True)
            data = body() if callable(body) else body
            arguments = {"headers": headers or {}, "data": data, "stream": stream, "auth": HeaderAuth(self.authorization(scope))}
            try:
                if retry and data is None:
                    response = self.request_with_retries(method, url, **arguments)
                else:
                    response = self.http.request(method, url, timeout=self.timeout, verify=self.verify, **arguments)
            except requests.exceptions.SSLError as error:
                raise UnreachableError(describe_connection_error(error)) from None
            except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as error:
                raise UnreachableError(f"does not answer ({describe_connection_error(error)})") from None
            finally:
                if hasattr(data, "close"):
                    data.close()
            if response.status_code != 401 or renewed:
                break
            response.close()
            challenge = parse_challenge(response.headers.get("WWW-Authenticate"))
            if challenge[0] in ("basic", "bearer"):
                self.challenge = challenge
        if response.status_code == 401:
            credential = self.load_credential()
            if credential:
                raise AuthenticationError(f"the registry refused the credentials from {credential.source}")
            raise AuthenticationError(f"the registry wants credentials, and none were found (looked in: {self.finder().searched()})")
        if response.status_code == 403:
            raise AuthenticationError(f"the registry denied access ({scope or 'HTTP 403'})")
        return response

    def close(self):
        self.http.close()


def error_reason(response):
    """The registry's own words for a failed request: its error codes, or the status."""
    try:
        errors = response.json().get("errors") or []
        codes = ", ".join(f"{item.get('code')}: {item.get('message')}" for item in errors if isinstance(item, dict))
    except (ValueError, AttributeError):
        codes = ""
    return f"HTTP {response.status_code}" + (f" ({codes})" if codes else "")


# ---------------------------------------------------------------- transfers


class Progress:
    """A line on stderr every PROGRESS_SECONDS (a log is no terminal: no redrawn bar), so a
    small blob prints nothing and a big one tells how far it is and how fast it goes."""

    def __init__(self, verb, label, total, stream):
        self.verb, self.label, self.total, self.stream = verb, label, total, stream
        self.started = self.last = time.monotonic()

    def update(self, done):
        now = time.monotonic()
        if self.stream is None or now - self.last < PROGRESS_SECONDS:
            return
        self.last = now
        rate = done / (now - self.started)
        percent = 100 * done / self.total if self.total else 100
        print(
            f"  {self.verb} {self.label}: {percent:3.0f}% of {self.total / 1e6:.1f} MB, {rate / 1e6:.1f} MB/s",
            file=self.stream,
            flush=True,
        )


class FileSlice(io.RawIOBase):
    """`length` bytes of a file from `offset`, read in chunks: an upload body that requests
    streams (it has a length) instead of reading the file into memory."""

    def __init__(self, path, offset, length, progress=None, done_before=0):
        self.handle = open(path, "rb")
        self.handle.seek(offset)
        self.left = length
        self.length = length
        self.progress = progress
        self.done = done_before

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
        self.done += len(data)
        if self.progress:
            self.progress.update(self.done)
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
        limit = float(self.environ.get(RATE_LIMIT_VARIABLE) or 0)
        done = 0
        progress = Progress("pull", f"{found.name}:{found.sha[:12]}", found.size, self.progress)
        with response:
            if response.status_code != 200:
                raise RegistryError(f"the SIF blob request answered {error_reason(response)}")
            started = time.monotonic()
            with HashingWriter(handle) as target:
                try:
                    for chunk in response.iter_content(CHUNK):
                        target.write(chunk)
                        done += len(chunk)
                        if done > found.size:
                            break
                        progress.update(done)
                        if limit:
                            ahead = done / limit - (time.monotonic() - started)
                            if ahead > 0:
                                time.sleep(ahead)
                except (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError, requests.exceptions.Timeout) as error:
                    raise UnreachableError(
                        f"the registry stopped sending at {done / 1e6:.1f} of {found.size / 1e6:.1f} MB "
                        f"({describe_connection_error(error)}); nothing kept, run again"
                    ) from None
                if done != found.size:
                    raise DigestMismatchError(f"the SIF blob has {done} bytes, its manifest says {found.size}: refused, nothing kept")
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
            progress = Progress("push", f"{name}:{sha[:12]}", size, self.progress)
            self.ensure_blob(repository, scope, layer_digest, size, lambda offset, length: FileSlice(sif, offset, length, progress, offset))
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
