"""Manifests: every malformed row reported with its line, all at once, before anything runs."""

import pytest

from repo2singularity import builds
from repo2singularity.manifest import ManifestError

from .workflow_runner import PROJECT, last_line, snakemake

SCHEMA = PROJECT / "workflow" / "schemas" / "manifest.schema.yaml"


@pytest.fixture
def repo(make_repo):
    repo = make_repo("good")
    repo.commit("first", {"Dockerfile": "FROM debian:bookworm\n"})
    return repo


def load(path):
    return builds.builds_from_manifest(path, SCHEMA, (str(path.parent),), ())


def problems_of(path):
    with pytest.raises(ManifestError) as error:
        load(path)
    return error.value.problems


def test_tsv_manifest_with_per_row_settings(tmp_path, repo):
    manifest = tmp_path / "images.tsv"
    manifest.write_text(
        "# images we publish\n"
        "name\trepo\tref\trepo2docker_args\n"
        f"one\t{repo.path}\tmain\t--build-arg 'GREETING=hello world'\n"
        "\n"
        f"Two\t{repo.path}\n"
    )
    found = load(manifest)
    assert list(found) == ["one", builds.naming.check_name("Two")]
    assert found["one"].repo2docker_args == ("--build-arg", "GREETING=hello world")
    assert found["one"].ref == "main" and found[builds.naming.check_name("Two")].ref == ""


def test_a_row_may_insist_on_a_builder_but_one_run_has_one(tmp_path, repo):
    manifest = tmp_path / "images.tsv"
    manifest.write_text(
        "name\trepo\tbuilder\n"
        f"either\t{repo.path}\t\n"
        f"here\t{repo.path}\tlocal\n"
        f"there\t{repo.path}\tremote\n"
        f"nowhere\t{repo.path}\tmars\n"
    )
    for run_builder, refused_line, refused in (("local", 4, "remote"), ("remote", 3, "local")):
        with pytest.raises(ManifestError) as error:
            builds.builds_from_manifest(manifest, SCHEMA, (str(tmp_path),), (), run_builder)
        problems = error.value.problems
        assert len(problems) == 2
        assert problems[0].startswith(f"{manifest}:{refused_line}: builder {refused!r}, but this run builds")
        assert problems[1].startswith(f"{manifest}:5:") and "mars" in problems[1]
    manifest.write_text(manifest.read_text().replace(f"nowhere\t{repo.path}\tmars\n", "").replace(f"there\t{repo.path}\tremote\n", ""))
    assert list(builds.builds_from_manifest(manifest, SCHEMA, (str(tmp_path),), (), "local")) == ["either", "here"]


def test_every_problem_of_a_tsv_manifest_is_reported_with_its_line(tmp_path, repo):
    manifest = tmp_path / "images.tsv"
    manifest.write_text(
        "name\trepo\tref\tcolour\n"  # line 1
        f"ok\t{repo.path}\tmain\n"  # 2
        f"ok\t{repo.path}\tmain\n"  # 3: duplicate name
        f"dash\t{repo.path}\t--upload-pack=x\n"  # 4: option injection
        f"escape/x\t{repo.path}\tmain\n"  # 5: name leaves results/
        f"gone\t{tmp_path / 'nowhere'}\tmain\n"  # 6: no such repository
        f"paint\t{repo.path}\tmain\tred\n"  # 7: unknown column
        f"extra\t{repo.path}\tmain\tx\ty\n"  # 8: too many fields
        "\trepo-only\n"  # 9: no name
    )
    problems = problems_of(manifest)
    lines = [int(problem.split(":")[1]) for problem in problems]
    assert lines == sorted(lines) and set(lines) == {3, 4, 5, 6, 7, 8, 9}
    text = "\n".join(problems)
    assert "already used on line 2" in text
    assert "may not start with '-'" in text
    assert "may not contain '/'" in text
    assert "repository not found" in text
    assert "'colour' was unexpected" in text
    assert "5 fields, but the header (line 1) names 4" in text
    assert "'name' is a required property" in text


def test_yaml_manifest_problems_carry_lines(tmp_path, repo):
    manifest = tmp_path / "images.yaml"
    manifest.write_text(
        "images:\n"
        f"  - name: ok\n    repo: {repo.path}\n    ref: main\n"  # lines 2-4
        f"  - name: digits\n    repo: {repo.path}\n    ref: 0123456\n"  # 5-7: a number
        f"  - name: ok\n    repo: {repo.path}\n"  # 8-9: duplicate
    )
    problems = problems_of(manifest)
    assert problems[0].startswith(f"{manifest}:5: ref: ") and "is not of type 'string'" in problems[0]
    assert problems[1] == f"{manifest}:8: name 'ok' is already used on line 2"


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x00\x01\x02garbage", "manifest is binary"),
        (b"\xff\xfe name", "not UTF-8"),
        (b"", "manifest is empty"),
        (b"images: [oops", "not valid YAML"),
    ],
)
def test_garbage_is_one_clear_problem(tmp_path, content, message):
    manifest = tmp_path / ("m.yaml" if b"images" in content else "m.tsv")
    manifest.write_bytes(content)
    assert message in problems_of(manifest)[0]


