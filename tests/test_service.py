"""The build service (issue 17) on a real Tornado server on loopback: the protocol of
docs/build-service.md ("The protocol") with a fast fake runner for our own logic, and real builds
of the example through the project's workflow. The same service set up by `setup.sh
build-service` on a host of its own, across hosts: tests/hosts/test_5_service.py."""

import concurrent.futures
import hashlib
import json
import subprocess

import pytest
import requests

from .git_http_server import GitHttpServer
from .service_server import Client, FakeRunner, ThreadServer, add_user, settings, wait_for


@pytest.fixture
def repo_url(make_repo):
    repo = make_repo("public")
    repo.commit("first")
    return f"file://{repo.path}", repo


@pytest.fixture
def start(tmp_path):
    """start(runner=None, **settings) -> (server, runner); users alice and bob exist."""
    servers = []

    def start_server(runner=None, **values):
        runner = runner or FakeRunner()
        work = tmp_path / "service"
        server = ThreadServer(settings(work, **values), runner)
        server.tokens = {name: add_user(work, name) for name in ("alice", "bob")}
        server.client = lambda name: Client(server.url, server.tokens[name])
        servers.append(server)
        return server, runner

    yield start_server
    for server in servers:
        server.stop()


def error_of(answer, status):
    assert answer.status_code == status, f"{answer.status_code}: {answer.text}"
    body = answer.json()
    assert set(body) == {"error"} and "\n" not in body["error"]
    return body["error"]


def test_every_api_path_needs_a_valid_token(start, repo_url):
    server, _ = start()
    for token in (None, "wrong", ""):
        client = Client(server.url, token)
        for path in ("/api/users/me", "/api/builds/0123456789abcdef", "/api/builds/0123456789abcdef/events", "/api/builds/0123456789abcdef/sif"):
            assert "token" in error_of(client.get(path), 401)
        assert "token" in error_of(client.build(repo_url[0]), 401)
    assert server.client("alice").get("/api/users/me").json() == {"name": "alice"}
    basic = requests.get(server.url + "/api/users/me", headers={"Authorization": "Basic " + server.tokens["alice"]}, timeout=10)
    error_of(basic, 401)


@pytest.mark.parametrize(
    "body, status, words",
    [
        ({"url": "not a url"}, 400, "spaces"),
        ({"url": "example.org/repo"}, 400, "not a git URL"),
        ({"url": "/etc"}, 400, "not a git URL"),
        ({"url": "ext::sh -c touch% /tmp/pwned"}, 400, "runs commands"),
        ({"url": "fd::3"}, 400, "runs commands"),
        ({"url": "ftp://example.org/repo.git"}, 400, "scheme"),
        ({"url": "https:///repo.git"}, 400, "no host"),
        ({"url": "-uhttps://x"}, 400, "'-'"),
        ({"url": "https://example.invalid/r.git", "ref": "--upload-pack=touch"}, 400, "may not start with '-'"),
        ({"url": "https://example.invalid/r.git", "image_name": "../../etc"}, 400, "not a name"),
        ({"url": "https://example.invalid/r.git", "image_name": "Upper"}, 400, "not a name"),
        ({"url": "https://example.invalid/r.git", "colour": "red"}, 400, "unknown key"),
        ({"url": 42}, 400, "must be a string"),
        ({}, 400, "url is missing"),
        ([1, 2], 400, "JSON object"),
        ("just a string", 400, "JSON object"),
    ],
)
def test_bad_input_is_one_line_and_starts_nothing(start, body, status, words):
    server, runner = start()
    assert words in error_of(server.client("alice").post("/api/builds", data=json.dumps(body)), status)
    assert runner.started == [] and server.service.queue.builds == {}


def test_bodies_that_are_not_json_or_too_long(start):
    server, runner = start()
    alice = server.client("alice")
    assert "not JSON" in error_of(alice.post("/api/builds", data=b"{nope"), 400)
    assert "not JSON" in error_of(alice.post("/api/builds", data=b"\xff\xfe"), 400)
    big = json.dumps({"url": "https://example.invalid/r.git", "ref": "x" * (65 * 1024)})
    assert "65536" in error_of(alice.post("/api/builds", data=big), 413)
    assert runner.started == []


