"""HTTP to one registry: TLS or plain HTTP, the auth challenge (Basic or bearer tokens per
scope), retries of idempotent requests, and one-line reasons for what goes wrong."""

import ipaddress
import os
import re
import ssl
import threading
import time
import urllib.parse

import requests

from ..downloads import CHUNK, CONNECT_TIMEOUT_SECONDS
from .credentials import CredentialFinder
from .errors import AuthenticationError, InvalidRegistrySetting, RegistryError, UnreachableError

CHALLENGE_PARAMETER = re.compile(r'([A-Za-z_]+)=(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))')

# a registry that stops sending mid-transfer is given up after this long without a byte
READ_TIMEOUT_SECONDS = 60
# connection errors of idempotent requests are retried this often, as BinderHub does
ATTEMPTS = 3
RETRY_PAUSE_SECONDS = 0.5
LOOKUP_WORKERS = 8


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
        # a Location the registry gave (an upload's) may name another host, port or scheme:
        # the registry's credentials go only to the registry itself, as docker's do
        own = origin(url) == origin(self.base)
        for renewed in (False, True) if own else (False,):
            if renewed and self.challenge and self.challenge[0] == "bearer":
                self.token(scope, refresh=True)
            data = body() if callable(body) else body
            authorization = self.authorization(scope) if own else None
            arguments = {"headers": headers or {}, "data": data, "stream": stream, "auth": HeaderAuth(authorization)}
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


def origin(url):
    """(scheme, host, port) of a URL, the port filled in from the scheme."""
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or {"http": 80, "https": 443}.get(parts.scheme)


def error_reason(response):
    """The registry's own words for a failed request: its error codes, or the status."""
    try:
        errors = response.json().get("errors") or []
        codes = ", ".join(f"{item.get('code')}: {item.get('message')}" for item in errors if isinstance(item, dict))
    except (ValueError, AttributeError):
        codes = ""
    return f"HTTP {response.status_code}" + (f" ({codes})" if codes else "")
