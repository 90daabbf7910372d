"""The HTTP builder (`builder: {kind: http}`, issue 17's client side): unit tests of its own
logic here; against the real build service on loopback in test_http_builder_service.py."""

import json
import os
import subprocess
import sys
import time

import pytest
import requests

from repo2singularity import builders
from repo2singularity.builders import InvalidBuilder, http
from repo2singularity.image import ImageSpec
from repo2singularity.repository import Repository
from repo2singularity.step import StepError

SHA = "a" * 40


def config(**builder):
    return {"builder": {"kind": "http", "url": "https://builder.example:8443", "token_env": "R2S_SERVICE_TOKEN", "ca_file": "", **builder}}


def test_the_kind_is_registered_and_fetches_its_own_source():
    assert builders.builder_class(config()) is http.HTTPBuilder
    assert http.HTTPBuilder.fetches_source and not builders.Builder.kinds["local"].fetches_source


@pytest.mark.parametrize(
    "url, base",
    [
        ("https://builder.example:8443", "https://builder.example:8443"),
        ("https://builder.example/api", "https://builder.example"),
        ("https://builder.example/api/", "https://builder.example"),
        ("HTTPS://builder.example/r2s/api", "https://builder.example/r2s"),
        ("http://127.0.0.1:8000/api", "http://127.0.0.1:8000"),
        ("http://localhost:8000", "http://localhost:8000"),
    ],
)
def test_service_url(url, base):
    assert http.service_url(url) == base


@pytest.mark.parametrize(
    "url, says",
    [
        ("http://builder.example", "plain http"),
        ("https://me:secret@builder.example", "may not hold credentials"),
        ("ftp://builder.example", "not an http(s) URL"),
        ("https://builder.example/api?x=1", "query"),
        ("builder.example", "not an http(s) URL"),
    ],
)
def test_bad_service_urls_are_one_line(url, says):
    with pytest.raises(InvalidBuilder) as caught:
        http.service_url(url)
    assert says in str(caught.value) and "\n" not in str(caught.value)
    assert "secret" not in str(caught.value)


def test_the_workflow_holds_the_token_and_its_steps_read_it_from_there():
    environ = {"R2S_SERVICE_TOKEN": "s3cret", "PATH": "/bin"}
    http.HTTPBuilder.prepare_run(config(), environ)
    # nothing the run starts inherits it (Snakemake's sbatch passes --export=ALL)
    assert environ == {"PATH": "/bin", "R2S_WORKFLOW_PID": str(os.getpid())}
    assert http.token_of("R2S_SERVICE_TOKEN", environ) == os.environ.get("R2S_SERVICE_TOKEN", "")
    # a step run on its own reads its own environment; nothing at all is one line later
    assert http.token_of("R2S_SERVICE_TOKEN", {"R2S_SERVICE_TOKEN": " t \n"}) == "t"
    assert http.token_of("R2S_SERVICE_TOKEN", {"R2S_WORKFLOW_PID": "999999999"}) == ""
    environ = {}
    http.HTTPBuilder.prepare_run(config(), environ)
    assert environ == {}


def test_prepare_run_checks_the_url():
    with pytest.raises(InvalidBuilder):
        http.HTTPBuilder.prepare_run(config(url="http://builder.example"), {})


def test_server_sent_events():
    lines = [
        ": heartbeat",
        "",
        'data: {"phase": "waiting", "message": "queued", "queue_position": 2}',
        "",
        "event: ignored",
        'data: {"phase": "building",',
        'data:  "message": "#6 [2/6] RUN x"}',
        "",
        "data: not json",
        "",
        'data: {"phase": "built", "sif_sha256": "' + "b" * 64 + '"}',
        "",
    ]
    events = list(http.parse_events(iter(lines)))
    assert [e["phase"] for e in events] == ["waiting", "building", "built"]
    assert events[1]["message"] == "#6 [2/6] RUN x"
    assert http.phase_line(events[0]) == "waiting (place 2 in the queue)"
    assert http.phase_line(events[1]) == "building"


def answer(status, body=None, reason="Reason"):
    response = requests.Response()
    response.status_code = status
    response.reason = reason
    response._content = json.dumps(body).encode() if body is not None else b"<html>oops</html>"
    return response


@pytest.mark.parametrize(
    "status, body, says",
    [
        (401, {"error": "a valid token is required"}, "refused the token in $R2S_SERVICE_TOKEN"),
        (404, {"error": "no build 0123"}, "has no such build"),
        (429, {"error": "at most 4 builds per user"}, "is at a limit while asking (429: at most 4 builds per user); run again later"),
        (503, {"error": "shutting down"}, "shutting down"),
        (400, {"error": "url is not a git URL:\n'x'"}, "answered 400 while asking: url is not a git URL: 'x'"),
        (502, None, "answered 502 while asking: Reason"),
    ],
)
def test_error_answers_are_one_line(status, body, says):
    settings = http.HTTPBuilderSettings.from_config(config())
    line = http.describe_failure(settings, answer(status, body), "asking")
    assert says in line and "\n" not in line


