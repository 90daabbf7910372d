"""`builder: {kind: ssh, host: ...}`: a host with Docker reached over SSH. The source goes there
as a tar stream, repo2docker, docker save and the runtime run there, and only the finished SIF
comes back. Artefacts that stay there are named in receipts here, and each step checks its
input against its receipt first. The host needs a POSIX shell, coreutils, tar and flock; no
Snakemake, no SFTP, no shared file system."""

import dataclasses
import functools
import getpass
import hashlib
import json
import posixpath
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

from .. import naming, runtime
from ..archive_to_sif import MKSQUASHFS_MINIMUM
from ..config_values import truthy
from ..files import checksum_line, write_json_atomic, write_text_atomic
from ..image import image_receipt, repo2docker_command
from ..ssh_transport import SSHTarget, SSHTransport, expand_home, last_line, remote_command
from ..step import StepError
from .base import Builder, InvalidBuilder

SLOT_WAIT_SECONDS = 2
TOOLS = ("docker", "buildx", "repo2docker", "runtime", "flock", "python", "mksquashfs")
# what each step needs: a step checks its own tools, so a rerun that starts at a later step is
# still checked first, and the cheap steps do not wait for repo2docker to start
STEP_TOOLS = {"build_image": TOOLS, "save_image": ("docker",), "build_sif": ("runtime", "python", "mksquashfs")}
# only the fast conversion needs these on the builder
FAST_CONVERSION_TOOLS = ("python", "mksquashfs")
PYTHON_MINIMUM = (3, 11)
# build_image checks every tool and leaves what it found in the results folder; save_image and
# build_sif of the same run trust it for this long instead of asking again (a preflight costs
# about a second, mostly repo2docker's and the runtime's start). A step that starts later, or
# finds no such receipt, or one from other settings, checks for itself
PREFLIGHT_RECEIPT = "builder-preflight.json"
PREFLIGHT_TRUST_SECONDS = 600


@dataclass(frozen=True)
class SSHBuilderSettings:
    target: SSHTarget
    workdir: str
    runtime: str
    python: str
    repo2docker: str
    max_builds: int
    keep_images: int
    min_free_gb: float
    # the login account this run is for: its own work folder and image names on the builder
    scope: str = dataclasses.field(default_factory=lambda: login_scope(getpass.getuser()))

    @classmethod
    def from_config(cls, config):
        """From the validated configuration's `builder` mapping (defaults filled in by the
        schema); numbers may arrive as strings from `--config builder={...}`."""
        values = config["builder"]
        host = str(values.get("host") or "")
        if not host or host.startswith("-") or any(c.isspace() for c in host):
            raise InvalidBuilder(f"builder host is not a host name: {host!r}")
        try:
            port, max_builds, keep_images = (int(values[key]) for key in ("port", "max_builds", "keep_images"))
            min_free_gb = float(values["min_free_gb"])
        except (TypeError, ValueError) as error:
            raise InvalidBuilder(f"builder setting is not a number: {error}") from None
        if not 0 < port < 65536:
            raise InvalidBuilder(f"builder port out of range: {port}")
        if max_builds < 1:
            raise InvalidBuilder(f"builder max_builds must be at least 1, not {max_builds}")
        if keep_images < 1:
            raise InvalidBuilder(f"builder keep_images must be at least 1 (the image just built), not {keep_images}")
        target = SSHTarget(
            host=host,
            port=port,
            user=str(values["user"]),
            key_file=str(values["key_file"]),
            known_hosts=str(values["known_hosts"]),
            trust_unknown_host=truthy(values["trust_unknown_host"]),
            role="builder",
        )
        return cls(
            target=target,
            workdir=str(values["workdir"]),
            runtime=str(values["runtime"]),
            python=str(values["python"]),
            repo2docker=str(values["repo2docker"]),
            max_builds=max_builds,
            keep_images=keep_images,
            min_free_gb=min_free_gb,
        )