def test_huge_manifest_is_refused_without_reading_it_all(tmp_path, repo):
    manifest = tmp_path / "huge.tsv"
    row = f"x\t{repo.path}\tmain\n"
    with open(manifest, "w") as handle:
        handle.write("name\trepo\tref\n")
        handle.write(row * 1_000_000)
    assert "at most" in problems_of(manifest)[0]


def test_snakemake_reports_all_problems_before_running(tmp_path, repo):
    manifest = tmp_path / "images.tsv"
    manifest.write_text(f"name\trepo\tref\na\t{repo.path}\t-x\na\t{repo.path}\tmain\n")
    result = snakemake(tmp_path, config={"manifest": manifest}, check=False)
    assert result.returncode != 0
    assert "2 problem(s) in the manifest" in result.stderr
    assert f"{manifest}:2: ref may not start with '-'" in result.stderr
    assert last_line(result) == f"{manifest}:3: name 'a' is already used on line 2"
    assert not (tmp_path / "results").exists()


def alias_bomb(levels):
    """YAML anchors, each a list of 10 aliases of the one before: 10**levels strings once expanded."""
    lines = ["defaults:", "  h0: &h0 lol"]  # the first anchor is on line 2
    lines += [f"  h{i}: &h{i} [{', '.join([f'*h{i - 1}'] * 10)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def test_yaml_anchors_and_aliases_are_refused_before_they_expand(tmp_path, repo):
    manifest = tmp_path / "images.yaml"
    manifest.write_text(alias_bomb(6) + f"images:\n  - name: bomb\n    repo: {repo.path}\n    repo2docker_args: *h6\n")
    problems = problems_of(manifest)
    assert len(problems) == 1 and len(problems[0]) < 300, problems[0][:300]
    assert problems[0].startswith(f"{manifest}:2: ") and "anchors and aliases" in problems[0]
    # a harmless-looking merge key is an alias too: every value is written out in a manifest
    manifest.write_text(f"- &base {{name: a, repo: {repo.path}}}\n- {{<<: *base, name: b}}\n")
    assert problems_of(manifest) == [f"{manifest}:1: YAML anchors and aliases (&name, *name) are not allowed in a manifest; write each value out"]


def test_a_number_too_long_for_python_is_one_problem(tmp_path, repo):
    manifest = tmp_path / "images.yaml"
    manifest.write_text(f"- name: digits\n  repo: {repo.path}\n  ref: {'1' * 5000}\n")
    problems = problems_of(manifest)
    assert len(problems) == 1 and len(problems[0]) < 300 and problems[0].startswith(f"{manifest}:3: "), problems[0][:300]


LONG = 5000


@pytest.mark.parametrize(
    "column, value, message",
    [
        ("ref", "-" + "a" * LONG, "ref may not start with '-'"),
        ("ref", "a.." * LONG, "longer than 255"),
        ("repo", "-" + "r" * LONG, "may not start with '-'"),
        ("repo", "x" * LONG + "::y", "transport"),
        ("repo", "s" * LONG + "://host/x", "scheme"),
        ("repo", "/nowhere/" + "n" * LONG, "repository not found"),
        ("subdir", "../" + "s" * LONG, "may not leave the repository"),
        ("subdir", "-" + "s" * LONG, "not a plain folder name"),
        ("name", "n" * LONG, "longer than"),
        ("builder", "b" * LONG, "builder"),
    ],
)
def test_a_long_value_is_echoed_cut_short(tmp_path, repo, column, value, message):
    values = {"name": "long", "repo": str(repo.path), "ref": "main", column: value}
    manifest = tmp_path / "images.tsv"
    manifest.write_text("\t".join(values) + "\n" + "\t".join(values.values()) + "\n")
    problems = problems_of(manifest)
    assert len(problems) == 1 and message in problems[0], problems[0][:300]
    assert len(problems[0]) < len(str(manifest)) + 300, problems[0][:300]


def test_a_long_value_of_the_wrong_type_is_echoed_cut_short(tmp_path, repo):
    manifest = tmp_path / "images.yaml"
    manifest.write_text(f"- name: wrong\n  repo: {repo.path}\n  repo2docker_args: {'x' * LONG}\n")
    problems = problems_of(manifest)
    assert len(problems) == 1 and "is not of type 'array'" in problems[0], problems[0][:300]
    assert len(problems[0]) < len(str(manifest)) + 300 and f"({LONG} characters)" in problems[0]


def test_repo2docker_options_outside_the_build_are_refused_with_their_line(tmp_path, repo):
    manifest = tmp_path / "images.yaml"
    manifest.write_text(
        f"- name: fine\n  repo: {repo.path}\n  repo2docker_args: [--build-arg, A=1, --appendix, 'RUN echo hi']\n"  # 1-3
        f"- name: config\n  repo: {repo.path}\n  repo2docker_args: [--config, /tmp/evil.py]\n"  # 4-6
        f"- name: forged\n  repo: {repo.path}\n  repo2docker_args:\n    - --appendix\n    - |\n      RUN true\n      LABEL repo2singularity.sha=x\n"
    )
    problems = problems_of(manifest)
    assert len(problems) == 2
    assert problems[0].startswith(f"{manifest}:4: repo2docker_args: option '--config' is not allowed")
    assert problems[1].startswith(f"{manifest}:7: repo2docker_args: --appendix: 'LABEL'")