def test_a_build_streams_its_phases_and_ends_with_the_sif(start, repo_url):
    url, repo = repo_url
    server, runner = start()
    alice = server.client("alice")
    answer = alice.build(url, "main", image_name="demo")
    assert answer.status_code == 200, answer.text
    build = answer.json()
    assert build["sha"] == repo.head() and build["image_name"] == "demo"
    assert build["events_url"] == f"/api/builds/{build['id']}/events" and build["sif_url"] == f"/api/builds/{build['id']}/sif"
    events = alice.events(build["id"])
    phases = [e["phase"] for e in events]
    assert phases[0] == "waiting" and phases[-1] == "built"
    assert phases.index("fetching") < phases.index("building") < phases.index("built")
    assert all(set(e) >= {"phase", "message"} and "\n" not in e["message"] for e in events)
    last = events[-1]
    sif = alice.get(build["sif_url"])
    assert sif.status_code == 200 and len(sif.content) == last["sif_size"] == runner.size
    assert hashlib.sha256(sif.content).hexdigest() == last["sif_sha256"] == sif.headers["X-Sif-Sha256"]
    assert sif.headers["Accept-Ranges"] == "bytes" and int(sif.headers["Content-Length"]) == runner.size
    assert last["sha"] == repo.head() and last["image_name"] == "demo"
    status = alice.get(f"/api/builds/{build['id']}").json()
    assert status["phase"] == "built" and status["sif_sha256"] == last["sif_sha256"] and status["sif_size"] == runner.size
    assert alice.get(f"/api/builds/{build['id']}/image").json() == {"image": "fake"}
    # the stream replays the whole build to a late client, and ends
    assert alice.events(build["id"]) == events
    # asked again: answered built at once, from the same build
    again = alice.build(url, "main").json()
    assert again["id"] == build["id"] and again["phase"] == "built" and runner.started == [build["id"]]


def test_range_resumes_the_download(start, repo_url):
    server, runner = start()
    alice = server.client("alice")
    build = alice.build(repo_url[0]).json()
    alice.events(build["id"])
    whole = alice.get(build["sif_url"]).content
    half = len(whole) // 2 + 7
    rest = alice.get(build["sif_url"], headers={"Range": f"bytes={half}-"})
    assert rest.status_code == 206 and rest.headers["Content-Range"] == f"bytes {half}-{len(whole) - 1}/{len(whole)}"
    assert whole[:half] + rest.content == whole
    assert rest.headers["X-Sif-Sha256"] == hashlib.sha256(whole).hexdigest()
    assert alice.get(build["sif_url"], headers={"Range": f"bytes={len(whole) + 10}-"}).status_code == 416


def held_build(start, url):
    """A build of `url` by alice, held in its building phase (runner.gate.set() lets it go on)."""
    runner = FakeRunner()
    runner.gate.clear()
    server, _ = start(runner)
    alice = server.client("alice")
    build = alice.build(url).json()
    wait_for(lambda: alice.get(f"/api/builds/{build['id']}").json()["phase"] == "building", 10, "no building phase")
    return server, runner, alice, build


def test_the_sif_and_receipt_wait_for_the_build(start, repo_url):
    server, runner, alice, build = held_build(start, repo_url[0])
    assert "not built" in error_of(alice.get(build["sif_url"]), 409)
    assert "not built" in error_of(alice.get(f"/api/builds/{build['id']}/image"), 409)
    runner.gate.set()
    assert alice.events(build["id"])[-1]["phase"] == "built"


def test_a_failed_build_says_why_and_a_new_request_builds_again(start, repo_url):
    server, runner = start(FakeRunner(fail="build_image: repo2docker failed: no such file"))
    alice = server.client("alice")
    build = alice.build(repo_url[0]).json()
    last = alice.events(build["id"])[-1]
    assert last == {"phase": "failed", "message": "build_image: repo2docker failed: no such file"}
    assert alice.get(f"/api/builds/{build['id']}").json()["error"] == last["message"]
    runner.fail = None
    again = alice.build(repo_url[0]).json()
    assert again["id"] != build["id"] and alice.events(again["id"])[-1]["phase"] == "built"


def test_an_unknown_ref_or_unreachable_repository_is_one_line(start, repo_url, tmp_path):
    server, runner = start()
    alice = server.client("alice")
    assert "not found" in error_of(alice.build(repo_url[0], "no-such-branch"), 400)
    assert "failed" in error_of(alice.build(f"file://{tmp_path}/nothing-here"), 400)
    assert runner.started == []