def login_scope(user):
    """The login account's own part of the builder: a folder name and a Docker repository
    component. Runs of different users sharing one builder account then never take, replace or
    remove each other's folders and images by accident (on purpose they still can: one builder
    account is one trust domain, docs/security.md)."""
    return naming.account_slug(user)


def scoped_tag(scope, tag):
    """The image's name on the builder: under the login account's own repository namespace."""
    return f"{scope}/{tag}"


def remote_paths(workdir, scope, name, sha):
    folder = posixpath.join(workdir, scope, name, sha)
    return {
        "folder": folder,
        "source": posixpath.join(folder, "source"),
        "tarball": posixpath.join(folder, "image.tar"),
        "tarball_digest": posixpath.join(folder, "image.tar.found-sha256"),
        "tarball_sha256": posixpath.join(folder, "image.tar.sha256"),
        "sif": posixpath.join(folder, f"{name}.sif"),
        "checksum": posixpath.join(folder, f"{name}.sif.sha256"),
        "build_slots": posixpath.join(workdir, ".build-slots"),
        "tools": posixpath.join(workdir, ".tools"),
    }


def with_build_slot(command, slots_folder, max_builds):
    """`command` run once it holds one of `max_builds` slots on the builder: a flock on
    `{slots_folder}/{n}`, held by the shell and its children (fd 4) and released when they end,
    however they end. The limit so holds across runs, and for everyone sharing the work folder."""
    folder = shlex.quote(slots_folder)
    return (
        f"mkdir -p -- {folder} && waited= && while :; do "
        f"for slot in $(seq 1 {int(max_builds)}); do exec 4>{folder}/\"$slot\" && flock -n 4 && break 2; done; "
        f"[ -n \"$waited\" ] || echo \"waiting for a build slot on the builder (max_builds: {int(max_builds)}, all in use)\"; "
        f"waited=1; sleep {SLOT_WAIT_SECONDS}; done && "
        f"echo \"build slot $slot of {int(max_builds)}\" && {command}"
    )


def images_to_remove(listing, current_tag, keep):
    """Older images of one name beyond the newest `keep` (the one just built counts among
    them). `listing`: `docker image ls --format '{{.CreatedAt}}\t{{.Repository}}:{{.Tag}}'`
    lines; CreatedAt is the same zone for all, so it sorts as text."""
    images = sorted((line.split("\t", 1) for line in listing.splitlines() if "\t" in line), reverse=True)
    tags = [tag for _, tag in images if tag != current_tag and not tag.endswith(":<none>")]
    return tags[keep - 1 :]


def checked_while(command, path, sha256, found_file):
    """`command`, with `path`'s sha256 taken alongside it into `found_file`; succeeds only when
    both did and the digest is `sha256`."""
    found, expected = shlex.quote(found_file), shlex.quote(sha256)
    return (
        f"{{ sha256sum -- {shlex.quote(path)} >{found} 2>&1 & r2s_hasher=$!; }} && "
        # a failed command still waits for the digest, which may be why it failed
        f"{{ {{ {command}; }} || {{ wait \"$r2s_hasher\"; false; }}; }} && wait \"$r2s_hasher\" && "
        # the path goes to printf as an argument of its own: inside the message's quotes it would be code
        f"read -r r2s_found _ <{found} && {{ [ \"$r2s_found\" = {expected} ] || "
        f"{{ printf 'sha256 of %s: %s, not %s\\n' {shlex.quote(path)} \"$r2s_found\" {expected}; false; }}; }}"
    )


def saved_while_hashed(tag, folder, partial, tarball, digest_file):
    """`docker save` into `tarball`, its sha256 into `digest_file` as it is written (a second
    read of the tarball would cost the chain as long again as writing it): a pipe through tee
    into sha256sum. A pipeline's status is its last command's, so docker and tee each leave a
    mark when they fail; the tarball and its digest take their names only when neither did."""
    failed = shlex.quote(partial + ".failed")
    quoted_partial, quoted_digest = shlex.quote(partial), shlex.quote(digest_file)
    return (
        remote_command(["mkdir", "-p", "--", folder], ["rm", "-f", "--", partial + ".failed"])
        + f" && {{ {shlex.join(['docker', 'save', tag])} || : >{failed}; }}"
        + f" | {{ tee -- {quoted_partial} || : >{failed}; }}"
        + f" | sha256sum >{quoted_digest}.partial && [ ! -e {failed} ] && "
        + remote_command(["mv", "-f", "--", partial, tarball], ["mv", "-f", "--", digest_file + ".partial", digest_file])
    )


