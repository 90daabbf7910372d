"""What a client asked for (POST /api/builds), checked: one line naming the problem otherwise."""

import json
import urllib.parse
from dataclasses import dataclass

from ..input_limits import shown
from ..naming import DOCKER_COMPONENT_PATTERN, NAME_LIMIT
from ..repository import SCP_LIKE_PATTERN, RepositoryError, check_ref, has_control_characters

MAX_BODY_BYTES = 64 * 1024
KEYS = ("url", "ref", "image_name")


class BadRequest(Exception):
    """Bad input, with the HTTP status to answer."""

    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class BuildRequest:
    url: str
    ref: str
    image_name: str


def parse(body, allowed_schemes):
    if len(body) > MAX_BODY_BYTES:
        raise BadRequest(f"the body is {len(body)} bytes; at most {MAX_BODY_BYTES} are accepted", 413)
    try:
        values = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the body is not JSON") from None
    if not isinstance(values, dict):
        raise BadRequest(f"the body must be a JSON object, not {type(values).__name__}")
    unknown = sorted(set(values) - set(KEYS))
    if unknown:
        raise BadRequest(f"unknown key {shown(unknown[0])}; a build takes {', '.join(KEYS)}")
    for key in KEYS:
        if key in values and not isinstance(values[key], str) and not (key != "url" and values[key] is None):
            raise BadRequest(f"{key} must be a string, not {type(values[key]).__name__}")
    url = check_url(values.get("url"), allowed_schemes)
    try:
        ref = check_ref(values.get("ref") or "")
    except RepositoryError as error:
        raise BadRequest(str(error)) from None
    return BuildRequest(url, ref, check_image_name(values.get("image_name") or ""))


def check_url(url, allowed_schemes):
    """A git URL of an allowed scheme; never a local path, nor a transport that runs commands."""
    if not url:
        raise BadRequest("url is missing")
    if "::" in url.split("/", 1)[0]:
        raise BadRequest(f"git transport {shown(url.split('::', 1)[0] + '::')} is not allowed (it runs commands)")
    if has_control_characters(url) or any(c.isspace() for c in url):
        raise BadRequest("url contains spaces or control characters")
    if url.startswith("-"):
        raise BadRequest(f"url may not start with '-': {shown(url)}")
    if "://" in url:
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in allowed_schemes:
            raise BadRequest(f"URL scheme {shown(scheme)} is not allowed here; use one of {', '.join(allowed_schemes)}")
        if scheme != "file" and not parts.hostname:
            raise BadRequest(f"url has no host: {shown(url)}")
        return url
    if SCP_LIKE_PATTERN.match(url) and not url.startswith(("/", ".")) and "ssh" in allowed_schemes:
        return url
    raise BadRequest(f"url is not a git URL ({', '.join(s + '://' for s in allowed_schemes)}): {shown(url)}")


def check_image_name(name):
    if name and not (DOCKER_COMPONENT_PATTERN.fullmatch(name) and len(name) <= NAME_LIMIT):
        raise BadRequest(
            f"image_name {shown(name)} is not a name: lowercase letters and digits, "
            f"separated by '.', '_' or '-', at most {NAME_LIMIT} characters"
        )
    return name
