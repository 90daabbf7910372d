"""The registry client (issue 12) against a real registry: Debian's docker-registry, started by
these tests on 127.0.0.1, with htpasswd auth and TLS (a CA made here, which the client and
apptainer are told to trust), in plain HTTP, and with token auth (bearer tokens from a token
service run here). Apptainer checks the other direction: it pulls what the client pushed, and the
client pulls what it pushed."""

import base64
import hashlib
import io
import json
import os
import re
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from repo2singularity import downloads, image, registry, shared_sifs
from repo2singularity.step import StepError

from .registry_server import CertificateAuthority, RegistryServer, TokenService

USER, PASSWORD = "alice", "s3cret-Pa55word"
SHA = "0123456789abcdef0123456789abcdef01234567"
CREDENTIALS_VARIABLE = "R2S_TEST_REGISTRY_CREDENTIALS"
SETUPS = ("tls-htpasswd", "plain-http")

pytestmark = pytest.mark.integration


def commit(number):
    return hashlib.sha1(str(number).encode()).hexdigest()


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def apptainer(*args, env=None, input=None, check=True):
    result = subprocess.run(["apptainer", *args], capture_output=True, text=True, env=env, input=input)
    if check and result.returncode != 0:
        raise AssertionError(f"apptainer {' '.join(args)} failed:\n{result.stderr}")
    return result


def make_sif(path, size):
    """A SIF made by apptainer itself: a header and one generic data object of random bytes
    (what is in it does not matter to a registry, only that it is apptainer's format)."""
    data = path.with_suffix(".data")
    data.write_bytes(os.urandom(size))
    apptainer("sif", "new", str(path))
    apptainer("sif", "add", "--datatype", "6", "--groupid", "1", str(path), str(data))
    data.unlink()
    return path


@pytest.fixture(scope="module")
def sifs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sifs")
    return {
        "small": make_sif(folder / "small.sif", 40_000),
        "other": make_sif(folder / "other.sif", 30_000),
        "spare": make_sif(folder / "spare.sif", 20_000),
        # big enough that a throttled pull is still running when its registry is stopped
        "big": make_sif(folder / "big.sif", 24_000_000),
    }


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return CertificateAuthority(tmp_path_factory.mktemp("ca"))


@dataclass
class Setup:
    """A running registry and how the client and apptainer reach it."""

    kind: str
    server: RegistryServer
    ca: CertificateAuthority | None
    apptainer_env: dict

    def settings(self, **changes):
        options = {"mode": "push", "credentials_variable": CREDENTIALS_VARIABLE}
        if self.ca:
            options["ca_file"] = str(self.ca.ca_file)
        return registry.RegistrySettings.from_url(self.server.url("lab/binder"), **{**options, **changes})

    def client(self, environ=None, **options):
        settings_changes = options.pop("settings", {})
        environ = {"HOME": "/nonexistent", CREDENTIALS_VARIABLE: f"{USER}:{PASSWORD}"} if environ is None else environ
        return registry.RegistryClient(self.settings(**settings_changes), environ=environ, progress=None, **options)

    def oras(self, name, tag):
        return f"oras://{self.server.host}/lab/binder/{name}:{tag}"

    def raw_manifest(self, name, tag):
        response = requests.get(
            f"{self.server.base_url}/v2/lab/binder/{name}/manifests/{tag}",
            headers={"Accept": registry.MANIFEST_TYPE},
            auth=(USER, PASSWORD) if self.ca else None,
            verify=str(self.ca.ca_file) if self.ca else True,
            timeout=10,
        )
        response.raise_for_status()
        return response


def apptainer_login(host, env):
    """`apptainer registry login` to the TLS registry: apptainer trusts the test's CA through
    SSL_CERT_FILE, which the sudo rule of the Apptainer wrapper must keep (setup/system.sh)."""
    result = apptainer("registry", "login", "-u", USER, "--password-stdin", f"oras://{host}", env=env, input=PASSWORD, check=False)
    hint = ""
    if "unknown authority" in result.stderr:
        hint = "\n(apptainer did not get SSL_CERT_FILE: does /etc/sudoers.d/repo2singularity keep it? run setup/system.sh install)"
    assert result.returncode == 0, f"apptainer registry login failed:\n{result.stderr}{hint}"