def ask_script(questions):
    """One shell line that runs `questions` ({name: argument list}) one after the other and prints
    each one's output and exit status between markers (parse_checks reads them): several small
    questions in one round trip."""
    return "; ".join(
        f"printf '@@check %s\\n' {name}; {{ {remote_command(command)}; }} 2>&1; printf '\\n@@rc %s\\n' \"$?\""
        for name, command in questions.items()
    )


def answer(checks, name):
    """The output of a question of ask_script's that succeeded, else None."""
    status, text = checks.get(name, (1, ""))
    return text if status == 0 else None


def first_word(text):
    words = (text or "").split()
    return words[0] if words else None


@functools.cache
def conversion_script():
    """archive_to_sif.py's bytes and full sha256 (read once: build_sif and make_sif both need them)."""
    content = runtime.ARCHIVE_TO_SIF.read_bytes()
    return content, hashlib.sha256(content).hexdigest()


def conversion_script_path(paths, digest):
    """Where archive_to_sif.py goes on the builder: under a name of its content, so it is sent
    once per version."""
    return posixpath.join(paths["tools"], f"archive_to_sif.{digest[:16]}.py")


def run_if_unchanged(script, digest, command):
    """`command` (which runs `script`) only if `script` still has the sha256 `digest`: its name
    holds its hash, but anyone with the builder account could have written another file there
    since it was sent."""
    quoted = shlex.quote(script)
    return (
        f"r2s_script=$(sha256sum -- {quoted}) && r2s_script=${{r2s_script%% *}} && {{ [ \"$r2s_script\" = {shlex.quote(digest)} ] || "
        f"{{ printf '%s was changed on the builder since it was sent (sha256 %s); not run\\n' {quoted} \"$r2s_script\"; false; }}; }} && "
        f"{command}"
    )


def image_listing(tag):
    """The question whose answer images_to_remove reads: the images of `tag`'s repository."""
    return ["docker", "image", "ls", "--format", "{{.CreatedAt}}\t{{.Repository}}:{{.Tag}}", "--", tag.rsplit(":", 1)[0]]


def image_details(text):
    """`docker image inspect`'s answer (ask's, with stderr: a warning may precede the JSON, which
    starts a line of its own), else None."""
    lines = (text or "").splitlines(keepends=True)
    starts = [number for number, line in enumerate(lines) if line.startswith("[")]
    try:
        found, _ = json.JSONDecoder().raw_decode("".join(lines[starts[0] :])) if starts else ([], 0)
        return found[0] if found and isinstance(found[0], dict) else None
    except (ValueError, IndexError, TypeError):
        return None


def check_tarball_receipt(receipt, found, receipt_path):
    """`found`: {"size"} of the tarball on the builder, with its "sha256" once known, or None
    when it is gone."""
    rerun = f"rerun it with: snakemake --forcerun save_image (receipt {receipt_path})"
    if found is None:
        raise StepError(f"the saved image {receipt['path']} is gone from builder {receipt['host']}; {rerun}")
    if found["size"] != receipt["size_bytes"] or found.get("sha256", receipt["sha256"]) != receipt["sha256"]:
        raise StepError(f"the saved image {receipt['path']} on builder {receipt['host']} does not match its receipt; {rerun}")


def check_image_receipt(receipt, found_id, host, receipt_path):
    if found_id != receipt["image_id"]:
        # a receipt written by a local build, or by another builder, names an image this one never had
        where = (receipt.get("builder") or {}).get("host")
        origin = "" if where == host else f" (built {f'on {where}' if where else 'locally'})"
        raise StepError(
            f"builder {host} does not have image {receipt['tag']} ({receipt['image_id'][:19]}) named in "
            f"{receipt_path}{origin}; rebuild it with: snakemake --forcerun build_image"
        )