def test_a_missing_token_is_one_line_naming_the_variable():
    settings = http.HTTPBuilderSettings.from_config(config(token_env="MY_TOKEN"))
    with pytest.raises(StepError) as caught:
        http.ServiceClient(settings, environ={})
    assert "MY_TOKEN" in str(caught.value) and "\n" not in str(caught.value)


def test_the_token_goes_in_the_header_and_nowhere_else(tmp_path):
    settings = http.HTTPBuilderSettings.from_config(config())
    client = http.ServiceClient(settings, environ={"R2S_SERVICE_TOKEN": "s3cret"})
    assert client.http.headers["Authorization"] == "token s3cret"
    assert "s3cret" not in repr(client.settings)


def test_a_missing_ca_file_is_one_line(tmp_path):
    settings = http.HTTPBuilderSettings.from_config(config(ca_file=str(tmp_path / "nope.pem")))
    with pytest.raises(StepError) as caught:
        http.ServiceClient(settings, environ={"R2S_SERVICE_TOKEN": "t"})
    assert "nope.pem is not a file" in str(caught.value)


def spec(repository, **changes):
    values = dict(name="demo", sha=SHA, tag=f"r2s-demo:{SHA}", labels={}, user_name="jovyan", repository=repository)
    values.update(changes)
    return ImageSpec(**values)


def test_the_request_asks_for_the_resolved_commit_with_the_credentials_for_the_service_only():
    builder = http.HTTPBuilder(config())
    repository = Repository("https://me:tok@git.example/org/repo")
    assert builder.request_body(spec(repository)) == {"url": "https://me:tok@git.example/org/repo", "ref": SHA, "image_name": "demo"}
    assert "tok" not in repr(spec(repository))


@pytest.mark.parametrize(
    "repository, changes, says",
    [
        (Repository("/home/me/repo"), {}, "cannot reach the local folder /home/me/repo"),
        (Repository("https://git.example/org/repo", "sub"), {}, "not subdir 'sub'"),
        (Repository("https://git.example/org/repo"), {"repo2docker_args": ("--appendix", "RUN x")}, "no repo2docker_args"),
    ],
)
def test_what_the_service_cannot_build_is_refused_in_one_line(repository, changes, says):
    with pytest.raises(StepError) as caught:
        http.HTTPBuilder(config()).request_body(spec(repository, **changes))
    assert says in str(caught.value)


def test_a_receipt_of_another_builder_names_the_rule_to_rerun(tmp_path):
    receipt = tmp_path / "image.json"
    receipt.write_text(json.dumps({"tag": "t", "image_id": "sha256:1", "builder": {"host": "vm", "port": 22, "user": "b"}}))
    with pytest.raises(StepError) as caught:
        http.HTTPBuilder(config()).save_image("demo", SHA, receipt, tmp_path / "image.build.json")
    assert "built on vm, not by a build service" in str(caught.value) and "--forcerun build_image" in str(caught.value)


def test_a_service_log_line_says_the_build_step():
    from repo2singularity.tools import describe_progress

    assert describe_progress(["[build_image] #6 [2/6] RUN pip install x", "[build_image] #6 1.20 Collecting x"]) == "build step 2/6: RUN pip install x | Collecting x"
    assert describe_progress(["[build_sif] INFO:    Creating SIF file..."]) == "Creating SIF file"


@pytest.mark.integration
def test_slurm_jobs_do_not_get_the_token_and_the_steps_do(tmp_path):
    """With the real sbatch, as Snakemake's Slurm plugin calls it (--export=ALL): a workflow
    process started with the token holds it back from its Slurm jobs, and a step it starts
    still reads it."""
    script = tmp_path / "workflow.py"
    script.write_text(
        f"""
import os, subprocess, sys
from repo2singularity.builders import http
http.HTTPBuilder.prepare_run({{"builder": {{"kind": "http", "url": "https://b.example", "token_env": "R2S_SERVICE_TOKEN", "ca_file": ""}}}}, os.environ)
job = subprocess.run(["sbatch", "--parsable", "--export=ALL", "--output={tmp_path}/job.out", "--time=1", "--wrap", "env"], capture_output=True, text=True)
print(job.stdout.strip().split(";")[0] if job.returncode == 0 else "sbatch failed: " + job.stderr)
step = "from repo2singularity.builders import http; import os; print(http.token_of('R2S_SERVICE_TOKEN', os.environ))"
print(subprocess.run([sys.executable, "-c", step], capture_output=True, text=True, env=os.environ).stdout.strip())
"""
    )
    environ = {**os.environ, "R2S_SERVICE_TOKEN": "s3cret-token", "R2S_TEST_KEPT": "kept"}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=environ, cwd=tmp_path, timeout=120)
    job_id, step_token = result.stdout.split()
    assert job_id.isdigit(), result.stdout + result.stderr
    assert step_token == "s3cret-token"
    output = tmp_path / "job.out"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout.strip()
        if not state and output.exists():
            break
        time.sleep(1)
    seen = output.read_text()
    assert "R2S_TEST_KEPT=kept" in seen and "R2S_WORKFLOW_PID=" in seen
    assert "s3cret-token" not in seen and "R2S_SERVICE_TOKEN" not in seen
