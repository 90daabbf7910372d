"""`repo2singularity`: the original tool's command line as a thin front end over the workflow.

It only builds a Snakemake command line (targets, profile, `--config`) and runs it; everything
else happens in the workflow, so `--dry-run` prints the exact `snakemake ...` to graduate to."""

import argparse
import json
import os
import shlex
import shutil
import sys
from pathlib import Path

import yaml

from . import PROGRAM
from .repository import redact_url

# the checkout this package belongs to (installed editable, as setup/python.sh does)
CHECKOUT = Path(__file__).resolve().parents[3]
SUBCOMMANDS = {"servers": "servers", "stop": "stop", "check-builder": "check_builder"}
# where Snakemake looks a profile name up, besides the working folder
PROFILE_FOLDERS = ("~/.config/snakemake", "/etc/xdg/snakemake")
DEFAULT_TOKEN_VARIABLE = "R2S_SERVICE_TOKEN"

DESCRIPTION = """\
Build a Jupyter-enabled Apptainer/Singularity image (SIF) from a code repository with
repo2docker, and run it on an HPC system. Runs the repo2singularity Snakemake workflow;
--dry-run prints the snakemake command instead of running it."""

USAGE = """\
%(prog)s [--ref REF] [--name NAME] [--remote --endpoint-url URL | --builder-ssh HOST]
                        [--sandbox | --run [--slurm]] [--profile NAME] [--cores N]
                        [--config KEY=VALUE] [--dry-run] REPO
       %(prog)s [options] --manifest FILE
       %(prog)s servers | stop REPO | check-builder [options]"""

EPILOG = """\
commands:
  REPO                  build the SIF of REPO (a URL or a local git repository) at --ref
  servers               list the Jupyter servers this folder's results/ records
  stop REPO             stop the servers of REPO (or of every image of --manifest)
  check-builder         check the builder (--endpoint-url or --builder-ssh) and say what it has

examples:
  repo2singularity https://github.com/org/repo
  repo2singularity --remote --endpoint-url https://builder.example/api https://github.com/org/repo
  repo2singularity --builder-ssh me@vm.example.org --ref v1.0 https://github.com/org/repo
  repo2singularity --run --slurm https://github.com/org/repo
  repo2singularity --dry-run --run https://github.com/org/repo   # the snakemake command

Results go to ./results/{name}/{sha}/. Every setting is in the workflow's
workflow/schemas/config.schema.yaml; set any with --config KEY=VALUE. See docs/cli.md."""


class UsageError(Exception):
    """A command line that cannot work, told in one line."""