# ------------------------------------------------------------------ the preflight


def parse_checks(output):
    """The preflight script's output: {check: (exit status, text)}."""
    found = {}
    current = None
    lines = []
    for line in output.splitlines():
        if line.startswith("@@check "):
            current, lines = line.split(" ", 1)[1], []
        elif line.startswith("@@rc ") and current:
            found[current] = (int(line.split()[1]), "\n".join(lines).strip())
            current = None
        elif current:
            lines.append(line)
    return found


def parse_df(text):
    lines = text.splitlines()
    try:
        return int(lines[-1].split()[3])
    except (IndexError, ValueError):
        return None


def preflight_problems(settings, workdir, checks, needs=TOOLS):
    """One line per problem found by the preflight script; an empty list when all is well."""
    problems = []
    where = f"builder {settings.target.display}"
    rc, text = checks.get("docker", (127, ""))
    if "docker" in needs:
        if rc == 127 or "not found" in text and "docker" in text.split(":")[0]:
            problems.append(f"{where}: docker is not installed (or not on the PATH of {settings.target.login}'s SSH sessions)")
        elif rc != 0:
            problems.append(f"{where}: the Docker engine does not answer `docker version`: {last_line(text)}")
        elif "buildx" in needs:
            rc, text = checks.get("buildx", (1, ""))
            if rc != 0:
                problems.append(f"{where}: docker buildx is missing (repo2docker needs it): {last_line(text)}")
    rc, text = checks.get("repo2docker", (127, ""))
    if "repo2docker" in needs and rc != 0:
        problems.append(f"{where}: {settings.repo2docker} does not run: {last_line(text, 'not found')}")
    rc, text = checks.get("runtime", (127, ""))
    if "runtime" in needs and rc != 0:
        problems.append(f"{where}: {settings.runtime} does not run: {last_line(text, 'not found')}")
    rc, text = checks.get("flock", (127, ""))
    if "flock" in needs and rc != 0:
        problems.append(f"{where}: flock (util-linux) does not run, and max_builds needs it: {last_line(text, 'not found')}")
    rc, text = checks.get("python", (127, ""))
    if "python" in needs and (rc != 0 or version_of(text) < PYTHON_MINIMUM):
        problems.append(
            f"{where}: {settings.python} (>= {'.'.join(map(str, PYTHON_MINIMUM))}) does not run, and the fast SIF "
            f"conversion needs it: {last_line(text, 'not found')}"
        )
    rc, text = checks.get("mksquashfs", (127, ""))
    if "mksquashfs" in needs and (rc != 0 or version_of(text) < MKSQUASHFS_MINIMUM):
        problems.append(
            f"{where}: mksquashfs >= {'.'.join(map(str, MKSQUASHFS_MINIMUM))} (squashfs-tools) does not run, and the fast "
            f"SIF conversion needs it: {last_line(text, 'not found')}"
        )
    rc, text = checks.get("space", (1, ""))
    free_kb = parse_df(text) if rc == 0 else None
    if free_kb is None:
        problems.append(f"{where}: cannot create or measure the work folder {workdir}: {last_line(text)}")
    elif free_kb < settings.min_free_gb * 1e6:
        problems.append(
            f"{where}: only {free_kb / 1e6:.1f} GB free in {workdir} (min_free_gb: {settings.min_free_gb}); "
            "free some space (docker image prune, old folders in the work folder)"
        )
    return problems


def version_of(text):
    """(major, minor) of the first version number in a tool's output, else (0, 0)."""
    found = re.search(r"(\d+)\.(\d+)", text)
    return (int(found[1]), int(found[2])) if found else (0, 0)


