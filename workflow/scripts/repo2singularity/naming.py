"""Names of images and result folders, in BinderHub's scheme: an escaped lowercase slug plus a
short hash of what it stands for, valid as a Docker repository name and as a file name."""

import hashlib
import re
import string
import urllib.parse

import escapism

from .repository import SCP_LIKE_PATTERN, has_control_characters, redact_url
from .results import OWN_ENTRIES

NAME_LIMIT = 63
HASH_LENGTH = 6
MAX_USER_NAME_LENGTH = 200
SAFE_CHARACTERS = set(string.ascii_letters + string.digits)
# one component of a Docker repository name, which is also a safe file name
DOCKER_COMPONENT_PATTERN = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")


class InvalidName(Exception):
    """A name that cannot be used, told in one line."""


def safe_slug(readable_parts, identity, limit=NAME_LIMIT, hash_length=HASH_LENGTH):
    """BinderHub's _safe_build_slug: the escaped readable parts joined by '-', then a hash of
    the identity they stand for."""
    digest = hashlib.sha256(identity.encode("utf-8")).hexdigest()[:hash_length]
    escaped = "-".join(escapism.escape(p, safe=SAFE_CHARACTERS, escape_char="-") for p in readable_parts)
    escaped = escaped[: limit - hash_length - 1].strip("-")
    return f"{escaped}-{digest}".lower() if escaped else digest


def repository_path(url):
    """The path part of a URL, scp-like address or local path."""
    if "://" in url:
        return urllib.parse.urlsplit(url).path
    match = SCP_LIKE_PATTERN.match(url)
    if match and not url.startswith(("/", ".")):
        return match.group("path")
    return url


def default_name(url, subdir=""):
    """A readable name from the repository's last path parts (owner-repo, or folder)."""
    parts = [p for p in repository_path(redact_url(url)).split("/") if p]
    if parts:
        parts[-1] = parts[-1].removesuffix(".git")
    parts = [p for p in parts if p]
    sub_parts = [p for p in subdir.split("/") if p]
    readable = (sub_parts[-1:] if sub_parts else parts[-2:]) or ["repo"]
    return safe_slug(readable, f"{redact_url(url)}\n{subdir}")


def check_name(name):
    """A name given by the user: refuse what could escape results/, slug anything odd."""
    name = str(name)
    if not name:
        raise InvalidName("name is empty")
    if has_control_characters(name):
        raise InvalidName("name contains control characters")
    if len(name) > MAX_USER_NAME_LENGTH:
        raise InvalidName(f"name is longer than {MAX_USER_NAME_LENGTH} characters ({len(name)})")
    if "/" in name or "\\" in name or ".." in name:
        raise InvalidName(f"name may not contain '/', '\\' or '..': {name!r}")
    if name.startswith(("-", ".")):
        raise InvalidName(f"name may not start with '-' or '.': {name!r}")
    if name in OWN_ENTRIES:
        raise InvalidName(f"name {name!r} cannot be used: results/{name} is the workflow's own; choose another name")
    if DOCKER_COMPONENT_PATTERN.fullmatch(name) and len(name) <= NAME_LIMIT:
        return name
    return safe_slug([name], name)


def image_tag(prefix, name, sha):
    """The Docker image name and tag, e.g. r2s-owner-repo-1a2b3c:<sha>."""
    return f"{prefix}{name}:{sha}"


def account_slug(user):
    """A login account's name as one folder name and Docker repository component (a name that
    is not one already gets BinderHub's slug, with a hash of the name)."""
    user = str(user)
    if DOCKER_COMPONENT_PATTERN.fullmatch(user) and len(user) <= NAME_LIMIT:
        return user
    return safe_slug([user], user)
