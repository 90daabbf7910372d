"""Repositories: check what the user gave, resolve a ref to its commit, clone that commit.

Every git call gets an argument list with `--` before user input, and an environment that
allows only transports that do not run commands, so a hostile URL or ref cannot become an
option or a program.
"""

import os
import re
import shutil
import subprocess
import threading
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from .input_limits import cut, shown
from .steplog import step_log

ALLOWED_SCHEMES = ("https", "http", "ssh", "git", "file")
GIT_TIMEOUT_SECONDS = 120
SHA_PATTERN = re.compile(r"[0-9a-f]{40}")
SHORT_SHA_PATTERN = re.compile(r"[0-9a-f]{4,40}")
SCP_LIKE_PATTERN = re.compile(r"^(?P<user>[^@/:]+@)?(?P<host>[^/:]+):(?P<path>.+)$")
# git's own rules for ref names (git-check-ref-format), less the ones git itself enforces later
FORBIDDEN_REF_PARTS = ("..", "@{", "\\", "//")
FORBIDDEN_REF_CHARS = set(" ~^:?*[")


class RepositoryError(Exception):
    """A problem with a repository or ref, told in one line."""


def git_environment():
    env = dict(os.environ)
    env.update(
        {
            # `ext::` and `fd::` run commands; only plain transports are allowed
            "GIT_ALLOW_PROTOCOL": "file:git:http:https:ssh",
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_ASKPASS": "true",
            "SSH_ASKPASS": "true",
            "GCM_INTERACTIVE": "never",
            "LC_ALL": "C",
        }
    )
    return env


def has_control_characters(text):
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