def shell_path(path):
    """`path` as a word of the remote shell, with a leading `~` its $HOME (quoted otherwise)."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


def preflight_script(settings, workdir, needs=TOOLS):
    """One shell line that runs the checks `needs` names at once (each tool's start-up, such as
    repo2docker's Python, is paid in parallel) and prints them in order between markers, with the
    account's home folder (a `~` in workdir is the remote shell's to expand: no round trip)."""
    checks = [
        ("docker", ["docker", "version", "--format", "{{.Server.Version}}"]),
        ("buildx", ["docker", "buildx", "version"]),
        ("repo2docker", [settings.repo2docker, "--version"]),
        ("runtime", [settings.runtime, "version"]),
        # which SIF compression the runtime can be told (runtime.choose_compression)
        ("runtime_build_help", [settings.runtime, "build", "--help"]),
        ("flock", ["flock", "--version"]),
        ("python", [settings.python, "--version"]),
        ("mksquashfs", ["mksquashfs", "-version"]),
    ]
    commands = [(name, shlex.join(command)) for name, command in checks if name.split("_")[0] in needs]
    folder = shell_path(workdir)
    commands.append(("space", f"mkdir -p -- {folder} && df -Pk -- {folder}"))
    commands.append(("home", "printf '%s\\n' \"$HOME\""))
    started = " ".join(f'{{ {{ {command}; }} >"$r2s_checks/{name}" 2>&1; echo $? >"$r2s_checks/{name}.rc"; }} &' for name, command in commands)
    names = " ".join(name for name, _ in commands)
    return (
        'r2s_checks=$(mktemp -d) || exit 1; '
        f"{started} wait; "
        f'for name in {names}; do printf \'@@check %s\\n\' "$name"; cat "$r2s_checks/$name"; '
        'printf \'@@rc %s\\n\' "$(cat "$r2s_checks/$name.rc")"; done; rm -rf "$r2s_checks"'
    )


def preflight_identity(settings):
    """What a preflight's answers hold for: the same builder account, work folder and tools."""
    return {
        **settings.target.describe(),
        "workdir": settings.workdir,
        "scope": settings.scope,
        "runtime": settings.runtime,
        "python": settings.python,
        "repo2docker": settings.repo2docker,
        "min_free_gb": settings.min_free_gb,
    }


def trusted_preflight(path, settings, needs, now=None):
    """(work folder, versions, age in seconds) of the preflight receipt at `path` when it checked
    at least `needs` with these settings, at most PREFLIGHT_TRUST_SECONDS ago; else None."""
    try:
        found = json.loads(Path(path).read_text())
        age = (time.time() if now is None else now) - float(found["checked_at"])
        if (
            found["identity"] == json.loads(json.dumps(preflight_identity(settings)))
            and set(needs) <= set(found["needs"])
            and 0 <= age <= PREFLIGHT_TRUST_SECONDS
            and isinstance(found["versions"], dict)
            and str(found["workdir"]).startswith("/")
        ):
            return found["workdir"], found["versions"], age
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def readiness_line(settings, workdir, versions):
    """What `check_builder` prints when the builder is ready."""
    tools = ", ".join(f"{name} {versions[name]}" for name in TOOLS if name in versions)
    return (
        f"builder {settings.target.display} is ready: {tools}; {versions['free_gb']} GB free in {workdir}; "
        f"max_builds {settings.max_builds}, keep_images {settings.keep_images}"
    )


