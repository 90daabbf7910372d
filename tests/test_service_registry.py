"""The build service with a registry (issue 17): the service as its own process on loopback, real
builds through the workflow, and Debian's docker-registry (TLS with a CA made here, htpasswd).
A public build is pushed with its provenance; a fresh service asked for the same commit answers
from the registry without a Docker build; a private build never reaches it; the registry's
password is in no event, log or file; a registry that is down costs the push, not the build."""

import base64
import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import requests

from repo2singularity import registry
from repo2singularity.shared_sifs import RECEIPT_ANNOTATION

from .conftest import GitRepo, files_holding
from .git_http_server import GitHttpServer
from .registry_server import free_port, tls_registry_in
from .service_server import Client, ProcessServer, add_user, write_settings

pytestmark = pytest.mark.integration

USER, PASSWORD = "dora", "Registry-Pa55-of-the-service"
VARIABLE = "R2S_TEST_SERVICE_REGISTRY_LOGIN"
NAMESPACE = "lab/service"
NAME = "svcreg"


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A small repository (a Dockerfile), built in seconds once Docker has its base image."""
    repo = GitRepo(tmp_path_factory.mktemp("service-registry") / "repo")
    repo.commit("first", {"Dockerfile": "FROM debian:bookworm\nRUN echo service-registry > /service-registry\n"})
    return repo


@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory):
    with tls_registry_in(tmp_path_factory.mktemp("service-tls-registry"), {USER: PASSWORD}) as running:
        yield running


def registry_client(tls_registry):
    server, ca = tls_registry
    settings = registry.RegistrySettings.from_url(server.url(NAMESPACE), mode="pull", credentials_variable=VARIABLE, ca_file=str(ca.ca_file))
    return registry.RegistryClient(settings, environ={VARIABLE: f"{USER}:{PASSWORD}", "HOME": "/nonexistent"}, progress=None)


def tags(tls_registry, name):
    server, ca = tls_registry
    answer = requests.get(f"{server.base_url}/v2/{NAMESPACE}/{name}/tags/list", auth=(USER, PASSWORD), verify=str(ca.ca_file), timeout=30)
    return [] if answer.status_code == 404 else answer.json()["tags"] or []


class Service:
    """The service as a process, with a work folder of its own and the user alice."""

    def __init__(self, folder, registry_settings, env=None):
        self.work = folder / "service"
        config = write_settings(
            folder / "service.yaml", work_dir=str(self.work), port=0, allowed_schemes=["file", "http"], heartbeat_seconds=5, registry=registry_settings
        )
        token = add_user(self.work, "alice")
        self.server = ProcessServer(config, env=env)
        self.alice = Client(self.server.url, token)

    def build(self, url, name=NAME):
        """(the build's first answer, its events to the end)."""
        build = self.alice.build(url, "main", image_name=name).json()
        assert "id" in build, build
        return build, self.alice.events(build["id"])

    def download(self, build, target):
        with self.alice.session.get(self.server.url + build["sif_url"], stream=True, timeout=600) as answer:
            assert answer.status_code == 200, answer.text
            with open(target, "wb") as handle:
                for chunk in answer.iter_content(1 << 20):
                    handle.write(chunk)
        return sha256(target)

    def work_folder(self, build):
        return self.work / "builds" / build["id"] / "work"

    def log(self):
        return self.server.log.read_text()

    def stop(self):
        self.server.stop()


def tls_settings(tls_registry, **extra):
    server, ca = tls_registry
    return {"url": server.url(NAMESPACE), "credentials_env": VARIABLE, "ca_file": str(ca.ca_file), **extra}


def messages(events):
    return "\n".join(event["message"] for event in events)


def assert_no_secret(service, events, *folders):
    assert PASSWORD not in messages(events) and PASSWORD not in service.log()
    assert files_holding(PASSWORD, service.work, *folders) == ""


@pytest.fixture(scope="module")
def pushed(repo, tls_registry, tmp_path_factory):
    """A public build through a service with the registry set (credentials in the variable the
    settings name): (its events, the downloaded SIF's sha256, the service's work folder)."""
    folder = tmp_path_factory.mktemp("pushing-service")
    service = Service(folder, tls_settings(tls_registry), env={VARIABLE: f"{USER}:{PASSWORD}"})
    try:
        build, events = service.build(f"file://{repo.path}")
        assert events[-1]["phase"] == "built", messages(events[-15:])
        digest = service.download(build, folder / "downloaded.sif")
        config = json.loads((service.work_folder(build) / "service-build.json").read_text())
        receipt = service.alice.get(f"/api/builds/{build['id']}/image").json()
        assert_no_secret(service, events)
    finally:
        service.stop()
    return events, digest, config, receipt


def test_a_public_build_is_pushed_with_its_provenance(pushed, repo, tls_registry):
    events, digest, config, _ = pushed
    phases = [event["phase"] for event in events]
    assert "building" in phases and phases.index("building") < phases.index("pushing") < phases.index("built")
    assert any("rule push_sif" in event["message"] for event in events)
    assert events[-1]["sif_sha256"] == digest
    assert tags(tls_registry, NAME) == [repo.head()]
    with registry_client(tls_registry) as client:
        found = client.lookup_one(NAME, repo.head())
    assert found is not None and found.sif_sha256 == digest
    assert found.annotations["org.opencontainers.image.revision"] == repo.head()
    assert found.annotations["org.opencontainers.image.source"] == f"file://{repo.path}"
    assert json.loads(found.annotations[RECEIPT_ANNOTATION])["labels"]["repo2singularity.sha"] == repo.head()
    # the build's config names the variable; its value is in the service's environment only
    assert (config["registry_mode"], config["registry_credentials_env"]) == ("push", VARIABLE)
    assert PASSWORD not in json.dumps(config)


def test_a_fresh_service_answers_a_commit_the_registry_holds_without_a_build(pushed, repo, tls_registry, tmp_path):
    """The service's own SIFs are gone (a new work_dir) and so is the Docker image: the SIF comes
    from the registry, no build step runs, and it is the very SIF that was pushed. Credentials
    from an auth file this time, the other way the service takes them."""
    _, first_digest, _, receipt = pushed
    subprocess.run(["docker", "image", "rm", receipt["tag"]], capture_output=True, check=False)
    assert subprocess.run(["docker", "image", "inspect", receipt["tag"]], capture_output=True).returncode != 0
    auth_file = tmp_path / "registry-auth.json"
    server, _ = tls_registry
    login = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    auth_file.write_text(json.dumps({"auths": {server.host: {"auth": login}}}))
    auth_file.chmod(0o600)
    service = Service(tmp_path, tls_settings(tls_registry, credentials_env="", auth_file=str(auth_file)))
    try:
        build, events = service.build(f"file://{repo.path}")
        assert events[-1]["phase"] == "built", messages(events[-15:])
        phases = {event["phase"] for event in events}
        assert phases == {"waiting", "fetching", "built"}, phases
        text = messages(events)
        assert "rule pull_sif" in text and "rule build_image" not in text and "[build_image]" not in text
        assert f"from oras://{server.host}/{NAMESPACE}/{NAME}:{repo.head()}" in text
        assert events[-1]["sif_sha256"] == first_digest == service.download(build, tmp_path / "pulled.sif")
        logs = service.work_folder(build) / "results" / NAME / repo.head() / "logs"
        assert not list(logs.glob("build_image*")) and not (logs.parent / "source").exists()
        assert subprocess.run(["docker", "image", "inspect", receipt["tag"]], capture_output=True).returncode != 0
        assert_no_secret(service, events)
    finally:
        service.stop()


def test_a_private_build_is_never_pushed(repo, tls_registry, tmp_path):
    """A URL with credentials: built from its commit (even one the registry holds), and neither
    looked up nor pushed; its workflow does not even get the registry's variable."""
    bare = tmp_path / "git" / "private.git"
    bare.parent.mkdir()
    repo.git("clone", "--quiet", "--bare", str(repo.path), str(bare))
    git_server = GitHttpServer(bare.parent, {"alice": "alices-password"})
    service = Service(tmp_path, tls_settings(tls_registry), env={VARIABLE: f"{USER}:{PASSWORD}"})
    try:
        for name in (NAME, f"{NAME}-private"):
            build, events = service.build(git_server.url("private.git", "alice", "alices-password"), name)
            assert events[-1]["phase"] == "built", messages(events[-15:])
            assert "pushing" not in {event["phase"] for event in events}
            text = messages(events)
            assert "rule build_image" in text and "rule pull_sif" not in text and "push_sif" not in text
            config = json.loads((service.work_folder(build) / "service-build.json").read_text())
            assert not [key for key in config if key.startswith("registry")]
            assert "alices-password" not in text
        assert tags(tls_registry, f"{NAME}-private") == []
        assert_no_secret(service, events)
    finally:
        service.stop()
        git_server.stop()


def test_a_registry_that_is_down_costs_the_push_not_the_build(repo, tmp_path):
    """Nothing listens at the registry's address: the lookup says so in one line, the image is
    built, the push fails in one line, and the build ends `built` with its SIF served."""
    new = repo.commit("down", {"down.txt": "a commit the registry never saw\n"})
    address = f"127.0.0.1:{free_port()}"
    down = {"url": f"oras://{address}/{NAMESPACE}", "plain_http": True}
    service = Service(tmp_path, down)
    try:
        build, events = service.build(f"file://{repo.path}")
        assert events[-1]["phase"] == "built", messages(events[-15:])
        assert events[-1]["sha"] == new
        text = messages(events)
        assert "Traceback" not in text
        lookups = [event["message"] for event in events if event["message"].startswith("repo2singularity: ") and "its push tried after" in event["message"]]
        assert len(lookups) == 1, text
        served = [event for event in events if event["message"].startswith("not pushed, served by this service only: push_sif: ")]
        assert len(served) == 1 and served[0]["phase"] == "pushing", text
        assert address in served[0]["message"] and address in lookups[0]
        assert service.download(build, tmp_path / "built.sif") == events[-1]["sif_sha256"]
    finally:
        service.stop()


def test_credentials_the_registry_refuses_cost_the_push_and_are_never_shown(repo, tls_registry, tmp_path):
    """A wrong password in the named variable: as a registry that is down, in one line that
    names the credentials and not the password; the build is served."""
    wrong = "Not-the-Pa55word-of-the-service"
    service = Service(tmp_path, tls_settings(tls_registry), env={VARIABLE: f"{USER}:{wrong}"})
    try:
        build, events = service.build(f"file://{repo.path}")
        assert events[-1]["phase"] == "built", messages(events[-15:])
        served = [event["message"] for event in events if event["message"].startswith("not pushed, served by this service only: ")]
        assert len(served) == 1 and "credentials" in served[0], messages(events[-15:])
        assert wrong not in messages(events) and wrong not in service.log()
        assert files_holding(wrong, service.work) == ""
        assert repo.head() not in tags(tls_registry, NAME)
    finally:
        service.stop()


def test_the_settings_refuse_a_registry_they_cannot_use(tmp_path):
    """One line at start, and no secret echoed: a URL with credentials, no URL, or registry
    settings in workflow_config (private builds would reach the registry)."""
    from repo2singularity.service import settings

    cases = [
        ({"registry": {"url": "oras://user:Secret-1@registry.example.org/lab"}}, "may not hold credentials"),
        ({"registry": {"credentials_env": VARIABLE}}, "url is missing"),
        ({"registry": {"url": "docker://registry.example.org/lab"}}, "oras:// URL"),
        ({"registry": {"url": "oras://registry.example.org/lab", "credentials_env": "NOT-A-NAME"}}, "credentials_env"),
        ({"workflow_config": {"registry": "oras://registry.example.org/lab"}}, "service's `registry` setting"),
    ]
    for values, words in cases:
        with pytest.raises(settings.SettingsError) as error:
            settings.check({"work_dir": str(tmp_path), **values})
        assert words in str(error.value) and "\n" not in str(error.value) and "Secret-1" not in str(error.value)
    accepted = settings.check({"work_dir": str(tmp_path), "registry": {"url": "oras://127.0.0.1:5000/lab"}})
    assert accepted["registry"] == {"url": "oras://127.0.0.1:5000/lab", "credentials_env": "", "auth_file": "", "ca_file": "", "plain_http": False}


def test_only_public_builds_get_the_registry_and_its_credentials(monkeypatch):
    """Our own logic: what each build's workflow is given (config and environment)."""
    from types import SimpleNamespace

    from repo2singularity.service import settings
    from repo2singularity.service.git_access import GitAccess
    from repo2singularity.service.runner import WorkflowRunner

    monkeypatch.setenv(VARIABLE, f"{USER}:{PASSWORD}")
    values = settings.check({"registry": {"url": "oras://127.0.0.1:5000/lab", "credentials_env": VARIABLE, "auth_file": "/etc/r2s/auth.json"}})
    runner = WorkflowRunner(registry=values["registry"])
    public = SimpleNamespace(url="https://example.org/r.git", sha="a" * 40, image_name="r", private=False, access=GitAccess("https://example.org/r.git"))
    private_url = "https://alice:alices-password@example.org/r.git"
    private = SimpleNamespace(url="https://example.org/r.git", sha="a" * 40, image_name="r", private=True, access=GitAccess(private_url))
    config = runner.config(public)
    assert {key: value for key, value in config.items() if key.startswith("registry")} == {
        "registry": "oras://127.0.0.1:5000/lab",
        "registry_mode": "push",
        "registry_credentials_env": VARIABLE,
        "registry_ca_file": "",
        "registry_plain_http": False,
    }
    env = runner.environment(public)
    assert env[VARIABLE] == f"{USER}:{PASSWORD}" and env["REGISTRY_AUTH_FILE"] == "/etc/r2s/auth.json"
    assert not [key for key in runner.config(private) if key.startswith("registry")]
    env = runner.environment(private)
    assert VARIABLE not in env and "REGISTRY_AUTH_FILE" not in env
    assert not [key for key in WorkflowRunner().config(public) if key.startswith("registry")]


def test_a_registry_note_is_never_the_reason_a_build_failed():
    from repo2singularity.service.runner import failure_line

    output = [
        "repo2singularity: lookup of oras://127.0.0.1:1/lab/x:abc: does not answer (connection refused); what is missing is built, and its push tried after",
        "build_image: repo2docker failed (exit status 1); see results/x/abc/logs/build_image.log",
        "Error in rule build_image:",
        "Shutting down, this might take some time.",
    ]
    assert failure_line(output, 1).startswith("build_image: repo2docker failed")
