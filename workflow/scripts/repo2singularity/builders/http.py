"""`builder: {kind: http, url: ..., token_env: ..., ca_file: ...}`: a repo2singularity build
service (the original repo2singularity's HTTP builder, with BinderHub's event stream). The
service fetches the repository and runs this workflow's own build there; this side posts the
resolved commit, shows the build's phases and log lines, and brings the SIF back checksummed
and resumable. The token comes from the environment only: never a setting, a log line, a
command line or a Slurm job's environment (hold_token)."""

import contextlib
import json
import os
import re
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from ..downloads import CHUNK, Download
from ..files import checksum_line, write_json_atomic, write_text_atomic
from ..input_limits import cut, shown
from ..step import StepError
from ..steplog import step_log
from ..tools import report_progress, say
from .base import Builder, InvalidBuilder

CONNECT_SECONDS = 15
# the service sends a heartbeat at least every 30 s: three missed ones mean the stream is dead
READ_SECONDS = 90
# a lost event stream is asked again this often (the service replays the build's events)
RECONNECTS = 5
RECONNECT_SECONDS = 2
SHA256 = re.compile(r"^[0-9a-f]{64}$")
FINAL_PHASES = ("built", "failed")
# the workflow process whose environment holds the token (see hold_token)
WORKFLOW_VARIABLE = "R2S_WORKFLOW_PID"


@dataclass(frozen=True)
class HTTPBuilderSettings:
    base_url: str
    token_env: str
    ca_file: str

    @classmethod
    def from_config(cls, config):
        values = config["builder"]
        return cls(
            base_url=service_url(str(values.get("url") or "")),
            token_env=str(values.get("token_env") or "R2S_SERVICE_TOKEN"),
            ca_file=str(Path(values["ca_file"]).expanduser()) if values.get("ca_file") else "",
        )

    @property
    def host(self):
        return urllib.parse.urlsplit(self.base_url).netloc


def service_url(url):
    """The service's base URL: https (http only on loopback, where a token cannot be overheard),
    no credentials, and without a trailing /api (the original tool's --endpoint-url had one)."""
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise InvalidBuilder(f"builder url is not an http(s) URL of a host: {shown(url)}")
    if "@" in parts.netloc:
        raise InvalidBuilder("builder url may not hold credentials: the token goes in the variable that builder.token_env names")
    if parts.query or parts.fragment:
        raise InvalidBuilder(f"builder url may not have a query or fragment: {shown(url)}")
    from ..registry.session import is_loopback_host

    if parts.scheme.lower() == "http" and not is_loopback_host(parts.hostname):
        raise InvalidBuilder(f"builder url {shown(url)} is plain http: the token would cross the network in clear; use https")
    path = parts.path.rstrip("/")
    if path.endswith("/api"):
        path = path[: -len("/api")]
    return urllib.parse.urlunsplit((parts.scheme.lower(), parts.netloc, path, "", ""))


def hold_token(token_env, environ, pid):
    """Take the token out of the workflow's environment, so that no process the run starts gets
    it: Snakemake's Slurm plugin submits every job with `sbatch --export=ALL`, and the sandbox's
    and Jupyter's jobs (and Slurm's records of them) would carry it. The build steps read it
    instead from the environment the workflow's process `pid` was started with
    (/proc/PID/environ, the user's own), which WORKFLOW_VARIABLE names."""
    if environ.pop(token_env, None):
        environ[WORKFLOW_VARIABLE] = str(pid)


def token_of(token_env, environ):
    """The token: from this process's environment (a step run on its own), else from the
    environment the workflow's process was started with."""
    token = (environ.get(token_env) or "").strip()
    if token or not environ.get(WORKFLOW_VARIABLE, "").isdigit():
        return token
    import psutil

    try:
        return (psutil.Process(int(environ[WORKFLOW_VARIABLE])).environ().get(token_env) or "").strip()
    except (psutil.Error, OSError):
        return ""


# ------------------------------------------------------------------ answers and errors


def error_line(response):
    """The service's one-line reason ({"error": ...}), else the HTTP reason."""
    try:
        text = str(response.json().get("error") or "")
    except (ValueError, AttributeError):
        text = ""
    text = " ".join((text or response.reason or "").split())
    return cut(text, 300) if text else f"HTTP {response.status_code}"


def describe_failure(settings, response, doing):
    """One line for an error answer of the service, naming what to do about it."""
    status = response.status_code
    where = f"the build service {settings.base_url}"
    reason = error_line(response)
    if status == 401:
        return f"{where} refused the token in ${settings.token_env} while {doing} (401: {reason}); ask its administrator for yours"
    if status == 404:
        return f"{where} has no such build while {doing} (404: {reason})"
    if status == 429:
        return f"{where} is at a limit while {doing} (429: {reason}); run again later"
    if status == 503:
        return f"{where} is shutting down while {doing} (503: {reason}); run again once it is back"
    return f"{where} answered {status} while {doing}: {reason}"


