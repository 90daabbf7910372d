"""`setup.sh login remote`'s check of builder.yaml (repo2singularity/login_check.py): the settings
as the workflow reads them, one line per finding. The login journey itself runs in tests/hosts."""

import shutil

import paramiko

from repo2singularity import login_check

from .workflow_runner import PROJECT

SHIPPED = PROJECT / "profiles" / "remote" / "builder.yaml"


def lines(path, **environ):
    return [("ok: " if ok else "MISSING: ") + text for ok, text in login_check.findings(path, environ)]


def builder_yaml(tmp_path, text):
    path = tmp_path / "builder.yaml"
    path.write_text(text)
    return path


def test_the_shipped_file_asks_for_the_host_and_names_the_missing_key(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    path = tmp_path / "builder.yaml"
    shutil.copy(SHIPPED, path)
    found = lines(path)
    assert found[0] == f"MISSING: {path}: fill in host (and port, user): the lines `bash setup.sh builder ACCOUNT` printed on the builder"
    assert found[1].startswith(f"MISSING: an SSH key: {tmp_path}/.ssh/id_ed25519 (key_file in {path}) does not exist")
    assert len(found) == 2


def test_a_filled_in_file_with_a_known_host_and_a_key_is_content(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    ssh = tmp_path / ".ssh"
    ssh.mkdir()
    private = paramiko.RSAKey.generate(2048)  # paramiko writes no ed25519 keys; the name is only a file name
    private.write_private_key_file(str(ssh / "id_ed25519"))
    (ssh / "known_hosts").write_text(f"[builder.test]:2222 {private.get_name()} {private.get_base64()}\n")
    path = builder_yaml(tmp_path, "builder:\n  host: builder.test\n  port: 2222\n  user: build\n")
    assert lines(path) == [
        f"ok: builder build@builder.test:2222 ({path})",
        f"ok: the builder's host key is in {ssh}/known_hosts",
        f"ok: SSH key {ssh}/id_ed25519",
    ]
    # another port is another known_hosts entry, as ssh has it
    other = builder_yaml(tmp_path, "builder:\n  host: builder.test\n  user: build\n")
    assert lines(other)[1].startswith("MISSING: the builder's host key: builder.test is not in ")


def test_a_build_service_needs_its_url_and_the_token_in_the_environment(tmp_path):
    no_url = builder_yaml(tmp_path, "builder:\n  kind: http\n")
    assert lines(no_url) == [f"MISSING: {no_url}: fill in url (the build service, e.g. https://builder.example:8443) under builder:"]
    path = builder_yaml(tmp_path, "builder:\n  kind: http\n  url: https://builds.test:8443\n  token_env: MY_TOKEN\n  ca_file: /nonexistent/ca.pem\n")
    assert lines(path) == [
        f"ok: build service https://builds.test:8443 ({path})",
        "MISSING: your token for the build service: export MY_TOKEN=... (its administrator gives it to you)",
        f"MISSING: {path}: ca_file /nonexistent/ca.pem is not readable",
    ]
    assert lines(path, MY_TOKEN="t")[1] == "ok: your token for the build service is in $MY_TOKEN"


def test_what_the_workflow_would_refuse_is_one_line(tmp_path):
    assert lines(builder_yaml(tmp_path, "builder: [")) [0].startswith("MISSING: ")
    assert len(lines(builder_yaml(tmp_path, "builder: ["))) == 1
    assert lines(builder_yaml(tmp_path, "other: 1\n")) == [f"MISSING: {tmp_path}/builder.yaml: no builder: mapping"]
    wrong = lines(builder_yaml(tmp_path, "builder:\n  host: h\n  port: many\n"))
    assert len(wrong) == 1 and wrong[0].startswith(f"MISSING: {tmp_path}/builder.yaml: ") and "port" in wrong[0]
    credentials = lines(builder_yaml(tmp_path, "builder:\n  kind: http\n  url: https://u:secret@builds.test\n"))
    assert len(credentials) == 1 and "may not hold credentials" in credentials[0] and "secret" not in credentials[0]