def test_another_users_build_is_404_and_public_builds_are_shared(start, repo_url, tmp_path):
    url, repo = repo_url
    server, runner = start()
    alice, bob = server.client("alice"), server.client("bob")
    public = alice.build(url).json()
    assert bob.build(url).json()["id"] == public["id"]
    assert len(runner.started) == 1
    assert bob.events(public["id"])[-1]["phase"] == "built"

    bare = tmp_path / "git" / "secret.git"
    bare.parent.mkdir()
    repo.git("clone", "--quiet", "--bare", str(repo.path), str(bare))
    git_server = GitHttpServer(bare.parent, {"alice": "alices-password", "bob": "bobs-password"})
    try:
        private_url = git_server.url("secret.git", "alice", "alices-password")
        answer = alice.build(private_url)
        assert answer.status_code == 200, answer.text
        private = answer.json()
        assert private["sha"] == repo.head()
        alice.events(private["id"])
        for path in ("", "/events", "/sif", "/image"):
            assert error_of(bob.get(f"/api/builds/{private['id']}{path}"), 404) == f"no build {private['id']}"
        # without credentials the repository does not answer; with his own, bob gets his own build
        refused = error_of(bob.build(git_server.url("secret.git")), 400)
        assert refused.startswith(f"git ls-remote failed for {git_server.url('secret.git')}: "), refused
        own = bob.build(git_server.url("secret.git", "bob", "bobs-password")).json()
        assert own["id"] not in (private["id"], public["id"])
        assert alice.build(private_url).json()["id"] == private["id"]
        assert error_of(alice.get(f"/api/builds/{own['id']}"), 404)
        bob.events(own["id"])
        # git got the password from the credential helper: it is in no file of the service
        work = tmp_path / "service"
        found = [p for p in work.rglob("*") if p.is_file() and b"alices-password" in p.read_bytes()]
        assert found == []
        assert any(user == "alice" for _, _, user, _ in git_server.seen)
    finally:
        git_server.stop()


def test_queue_positions_and_limits(start, make_repo):
    repos = []
    for index in range(4):
        repo = make_repo(f"r{index}")
        repo.commit(f"c{index}")
        repos.append(f"file://{repo.path}")
    runner = FakeRunner()
    runner.gate.clear()
    server, _ = start(runner, max_builds=1, max_builds_per_user=2, max_total_builds=3)
    alice, bob = server.client("alice"), server.client("bob")
    first = alice.build(repos[0]).json()
    second = alice.build(repos[1]).json()
    assert second["phase"] == "waiting" and second["queue_position"] == 1
    assert "per-user limit" in (line := error_of(alice.build(repos[2]), 429)) and "max_builds_per_user 2" in line
    # joining a build is no new build: no limit applies
    assert bob.build(repos[0]).json()["id"] == first["id"]
    third = bob.build(repos[2]).json()
    assert third["queue_position"] == 2
    assert "total limit" in (line := error_of(bob.build(repos[3]), 429)) and "max_total_builds 3" in line
    runner.gate.set()
    events = alice.events(second["id"])
    assert [e.get("queue_position") for e in events if e["phase"] == "waiting"] == [1]
    third_events = bob.events(third["id"])
    assert [e.get("queue_position") for e in third_events if e["phase"] == "waiting"] == [2, 1]
    assert len(runner.started) == 3
    assert bob.build(repos[3]).status_code == 200


def test_two_hundred_clients_asking_for_one_commit_get_one_build(start, repo_url):
    url, _ = repo_url
    runner = FakeRunner()
    runner.gate.clear()
    server, _ = start(runner)
    tokens = server.tokens

    def ask(index):
        client = Client(server.url, tokens["alice" if index % 2 else "bob"])
        return client.build(url).json()

    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(ask, range(200)))
    assert len({a["id"] for a in answers}) == 1 and len(runner.started) == 1
    runner.gate.set()
    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        finals = list(pool.map(lambda i: Client(server.url, tokens["alice"]).events(answers[0]["id"])[-1], range(200)))
    assert len({f["sif_sha256"] for f in finals}) == 1 and finals[0]["phase"] == "built"