def apptainer_home(folder, env_extra):
    """An environment in which apptainer keeps its login and cache in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "HOME": str(folder), "APPTAINER_CACHEDIR": str(folder / "cache"), **env_extra}


@pytest.fixture(scope="module", params=SETUPS)
def setup(request, tmp_path_factory, ca):
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "tls-htpasswd":
        server = RegistryServer(folder / "registry", tls=ca, users={USER: PASSWORD})
        env = apptainer_home(folder / "home", {"SSL_CERT_FILE": str(ca.ca_file)})
    else:
        server = RegistryServer(folder / "registry")
        env = apptainer_home(folder / "home", {})
    server.start()
    try:
        if request.param == "tls-htpasswd":
            apptainer_login(server.host, env)
        yield Setup(request.param, server, ca if request.param == "tls-htpasswd" else None, env)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def tls_setup(tmp_path_factory, ca):
    folder = tmp_path_factory.mktemp("tls-only")
    with RegistryServer(folder / "registry", tls=ca, users={USER: PASSWORD}) as server:
        yield Setup("tls-htpasswd", server, ca, {})


def assert_one_line(message, *secrets):
    assert "\n" not in message, message
    for secret in secrets:
        assert secret not in message, message


def leftovers(folder):
    return sorted(path.name for path in Path(folder).iterdir()) if Path(folder).exists() else []


# ---------------------------------------------------------------- both set-ups


def test_push_is_stored_as_apptainer_stores_it_and_apptainer_pulls_it(setup, sifs, tmp_path):
    client = setup.client()
    annotations = registry.push_annotations("https://ci-user:ghp_T0KEN@example.org/lab/repo.git", "main", SHA, "2026.4.0")
    digest = client.push(sifs["small"], "pushed", SHA, annotations)

    response = setup.raw_manifest("pushed", SHA)
    assert response.headers["Docker-Content-Digest"] == digest
    manifest = response.json()
    assert manifest["mediaType"] == registry.MANIFEST_TYPE
    assert manifest["config"] == {
        "mediaType": "application/vnd.sylabs.sif.config.v1+json",
        "size": 2,
        "digest": "sha256:" + hashlib.sha256(b"{}").hexdigest(),
    }
    assert manifest["layers"] == [
        {
            "mediaType": "application/vnd.sylabs.sif.layer.v1.sif",
            "size": sifs["small"].stat().st_size,
            "digest": "sha256:" + sha256(sifs["small"]),
            "annotations": {"org.opencontainers.image.title": "small.sif"},
        }
    ]
    assert manifest["annotations"]["org.opencontainers.image.source"] == "https://example.org/lab/repo.git"
    assert manifest["annotations"]["org.opencontainers.image.revision"] == SHA
    assert manifest["annotations"]["repo2docker.ref"] == "main"
    assert manifest["annotations"]["repo2docker.version"] == "2026.4.0"
    assert "ghp_T0KEN" not in response.text

    pulled = tmp_path / "by-apptainer.sif"
    apptainer("pull", str(pulled), setup.oras("pushed", SHA), env=setup.apptainer_env)
    assert pulled.read_bytes() == sifs["small"].read_bytes()


def test_pull_what_apptainer_pushed(setup, sifs, tmp_path):
    apptainer("push", str(sifs["other"]), setup.oras("from-apptainer", SHA), env=setup.apptainer_env)
    client = setup.client()
    found = client.lookup_one("from-apptainer", SHA)
    assert found.sif_sha256 == sha256(sifs["other"]) and found.title == "other.sif"

    folder = tmp_path / "results" / "from-apptainer" / SHA
    client.pull(found, folder / "from-apptainer.sif", folder / "from-apptainer.sif.sha256")
    assert (folder / "from-apptainer.sif").read_bytes() == sifs["other"].read_bytes()
    assert (folder / "from-apptainer.sif.sha256").read_text() == f"{sha256(sifs['other'])}  from-apptainer.sif\n"
    assert leftovers(folder) == ["from-apptainer.sif", "from-apptainer.sif.sha256"]


def test_a_pull_after_a_kill_between_sif_and_checksum_keeps_the_sif_and_replaces_a_stale_pair(setup, sifs, tmp_path):
    client = setup.client()
    client.push(sifs["other"], "rerun", SHA)
    found = client.lookup_one("rerun", SHA)
    sif, checksum = tmp_path / "rerun.sif", tmp_path / "rerun.sif.sha256"
    # an older SIF and the checksum that vouches for it: both give way to the registry's
    sif.write_bytes(sifs["small"].read_bytes())
    checksum.write_text(f"{sha256(sifs['small'])}  rerun.sif\n")
    client.pull(found, sif, checksum)
    assert sha256(sif) == found.sif_sha256 and checksum.read_text() == f"{found.sif_sha256}  rerun.sif\n"
    # killed after the SIF took its name, before its checksum was written: the verified SIF stays
    checksum.unlink()
    inode = sif.stat().st_ino
    client.pull(found, sif, checksum)
    assert sif.stat().st_ino == inode and checksum.read_text() == f"{found.sif_sha256}  rerun.sif\n"
    assert leftovers(tmp_path) == ["rerun.sif", "rerun.sif.sha256"]


def test_parallel_lookup_of_20_images_finds_exactly_the_pushed_half(setup, sifs):
    client = setup.client()
    images = [(f"many{index:02d}", commit(index)) for index in range(20)]
    for name, sha in images[::2]:
        client.push(sifs["small"], name, sha)

    found = client.lookup(images)

    assert sorted(found) == sorted(images)
    present = {image for image, result in found.items() if result is not None}
    assert present == set(images[::2])
    for name, tag in images[::2]:
        assert found[name, tag].sif_sha256 == sha256(sifs["small"]) and found[name, tag].size == sifs["small"].stat().st_size
        assert found[name, tag].reference == f"{setup.server.host}/lab/binder/{name}:{tag}"


def test_pushing_the_same_sif_again_uploads_no_blob(setup, sifs):
    client = setup.client()
    client.push(sifs["small"], "again", commit("first"))
    uploads_before = setup.server.log.read_text().count("POST /v2/lab/binder/again/blobs/uploads/")
    client.push(sifs["small"], "again", commit("second"))
    assert setup.server.log.read_text().count("POST /v2/lab/binder/again/blobs/uploads/") == uploads_before == 2
    assert client.lookup_one("again", commit("second")).sif_sha256 == sha256(sifs["small"])


def test_registry_stopped_mid_pull_leaves_no_partial_sif_and_a_rerun_completes(setup, sifs, tmp_path, monkeypatch):
    setup.client().push(sifs["big"], "big", SHA)
    folder = tmp_path / "results" / "big" / SHA
    sif, checksum = folder / "big.sif", folder / "big.sif.sha256"
    progress = io.StringIO()
    # a throttled transfer (the builder downloads' own rate limit), so that it is still running
    # when the registry goes away, with more left than the sockets' buffers hold
    monkeypatch.setattr(downloads, "PROGRESS_SECONDS", 0.5)
    throttled = {"HOME": "/nonexistent", CREDENTIALS_VARIABLE: f"{USER}:{PASSWORD}", registry.RATE_LIMIT_VARIABLE: "3000000"}
    client = setup.client(environ=throttled, read_timeout=5)
    client.progress = progress
    found = client.lookup_one("big", SHA)
    outcome = {}

    def pull():
        try:
            client.pull(found, sif, checksum)
        except registry.RegistryError as error:
            outcome["error"] = error

    puller = threading.Thread(target=pull)
    puller.start()
    deadline = time.monotonic() + 60
    while "pull big:" not in progress.getvalue():
        assert puller.is_alive() and time.monotonic() < deadline, f"the pull ended early: {outcome}"
        time.sleep(0.2)
    setup.server.stop(kill=True)
    try:
        puller.join(60)
        assert not puller.is_alive()
    finally:
        setup.server.start()

    assert isinstance(outcome.get("error"), registry.UnreachableError), outcome
    message = str(outcome["error"])
    assert_one_line(message, PASSWORD)
    assert setup.server.host in message and "big:" + SHA in message and "nothing kept" in message
    # the progress line every transfer here has (downloads.TransferMeter)
    assert re.search(r"^  pull big:\w{12} \[#*\.*\] +\d+%  [\d.]+ of 24\.0 MB, [\d.]+ MB/s", progress.getvalue(), re.MULTILINE), progress.getvalue()
    assert leftovers(folder) == []

    setup.client().pull_image("big", SHA, sif, checksum)
    assert sha256(sif) == sha256(sifs["big"])
    assert checksum.read_text() == f"{sha256(sifs['big'])}  big.sif\n"
    assert leftovers(folder) == ["big.sif", "big.sif.sha256"]


def test_a_corrupted_blob_is_refused_and_nothing_is_kept(setup, sifs, tmp_path):
    client = setup.client()
    client.push(sifs["spare"], "corrupt", SHA)
    blob = setup.server.blob_file("sha256:" + sha256(sifs["spare"]))
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))

    folder = tmp_path / "results" / "corrupt" / SHA
    with pytest.raises(registry.DigestMismatchError) as refused:
        client.pull_image("corrupt", SHA, folder / "corrupt.sif", folder / "corrupt.sif.sha256")
    assert_one_line(str(refused.value), PASSWORD)
    assert f"oras://{setup.server.host}/lab/binder/corrupt:{SHA}" in str(refused.value)
    assert "does not match its digest" in str(refused.value)
    assert leftovers(folder) == []


def test_a_tag_whose_manifest_does_not_match_its_digest_is_refused(setup, sifs, tmp_path):
    client = setup.client()
    digest = client.push(sifs["small"], "tampered", SHA)
    manifest = setup.server.blob_file(digest)
    manifest.write_text(manifest.read_text().replace('"size":2', '"size":2 '))

    found = client.lookup([("tampered", SHA)])[("tampered", SHA)]
    assert isinstance(found, registry.DigestMismatchError)
    assert_one_line(str(found), PASSWORD)
    assert setup.server.host in str(found) and "tampered:" + SHA in str(found)
    folder = tmp_path / "results"
    with pytest.raises(registry.DigestMismatchError):
        client.pull_image("tampered", SHA, folder / "tampered.sif", folder / "tampered.sif.sha256")
    assert leftovers(folder) == []


def test_a_manifest_that_is_not_a_sif_is_refused(setup):
    client = setup.client()
    config = b'{"architecture":"amd64","os":"linux"}'
    repository = "lab/binder/docker-image"
    session = client.session
    session.connect()
    upload = session.send("POST", f"/v2/{repository}/blobs/uploads/", f"repository:{repository}:pull,push", body=b"")
    location = requests.compat.urljoin(session.base + "/", upload.headers["Location"])
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    session.send("PUT", registry.with_query(location, digest=config_digest), f"repository:{repository}:pull,push", body=config)
    image = {
        "schemaVersion": 2,
        "mediaType": registry.MANIFEST_TYPE,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "size": len(config), "digest": config_digest},
        "layers": [],
    }
    stored = session.send(
        "PUT",
        f"/v2/{repository}/manifests/{SHA}",
        f"repository:{repository}:pull,push",
        body=json.dumps(image).encode(),
        headers={"Content-Type": registry.MANIFEST_TYPE},
    )
    assert stored.status_code == 201

    found = client.lookup([("docker-image", SHA)])[("docker-image", SHA)]
    assert isinstance(found, registry.RegistryError)
    assert "not a SIF" in str(found) and "docker-image:" + SHA in str(found)


# ---------------------------------------------------------------- credentials (htpasswd and TLS)


def docker_config(path, key, user, password):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"auths": {key: {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}}}))
    return path


@pytest.mark.parametrize(
    "source", ["apptainer login", "apptainer login, own file", "DOCKER_CONFIG", "REGISTRY_AUTH_FILE", "~/.docker", "variable"]
)
def test_credentials_from_where_users_keep_them(tls_setup, sifs, source, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    environ = {"HOME": str(home)}
    host = tls_setup.server.host
    expected_file = None
    if source.startswith("apptainer login"):
        if source.endswith("own file"):
            # apptainer 1.4 writes its own file only when it exists already
            (home / ".apptainer").mkdir()
            (home / ".apptainer" / "docker-config.json").write_text("{}")
            expected_file = home / ".apptainer" / "docker-config.json"
        else:
            expected_file = home / ".docker" / "config.json"
        env = apptainer_home(home, {"SSL_CERT_FILE": str(tls_setup.ca.ca_file)})
        apptainer_login(host, env)
        assert host in json.loads(expected_file.read_text())["auths"]
    elif source == "DOCKER_CONFIG":
        environ["DOCKER_CONFIG"] = str(docker_config(tmp_path / "docker" / "config.json", f"https://{host}", USER, PASSWORD).parent)
    elif source == "REGISTRY_AUTH_FILE":
        environ["REGISTRY_AUTH_FILE"] = str(docker_config(tmp_path / "auth.json", f"{host}/lab", USER, PASSWORD))
    elif source == "~/.docker":
        docker_config(home / ".docker" / "config.json", host, USER, PASSWORD)
    else:
        environ[CREDENTIALS_VARIABLE] = f"{USER}:{PASSWORD}"

    client = tls_setup.client(environ=environ)
    client.push(sifs["small"], "credentials", SHA)
    assert client.lookup([("credentials", SHA)])[("credentials", SHA)] is not None
    if expected_file:
        assert client.session.credential.source.startswith(str(expected_file))


def test_no_credentials_is_one_line_saying_where_was_looked(tls_setup, tmp_path):
    client = tls_setup.client(environ={"HOME": str(tmp_path)})
    with pytest.raises(registry.AuthenticationError) as refused:
        client.lookup([("anything", SHA)])
    message = str(refused.value)
    assert_one_line(message)
    assert tls_setup.server.host in message and "anything:" + SHA in message
    assert f"${CREDENTIALS_VARIABLE}" in message and str(tmp_path / ".docker" / "config.json") in message


def test_wrong_password_is_one_line_naming_the_registry_without_the_secret(tls_setup, tmp_path):
    wrong = "Wr0ng-Pa55-xyz"
    client = tls_setup.client(environ={"HOME": str(tmp_path), CREDENTIALS_VARIABLE: f"{USER}:{wrong}"})
    with pytest.raises(registry.AuthenticationError) as refused:
        client.lookup([(f"image{index}", SHA) for index in range(3)])
    message = str(refused.value)
    assert_one_line(message, wrong, base64.b64encode(f"{USER}:{wrong}".encode()).decode())
    assert tls_setup.server.host in message and "refused the credentials" in message and f"${CREDENTIALS_VARIABLE}" in message


def test_a_registry_whose_ca_is_not_trusted_is_refused_not_spoken_to_in_plain_http(tls_setup, tmp_path):
    client = tls_setup.client(settings={"ca_file": ""}, environ={"HOME": str(tmp_path), CREDENTIALS_VARIABLE: f"{USER}:{PASSWORD}"})
    with pytest.raises(registry.UnreachableError) as refused:
        client.lookup([("anything", SHA)])
    assert_one_line(str(refused.value), PASSWORD)
    assert "TLS certificate not accepted" in str(refused.value) and tls_setup.server.host in str(refused.value)


# ---------------------------------------------------------------- token auth, chunked uploads


@pytest.fixture(scope="module")
def token_setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("token")
    service = TokenService(folder / "token", {USER: PASSWORD})
    try:
        with RegistryServer(folder / "registry", token_service=service) as server:
            yield Setup("token", server, None, {}), service
    finally:
        service.stop()


def test_bearer_tokens_from_the_registry_token_service(token_setup, sifs, tmp_path):
    setup, service = token_setup
    client = setup.client()
    client.push(sifs["small"], "tokens", SHA)
    found = client.lookup([("tokens", SHA), ("absent", SHA)])
    assert found[("absent", SHA)] is None
    client.pull(found[("tokens", SHA)], tmp_path / "tokens.sif", tmp_path / "tokens.sif.sha256")
    assert (tmp_path / "tokens.sif").read_bytes() == sifs["small"].read_bytes()
    scopes = {request.get("scope") for request in service.requests}
    assert {"repository:lab/binder/tokens:pull,push", "repository:lab/binder/tokens:pull"} <= scopes

    wrong = setup.client(environ={CREDENTIALS_VARIABLE: f"{USER}:not-{PASSWORD}"})
    with pytest.raises(registry.AuthenticationError) as refused:
        wrong.lookup([("tokens", SHA)])
    assert_one_line(str(refused.value), f"not-{PASSWORD}")
    assert setup.server.host in str(refused.value) and "refused the credentials" in str(refused.value)


def test_a_chunked_upload_is_what_apptainer_pulls(tmp_path, sifs):
    with RegistryServer(tmp_path / "registry") as server:
        setup = Setup("plain-http", server, None, apptainer_home(tmp_path / "home", {}))
        # plain HTTP as the setting asks (apptainer's --no-https), not as the loopback fallback
        setup.client(upload_chunk=16_384, settings={"plain_http": True}).push(sifs["small"], "chunked", SHA)
        chunks = -(-sifs["small"].stat().st_size // 16_384)
        assert server.log.read_text().count("PATCH /v2/lab/binder/chunked/blobs/uploads/") == chunks > 1
        apptainer("pull", str(tmp_path / "chunked.sif"), setup.oras("chunked", SHA), env=setup.apptainer_env)
        assert (tmp_path / "chunked.sif").read_bytes() == sifs["small"].read_bytes()


# ---------------------------------------------------------------- no registry


def closed_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_registry_that_does_not_answer_is_one_line(tmp_path):
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # accepts connections (the kernel does), never answers
        for port, reason in ((closed_port(), "connection refused"), (silent.getsockname()[1], "timed out")):
            settings = registry.RegistrySettings.from_url(f"oras://127.0.0.1:{port}/lab", mode="pull")
            client = registry.RegistryClient(settings, environ={}, progress=None, connect_timeout=1, read_timeout=1)
            with pytest.raises(registry.UnreachableError) as unreachable:
                client.pull_image("quiet", SHA, tmp_path / "quiet.sif", tmp_path / "quiet.sif.sha256")
            message = str(unreachable.value)
            assert_one_line(message)
            assert message == f"lookup of oras://127.0.0.1:{port}/lab/quiet:{SHA}: does not answer ({reason})"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "url, problem",
    [
        ("oras://ci:hunter2@registry.example.org/lab", "may not hold credentials"),
        ("oras://ci:hunter2/x@registry.example.org/lab", "may not hold credentials"),
        ("docker://registry.example.org/lab", "give an oras:// URL"),
        ("oras://registry.example.org/Lab", "not a valid repository name"),
        ("oras://registry example/lab", "is not a host[:port]"),
    ],
)
def test_a_registry_setting_that_cannot_work_is_one_line(url, problem):
    with pytest.raises(registry.InvalidRegistrySetting) as invalid:
        registry.RegistrySettings.from_url(url)
    assert problem in str(invalid.value)
    assert_one_line(str(invalid.value), "hunter2")


def test_settings_from_the_config_carry_no_secret():
    config = {"registry": "oras://registry.example.org:5000/lab/binder", "registry_mode": "pull", "registry_credentials_env": "CI_TOKEN"}
    settings = registry.RegistrySettings.from_config(config)
    assert (settings.host, settings.namespace, settings.mode) == ("registry.example.org:5000", "lab/binder", "pull")
    assert settings.reference("name", SHA) == f"registry.example.org:5000/lab/binder/name:{SHA}"
    assert registry.RegistrySettings.from_config({"registry": "oras://r.example.org/x"}) is None  # mode off


def test_challenge_and_auth_file_keys_are_read_as_registries_write_them():
    assert registry.parse_challenge('Bearer realm="https://auth.example.org/token",service="reg",scope="repository:a/b:pull,push"') == (
        "bearer",
        {"realm": "https://auth.example.org/token", "service": "reg", "scope": "repository:a/b:pull,push"},
    )
    assert registry.parse_challenge('Basic realm="r2s"') == ("basic", {"realm": "r2s"})
    for key in ("registry.example.org:5000", "https://registry.example.org:5000/v2/", "http://Registry.example.org:5000/v1/"):
        assert registry.normal_auth_key(key) == "registry.example.org:5000"


def test_credentials_found_print_without_their_secret(tmp_path):
    settings = registry.RegistrySettings.from_url("oras://registry.example.org/lab", credentials_variable="CI_LOGIN")
    docker_config(tmp_path / ".docker" / "config.json", "registry.example.org", "ci", "hunter2-secret")
    for environ in ({"HOME": str(tmp_path)}, {"HOME": str(tmp_path), "CI_LOGIN": "ci:hunter2-secret"}):
        credential = registry.CredentialFinder(settings, environ).find()
        assert credential.password == "hunter2-secret"
        # the repr is the credential's own (its source and user), without the password it holds
        assert "ci" in repr(credential) and "hunter2" not in repr(credential) and "hunter2" not in str(credential)
    token = registry.CredentialFinder(settings, {"CI_LOGIN": "ghp_only-a-token"}).find()
    assert token.token == "ghp_only-a-token" and "ghp_" not in repr(token)


class OneOriginRegistry:
    """A registry of the test's own, in plain HTTP on loopback, that asks for Basic credentials
    and answers an upload's start with a Location on another port: `elsewhere` keeps the
    Authorization headers it is sent there."""

    def __init__(self):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        received = self.received = []
        servers = self.servers = []

        class Elsewhere(BaseHTTPRequestHandler):
            def do_PUT(self):
                received.append(self.headers.get("Authorization"))
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(201)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_):
                pass

        servers.append(ThreadingHTTPServer(("127.0.0.1", 0), Elsewhere))
        other = servers[0].server_address[1]

        class Registry(BaseHTTPRequestHandler):
            def answer(self, status, headers=()):
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self):
                if self.headers.get("Authorization") != expected:
                    return self.answer(401, [("WWW-Authenticate", 'Basic realm="r2s"')])
                self.answer(200, [("Docker-Distribution-Api-Version", "registry/2.0")])

            def do_HEAD(self):
                self.answer(404 if self.headers.get("Authorization") == expected else 401, [("WWW-Authenticate", 'Basic realm="r2s"')])

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.answer(202, [("Location", f"http://127.0.0.1:{other}/upload/1")])

            def log_message(self, *_):
                pass

        servers.append(ThreadingHTTPServer(("127.0.0.1", 0), Registry))
        self.host = f"127.0.0.1:{servers[1].server_address[1]}"
        for server in servers:
            threading.Thread(target=server.serve_forever, daemon=True).start()

    def close(self):
        for server in self.servers:
            server.shutdown()
            server.server_close()


def test_credentials_go_only_to_the_registrys_own_scheme_host_and_port():
    """Issue 19 item 3: an upload's Location may name another host (or plain HTTP); the
    registry's credentials are not sent there."""
    fake = OneOriginRegistry()
    try:
        settings = registry.RegistrySettings.from_url(f"oras://{fake.host}/lab", credentials_variable=CREDENTIALS_VARIABLE, plain_http=True)
        with registry.RegistryClient(settings, {CREDENTIALS_VARIABLE: f"{USER}:{PASSWORD}"}) as client:
            body = b"blob"
            client.ensure_blob("lab/x", "repository:lab/x:pull,push", "sha256:" + hashlib.sha256(body).hexdigest(), len(body), lambda offset, length: io.BytesIO(body))
    finally:
        fake.close()
    assert fake.received == [None]