def describe_connection_error(settings, error):
    import requests

    from ..registry.session import describe_connection_error as reason_of
    from ..registry.session import iter_causes

    where = f"the build service {settings.base_url}"
    if isinstance(error, requests.exceptions.SSLError):
        for inner in iter_causes(error):
            if getattr(inner, "verify_message", None):
                return f"{where}: TLS certificate not accepted: {inner.verify_message} (set builder.ca_file, or --ca-file of repo2singularity, to its certificate or CA)"
        if "WRONG_VERSION_NUMBER" in str(error) or "record layer failure" in str(error):
            return f"{where}: TLS handshake failed: it does not speak HTTPS (an http:// URL?)"
        return f"{where}: TLS handshake failed"
    return f"{where} does not answer: {reason_of(error)}"


def parse_events(lines):
    """Server-sent events from an iterator of text lines: each event's JSON data. Comments (the
    heartbeat) and other fields are skipped; an event's data lines are joined."""
    data = []
    for line in lines:
        if line is None:
            continue
        if line == "":
            if data:
                try:
                    event = json.loads("\n".join(data))
                except ValueError:
                    event = None
                if isinstance(event, dict):
                    yield event
                data = []
        elif line.startswith(":"):
            continue
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))


def phase_line(event):
    """What the terminal says when the phase changes."""
    phase = event.get("phase")
    if phase == "waiting" and event.get("queue_position") is not None:
        return f"waiting (place {event['queue_position']} in the queue)"
    return str(phase)


# ------------------------------------------------------------------ the client


class ServiceError(StepError):
    """An error answer of the service, with its HTTP status."""

    def __init__(self, message, status):
        super().__init__(message)
        self.status = status


class ServiceClient:
    """Requests to the service with the token, one line for every failure."""

    def __init__(self, settings, log_path=None, environ=None):
        import requests

        self.settings = settings
        self.step_log = step_log(log_path)
        environ = os.environ if environ is None else environ
        token = token_of(settings.token_env, environ)
        if not token:
            raise StepError(
                f"the build service {settings.base_url} needs your token in the environment variable "
                f"{settings.token_env} (builder.token_env); its administrator gives it to you"
            )
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"token {token}"
        self.http.headers["User-Agent"] = "repo2singularity"
        self.http.verify = self.trust(environ)

    def trust(self, environ):
        """builder.ca_file, else SSL_CERT_FILE, else the system's store (not certifi's copy)."""
        import ssl

        if self.settings.ca_file:
            if not os.path.isfile(self.settings.ca_file):
                raise StepError(f"builder ca_file {self.settings.ca_file} is not a file")
            return self.settings.ca_file
        if environ.get("SSL_CERT_FILE") and os.path.isfile(environ["SSL_CERT_FILE"]):
            return environ["SSL_CERT_FILE"]
        paths = ssl.get_default_verify_paths()
        for candidate in (paths.cafile, paths.capath):
            if candidate and os.path.exists(candidate):
                return candidate
        return True

    def url(self, path):
        return f"{self.settings.base_url}{path}"

    def request(self, method, path, doing, expect=(200,), stream=False, **kwargs):
        import requests

        try:
            response = self.http.request(method, self.url(path), timeout=(CONNECT_SECONDS, READ_SECONDS), stream=stream, **kwargs)
        except requests.exceptions.RequestException as error:
            raise StepError(f"{describe_connection_error(self.settings, error)} (while {doing})") from None
        if response.status_code not in expect:
            line = describe_failure(self.settings, response, doing)
            response.close()
            raise ServiceError(line, response.status_code)
        return response

    def json(self, method, path, doing, **kwargs):
        response = self.request(method, path, doing, **kwargs)
        try:
            answer = response.json()
        except ValueError:
            raise StepError(f"the build service {self.settings.base_url} sent no JSON while {doing}") from None
        if not isinstance(answer, dict):
            raise StepError(f"the build service {self.settings.base_url} sent no JSON object while {doing}")
        return answer

    def close(self):
        self.http.close()

    # -------------------------------------------------------------- a build's events

    def follow(self, build_id, on_event):
        """The build's events until the last one (built or failed), which is returned. A stream
        that breaks is asked again: the service replays the events, and those already seen are
        skipped."""
        import requests

        seen = 0
        attempts = 0
        doing = f"following build {build_id}"
        while True:
            try:
                response = self.request("GET", f"/api/builds/{build_id}/events", doing, stream=True, headers={"Accept": "text/event-stream"})
            except ServiceError:
                raise
            except StepError as error:
                # a service that restarts does not answer for a moment
                reason, response = str(error), None
            count = 0
            try:
                for event in parse_events(response.iter_lines(decode_unicode=True)) if response else ():
                    count += 1
                    if count <= seen:
                        continue
                    seen = count
                    attempts = 0
                    on_event(event)
                    if event.get("phase") in FINAL_PHASES:
                        return event
            except requests.exceptions.RequestException as error:
                reason = describe_connection_error(self.settings, error)
            else:
                if response:
                    reason = "the event stream ended before the build did"
            finally:
                if response:
                    response.close()
            attempts += 1
            self.step_log.info(f"{reason}; asking again ({attempts} of {RECONNECTS})")
            if attempts > RECONNECTS:
                raise StepError(f"{reason} (build {build_id}); run again: the build goes on there, and a rerun follows it")
            time.sleep(RECONNECT_SECONDS * attempts)

    # -------------------------------------------------------------- the SIF

    def download(self, build_id, local_path, expected_sha256, expected_size):
        """The build's SIF to `local_path` (downloads.Download: a dot-partial file, resumed with
        a Range request when an earlier download of the same SIF was cut), checked against the
        service's X-Sif-Sha256 and the build's record."""
        import requests

        download = Download(local_path, expected_size, expected_sha256, self.step_log, {"build": self.url(f"/api/builds/{build_id}")})
        offset = download.begin(self.settings.host)
        doing = f"downloading the SIF of build {build_id}"
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        response = self.request("GET", f"/api/builds/{build_id}/sif", doing, expect=(200, 206), stream=True, headers=headers)
        try:
            sent_sha256 = (response.headers.get("X-Sif-Sha256") or "").strip().lower()
            if sent_sha256 != expected_sha256:
                raise StepError(
                    f"the build service's SIF of build {build_id} has sha256 {shown(sent_sha256, 70) or 'none'}, "
                    f"not {expected_sha256} as its build said; rebuild with: snakemake --forcerun build_image"
                )
            if offset and response.status_code != 206:
                download.start_over()
            with download.receiving() as write:
                try:
                    for chunk in response.iter_content(CHUNK):
                        write(chunk)
                except requests.exceptions.RequestException as error:
                    raise StepError(
                        f"{describe_connection_error(self.settings, error)} while {doing}, at {download.done / 1e6:.1f} of "
                        f"{expected_size / 1e6:.1f} MB; run again to resume"
                    ) from None
        finally:
            response.close()
        download.finish(f"build {build_id}'s SIF", "service")