def test_heartbeat_and_a_client_that_leaves(start, repo_url):
    runner = FakeRunner()
    runner.gate.clear()
    server, _ = start(runner, heartbeat_seconds=0.2)
    alice = server.client("alice")
    build = alice.build(repo_url[0]).json()
    lines = []
    with alice.session.get(f"{server.url}{build['events_url']}", stream=True, timeout=30) as answer:
        for line in answer.iter_lines(decode_unicode=True):
            lines.append(line)
            if lines.count(": heartbeat") == 2:
                break  # the client leaves mid-build
    assert lines[0].startswith("data: ")
    runner.gate.set()
    wait_for(lambda: alice.get(f"/api/builds/{build['id']}").json()["phase"] == "built", 20, "the build did not go on")
    again = alice.build(repo_url[0]).json()
    assert (again["id"], again["phase"], again["queue_position"]) == (build["id"], "built", None)


def test_a_restart_mid_build_fails_the_build_and_never_serves_part_of_a_sif(start, repo_url, tmp_path):
    server, runner, alice, build = held_build(start, repo_url[0])
    partial = tmp_path / "service" / "builds" / build["id"] / f"{build['image_name']}.sif"
    partial.write_bytes(b"half a SIF")
    server.stop()  # as if killed: nothing told the build
    again, runner2 = start()
    alice = again.client("alice")
    last = alice.events(build["id"])[-1]
    assert last["phase"] == "failed" and "restarted" in last["message"]
    assert error_of(alice.get(build["sif_url"]), 409)
    fresh = alice.build(repo_url[0]).json()
    assert fresh["id"] != build["id"] and alice.events(fresh["id"])[-1]["phase"] == "built"
    assert runner2.started == [fresh["id"]]


@pytest.fixture
def example_repo(make_repo):
    """The bundled example as a repository of its own (a build takes a URL, not a folder)."""
    import shutil

    from .service_server import PROJECT

    repo = make_repo("example")
    shutil.copytree(PROJECT / "example", repo.path, dirs_exist_ok=True)
    repo.commit("the example")
    return repo


def test_real_builds_through_the_workflow_and_a_restart_mid_build(tmp_path, example_repo):
    import subprocess

    from .service_server import ProcessServer, write_settings

    work = tmp_path / "service"
    config = write_settings(tmp_path / "service.yaml", work_dir=str(work), port=0, allowed_schemes=["file", "http"], max_builds=1, heartbeat_seconds=5)
    token = add_user(work, "alice")
    server = ProcessServer(config)
    try:
        alice = Client(server.url, token)
        url = f"file://{example_repo.path}"
        build = alice.build(url, "main", image_name="example").json()
        events = alice.events(build["id"])
        phases = [e["phase"] for e in events]
        assert phases[-1] == "built", events[-5:]
        assert phases.index("fetching") < phases.index("building")
        assert any("rule build_sif" in e["message"] for e in events)
        assert any(e["message"].startswith("[build_image] ") for e in events), "no line of repo2docker's log"
        final = events[-1]
        assert final["sha"] == example_repo.head() and final["image_name"] == "example"
        sif = tmp_path / "example.sif"
        with alice.session.get(server.url + build["sif_url"], stream=True, timeout=600) as answer:
            with open(sif, "wb") as handle:
                for chunk in answer.iter_content(1 << 20):
                    handle.write(chunk)
        digest = subprocess.run(["sha256sum", sif], capture_output=True, text=True, check=True).stdout.split()[0]
        assert digest == final["sif_sha256"] and sif.stat().st_size == final["sif_size"]
        inspected = subprocess.run(["apptainer", "inspect", "--json", "--labels", str(sif)], capture_output=True, text=True, check=True)
        labels = json.loads(inspected.stdout)["data"]["attributes"]["labels"]
        assert labels["repo2singularity.repo"] == url
        assert labels["repo2singularity.sha"] == example_repo.head() == labels["repo2docker.ref"]
        receipt = alice.get(f"/api/builds/{build['id']}/image").json()
        assert receipt["tag"] == f"r2s-example:{example_repo.head()}"

        # a private repository: git gets the password from the credential helper, in the
        # workflow's clone too, and it is written nowhere
        bare = tmp_path / "git" / "private.git"
        bare.parent.mkdir()
        example_repo.git("clone", "--quiet", "--bare", str(example_repo.path), str(bare))
        git_server = GitHttpServer(bare.parent, {"alice": "alices-password"})
        try:
            private = alice.build(git_server.url("private.git", "alice", "alices-password"), "main", image_name="example").json()
            assert "id" in private, private
            private_events = alice.events(private["id"])
            assert private_events[-1]["phase"] == "built", private_events[-5:]
            assert private["id"] != build["id"] and private_events[-1]["sha"] == build["sha"]
            assert [p for p in tmp_path.rglob("*") if p.is_file() and b"alices-password" in p.read_bytes()] == []
            assert not any("alices-password" in e["message"] for e in private_events)
            assert ("GET", "/private.git/info/refs", "alice", True) in git_server.seen
        finally:
            git_server.stop()

        # a new commit, and the service stopped while it builds: the client is told it failed
        example_repo.commit("second", {"extra.txt": "more"})
        second = alice.build(url, "main", image_name="example").json()
        seen = []
        with alice.session.get(server.url + second["events_url"], stream=True, timeout=600) as answer:
            for line in answer.iter_lines(decode_unicode=True):
                if line.startswith("data: "):
                    seen.append(json.loads(line[6:]))
                    if seen[-1]["phase"] == "building" and len(seen) > 3:
                        server.stop()
        assert seen[-1]["phase"] == "failed" and "stopped during this build" in seen[-1]["message"]
    finally:
        server.stop(sig=9)
    server = ProcessServer(config)
    try:
        alice = Client(server.url, token)
        assert alice.events(second["id"])[-1]["phase"] == "failed"
        assert error_of(alice.get(second["sif_url"]), 409)
        # the first commit's SIF outlived the restart: answered at once
        example_repo.git("checkout", "--quiet", "-b", "old", build["sha"])
        cached = alice.build(url, "old").json()
        assert (cached["id"], cached["phase"], cached["sif_sha256"]) == (build["id"], "built", final["sif_sha256"])
    finally:
        server.stop()


