"""repo2docker_args, from the config or a manifest row: only options that change what is built
inside the build reach repo2docker.

repo2docker (2026.4.0) reads its command line with argparse, which lets a later flag win and
takes an unambiguous prefix for an option (`--conf` is `--config`), and passes whatever argparse
does not know to traitlets (`--Repo2Docker.run=True`). Its options include running the image on
the builder with host folders mounted (`--run --volume /:/host`, `--editable`), a Python config
file executed on the builder outside any container (`--config`), pushing with the builder's
credentials (`--push`), another image's name and provenance labels (`--image-name`, `--label`),
another engine, ref or subdir, and a second positional argument that replaces the repository.
So each argument is matched exactly against the short list below, and each value is checked
where it could smuggle something; everything else is refused in one line that names it.

Allowed, and why each is safe:
- `--build-arg NAME=VALUE`: a build argument of the Dockerfile, as a build with `docker build
  --build-arg` has. Refused names: NB_USER and NB_UID (the config's `user_name`/`user_id`; a
  build argument would override them) and BUILDKIT_* (BUILDKIT_SYNTAX swaps the Dockerfile
  frontend for an image of the caller's choice, which could write any labels).
- `--target-repo-dir /PATH`: where the repository is copied in the image (a build argument,
  REPO_DIR); a plain absolute path.
- `--cache-from IMAGE`: images whose layers the build may reuse; an image name only, not
  buildx's `type=local,src=...` forms that read folders of the builder.
- `--appendix TEXT`: Dockerfile instructions run after repo2docker's own (ignored for a
  repository with its own Dockerfile). They run in the build, as a Dockerfile in the repository
  could: RUN, COPY --from another image, RUN --network or --mount are no more than such a
  Dockerfile may do on the same builder. What only the appendix could do is take over the
  provenance: repo2docker writes our labels as LABEL lines before the appendix, so a later LABEL
  or a new FROM stage would replace them. So FROM, LABEL, MAINTAINER and ONBUILD (which acts on
  later builds) are refused, and the text is split into instructions exactly as Docker's parser
  does, refusing what the two could read differently (heredocs, blank or comment lines inside a
  continued instruction, line breaks other than \\n).
"""

import re

from .input_limits import shown

ALLOWED_OPTIONS = ("--build-arg", "--appendix", "--target-repo-dir", "--cache-from")
ALLOWED_HELP = "allowed: --build-arg, --target-repo-dir, --cache-from, --appendix"
WHY_REFUSED = {
    "--run": "it runs the image on the builder; images are built with --no-run",
    "--volume": "it mounts builder folders into a container run on the builder",
    "--editable": "it mounts the source into a container run on the builder",
    "--publish": "it publishes ports of a container run on the builder",
    "--publish-all": "it publishes ports of a container run on the builder",
    "--env": "it sets variables of a container run, and repo2docker refuses it with --no-run",
    "--config": "it executes a Python file on the builder, outside any container",
    "--push": "it pushes with the builder's credentials",
    "--image-name": "the image name is repo2singularity's",
    "--label": "the labels are repo2singularity's provenance",
    "--ref": "the commit is the resolved ref's",
    "--subdir": "use the subdir setting",
    "--user-id": "use the user_id setting",
    "--user-name": "use the user_name setting",
    "--engine": "the engine is the builder's Docker",
    "--build-memory-limit": "repo2docker no longer supports it",
    "--": "what follows it would be read as the repository",
}
SHORT_NAMES = {"-v": "--volume", "-e": "--env", "-E": "--editable", "-p": "--publish", "-P": "--publish-all"}

BUILD_ARG_PATTERN = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)=(?P<value>.*)", re.DOTALL)
RESERVED_BUILD_ARGS = ("NB_USER", "NB_UID")
PATH_PATTERN = re.compile(r"(/[A-Za-z0-9._+@-]+)+")
IMAGE_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@-]*")
MAX_APPENDIX_CHARACTERS = 65536

# Docker's instruction set; what the appendix may not use, and why
DOCKERFILE_INSTRUCTIONS = {
    "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL",
    "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR",
}  # fmt: skip
REFUSED_INSTRUCTIONS = {
    "FROM": "a new stage would drop the image's provenance labels",
    "LABEL": "it would overwrite the image's provenance labels",
    "MAINTAINER": "it sets image metadata",
    "ONBUILD": "it acts on later builds from this image",
}
# buildkit's parser: an instruction goes on while its line ends in the escape character (a
# backslash: repo2docker's template sets no escape directive), maybe followed by spaces and tabs
CONTINUATION = re.compile(r"\\[ \t]*$")
INSTRUCTION = re.compile(r"[ \t]*([A-Za-z]+)(?=[ \t]|$)")
# any other character that some parser could take for a line break
ODD_CHARACTERS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\x85\u2028\u2029]")


