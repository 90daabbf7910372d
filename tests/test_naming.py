"""Image and folder names: BinderHub's escaped slug plus hash, safe as Docker tag and file name."""

import pytest

from repo2singularity.naming import DOCKER_COMPONENT_PATTERN, InvalidName, check_name, default_name, image_tag


@pytest.mark.parametrize(
    "url, subdir, readable",
    [
        ("https://github.com/Owner/Some.Repo.git", "", "owner-some-2erepo"),
        ("git@gitlab.example:group/sub/project", "", "sub-project"),
        ("/srv/git/analysis", "", "git-analysis"),
        ("/work/main", "example", "example"),
    ],
)
def test_default_names_are_readable_and_valid_docker_names(url, subdir, readable):
    name = default_name(url, subdir)
    assert name.startswith(readable + "-")
    assert DOCKER_COMPONENT_PATTERN.fullmatch(name)
    assert len(name) <= 63


def test_default_names_differ_by_repository_and_ignore_credentials():
    assert default_name("https://a.example/x/repo") != default_name("https://b.example/x/repo")
    assert default_name("https://user:pw@a.example/x/repo") == default_name("https://a.example/x/repo")
    assert "pw" not in default_name("https://user:pw@a.example/x/repo")


def test_long_and_odd_names_stay_within_limits():
    name = default_name("https://host.example/" + "ÿ" * 500 + "/" + "x" * 500)
    assert len(name) <= 63 and DOCKER_COMPONENT_PATTERN.fullmatch(name)


@pytest.mark.parametrize("given", ["Mixed-Case", "ünïcödé", "with space", "a__b---c"])
def test_odd_but_legitimate_names_get_a_safe_slug(given):
    name = check_name(given)
    assert DOCKER_COMPONENT_PATTERN.fullmatch(name)
    assert check_name(given) == name


def test_plain_names_are_kept():
    assert check_name("my-image.v2") == "my-image.v2"


@pytest.mark.parametrize("given", ["../escape", "a/b", "..", ".hidden", "-x", "a\x07b", "x" * 5000, ""])
def test_names_that_could_escape_results_are_refused(given):
    with pytest.raises(InvalidName):
        check_name(given)


@pytest.mark.parametrize("given", ["logs", "benchmarks", "summary.json", "summary.md"])
def test_names_of_the_workflows_own_files_in_results_are_refused(given):
    # results/logs/servers/... or results/summary.md would be mixed with an image's folder
    with pytest.raises(InvalidName, match=f"results/{given} is the workflow's own"):
        check_name(given)


def test_image_tag_has_prefix_name_and_sha():
    assert image_tag("r2s-", "example-abc123", "0" * 40) == "r2s-example-abc123:" + "0" * 40
