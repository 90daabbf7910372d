"""Bad input stops the real workflow with one clear line, before anything is built."""

import pytest

from .workflow_runner import last_line, snakemake


@pytest.fixture
def repo(make_repo):
    repo = make_repo()
    repo.commit("first", {"Dockerfile": "FROM debian:bookworm\n"})
    return repo


def assert_refused(workdir, config, message):
    result = snakemake(workdir, config=config, check=False)
    line = last_line(result)
    assert result.returncode != 0
    assert line.startswith("repo2singularity: ") and message in line, result.stderr[-3000:]
    built = [p for p in (workdir / "results").glob("*") if p.name != ".cache"] if (workdir / "results").exists() else []
    assert built == [], "something was written under results/ before the error"
    return line


def test_repository_that_does_not_exist(tmp_path):
    assert_refused(tmp_path, {"repo": tmp_path / "missing"}, "repository not found")


def test_remote_repository_that_does_not_answer(tmp_path):
    line = assert_refused(tmp_path, {"repo": "https://user:s3cret@127.0.0.1:9/x.git"}, "git ls-remote failed")
    assert "s3cret" not in line


def test_ref_that_does_not_exist(tmp_path, repo):
    assert_refused(tmp_path, {"repo": repo.path, "ref": "no-such-branch"}, "ref 'no-such-branch' not found")


def test_ref_starting_with_dash(tmp_path, repo):
    assert_refused(tmp_path, {"repo": repo.path, "ref": "--upload-pack=touch"}, "may not start with '-'")


def test_url_starting_with_dash(tmp_path):
    assert_refused(tmp_path, {"repo": "-oProxyCommand=touch"}, "may not start with '-'")


def test_name_that_would_escape_results(tmp_path, repo):
    assert_refused(tmp_path, {"repo": repo.path, "name": "../outside"}, "name may not contain")


def test_unknown_config_key(tmp_path, repo):
    assert_refused(tmp_path, {"repo": repo.path, "colour": "red"}, "'colour' was unexpected")


def test_wrong_config_type(tmp_path, repo):
    assert_refused(tmp_path, {"repo": repo.path, "launch_timeout": "soon"}, "'launch_timeout'")


def test_wrong_runtime(tmp_path, repo):
    assert_refused(tmp_path, {"repo": repo.path, "runtime": "docker"}, "'runtime'")


def test_unknown_builder(tmp_path, repo):
    assert_refused(tmp_path, {"repo": repo.path, "builder": "docker"}, "builder must be 'local', 'podman' or a mapping with a host, not 'docker'")


def test_a_long_ref_is_echoed_cut_short(tmp_path, repo):
    line = assert_refused(tmp_path, {"repo": repo.path, "ref": "-" + "a" * 4999}, "may not start with '-'")
    assert len(line) < 300 and "(5000 characters)" in line


def test_a_long_value_of_the_wrong_type_is_echoed_cut_short(tmp_path, repo):
    line = assert_refused(tmp_path, {"repo": repo.path, "launch_timeout": "x" * 5000}, "'launch_timeout'")
    assert len(line) < 300 and "(5000 characters)" in line


def test_a_config_file_with_an_alias_bomb_is_refused_before_it_expands(tmp_path, repo):
    # 10**5 strings once expanded (each level more multiplies the cost of checking by 10)
    bomb = ["h0: &h0 lol"] + [f"h{i}: &h{i} [{', '.join([f'*h{i - 1}'] * 10)}]" for i in range(1, 6)]
    configfile = tmp_path / "bomb.yaml"
    configfile.write_text("\n".join(bomb) + "\nrepo2docker_args: *h5\n")
    result = snakemake(tmp_path, "--configfile", str(configfile), config={"repo": repo.path}, check=False)
    line = last_line(result)
    assert result.returncode != 0 and len(line) < 300, line[:300]
    assert line.startswith("repo2singularity: invalid config: ") and "YAML alias" in line, result.stderr[-2000:]
