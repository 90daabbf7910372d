"""A manifest of several real repositories, built with the real Docker engine, repo2docker and
Apptainer: with the local profile, as users run a manifest, broken rows do not stop the others;
only moved branches are rebuilt; prune keeps exactly the newest N."""

import json
import subprocess

import pytest

from .conftest import PROJECT, GitRepo
from .workflow_runner import snakemake

pytestmark = pytest.mark.integration


def dockerfile(word):
    # small images: these tests are about which rows build, not about Jupyter
    return {"Dockerfile": f"FROM debian:bookworm\nRUN echo {word} > /{word}\n"}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    base = tmp_path_factory.mktemp("fleet")
    repos = {name: GitRepo(base / name) for name in ("alpha", "beta", "broken")}
    repos["alpha"].commit("a1", dockerfile("alpha"))
    repos["beta"].commit("b1", dockerfile("beta"))
    repos["broken"].commit("x1", {"Dockerfile": "FROM debian:bookworm\nRUN echo failing on purpose && exit 3\n"})
    manifest = base / "images.tsv"
    manifest.write_text(
        "name\trepo\tref\tsubdir\n"
        + "".join(f"{name}\t{repo.path}\tmain\t\n" for name, repo in repos.items())
        + f"gone\t{repos['alpha'].path}\tdeleted-branch\t\n"
        # fails in the very first step, while the other rows have their whole chain ahead of them
        + f"lost\t{repos['beta'].path}\tmain\tno-such-folder\n"
    )
    workdir = base / "work"
    workdir.mkdir()
    # as the README says to run a manifest: with the local profile, nothing added
    first = snakemake(workdir, "--profile", str(PROJECT / "profiles" / "local"), config={"manifest": manifest}, check=False)
    return repos, workdir, first


def summary(workdir):
    return {row["name"]: row for row in json.loads((workdir / "results" / "summary.json").read_text())["images"]}


def sif(workdir, name, sha):
    return workdir / "results" / name / sha / f"{name}.sif"


def test_with_the_local_profile_one_broken_repository_does_not_stop_the_others(fleet):
    repos, workdir, first = fleet
    assert "--keep-going" not in first.args
    assert first.returncode != 0, "a failed image must fail the run for CI"
    for name in ("alpha", "beta"):
        assert sif(workdir, name, repos[name].head()).exists()
    rows = summary(workdir)
    assert rows["alpha"]["status"] == rows["beta"]["status"] == "built"
    assert rows["broken"]["status"] == "failed" and rows["broken"]["step"] == "build_image"
    assert "failing on purpose" in open(rows["broken"]["log"]).read()
    assert rows["gone"]["status"] == "failed" and rows["gone"]["step"] == "resolve"
    assert "'deleted-branch' not found" in rows["gone"]["error"]
    assert rows["lost"]["status"] == "failed" and rows["lost"]["step"] == "clone_source"
    table = (workdir / "results" / "summary.md").read_text()
    assert "2 built, 0 up to date, 3 failed" in table
    assert "| broken | failed |" in table and "| alpha | built |" in table


def test_moving_one_branch_rebuilds_only_that_row(fleet):
    repos, workdir, _ = fleet
    manifest = workdir.parent / "good.tsv"
    manifest.write_text("name\trepo\tref\n" + "".join(f"{n}\t{repos[n].path}\tmain\n" for n in ("alpha", "beta")))
    unchanged = snakemake(workdir, "-n", config={"manifest": manifest})
    assert "Nothing to be done" in unchanged.stdout + unchanged.stderr
    old_alpha, beta = repos["alpha"].head(), repos["beta"].head()
    beta_mtime = sif(workdir, "beta", beta).stat().st_mtime_ns
    new_alpha = repos["alpha"].commit("a2", dockerfile("alpha2"))
    plan = snakemake(workdir, "-n", config={"manifest": manifest}).stdout
    assert f"name=alpha, sha={new_alpha}" in plan
    assert "name=beta" not in plan and old_alpha not in plan
    snakemake(workdir, config={"manifest": manifest})
    rows = summary(workdir)
    assert rows["alpha"]["status"] == "built" and rows["alpha"]["sha"] == new_alpha
    assert rows["beta"]["status"] == "up to date"
    assert sif(workdir, "beta", beta).stat().st_mtime_ns == beta_mtime
    assert sif(workdir, "alpha", old_alpha).exists()


def test_prune_keeps_exactly_the_newest_and_any_image_in_use(fleet):
    repos, workdir, _ = fleet
    manifest = workdir.parent / "good.tsv"
    commits = [path for path in (workdir / "results" / "alpha").glob("*/alpha.sif") if not path.parent.is_symlink()]  # not latest/
    shas = [path.parent.name for path in sorted(commits, key=lambda p: p.stat().st_mtime)]
    newest = repos["alpha"].commit("a3", dockerfile("alpha3"))
    snakemake(workdir, config={"manifest": manifest})
    oldest, middle = shas
    outside = workdir / "notes.txt"
    outside.write_text("not ours to remove\n")
    server = subprocess.Popen(["sleep", "300"])
    try:
        (workdir / "results" / "alpha" / oldest / "launch.json").write_text(json.dumps({"pid": server.pid}))
        snakemake(workdir, "prune", config={"manifest": manifest, "keep_sifs": 1})
        remaining = {p.name for p in (workdir / "results" / "alpha").iterdir()}
        assert remaining == {oldest, newest, "latest"}, "the middle commit goes; the newest and the one in use stay"
    finally:
        server.kill()
        server.wait()
    snakemake(workdir, "prune", config={"manifest": manifest, "keep_sifs": 1})
    assert {p.name for p in (workdir / "results" / "alpha").iterdir()} == {newest, "latest"}
    assert (workdir / "results" / "alpha" / "latest").readlink().name == newest
    assert [p.parent.name for p in (workdir / "results" / "beta").glob("*/beta.sif") if not p.parent.is_symlink()] == [repos["beta"].head()]
    assert outside.exists() and (workdir / "results" / "summary.json").exists()


def test_report_is_one_html_page_with_each_image(fleet):
    repos, workdir, _ = fleet
    manifest = workdir.parent / "good.tsv"
    snakemake(workdir, "--report", "report.html", config={"manifest": manifest})
    page = (workdir / "report.html").read_text()
    assert "alpha.card.html" in page and "beta.card.html" in page
    card = (workdir / "results" / "beta" / repos["beta"].head() / "beta.card.html").read_text()
    assert "SIF size" in card and "build_sif (s)" in card
