"""A repository as the service fetches it: credentials in its URL are taken out and handed to
git by a credential helper through the environment, so they are on no command line, in no log,
file or build record, and are given to that host only."""

import urllib.parse

from ..repository import Repository, git_environment, redact_url, resolve_ref
from .build_request import BadRequest

# git runs this through the shell; it answers `get` for the URL's own host and nothing else
CREDENTIAL_HELPER = (
    '!f() { test "$1" = get || exit 0; host=; while IFS= read -r line; do case "$line" in host=*) host="${line#host=}";; esac; done; '
    'test "$host" = "$R2S_GIT_HOST" || exit 0; printf "username=%s\\npassword=%s\\n" "$R2S_GIT_USERNAME" "$R2S_GIT_PASSWORD"; }; f'
)


class GitAccess:
    def __init__(self, url):
        parts = urllib.parse.urlsplit(url) if "://" in url else None
        self.display_url = redact_url(url)
        self.credentials = None
        if parts is not None and "@" in parts.netloc:
            if parts.scheme.lower() not in ("http", "https"):
                if parts.password is not None:
                    raise BadRequest(f"{parts.scheme} URLs take no password: {self.display_url}")
                self.display_url = url  # a user name for ssh is no secret
            else:
                username = urllib.parse.unquote(parts.username or "")
                password = urllib.parse.unquote(parts.password or "")
                if any(c in username + password for c in "\n\r\0"):
                    raise BadRequest("the URL's credentials contain control characters")
                self.credentials = (parts.netloc.rsplit("@", 1)[1], username, password)

    @property
    def private(self):
        """A URL with credentials: its build is its owner's alone."""
        return self.credentials is not None

    def __repr__(self):
        return f"GitAccess({self.display_url!r}, private={self.private})"

    def environment(self):
        """git_environment(), plus the credential helper for a URL with credentials."""
        env = git_environment()
        if self.credentials:
            host, username, password = self.credentials
            count = int(env.get("GIT_CONFIG_COUNT", "0") or 0)
            env.update(
                {
                    "GIT_CONFIG_COUNT": str(count + 1),
                    f"GIT_CONFIG_KEY_{count}": "credential.helper",
                    f"GIT_CONFIG_VALUE_{count}": CREDENTIAL_HELPER,
                    "R2S_GIT_HOST": host,
                    "R2S_GIT_USERNAME": username,
                    "R2S_GIT_PASSWORD": password,
                }
            )
        return env

    def resolve(self, ref):
        """The commit `ref` names (RepositoryError in one line without credentials)."""
        return resolve_ref(Repository(self.display_url), ref, env=self.environment())
