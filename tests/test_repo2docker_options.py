"""repo2docker_args: only options that change what is built inside the build reach repo2docker;
anything that could run, mount, push, rename or relabel on the builder is refused in one line."""

import pytest

from repo2singularity.repo2docker_options import ALLOWED_OPTIONS, RefusedOption, check_repo2docker_args

APPENDIX = "RUN echo one && \\\n    echo two \\  \n    three\n\n# a comment\n  env GREETING=hello\nUSER root\nCOPY --chown=1000:1000 a /b\n"


def test_options_that_change_only_the_build_pass_unchanged():
    args = [
        "--build-arg", "PIP_INDEX_URL=https://pypi.example/simple",
        "--build-arg=EMPTY=",
        "--target-repo-dir", "/srv/repo",
        "--cache-from", "registry.example:5000/team/base:2024.1",
        "--appendix", APPENDIX,
        "--appendix=RUN true",
    ]  # fmt: skip
    assert check_repo2docker_args(args) == tuple(args)
    assert check_repo2docker_args([]) == ()
    assert set(ALLOWED_OPTIONS) == {"--build-arg", "--appendix", "--target-repo-dir", "--cache-from"}


@pytest.mark.parametrize(
    "args, option",
    [
        (["--run", "--volume", "/:/host"], "--run"),
        (["--volume", "/:/host"], "--volume"),
        (["-v", "/:/host"], "-v"),
        (["--config", "/tmp/evil.py"], "--config"),
        (["--conf", "/tmp/evil.py"], "--conf"),  # argparse would take the abbreviation for --config
        (["--push"], "--push"),
        (["--pus"], "--pus"),
        (["--image-name", "someone-else:latest"], "--image-name"),
        (["--label", "repo2singularity.sha=forged"], "--label"),
        (["--engine", "podman"], "--engine"),
        (["--editable"], "--editable"),
        (["-E"], "-E"),
        (["--env", "A=1"], "--env"),
        (["-e", "A=1"], "-e"),
        (["--publish", "8888:8888"], "--publish"),
        (["-P"], "-P"),
        (["--ref", "other"], "--ref"),
        (["--subdir", "elsewhere"], "--subdir"),
        (["--user-id", "0"], "--user-id"),
        (["--user-name", "root"], "--user-name"),
        (["--no-build"], "--no-build"),
        (["--build-memory-limit", "2G"], "--build-memory-limit"),
        (["--json-logs"], "--json-logs"),
        (["--help"], "--help"),
        (["--Repo2Docker.run=True"], "--Repo2Docker.run"),  # traitlets read what argparse does not know
        (["--build-a", "A=1"], "--build-a"),
        (["https://evil.example/other.git"], "https://evil.example/other.git"),  # a second repository
        (["--", "https://evil.example/other.git"], "--"),
        (["--build-arg", "A=1", "--push"], "--push"),
    ],
)
def test_options_outside_the_build_are_refused_by_name(args, option):
    with pytest.raises(RefusedOption) as error:
        check_repo2docker_args(args)
    message = str(error.value)
    assert "\n" not in message and f"{option!r}" in message and "allowed:" in message, message


@pytest.mark.parametrize(
    "args, message",
    [
        (["--build-arg"], "'--build-arg' needs a value"),
        (["--build-arg", "--push"], "'--build-arg' needs a value"),
        (["--build-arg", "NOEQUALS"], "NAME=VALUE"),
        (["--build-arg", "BAD NAME=1"], "NAME=VALUE"),
        (["--build-arg", "NB_UID=0"], "NB_UID"),
        (["--build-arg", "NB_USER=root"], "NB_USER"),
        (["--build-arg", "BUILDKIT_SYNTAX=evil/frontend"], "BUILDKIT_SYNTAX"),
        (["--build-arg", "A=line\nbreak"], "control characters"),
        (["--target-repo-dir", "relative/dir"], "absolute"),
        (["--target-repo-dir", "/srv/../etc"], "'..'"),
        (["--target-repo-dir", "/srv/with space"], "absolute"),
        (["--target-repo-dir", "/"], "absolute"),
        (["--cache-from", "type=local,src=/home/other/cache"], "image name"),
        (["--appendix", "FROM someone-else:latest"], "'FROM'"),
        (["--appendix", "RUN true\nLABEL repo2singularity.sha=forged"], "'LABEL'"),
        (["--appendix", "  label repo2singularity.repo=forged"], "'LABEL'"),
        (["--appendix", "ONBUILD RUN true"], "'ONBUILD'"),
        (["--appendix", "MAINTAINER someone"], "'MAINTAINER'"),
        (["--appendix", "ECHO hi"], "not a Dockerfile instruction"),
        # where Docker's parser and a careless one could disagree on where an instruction starts
        (["--appendix", "RUN a \\\n\nLABEL x=y"], "blank line"),
        (["--appendix", "RUN a \\\n# note\nLABEL x=y"], "comment"),
        (["--appendix", "# note \\\nLABEL x=y"], "'LABEL'"),
        (["--appendix", "RUN a\u2028LABEL x=y"], "control characters"),
        (["--appendix", "RUN a\r\nLABEL x=y"], "control characters"),
        (["--appendix", "RUN <<EOF\nLABEL x=y\nEOF"], "heredoc"),
        (["--appendix", "RUN \\\n  <<EOF\nRUN x\nEOF"], "heredoc"),
        (["--appendix", "RUN true \\"], "ends inside"),
    ],
)
def test_values_that_could_smuggle_something_are_refused(args, message):
    with pytest.raises(RefusedOption, match=message) as error:
        check_repo2docker_args(args)
    assert "\n" not in str(error.value)


def test_a_long_value_is_echoed_cut_short():
    with pytest.raises(RefusedOption) as error:
        check_repo2docker_args(["--appendix", "RUN true\n" + "X" * 5000])
    assert len(str(error.value)) < 300
