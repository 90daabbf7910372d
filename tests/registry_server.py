"""A real OCI registry for the tests and the benchmark: Debian's docker-registry, started on
127.0.0.1 and a free port with its storage in a folder of its own, in plain HTTP or with TLS (a CA
and a server certificate made here), open or with htpasswd (bcrypt) or token auth (a token
service run here, whose signed tokens the registry checks against the certificate it is given)."""

import base64
import contextlib
import datetime
import ipaddress
import json
import multiprocessing
import socket
import subprocess
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import bcrypt
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

REGISTRY_BINARY = "/usr/bin/docker-registry"
START_SECONDS = 30


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def new_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def certificate(subject_name, public_key, issuer_name, signing_key, is_ca, alt_names=()):
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_name)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if alt_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(alt_names)), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def write_key(key, path):
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    path.chmod(0o600)


class CertificateAuthority:
    """A CA of the test's own and a server certificate for 127.0.0.1 and localhost, signed by it."""

    def __init__(self, folder):
        folder.mkdir(parents=True, exist_ok=True)
        ca_key, server_key = new_key(), new_key()
        ca = certificate("repo2singularity test CA", ca_key.public_key(), "repo2singularity test CA", ca_key, True)
        server = certificate(
            "127.0.0.1",
            server_key.public_key(),
            "repo2singularity test CA",
            ca_key,
            False,
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")],
        )
        self.ca_file = folder / "ca.pem"
        self.certificate_file = folder / "server.pem"
        self.key_file = folder / "server.key"
        self.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        self.certificate_file.write_bytes(server.public_bytes(serialization.Encoding.PEM))
        write_key(server_key, self.key_file)


def htpasswd_lines(users):
    # bcrypt is the only hash docker-registry's htpasswd accepts; few rounds keep the tests quick
    return "".join(f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()}\n" for user, password in users.items())


def base64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenService:
    """The auth server of the registry token protocol: GET /token?service=...&scope=... with the
    user's Basic credentials gives a JWT (RS256, its certificate in the x5c header) granting the
    scope's actions; the registry verifies it against the certificate in its config."""

    service = "r2s-test-registry"
    issuer = "r2s-test-token-service"

    def __init__(self, folder, users, thread=True):
        folder.mkdir(parents=True, exist_ok=True)
        self.users = dict(users)
        self.key = new_key()
        cert = certificate("token signer", self.key.public_key(), "token signer", self.key, False)
        self.certificate_der = cert.public_bytes(serialization.Encoding.DER)
        self.certificate_file = folder / "token.pem"
        self.certificate_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self.requests = []
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                service.answer(self)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.threaded = thread
        if thread:  # else the caller serves it, e.g. in a process of its own
            threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def realm(self):
        return f"http://127.0.0.1:{self.server.server_address[1]}/token"

    def answer(self, request):
        query = dict(part.split("=", 1) for part in request.path.partition("?")[2].split("&") if "=" in part)
        query = {key: requests.utils.unquote(value) for key, value in query.items()}
        self.requests.append(query)
        header = request.headers.get("Authorization", "")
        user = None
        if header.startswith("Basic "):
            name, _, password = base64.b64decode(header[6:]).decode().partition(":")
            if self.users.get(name) == password:
                user = name
        if user is None:
            request.send_response(401)
            request.send_header("WWW-Authenticate", 'Basic realm="token"')
            request.end_headers()
            return
        access = []
        if query.get("scope"):
            kind, name, actions = query["scope"].split(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        body = json.dumps({"token": self.token(user, access), "expires_in": 300}).encode()
        request.send_response(200)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)

    def token(self, user, access):
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(self.certificate_der).decode()]}
        claims = {
            "iss": self.issuer,
            "sub": user,
            "aud": self.service,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        signed = f"{base64url(json.dumps(header).encode())}.{base64url(json.dumps(claims).encode())}"
        signature = self.key.sign(signed.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signed}.{base64url(signature)}"

    def stop(self):
        if self.threaded:
            self.server.shutdown()
        self.server.server_close()

    def serve_in_process(self):
        """Serve from a forked process (so that a benchmark's client threads do not share its
        GIL); returns the process, to be terminated."""
        process = multiprocessing.get_context("fork").Process(target=self.server.serve_forever, daemon=True)
        process.start()
        self.server.socket.close()
        return process


class RegistryServer:
    """docker-registry serve CONFIG on 127.0.0.1:port; stop() and start() again keep its storage."""

    def __init__(self, folder, tls=None, users=None, token_service=None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.storage = self.folder / "storage"
        self.tls = tls
        self.token_service = token_service
        self.port = free_port()
        self.process = None
        self.log = self.folder / "registry.log"
        config = {
            "version": 0.1,
            "log": {"level": "warn"},
            "storage": {"filesystem": {"rootdirectory": str(self.storage)}, "delete": {"enabled": True}},
            "http": {"addr": f"127.0.0.1:{self.port}"},
        }
        if tls:
            config["http"]["tls"] = {"certificate": str(tls.certificate_file), "key": str(tls.key_file)}
        if users:
            htpasswd = self.folder / "htpasswd"
            htpasswd.write_text(htpasswd_lines(users))
            config["auth"] = {"htpasswd": {"realm": "r2s-test", "path": str(htpasswd)}}
        if token_service:
            config["auth"] = {
                "token": {
                    "realm": token_service.realm,
                    "service": token_service.service,
                    "issuer": token_service.issuer,
                    "rootcertbundle": str(token_service.certificate_file),
                }
            }
        self.config = self.folder / "config.yml"
        # JSON is YAML
        self.config.write_text(json.dumps(config, indent=2))

    @property
    def host(self):
        return f"127.0.0.1:{self.port}"

    @property
    def base_url(self):
        return f"{'https' if self.tls else 'http'}://{self.host}"

    def url(self, namespace=""):
        return f"oras://{self.host}/{namespace}".rstrip("/")

    def start(self):
        if not Path(REGISTRY_BINARY).exists():
            raise RuntimeError(f"{REGISTRY_BINARY} is missing: install Debian's docker-registry (as root: bash setup.sh test)")
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [REGISTRY_BINARY, "serve", str(self.config)], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + START_SECONDS
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"docker-registry exited ({self.process.returncode}): {self.log.read_text()[-2000:]}")
            try:
                requests.get(f"{self.base_url}/v2/", verify=str(self.tls.ca_file) if self.tls else True, timeout=2)
                return self
            except requests.RequestException:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"docker-registry did not answer on {self.host} within {START_SECONDS} s") from None
                time.sleep(0.1)

    def stop(self, kill=False):
        if self.process and self.process.poll() is None:
            self.process.kill() if kill else self.process.terminate()
            self.process.wait(timeout=30)
        self.process = None

    def blob_file(self, digest):
        """Where the registry keeps a blob (filesystem storage driver's layout)."""
        hexdigest = digest.split(":", 1)[1]
        return self.storage / "docker" / "registry" / "v2" / "blobs" / "sha256" / hexdigest[:2] / hexdigest / "data"

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


@contextlib.contextmanager
def tls_registry_in(folder, users):
    """A registry with TLS from a certificate authority of its own, under `folder`: (server, ca)
    while it runs."""
    ca = CertificateAuthority(folder / "ca")
    with RegistryServer(folder / "registry", tls=ca, users=users) as server:
        yield server, ca