class BuilderSession:
    """One connection to the builder, checked for the tools a step needs: the transport, the
    work folder there, and the versions the preflight found."""

    def __init__(self, settings, log, needs, trust=None):
        self.settings = settings
        self.needs = needs
        self.transport = SSHTransport(settings.target, log)
        self.workdir = settings.workdir
        self.versions = {}
        # a preflight receipt of an earlier step of this run (trusted_preflight), if any
        self.trust = trust
        self.checked_at = None

    def __enter__(self):
        self.transport.connect()
        try:
            trusted = trusted_preflight(self.trust, self.settings, self.needs) if self.trust else None
            if trusted:
                self.workdir, self.versions, age = trusted
                self.transport.step_log.info(f"builder preflight of {age:.0f} s ago trusted ({self.trust}): " + json.dumps(self.versions, sort_keys=True))
            else:
                self.checked_at = time.time()
                self.versions = self.preflight()
        except BaseException:
            self.transport.close()
            raise
        return self

    def __exit__(self, *exc):
        self.transport.close()

    def record_preflight(self, path):
        """What this session's own preflight found, for the later steps of the run
        (trusted_preflight); a trusted receipt is never passed on, so its age stays bounded."""
        if self.checked_at is not None:
            write_json_atomic(
                path,
                {
                    "checked_at": self.checked_at,
                    "identity": preflight_identity(self.settings),
                    "needs": sorted(self.needs),
                    "workdir": self.workdir,
                    "versions": self.versions,
                },
            )

    def paths(self, name, sha):
        return remote_paths(self.workdir, self.settings.scope, name, sha)

    def preflight(self):
        """Raises StepError with one line per problem; the versions found go into the log."""
        _, out, _ = self.transport.capture(preflight_script(self.settings, self.workdir, self.needs))
        checks = parse_checks(out)
        if self.workdir.startswith("~"):
            home = checks.get("home", (1, ""))[1].strip()
            if not home.startswith("/"):
                raise StepError(f"builder {self.settings.target.display}: the account has no home folder")
            self.workdir = expand_home(self.workdir, home)
        problems = preflight_problems(self.settings, self.workdir, checks, self.needs)
        if problems:
            self.transport.step_log.info("\n".join(problems))
            raise StepError("\n".join(problems))
        # mksquashfs says its version first, then its licence
        versions = {
            name: text.splitlines()[0] if name == "mksquashfs" and text else last_line(text)
            for name, (_, text) in checks.items()
            if name not in ("space", "runtime_build_help", "home")
        }
        versions["free_gb"] = round(parse_df(checks["space"][1]) / 1e6, 1)
        if "runtime_build_help" in checks:
            versions["mksquashfs_args"] = "--mksquashfs-args" in checks["runtime_build_help"][1]
        self.transport.step_log.info("builder preflight: " + json.dumps(versions, sort_keys=True))
        return versions

    def run(self, command):
        """A quick command there: (exit status, stdout, stderr)."""
        return self.transport.capture(remote_command(command))

    def ask(self, **questions):
        """Several quick commands there in one round trip: {name: (exit status, output)}."""
        return parse_checks(self.transport.capture(ask_script(questions))[1])

    def docker_step(self, command, step):
        """A Docker step there; if it fails because the engine there is gone, say so."""
        try:
            self.transport.run_logged(command, self.transport.log_path, step)
        except StepError:
            # a lost connection is its own answer: asking the engine over it would only hide it
            if not self.transport.connected():
                raise
            if self.run(["docker", "version"])[0] != 0:
                raise StepError(
                    f"{step} failed: the Docker engine on builder {self.settings.target.display} does not answer; "
                    "start it there and run again"
                ) from None
            raise

    def inspect(self, tag):
        status, out, _ = self.run(["docker", "image", "inspect", tag])
        return json.loads(out)[0] if status == 0 else None