def sign_in(server, name):
    """A browser-like session: the XSRF cookie from the sign-in page, then the token posted."""
    session = requests.Session()
    page = session.get(server.url + "/", timeout=10)
    assert page.status_code == 200 and 'name="token"' in page.text
    answer = session.post(
        server.url + "/sign-in", data={"token": server.tokens[name], "_xsrf": session.cookies["_xsrf"], "next": "/"}, timeout=10
    )
    assert answer.status_code == 200 and "build-form" in answer.text
    return session


def test_cookie_sign_in_and_what_works_without_it(start, repo_url):
    server, runner = start()
    anonymous = requests.Session()
    assert 'name="token"' in anonymous.get(server.url + "/", timeout=10).text
    launch = anonymous.get(f"{server.url}/v2/git/{requests.utils.quote(repo_url[0], safe='')}/main", timeout=10)
    assert 'name="token"' in launch.text and runner.started == []
    wrong = anonymous.post(server.url + "/sign-in", data={"token": "nope", "_xsrf": anonymous.cookies["_xsrf"]}, timeout=10)
    assert wrong.status_code == 401 and "not valid" in wrong.text
    badge = anonymous.get(server.url + "/badge.svg", timeout=10)
    assert badge.headers["Content-Type"] == "image/svg+xml" and badge.text.startswith("<svg")

    session = sign_in(server, "alice")
    assert session.get(server.url + "/api/users/me", timeout=10).json() == {"name": "alice"}
    body = {"url": repo_url[0], "ref": "main"}
    assert "XSRF" in error_of(session.post(server.url + "/api/builds", json=body, timeout=10), 403)
    answer = session.post(server.url + "/api/builds", json=body, headers={"X-XSRFToken": session.cookies["_xsrf"]}, timeout=10)
    assert answer.status_code == 200, answer.text
    # a new token for alice ends the sessions of the old one
    add_user(server.service.settings["work_dir"], "alice")
    error_of(session.get(server.url + "/api/users/me", timeout=10), 401)
    credentials = requests.utils.quote("https://alice:secret@example.org/r.git", safe="")
    assert "cannot carry credentials" in sign_in(server, "bob").get(f"{server.url}/v2/git/{credentials}/main", timeout=10).text


