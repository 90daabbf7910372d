"""Users and their API tokens. A token is shown once, when it is made; the service keeps only its
SHA-256 (tokens are 256 random bits, so a plain hash is enough: there is nothing to guess), in a
file only the service's account reads. The running service sees added users at once."""

import hashlib
import json
import os
import re
import secrets
import time
from pathlib import Path

from ..files import write_text_atomic

USER_NAME_PATTERN = re.compile(r"[a-z][a-z0-9_-]{0,31}")


class AccountError(Exception):
    """A bad user name or an unreadable accounts file, in one line."""


def token_hash(token):
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


class Accounts:
    def __init__(self, path):
        self.path = Path(path)
        self.by_hash = {}
        self.seen = None

    def add_user(self, name):
        """Make (or replace) `name`'s token; returns the token, which is stored nowhere."""
        if not isinstance(name, str) or not USER_NAME_PATTERN.fullmatch(name):
            raise AccountError(f"user name {name!r} is not 1-32 of a-z, 0-9, '_', '-' starting with a letter")
        users = self.read()
        token = secrets.token_hex(32)
        users[name] = {"token_sha256": token_hash(token), "created": int(time.time())}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, json.dumps({"users": users}, indent=1) + "\n", mode=0o600)
        return token

    def read(self):
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            raise AccountError(f"cannot read the accounts file {self.path}: {error}") from None
        return dict(data.get("users", {}))

    def refresh(self):
        """Re-read the file when it changed (an administrator added a user)."""
        try:
            stat = os.stat(self.path)
            seen = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        except FileNotFoundError:
            seen = None
        if seen != self.seen:
            users = self.read()
            self.by_hash = {record["token_sha256"]: name for name, record in users.items()}
            self.seen = seen

    def user_of_hash(self, digest):
        self.refresh()
        return self.by_hash.get(digest)

    def user_of_token(self, token):
        """The user a token belongs to, or None."""
        if not token:
            return None
        return self.user_of_hash(token_hash(token))