class SSHBuilder(Builder):
    kind = "ssh"
    # the saved image stays on the builder and a receipt names it here: the DAG keeps its
    # shape, only the file that stands for the tarball changes
    saved_image_file = "image.tar.receipt.json"

    def __init__(self, config, log=None):
        super().__init__(config, log)
        self.settings = SSHBuilderSettings.from_config(config)
        self.compression_setting = config["sif_compression"]
        self.conversion = config["sif_conversion"]

    def session(self, step, trust=None):
        needs = STEP_TOOLS.get(step, TOOLS)
        if self.conversion != "fast":
            needs = tuple(tool for tool in needs if tool not in FAST_CONVERSION_TOOLS)
        return BuilderSession(self.settings, self.log, needs, trust)

    def build_image(self, spec, source, receipt):
        """Send the clone to the builder, run repo2docker there with the same arguments as a
        local build (once a build slot is free), and write the receipt here."""
        spec = dataclasses.replace(spec, tag=scoped_tag(self.settings.scope, spec.tag))
        with self.session("build_image") as builder:
            paths = builder.paths(spec.name, spec.sha)
            builder.transport.step_log.info(f"sending {source} to {paths['source']}")
            builder.transport.send_folder(source, paths["source"])
            command = remote_command(repo2docker_command(self.settings.repo2docker, paths["source"], spec))
            builder.docker_step(with_build_slot(command, paths["build_slots"], self.settings.max_builds), "build_image (repo2docker)")
            # one round trip: the image, the older images of its name, and (the image holds
            # everything now) the unpacked source removed from the builder
            found = builder.ask(
                inspect=["docker", "image", "inspect", "--", spec.tag],
                removed=["rm", "-rf", "--", paths["source"]],
                listing=image_listing(spec.tag),
            )
            details = image_details(answer(found, "inspect"))
            if details is None:
                raise StepError(f"repo2docker finished but Docker on builder {self.settings.target.host} has no image {spec.tag}")
            self.remove_old_images(builder, spec.name, spec.tag, answer(found, "listing"))
            found = image_receipt(details, spec.tag, spec.user_name, builder.versions["repo2docker"])
            write_json_atomic(receipt, {**found, "builder": self.settings.target.describe()})
            builder.record_preflight(Path(receipt).with_name(PREFLIGHT_RECEIPT))

    def remove_old_images(self, builder, name, tag, listing):
        """The builder keeps the newest `keep_images` images of this name. An image whose chain
        is still under way there (another run's: its work folder exists until its SIF has been
        fetched) stays, and so does one that cannot go (a container uses it); the log says so.
        `listing`: image_listing's answer, None when it failed."""
        keep = self.settings.keep_images
        repository = tag.rsplit(":", 1)[0]
        old = images_to_remove(listing, tag, keep) if listing is not None else []
        folders = {old_tag: builder.paths(name, old_tag.rsplit(":", 1)[1])["folder"] for old_tag in old}
        under_way = builder.transport.existing(folders.values()) if folders else set()
        if under_way:
            builder.transport.step_log.info(f"kept on the builder, still being made into SIFs: {' '.join(t for t, f in folders.items() if f in under_way)}")
        old = [old_tag for old_tag in old if folders[old_tag] not in under_way]
        if old:
            status, out, err = builder.run(["docker", "image", "rm", "--", *old])
            builder.transport.step_log.info(f"removed older images of {repository} on the builder (keep_images: {keep}): {' '.join(old)}")
            if status != 0:
                builder.transport.step_log.info(f"  some stay: {last_line(err or out)}")

    def save_image(self, name, sha, receipt, saved):
        """docker save on the builder, hashed as it is written; the tarball stays there and a
        receipt names it here."""
        image = json.loads(Path(receipt).read_text())
        with self.session("save_image", trust=Path(receipt).with_name(PREFLIGHT_RECEIPT)) as builder:
            details = builder.inspect(image["tag"])
            check_image_receipt(image, details and details["Id"], self.settings.target.host, receipt)
            paths = builder.paths(name, sha)
            partial = paths["tarball"] + ".partial"
            builder.docker_step(
                saved_while_hashed(image["tag"], paths["folder"], partial, paths["tarball"], paths["tarball_sha256"]),
                "save_image (docker save)",
            )
            found = builder.ask(size=["stat", "-L", "-c", "%s", "--", paths["tarball"]], sha256=["cat", "--", paths["tarball_sha256"]])
            size_text = (answer(found, "size") or "").strip()
            size = int(size_text) if size_text.isdigit() else None
            digest = ((answer(found, "sha256") or "").split() or [None])[0]
            if size is None or digest is None:
                raise StepError(f"docker save finished but builder {self.settings.target.host} has no {paths['tarball']}")
            write_json_atomic(
                saved,
                {
                    **self.settings.target.describe(),
                    "path": paths["tarball"],
                    "size_bytes": size,
                    "sha256": digest,
                    "tag": image["tag"],
                    "image_id": image["image_id"],
                },
            )

    def build_sif(self, name, sha, saved, sif, checksum):
        """The runtime's build on the builder (the SIF is kept there until it is here, so a cut
        download resumes without building again), then the SIF brought back, verified."""
        tarball = json.loads(Path(saved).read_text())
        preflight_receipt = Path(saved).with_name(PREFLIGHT_RECEIPT)
        with self.session("build_sif", trust=preflight_receipt) as builder:
            paths = builder.paths(name, sha)
            # each round trip costs a few tens of ms: the small questions go together
            script_digest = conversion_script()[1]
            script = conversion_script_path(paths, script_digest) if self.conversion == "fast" else None
            questions = {"checksum": ["cat", "--", paths["checksum"]], "tarball": ["stat", "-L", "-c", "%s", "--", tarball["path"]]}
            found = builder.ask(**questions, **({"script": ["sha256sum", "--", script]} if script else {}))
            if first_word(answer(found, "checksum")) is None:
                size = answer(found, "tarball")
                script_there = first_word(answer(found, "script")) == script_digest
                self.make_sif(builder, paths, tarball, saved, int(size) if size and size.strip().isdigit() else None, script, script_there)
            # the tarball is no longer needed once the SIF exists
            found = builder.ask(checksum=questions["checksum"], removed=["rm", "-f", "--", tarball["path"]], size=["stat", "-L", "-c", "%s", "--", paths["sif"]])
            digest = first_word(answer(found, "checksum"))
            if digest is None:
                raise StepError(f"the SIF built on builder {self.settings.target.host} has no checksum")
            size = (answer(found, "size") or "").strip()
            # the checksum comes last: it marks a finished SIF
            builder.transport.download(
                paths["sif"], sif, digest, after_rename=lambda: write_text_atomic(checksum, checksum_line(digest, sif)), size=int(size) if size.isdigit() else None
            )
            # here and verified: nothing of this build is needed on the builder any more
            builder.run(["rm", "-rf", "--", paths["folder"]])
        # the chain's last step on the builder: no later step needs the preflight's answers
        preflight_receipt.unlink(missing_ok=True)

    def make_sif(self, builder, paths, tarball, saved, size, script, script_there):
        check_tarball_receipt(tarball, None if size is None else {"size": size}, saved)
        fast = self.conversion == "fast"
        compression = runtime.choose_compression(self.compression_setting, fast or builder.versions["mksquashfs_args"])
        content, digest = conversion_script()
        if fast and not script_there:
            # a file of that name with other content is replaced, never run
            builder.transport.put_file(content, script)
        partial = paths["sif"] + ".partial"
        convert = runtime.conversion_command(self.conversion, self.settings.runtime, compression, partial, tarball["path"], self.settings.python, script)
        build = remote_command(["rm", "-f", "--", partial], convert)
        if fast:
            build = run_if_unchanged(script, digest, build)
        # the tarball's digest is checked while the SIF is built from it (hashing it first would
        # cost the chain a full read), and the SIF takes its name only if it matched; the
        # checksum file comes last, so that it marks a finished SIF
        found_file = paths["tarball_digest"]
        try:
            builder.transport.run_logged(
                checked_while(build, tarball["path"], tarball["sha256"], found_file)
                + " && "
                + remote_command(["mv", "-f", "--", partial, paths["sif"]])
                + " && "
                + remote_command(["sha256sum", "--", paths["sif"]])
                + " > "
                + remote_command([paths["checksum"] + ".partial"])
                + " && "
                + remote_command(["mv", "-f", "--", paths["checksum"] + ".partial", paths["checksum"]]),
                self.log,
                runtime.step_name(self.conversion, self.settings.runtime, compression, f" on {self.settings.target.host}"),
            )
        except StepError:
            found = (builder.transport.read_text(found_file) or "").split()
            if found and found[0] != tarball["sha256"]:
                check_tarball_receipt(tarball, {"size": size, "sha256": found[0]}, saved)
            raise

    def readiness(self):
        with self.session("check_builder") as builder:
            line = readiness_line(self.settings, builder.workdir, builder.versions)
            builder.transport.step_log.info(line)
        return line