def redact_url(url):
    """The URL without user name or password, fit for logs, labels and names."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme and "@" in parsed.netloc:
        host = parsed.netloc.rsplit("@", 1)[1]
        return urllib.parse.urlunsplit(parsed._replace(netloc=host))
    return url


@dataclass(frozen=True)
class Repository:
    """Where to fetch from, and which folder of it to build."""

    url: str
    subdir: str = ""

    @property
    def display_url(self):
        return redact_url(self.url)

    @property
    def shown_url(self):
        """The display URL as error lines echo it: cut short."""
        return cut(self.display_url, 120)

    def __repr__(self):
        # whatever prints this object (an error message, a debug log) shows no credentials
        return f"Repository({self.display_url!r}, subdir={self.subdir!r})"

    def __reduce__(self):
        # Snakemake pickles a rule's params into .snakemake/scripts/, and a killed workflow leaves
        # that file behind: what is pickled names the URL without credentials, and the URL with
        # them waits in this process's environment, which the job's process inherits
        if self.url == self.display_url:
            return (Repository, (self.url, self.subdir))
        return (repository_from_environment, (self.display_url, self.subdir, stash_url(self.url)))


STASH_PREFIX = "R2S_REPOSITORY_URL_"


def stash_url(url):
    import hashlib

    name = f"{STASH_PREFIX}{hashlib.sha256(url.encode()).hexdigest()[:16]}"
    os.environ[name] = url
    return name


def without_secrets(environ, names=()):
    """`environ` without the stashed repository URLs and the variables `names` (the registry
    credential's): for a child that needs none of them, such as a server or a Slurm job."""
    return {key: value for key, value in environ.items() if not key.startswith(STASH_PREFIX) and key not in names}


def drop_stashed_urls(environ=os.environ):
    """A step has its Repository once Snakemake has loaded its params: the URL needs to wait in
    the environment no longer, and no tool or server of the step inherits it."""
    for key in [key for key in environ if key.startswith(STASH_PREFIX)]:
        del environ[key]


def repository_from_environment(display_url, subdir, name):
    url = os.environ.get(name)
    if url is None:
        raise RepositoryError(f"the credentials of {display_url} are not in this process's environment; run the workflow again")
    return Repository(url, subdir)


def check_repository(spec, subdir="", base_dirs=(".",)):
    """Validate a repository given by the user; local folders become absolute paths, looked
    up in each of `base_dirs` in turn.

    A local folder inside a git work tree stands for that repository with the folder as
    subdir, so `repo=path/in/a/repo` builds that folder from the committed tree.
    """
    spec = str(spec)
    subdir = str(subdir or "").strip("/")
    if not spec:
        raise RepositoryError("repository is empty")
    if has_control_characters(spec):
        raise RepositoryError("repository contains control characters")
    if spec.startswith("-"):
        raise RepositoryError(f"repository may not start with '-': {shown(spec)}")
    check_subdir(subdir)
    scheme = urllib.parse.urlsplit(spec).scheme
    if "::" in spec.split("/", 1)[0]:
        raise RepositoryError(
            f"git transport {shown(spec.split('::', 1)[0] + '::')} is not allowed (it runs commands)"
        )
    if "://" in spec:
        if scheme.lower() not in ALLOWED_SCHEMES:
            raise RepositoryError(
                f"URL scheme {shown(scheme)} is not allowed; use one of {', '.join(ALLOWED_SCHEMES)}"
            )
        return Repository(spec, subdir)
    for base_dir in base_dirs:
        local = Path(base_dir, spec)
        if is_folder(local):
            return local_repository(local, subdir)
    if SCP_LIKE_PATTERN.match(spec) and not spec.startswith(("/", ".")):
        return Repository(spec, subdir)
    raise RepositoryError(f"repository not found: {shown(spec)} is neither a URL nor a folder")


def is_folder(path):
    try:
        return path.is_dir()
    except OSError:  # e.g. a name too long for the file system: not a folder either
        return False


def local_repository(folder, subdir):
    """A folder on this machine: a work tree (or a folder in one: that repository, with the
    folder as subdir), or a git folder itself, such as a bare mirror, which git clones as it is."""
    folder = folder.resolve()
    where = rev_parse(folder, "--is-inside-git-dir", "--absolute-git-dir").splitlines()
    if where[0] == "true":
        git_dir = Path(where[1]).resolve()
        if git_dir != folder:
            raise RepositoryError(f"repository not found: {folder} is inside the git folder of {git_dir}; give that folder")
        return Repository(str(folder), subdir)
    top = Path(rev_parse(folder, "--show-toplevel").strip()).resolve()
    inner = folder.relative_to(top).as_posix()
    inner = "" if inner == "." else inner
    return Repository(str(top), "/".join(p for p in (inner, subdir) if p))


def rev_parse(folder, *options):
    result = subprocess.run(
        ["git", "-C", str(folder), "rev-parse", *options],
        capture_output=True,
        text=True,
        env=git_environment(),
    )
    if result.returncode == 0:
        return result.stdout
    if "dubious ownership" in result.stderr:
        # shared mirrors usually belong to another account, and git reads those only when trusted
        raise RepositoryError(
            f"repository {folder} belongs to another user and git does not trust it: "
            f"git config --global --add safe.directory {folder}"
        )
    raise RepositoryError(f"repository not found: {folder} is not in a git repository")


def check_subdir(subdir):
    if has_control_characters(subdir) or subdir.startswith("-"):
        raise RepositoryError(f"subdir is not a plain folder name: {shown(subdir)}")
    if ".." in Path(subdir).parts:
        raise RepositoryError(f"subdir may not leave the repository: {shown(subdir)}")


def check_ref(ref):
    """Refuse refs that could be options or are not valid git ref names."""
    ref = "" if ref is None else str(ref)
    if has_control_characters(ref):
        raise RepositoryError("ref contains control characters")
    if ref.startswith("-"):
        raise RepositoryError(f"ref may not start with '-': {shown(ref)}")
    if len(ref) > 255:
        raise RepositoryError(f"ref is longer than 255 characters ({len(ref)})")
    if (
        any(part in ref for part in FORBIDDEN_REF_PARTS)
        or FORBIDDEN_REF_CHARS & set(ref)
        or ref.endswith((".", "/", ".lock"))
        or ref.startswith("/")
    ):
        raise RepositoryError(f"ref is not a valid git ref name: {shown(ref)}")
    return ref


def run_git(args, repository, cwd=None, env=None):
    """Run git; on failure raise its last error line, with credentials removed. `env`: the
    environment to run it in (git_environment() by default), e.g. with a credential helper."""
    try:
        result = subprocess.run(
            ["git", *args],
            capture_output=True,
            text=True,
            errors="replace",
            cwd=cwd,
            env=env or git_environment(),
            timeout=GIT_TIMEOUT_SECONDS,
        )
    except subprocess.TimeoutExpired:
        raise RepositoryError(
            f"git {args[0]} timed out after {GIT_TIMEOUT_SECONDS} s for {repository.shown_url}"
        ) from None
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        reason = lines[0] if lines else f"exit status {result.returncode}"
        reason = cut(reason.replace(repository.url, repository.shown_url), 300)
        raise RepositoryError(f"git {args[0]} failed for {repository.shown_url}: {reason}")
    return result.stdout


def list_remote_refs(repository, env=None):
    """Refs the repository advertises, and the branch its HEAD points to."""
    output = run_git(["ls-remote", "--symref", "--", repository.url], repository, env=env)
    refs = {}
    head_branch = ""
    for line in output.splitlines():
        target, _, refname = line.partition("\t")
        if target.startswith("ref: ") and refname == "HEAD":
            head_branch = target[len("ref: ") :].removeprefix("refs/heads/")
        elif SHA_PATTERN.fullmatch(target):
            refs[refname] = target
    return refs, head_branch


@dataclass(frozen=True)
class ResolvedRef:
    sha: str
    ref: str


def resolve_ref(repository, ref, cache_dir=None, env=None):
    """The commit a ref names: branch, tag (its commit, not the tag object), sha, or HEAD."""
    ref = check_ref(ref)
    refs, head_branch = list_remote_refs(repository, env)
    if ref in ("", "HEAD"):
        if "HEAD" not in refs:
            raise RepositoryError(f"{repository.shown_url} has no default branch (empty?)")
        return ResolvedRef(refs["HEAD"], head_branch or "HEAD")
    # git's own precedence: a full ref name, then a tag, then a branch
    for candidate in (ref, f"refs/tags/{ref}", f"refs/heads/{ref}"):
        if not candidate.startswith("refs/"):
            continue
        peeled = refs.get(f"{candidate}^{{}}")
        if peeled or candidate in refs:
            return ResolvedRef(peeled or refs[candidate], ref)
    if SHORT_SHA_PATTERN.fullmatch(ref.lower()):
        return ResolvedRef(resolve_commit(repository, ref.lower(), refs, cache_dir), ref)
    raise RepositoryError(f"ref {ref!r} not found in {repository.shown_url}")


def resolve_commit(repository, sha_prefix, advertised, cache_dir):
    """A full or short sha: look at advertised tips first, else in a fetched copy."""
    tips = {sha for sha in advertised.values() if sha.startswith(sha_prefix)}
    if len(tips) == 1:
        return tips.pop()
    if cache_dir is None:
        raise RepositoryError(f"commit {sha_prefix} is not a branch or tag tip of {repository.shown_url}")
    mirror = update_mirror(repository, Path(cache_dir))
    try:
        output = run_git(
            ["rev-parse", "--verify", "--quiet", "--end-of-options", f"{sha_prefix}^{{commit}}"],
            repository,
            cwd=mirror,
        )
    except RepositoryError:
        raise RepositoryError(
            f"ref {sha_prefix!r} not found in {repository.shown_url} (no such commit, or ambiguous)"
        ) from None
    return output.strip()


MIRROR_LOCKS = {}
MIRROR_LOCKS_GUARD = threading.Lock()


def update_mirror(repository, cache_dir):
    """A bare, blob-less copy of all branches and tags, to look commits up in; one fetch at a
    time per repository, as refs are resolved in parallel."""
    import hashlib

    key = hashlib.sha256(repository.url.encode()).hexdigest()[:16]
    mirror = cache_dir / f"{key}.git"
    with MIRROR_LOCKS_GUARD:
        lock = MIRROR_LOCKS.setdefault(str(mirror), threading.Lock())
    with lock:
        return fetch_into_mirror(repository, mirror)


def fetch_into_mirror(repository, mirror):
    if not mirror.exists():
        mirror.parent.mkdir(parents=True, exist_ok=True)
        run_git(["init", "--quiet", "--bare", str(mirror)], repository)
    run_git(
        [
            "fetch",
            "--quiet",
            "--filter=blob:none",
            "--prune",
            "--",
            repository.url,
            "+refs/heads/*:refs/heads/*",
            "+refs/tags/*:refs/tags/*",
        ],
        repository,
        cwd=mirror,
    )
    return mirror


def clone_commit(repository, sha, destination):
    """Check out exactly `sha` into `destination`, which appears only once complete."""
    if not SHA_PATTERN.fullmatch(sha):
        raise RepositoryError(f"not a full commit sha: {sha!r}")
    destination = Path(destination)
    partial = destination.with_name(destination.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        fetch_commit(repository, sha, partial)
        if destination.exists():
            shutil.rmtree(destination)
        os.rename(partial, destination)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return destination


def fetch_commit(repository, sha, partial):
    run_git(["init", "--quiet", str(partial)], repository)
    try:
        run_git(["fetch", "--quiet", "--depth", "1", "--", repository.url, sha], repository, cwd=partial)
    except RepositoryError:
        # servers that refuse a bare sha still serve it inside a full fetch
        run_git(
            ["fetch", "--quiet", "--", repository.url, "+refs/heads/*:refs/remotes/origin/*", "+refs/tags/*:refs/tags/*"],
            repository,
            cwd=partial,
        )
    run_git(["-c", "advice.detachedHead=false", "checkout", "--quiet", "--detach", sha], repository, cwd=partial)
    checked_out = run_git(["rev-parse", "HEAD"], repository, cwd=partial).strip()
    if checked_out != sha:
        raise RepositoryError(f"checked out {checked_out} instead of {sha}")
    if repository.subdir and not (partial / repository.subdir).is_dir():
        raise RepositoryError(f"subdir {repository.subdir!r} does not exist at commit {sha[:12]}")



def clone_logged(repository, sha, destination, log):
    """clone_commit with what it did in the step's log; RepositoryError in one line."""
    log = step_log(log)
    log.info(f"cloning {repository.display_url} at {sha}")
    try:
        clone_commit(repository, sha, destination)
    except RepositoryError as error:
        log.info(str(error))
        raise
    log.info(f"checked out into {destination}")