def test_the_web_page_shows_the_live_log_and_the_download_in_chromium(start, repo_url, tmp_path):
    from repo2singularity.service.web import launch_path

    from .chromium import Chromium

    url, repo = repo_url
    runner = FakeRunner()
    runner.gate.clear()
    server, _ = start(runner)
    browser = Chromium(tmp_path / "chromium-profile")
    try:
        browser.navigate(server.url + launch_path(url, "main"))
        assert browser.evaluate("!!document.getElementById('token')"), "no sign-in form"
        browser.evaluate(f"document.getElementById('token').value = {json.dumps(server.tokens['alice'])}; document.querySelector('form').submit(); true")
        browser.wait_for("document.getElementById('user') && document.getElementById('user').textContent === 'alice'", 20, "not signed in")
        # the launch URL started the build; its log arrives while it runs
        browser.wait_for("document.getElementById('log').textContent.includes('Step 1/2 : FROM debian')", 20, "no live log line")
        assert browser.evaluate("document.querySelector('#phases span.current').dataset.phase") == "building"
        assert browser.evaluate("document.getElementById('result').hidden") is True
        runner.gate.set()
        browser.wait_for("!document.getElementById('result').hidden", 20, "no download link")
        build_id = runner.started[0]
        assert browser.evaluate("document.getElementById('download').getAttribute('href')") == f"/api/builds/{build_id}/sif"
        assert browser.evaluate("document.querySelector('#phases span.current').dataset.phase") == "built"
        log = browser.evaluate("document.getElementById('log').textContent")
        assert "Step 2/2 : RUN true" in log and "built" in log
        command = browser.evaluate("document.getElementById('launch-command').textContent")
        assert f"--endpoint-url {server.url}" in command and f"--ref {repo.head()}" in command and command.endswith(f"'{url}'")
        # the link downloads the SIF with the sign-in cookie
        status = browser.evaluate("fetch(document.getElementById('download').href).then(r => r.status + ' ' + r.headers.get('X-Sif-Sha256'))")
        sha256 = server.service.queue.builds[build_id].sif_sha256
        assert status == f"200 {sha256}"
        # the form builds what it is given, and a refusal is one line on the page
        browser.evaluate("document.getElementById('url').value = 'ext::sh'; document.getElementById('start').click(); true")
        browser.wait_for("document.getElementById('status').textContent.includes('runs commands')", 20, "no refusal shown")
    finally:
        browser.close()


def self_signed_certificate(folder):
    """A certificate as `setup.sh build-service` makes one when given none: self-signed, for localhost."""
    folder.mkdir(parents=True, exist_ok=True)
    certificate, key = folder / "service.crt", folder / "service.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", key, "-out", certificate],
        check=True, capture_output=True,
    )  # fmt: skip
    printed = subprocess.run(["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", certificate], check=True, capture_output=True, text=True)
    return certificate, key, printed.stdout.strip().split("=", 1)[1]


def test_a_self_signed_certificate_is_named_in_the_pages_commands(tmp_path):
    """Found in tests/hosts: with set-up's self-signed certificate, the page's commands failed on
    the login node (TLS certificate not accepted) for want of --ca-file; now they name the copy
    users get from the administrator, and the page shows the fingerprint to check it by."""
    from repo2singularity.service.web import self_signed_fingerprint

    from .registry_server import CertificateAuthority

    certificate, key, fingerprint = self_signed_certificate(tmp_path / "tls")
    assert self_signed_fingerprint(str(certificate)) == fingerprint
    assert self_signed_fingerprint(str(CertificateAuthority(tmp_path / "ca").certificate_file)) == ""
    assert self_signed_fingerprint("") == ""
    work = tmp_path / "service"
    server = ThreadServer(settings(work, tls_cert=str(certificate), tls_key=str(key)), FakeRunner())
    try:
        token = add_user(work, "alice")
        session = requests.Session()
        session.verify = str(certificate)
        session.get(server.url + "/", timeout=10)
        page = session.post(server.url + "/sign-in", data={"token": token, "_xsrf": session.cookies["_xsrf"], "next": "/"}, timeout=10).text
        assert f'<code id="certificate-fingerprint">{fingerprint}</code>' in page
        assert 'const CA_FILE = true ? "service.crt" : "";' in page
    finally:
        server.stop()


def test_a_plain_or_ca_issued_service_names_no_certificate(start):
    server, _ = start()
    page = sign_in(server, "alice").get(server.url + "/", timeout=10).text
    assert 'id="certificate-note"' not in page and 'const CA_FILE = false ? "service.crt" : "";' in page