def parser():
    p = argparse.ArgumentParser(
        prog=PROGRAM,
        usage=USAGE,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("words", nargs="*", metavar="REPO", help="repository URL or local path, or one of the commands below")
    p.add_argument("--ref", help="branch, tag or commit to build (default: the default branch)")
    p.add_argument("--name", help="name of the image and of its folder under results/ (default: derived from REPO)")
    build = p.add_argument_group("where to build (default: this machine's Docker)")
    build.add_argument("--remote", action="store_true", help="build on a repo2singularity build service (needs --endpoint-url)")
    build.add_argument("--endpoint-url", metavar="URL", help="the build service's URL, e.g. https://builder.example/api")
    build.add_argument(
        "--token-env",
        metavar="NAME",
        help=f"environment variable holding your token for the build service (default: {DEFAULT_TOKEN_VARIABLE})",
    )
    build.add_argument("--ca-file", metavar="FILE", help="CA certificate (PEM) to check the build service's certificate against")
    build.add_argument("--builder-ssh", metavar="[USER@]HOST[:PORT]", help="build on a host with Docker reached over SSH")
    stage = p.add_argument_group("how far to go (default: the SIF)")
    how_far = stage.add_mutually_exclusive_group()
    how_far.add_argument("--sandbox", action="store_true", help="also unpack the SIF into a writable sandbox folder")
    how_far.add_argument("--run", action="store_true", help="also launch Jupyter from the sandbox and print its URL")
    stage.add_argument("--slurm", action="store_true", help="with --run: launch Jupyter as a Slurm job (default profile: slurm)")
    stage.add_argument("--manifest", metavar="FILE", help="build every image of a manifest (TSV or YAML) instead of one REPO")
    snake = p.add_argument_group("Snakemake")
    snake.add_argument("--profile", metavar="NAME", help="Snakemake profile: local (default), slurm, remote, or a folder")
    snake.add_argument("--cores", metavar="N", help="cores for local jobs (default: the profile's)")
    snake.add_argument(
        "--config",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="any workflow setting, passed to snakemake --config (repeatable)",
    )
    snake.add_argument("--dry-run", action="store_true", help="print the snakemake command and exit")
    return p


def read_back(text):
    """What Snakemake's --config makes of a value (snakemake.cli.parse_config): quotes at either
    end stripped, then the first of int, float, True/False, YAML (all scalars strings) that
    takes it."""
    text = text.strip("'\"")
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    if text in ("True", "False"):
        return text == "True"
    try:
        return yaml.load(text, Loader=yaml.BaseLoader)
    except yaml.YAMLError:
        return text


def parse(argv):
    # options may come after the repository or a command (`stop --run URL`)
    return parser().parse_intermixed_args(argv)


def config_value(key, value):
    """`key=value` for --config such that the workflow gets `value` as this very string. A ref of
    digits only, `True` or `1e5` would arrive as a number or a bool, and quotes do not help
    (Snakemake strips them): YAML's `!!str` tag does."""
    for given in (value, f"!!str {value}"):
        if read_back(given) == value:
            return f"{key}={given}"
    raise UsageError(f"{key} {value!r} cannot be passed through Snakemake's --config unchanged")


def builder_setting(args):
    """The `builder` config value for --endpoint-url or --builder-ssh, as JSON (which Snakemake
    reads as YAML), or None."""
    if args.endpoint_url:
        setting = {"kind": "http", "url": args.endpoint_url}
        if args.token_env:
            setting["token_env"] = args.token_env
        if args.ca_file:
            setting["ca_file"] = str(Path(args.ca_file).expanduser().resolve())
        return json.dumps(setting)
    if args.builder_ssh:
        user, _, host = args.builder_ssh.rpartition("@")
        port = ""
        if host.count(":") == 1 or (host.startswith("[") and "]:" in host):
            host, _, port = host.rpartition(":")
        host = host.strip("[]")
        if not host or host.startswith("-") or any(c.isspace() for c in args.builder_ssh):
            raise UsageError(f"--builder-ssh is not [USER@]HOST[:PORT]: {args.builder_ssh!r}")
        setting = {"kind": "ssh", "host": host}
        if user:
            setting["user"] = user
        if port:
            if not port.isdigit():
                raise UsageError(f"--builder-ssh port is not a number: {port!r}")
            setting["port"] = int(port)
        return json.dumps(setting)
    return None


def profile_argument(name, cwd):
    """The profile as Snakemake finds it: a name it finds itself (the working folder, then the
    user's and the system's folders) stays a name; one of this checkout's profiles otherwise
    becomes its path, so the command works from any folder."""
    if "/" in name or Path(cwd, name).is_dir():
        return name
    if any(Path(folder, name).expanduser().is_dir() for folder in PROFILE_FOLDERS):
        return name
    ours = CHECKOUT / "profiles" / name
    return str(ours) if ours.is_dir() else name


def profile_folder(profile, cwd):
    for folder in (Path(cwd), *(Path(f).expanduser() for f in PROFILE_FOLDERS)):
        if (folder / profile).is_dir():
            return folder / profile
    return Path(cwd, profile)


def profile_sets_builder(profile, cwd):
    """Whether the profile's config files set `builder`: Snakemake merges --config into them
    key by key, so another kind's settings would be mixed into the one given here."""
    folder = profile_folder(profile, cwd)
    try:
        settings = yaml.safe_load((folder / "config.yaml").read_text()) or {}
        files = settings.get("configfile") or settings.get("configfiles") or []
        for name in [files] if isinstance(files, str) else files:
            content = yaml.safe_load(Path(folder, name).expanduser().read_text()) or {}
            if isinstance(content, dict) and "builder" in content:
                return str(Path(folder, name))
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    return None


def snakemake_program():
    """Snakemake beside this Python (the project's venv), else the one on PATH; shown as
    `snakemake` when that is what the user's PATH finds anyway."""
    beside = Path(sys.executable).with_name("snakemake")
    found = shutil.which("snakemake")
    if beside.exists():
        return "snakemake" if found and Path(found).resolve() == beside.resolve() else str(beside)
    if found:
        return "snakemake"
    raise UsageError("snakemake is not installed here (run `bash setup.sh check` in the repo2singularity checkout)")


def snakemake_command(args, cwd=None, program="snakemake"):
    """The snakemake command line for repo2singularity's parsed arguments."""
    cwd = Path(cwd or os.getcwd())
    words = list(args.words)
    command = words[0] if words and words[0] in SUBCOMMANDS else None
    if command:
        words = words[1:]
    if len(words) > 1:
        raise UsageError(f"one repository at a time, not {len(words)} (a manifest builds many: --manifest FILE)")
    repo = words[0] if words else None
    if args.remote and not args.endpoint_url:
        raise UsageError("--remote needs --endpoint-url URL (the build service)")
    if args.endpoint_url and args.builder_ssh:
        raise UsageError("--endpoint-url and --builder-ssh name two builders; give one")
    if (args.token_env or args.ca_file) and not args.endpoint_url:
        raise UsageError("--token-env and --ca-file go with --endpoint-url")
    if args.slurm and not args.run:
        raise UsageError("--slurm launches Jupyter as a Slurm job: it goes with --run")
    if command == "servers":
        if repo or args.manifest:
            raise UsageError("servers lists every recorded server: it takes no repository")
    elif command == "check-builder":
        if not (args.endpoint_url or args.builder_ssh or args.profile):
            raise UsageError("check-builder needs a builder: --endpoint-url URL, --builder-ssh HOST or --profile remote")
    elif repo and args.manifest:
        raise UsageError("give a repository or --manifest FILE, not both")
    elif not repo and not args.manifest:
        raise UsageError("which repository? give its URL or path (or --manifest FILE); see --help")
    if command and (args.sandbox or args.run):
        raise UsageError(f"{command} takes no --sandbox or --run")

    if command:
        target = SUBCOMMANDS[command]
    elif args.run:
        target = "launch"
    elif args.sandbox:
        target = "sandbox"
    else:
        # a manifest's default target is its SIFs with their report cards
        target = None if args.manifest else "build"

    line = [program]
    if (cwd / "Snakefile").resolve() != CHECKOUT / "Snakefile":
        line += ["--snakefile", str(CHECKOUT / "Snakefile")]
    if target:
        line.append(target)
    profile = args.profile or ("slurm" if args.slurm else "local")
    line += ["--profile", profile_argument(profile, cwd)]
    if args.cores:
        line += ["--cores", args.cores]

    config = []
    if repo:
        config.append(config_value("repo", repo))
    if args.ref is not None:
        config.append(config_value("ref", args.ref))
    if args.name is not None:
        config.append(config_value("name", args.name))
    if args.manifest:
        config.append(config_value("manifest", args.manifest))
    builder = builder_setting(args)
    if builder:
        sets = profile_sets_builder(profile_argument(profile, cwd), cwd)
        if sets:
            raise UsageError(
                f"profile {profile} sets the builder in {sets}; Snakemake would mix its settings into "
                f"--{'endpoint-url' if args.endpoint_url else 'builder-ssh'}'s: edit the builder there, or use another profile"
            )
        config.append(f"builder={builder}")
    if args.slurm:
        config.append("launch_on=slurm")
    for item in args.config:
        if "=" not in item:
            raise UsageError(f"--config takes KEY=VALUE, not {item!r}")
        config.append(item)
    if config:
        line += ["--config", *config]
    return line


def shown(command):
    """The command for a terminal or log: a repository URL's credentials left out."""
    return shlex.join(f"repo={redact_url(word[5:])}" if word.startswith("repo=") else word for word in command)


def main(argv=None):
    args = parse(argv)
    try:
        command = snakemake_command(args, program=snakemake_program())
    except UsageError as error:
        print(f"{PROGRAM}: {error}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(shlex.join(command))
        return 0
    print(f"{PROGRAM}: running {shown(command)}", file=sys.stderr, flush=True)
    executable = shutil.which(command[0]) or command[0]
    # Snakemake takes this process's place: Ctrl-C, signals and the exit status are its own
    try:
        os.execv(executable, command)
    except OSError as error:
        print(f"{PROGRAM}: cannot run {command[0]}: {error.strerror}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main())