GOOD_RECEIPT = {"image_id": "sha256:" + "a" * 64, "tag": "r2s-x:" + SHA, "working_folder": "/home/jovyan", "home": "/home/jovyan", "labels": {}}


@pytest.mark.parametrize(
    "receipt",
    ["[1, 2]", json.dumps({**GOOD_RECEIPT, "home": "/../../home/u"}), json.dumps({**GOOD_RECEIPT, "working_folder": "relative"}), "{"],
    ids=["not an object", "home outside the sandbox", "relative working folder", "not JSON"],
)
def test_a_pulled_image_receipt_that_is_not_valid_is_one_line_and_nothing_is_pulled(tmp_path, sifs, receipt):
    """Issue 19 item 7: the receipt in the manifest becomes image.json, whose folders the
    server is started in; it is checked against the receipt's schema before anything is pulled."""
    with RegistryServer(tmp_path / "registry") as server:
        setup = Setup("plain-http", server, None, {})
        setup.client(settings={"plain_http": True}).push(sifs["small"], "bad", SHA, {shared_sifs.RECEIPT_ANNOTATION: receipt})
        settings = setup.settings(plain_http=True, mode="pull")
        usable, notes = shared_sifs.look_up(settings, [("bad", SHA)])
        assert usable == {} and len(notes) == 1 and "image receipt is not valid" in notes[0], notes
        out = tmp_path / "out"
        out.mkdir()
        with pytest.raises(StepError, match="image receipt is not valid") as failed:
            shared_sifs.pull(settings, "bad", SHA, out / "bad.sif", out / "bad.sif.sha256", out / "image.json", out / "pulled.json", out / "log")
    assert "\n" not in str(failed.value)
    assert sorted(path.name for path in out.iterdir()) == ["log"] or list(out.iterdir()) == []


def test_the_receipt_schema_takes_what_a_build_writes():
    image.check_receipt(GOOD_RECEIPT)
    image.check_receipt({**GOOD_RECEIPT, "working_folder": "/", "created": None, "size_bytes": 10, "engine": "docker"})