# ------------------------------------------------------------------ the builder


class HTTPBuilder(Builder):
    kind = "http"
    # the service keeps the image and makes the SIF itself: a receipt here names its build
    saved_image_file = "image.build.json"
    # the service fetches the commit itself; clone_source only marks the folder
    fetches_source = True
    # the steps stay local rules (step_group None): they read the token from the environment
    # of the workflow's own process, on this machine (hold_token)
    step_group = None

    def __init__(self, config, log=None):
        super().__init__(config, log)
        self.settings = HTTPBuilderSettings.from_config(config)

    @classmethod
    def prepare_run(cls, config, environ):
        settings = HTTPBuilderSettings.from_config(config)
        hold_token(settings.token_env, environ, os.getpid())

    def client(self):
        return contextlib.closing(ServiceClient(self.settings, self.log))

    def request_body(self, spec):
        """What the service is asked to build: the repository (with its credentials, which only
        the service sees, over TLS), the commit resolved here, and the name."""
        repository = spec.repository
        if repository is None:
            raise StepError("the build service needs the repository's URL; the rule passed none")
        url = repository.url
        # the workflow makes a local folder an absolute path
        if url.startswith("/"):
            raise StepError(
                f"the build service fetches the repository itself and cannot reach the local folder {repository.shown_url}; "
                "give a URL it can fetch (https://, git://, ...)"
            )
        if repository.subdir:
            raise StepError(f"the build service builds a repository's top folder, not subdir {shown(repository.subdir)}")
        if spec.repo2docker_args:
            raise StepError("the build service takes no repo2docker_args: its administrator sets them for every build")
        return {"url": url, "ref": spec.sha, "image_name": spec.name}

    def build_image(self, spec, source, receipt):
        """Ask the service to build the commit (it joins a build of the same commit, or answers
        at once when it has it), follow the build, and write its image.json here."""
        step = "build_image"
        body = self.request_body(spec)
        with self.client() as service:
            build = service.json("POST", "/api/builds", "asking for a build", json=body)
            build_id = str(build.get("id") or "")
            if not re.fullmatch(r"[0-9A-Za-z_-]{1,64}", build_id):
                raise StepError(f"the build service {self.settings.base_url} answered without a build id")
            if build.get("sha") and build["sha"] != spec.sha:
                raise StepError(f"the build service resolved {spec.sha[:12]} to another commit, {shown(str(build['sha']), 50)}")
            where = f" on {self.settings.host}"
            self.step_log.info(f"build {build_id} of {spec.repository.display_url} at {spec.sha} on {self.settings.base_url}: {phase_line(build)}")
            say(f"  {step}{where}: build {build_id}, {phase_line(build)}")
            finished = report_progress(f"{step} (service)", self.log, where=where)
            started = time.monotonic()
            said = {"phase": build.get("phase")}

            def show(event):
                message = str(event.get("message") or "")
                if message:
                    self.step_log.info(message)
                line = phase_line(event)
                if event.get("phase") != said["phase"] or (event.get("phase") == "waiting" and line != said.get("line")):
                    say(f"  {step}{where}: {line}")
                    said.update(phase=event.get("phase"), line=line)

            try:
                last = service.follow(build_id, show)
            finally:
                finished.set()
            if last.get("phase") == "failed":
                reason = " ".join(str(last.get("message") or "no reason given").split())
                raise StepError(f"the build service's build {build_id} failed: {cut(reason, 300)} (its log lines: {self.log})")
            record = service.json("GET", f"/api/builds/{build_id}", f"reading build {build_id}")
            image = service.json("GET", f"/api/builds/{build_id}/image", f"reading the image.json of build {build_id}")
        sif_sha256 = str(record.get("sif_sha256") or last.get("sif_sha256") or "")
        if record.get("sha") not in (None, spec.sha) or not SHA256.match(sif_sha256):
            raise StepError(f"build {build_id} on {self.settings.base_url} ended without the SIF's sha256 of commit {spec.sha[:12]}")
        service_record = {
            "kind": self.kind,
            "url": self.settings.base_url,
            "build_id": build_id,
            "sif_sha256": sif_sha256,
            "sif_size": int(record.get("sif_size") or last.get("sif_size") or 0),
        }
        write_json_atomic(receipt, {**image, "builder": service_record})
        say(f"  {step}{where}: built in {time.monotonic() - started:.0f} s")

    def save_image(self, name, sha, receipt, saved):
        """The service keeps the image: the receipt here names its build and the SIF it made,
        checked against the service's record of the build."""
        image = json.loads(Path(receipt).read_text())
        made = image.get("builder") or {}
        if made.get("kind") != self.kind or not made.get("build_id"):
            origin = f"on {made['host']}" if made.get("host") else "locally"
            raise StepError(f"{receipt} names an image built {origin}, not by a build service; rebuild it with: snakemake --forcerun build_image")
        build_id = made["build_id"]
        with self.client() as service:
            try:
                record = service.json("GET", f"/api/builds/{build_id}", f"checking build {build_id}")
            except ServiceError as error:
                if error.status == 404:
                    raise StepError(
                        f"the build service {self.settings.base_url} no longer has build {build_id} named in {receipt}; "
                        "rebuild it with: snakemake --forcerun build_image"
                    ) from None
                raise
        if record.get("phase") != "built" or record.get("sif_sha256") != made["sif_sha256"]:
            raise StepError(
                f"build {build_id} on {self.settings.base_url} no longer has the SIF named in {receipt}; "
                "rebuild it with: snakemake --forcerun build_image"
            )
        write_json_atomic(
            saved,
            {
                "url": self.settings.base_url,
                "build_id": build_id,
                "sha": sha,
                "sif_sha256": made["sif_sha256"],
                "sif_size": int(record.get("sif_size") or made["sif_size"]),
                "image_name": record.get("image_name") or name,
            },
        )

    def build_sif(self, name, sha, saved, sif, checksum):
        """The SIF the service made, downloaded (resumed when cut) and verified here."""
        made = json.loads(Path(saved).read_text())
        if made.get("url") != self.settings.base_url:
            raise StepError(f"{saved} names a build on {made.get('url')}, not on {self.settings.base_url}; rerun: snakemake --forcerun build_image")
        with self.client() as service:
            service.download(made["build_id"], sif, made["sif_sha256"], made["sif_size"])
        # the checksum comes last: it marks a finished SIF
        write_text_atomic(checksum, checksum_line(made["sif_sha256"], sif))

    def readiness(self):
        with self.client() as service:
            me = service.json("GET", "/api/users/me", "checking the token")
        line = f"build service {self.settings.base_url} answers; signed in as {shown(str(me.get('name') or '?'), 60)}"
        self.step_log.info(line)
        return line
