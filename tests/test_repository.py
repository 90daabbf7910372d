"""Ref resolution and repository checks against real local git repositories."""

import pytest

from repo2singularity.repository import (
    Repository,
    RepositoryError,
    check_ref,
    check_repository,
    clone_commit,
    redact_url,
    resolve_ref,
)


@pytest.fixture
def repo(make_repo):
    repo = make_repo(branch="trunk")
    first = repo.commit("first")
    repo.git("tag", "light")
    repo.git("tag", "-a", "annotated", "-m", "an annotated tag")
    repo.git("branch", "feature/with/slashes")
    repo.git("branch", "zweig-ä")
    second = repo.commit("second")
    repo.first, repo.second = first, second
    return repo


def resolve(repo, ref, tmp_path=None):
    return resolve_ref(Repository(str(repo.path)), ref, tmp_path)


def test_default_branch_that_is_not_main_or_master(repo):
    found = resolve(repo, "")
    assert (found.sha, found.ref) == (repo.second, "trunk")
    assert resolve(repo, "HEAD").sha == repo.second


def test_branch_names_with_slashes_and_unicode(repo):
    assert resolve(repo, "feature/with/slashes").sha == repo.first
    assert resolve(repo, "zweig-ä").sha == repo.first
    assert resolve(repo, "refs/heads/trunk").sha == repo.second


def test_lightweight_tag(repo):
    assert resolve(repo, "light").sha == repo.first


def test_annotated_tag_gives_the_commit_not_the_tag_object(repo):
    tag_object = repo.git("rev-parse", "annotated")
    found = resolve(repo, "annotated").sha
    assert found == repo.first
    assert found != tag_object


def test_full_and_short_sha_of_a_branch_tip(repo):
    assert resolve(repo, repo.second).sha == repo.second
    assert resolve(repo, repo.second[:7]).sha == repo.second


def test_short_sha_of_an_older_commit_is_looked_up_in_a_fetched_copy(repo, make_repo, tmp_path):
    older = repo.commit("third")
    repo.commit("fourth")
    assert resolve(repo, older[:8], tmp_path / "cache").sha == older
    assert resolve(repo, older.upper()[:10], tmp_path / "cache").sha == older


def test_missing_ref_is_one_clear_line(repo, tmp_path):
    with pytest.raises(RepositoryError, match=r"^ref 'no-such-branch' not found in "):
        resolve(repo, "no-such-branch")
    with pytest.raises(RepositoryError, match="not found") as error:
        resolve(repo, "deadbeef", tmp_path / "cache")
    assert "\n" not in str(error.value)


def test_missing_repository_is_one_clear_line(tmp_path):
    with pytest.raises(RepositoryError, match="repository not found") as error:
        check_repository(str(tmp_path / "nothing-here"))
    assert "\n" not in str(error.value)
    with pytest.raises(RepositoryError, match="not in a git repository"):
        check_repository(str(tmp_path))


@pytest.mark.parametrize(
    "ref",
    ["-x", "--upload-pack=touch /tmp/pwned", "a..b", "a b", "x~1", "x^", "a:b", "x\x00", "x\n", "a" * 300],
)
def test_refs_that_could_be_options_or_are_invalid_are_refused(ref):
    with pytest.raises(RepositoryError):
        check_ref(ref)


@pytest.mark.parametrize(
    "url, message",
    [
        ("-oProxyCommand=x", "may not start with '-'"),
        ("--upload-pack=touch /tmp/pwned", "may not start with '-'"),
        ("ext::sh -c touch% /tmp/pwned", "transport 'ext::'"),
        ("fd::17", "transport 'fd::'"),
        ("ftp://example.invalid/x", "scheme 'ftp'"),
        ("https://host/x\n", "control characters"),
    ],
)
def test_hostile_urls_are_refused(url, message):
    with pytest.raises(RepositoryError, match=message):
        check_repository(url)


def test_folder_inside_a_repository_means_that_repository_and_subdir(repo):
    (repo.path / "binder" / "env").mkdir(parents=True)
    found = check_repository(str(repo.path / "binder"), subdir="env")
    assert found == Repository(str(repo.path.resolve()), "binder/env")


def test_credentials_are_removed_for_display():
    assert redact_url("https://user:s3cret@host.example/x.git") == "https://host.example/x.git"
    assert redact_url("https://TOKEN@host.example/x") == "https://host.example/x"
    assert redact_url("git@host.example:owner/repo") == "git@host.example:owner/repo"


def test_failed_resolution_does_not_show_credentials():
    with pytest.raises(RepositoryError) as error:
        resolve_ref(Repository("https://user:s3cret@127.0.0.1:9/x.git"), "main")
    assert "s3cret" not in str(error.value)


def test_clone_checks_out_exactly_the_commit(repo, tmp_path):
    destination = tmp_path / "source"
    clone_commit(Repository(str(repo.path)), repo.first, destination)
    assert (destination / "file-first.txt").exists()
    assert not (destination / "file-second.txt").exists()
    assert not list(tmp_path.glob("*.partial"))


def test_clone_of_a_missing_subdir_leaves_nothing(repo, tmp_path):
    destination = tmp_path / "source"
    with pytest.raises(RepositoryError, match="subdir 'nope' does not exist"):
        clone_commit(Repository(str(repo.path), "nope"), repo.first, destination)
    assert not destination.exists()


def test_a_bare_repository_is_resolved_and_cloned_from(repo, tmp_path):
    # sites keep bare mirrors on shared file systems; git clone takes their path as it is
    bare = tmp_path / "mirrors" / "project.git"
    repo.git("clone", "--quiet", "--bare", str(repo.path), str(bare))
    found = check_repository(str(bare))
    assert found == Repository(str(bare.resolve()))
    assert resolve_ref(found, "trunk").sha == repo.second
    destination = tmp_path / "source"
    clone_commit(found, repo.first, destination)
    assert (destination / "file-first.txt").exists() and not (destination / "file-second.txt").exists()
    # relative to a base folder, and with a subdir, like any other repository
    assert check_repository("project.git", "docs", base_dirs=(str(bare.parent),)) == Repository(str(bare.resolve()), "docs")


def test_a_folder_inside_a_bare_repository_is_refused_in_one_line(repo, tmp_path):
    bare = tmp_path / "project.git"
    repo.git("clone", "--quiet", "--bare", str(repo.path), str(bare))
    with pytest.raises(RepositoryError, match=r"inside the git folder of .*project\.git; give that folder") as error:
        check_repository(str(bare / "refs" / "heads"))
    assert "\n" not in str(error.value)


def test_a_repository_of_another_user_names_the_git_setting_that_trusts_it(repo, tmp_path, monkeypatch):
    # git refuses a repository owned by another account unless safe.directory lists it; the
    # test knob of git makes this repository look foreign, an empty HOME drops any trust
    bare = tmp_path / "shared.git"
    repo.git("clone", "--quiet", "--bare", str(repo.path), str(bare))
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("GIT_TEST_ASSUME_DIFFERENT_OWNER", "1")
    with pytest.raises(RepositoryError, match=r"belongs to another user .*safe\.directory .*shared\.git$"):
        check_repository(str(bare))