class RefusedOption(ValueError):
    """A repo2docker argument that is not allowed, told in one line."""


def check_repo2docker_args(args):
    """The arguments as given, once every one is an allowed option with an acceptable value."""
    args = [str(arg) for arg in args]
    position = 0
    while position < len(args):
        option, joined, value = args[position].partition("=")
        if option not in ALLOWED_OPTIONS:
            raise RefusedOption(refusal(option if option.startswith("-") else args[position]))
        if not joined:
            position += 1
            if position == len(args) or args[position].startswith("-"):
                raise RefusedOption(f"{option!r} needs a value")
            value = args[position]
        check_value(option, value)
        position += 1
    return tuple(args)


def refusal(argument):
    if not argument.startswith("-"):
        reason = "repo2docker would read it as the repository or a command to run"
    else:
        reason = WHY_REFUSED.get(SHORT_NAMES.get(argument, argument), "it does not change only what is built")
    return f"option {shown(argument)} is not allowed ({reason}); {ALLOWED_HELP}"


def check_value(option, value):
    if option == "--appendix":
        check_appendix(value)
        return
    if ODD_CHARACTERS.search(value) or "\n" in value or "\t" in value:
        raise RefusedOption(f"{option}: value contains control characters: {shown(value)}")
    if option == "--build-arg":
        match = BUILD_ARG_PATTERN.fullmatch(value)
        if not match:
            raise RefusedOption(f"--build-arg takes NAME=VALUE (NAME of letters, digits and _): {shown(value)}")
        name = match.group("name")
        if name in RESERVED_BUILD_ARGS:
            raise RefusedOption(f"--build-arg {name} is set from the config's user_name/user_id; set those instead")
        if name.upper().startswith("BUILDKIT_"):
            raise RefusedOption(f"--build-arg {name}: BUILDKIT_* arguments steer BuildKit itself, not the build")
    elif option == "--target-repo-dir":
        if not PATH_PATTERN.fullmatch(value):
            raise RefusedOption(f"--target-repo-dir takes an absolute path of letters, digits and ._+@-: {shown(value)}")
        if {".", ".."} & set(value.split("/")):
            raise RefusedOption(f"--target-repo-dir may not contain '.' or '..': {shown(value)}")
    elif option == "--cache-from" and not IMAGE_PATTERN.fullmatch(value):
        raise RefusedOption(f"--cache-from takes an image name: {shown(value)}")


def check_appendix(text):
    if len(text) > MAX_APPENDIX_CHARACTERS:
        raise RefusedOption(f"--appendix is longer than {MAX_APPENDIX_CHARACTERS} characters ({len(text)})")
    if ODD_CHARACTERS.search(text):
        raise RefusedOption("--appendix: contains control characters or line breaks other than \\n")
    if "<<" in text:
        # a heredoc's lines are not instructions to Docker, and where it ends is Docker's to say
        raise RefusedOption("--appendix: heredocs (<<) are not allowed; run a script from the repository instead")
    continued = False
    for number, line in enumerate(text.split("\n"), 1):
        stripped = line.strip(" \t")
        if continued:
            # Docker skips such lines and goes on with the instruction; refused, so that no
            # reading of them can end the instruction early
            if not stripped or stripped.startswith("#"):
                kind = "blank line" if not stripped else "comment"
                raise RefusedOption(f"--appendix line {number}: a {kind} inside a continued instruction")
        elif not stripped or stripped.startswith("#"):
            continue
        else:
            check_instruction(number, line)
        continued = bool(CONTINUATION.search(line))
    if continued:
        raise RefusedOption("--appendix ends inside a continued instruction (its last line ends in '\\')")


def check_instruction(number, line):
    match = INSTRUCTION.match(line)
    keyword = match.group(1).upper() if match else ""
    if keyword not in DOCKERFILE_INSTRUCTIONS:
        raise RefusedOption(f"--appendix line {number}: not a Dockerfile instruction: {shown(line.strip())}")
    if keyword in REFUSED_INSTRUCTIONS:
        raise RefusedOption(f"--appendix: {keyword!r} is not allowed ({REFUSED_INSTRUCTIONS[keyword]}), line {number}")
