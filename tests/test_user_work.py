"""Issue 19 item 1: users' work outlives every sandbox. What users changed in a sandbox's home
is found against the record made at unpack, moved to the image's work folder before a swap or a
prune removes the sandbox, and a sandbox whose files cannot be moved is not removed."""

import json
import os
import time

import pytest

from repo2singularity import files, jupyter, retention, runtime, user_work
from repo2singularity.step import StepError

IMAGE = {"working_folder": "/home/jovyan", "home": "/home/jovyan"}
COMMIT = "ab" * 20


def image_sandbox(folder):
    """A sandbox as the example image unpacks: a home with a notebook, a read-only folder, and
    the system around it."""
    home = folder / "home" / "jovyan"
    (home / "data").mkdir(parents=True)
    (home / "hello.ipynb").write_text('{"cells": []}')
    (home / "data" / "table.csv").write_text("a,b\n")
    (home / ".bashrc").write_text("# image\n")
    (home / "link").symlink_to("/usr/share/doc")
    (folder / "usr" / "bin").mkdir(parents=True)
    (folder / "usr" / "bin" / "python3").write_text("binary")
    os.chmod(home / "data", 0o555)
    return folder


def changed_by_a_user(sandbox):
    """What a session in the server does: a notebook edited, a new one, and the server's own
    files (runtime files hold its token), caches and checkpoints, which are not users' work."""
    home = sandbox / "home" / "jovyan"
    time.sleep(0.01)
    (home / "hello.ipynb").write_text('{"cells": ["edited"]}')
    os.chmod(home / "data", 0o755)
    (home / "data" / "new.ipynb").write_text("{}")
    os.chmod(home / "data", 0o555)
    runtime_files = home / ".local" / "share" / "jupyter" / "runtime"
    runtime_files.mkdir(parents=True)
    (runtime_files / "jpserver-1.json").write_text('{"token": "secret"}')
    for folder in (".ipynb_checkpoints", "__pycache__", ".cache"):
        (home / folder).mkdir()
        (home / folder / "x").write_text("x")
    (sandbox / "usr" / "bin" / "python3").write_text("changed, but no user's work")


def test_the_work_folder_is_per_name_and_bound_at_work_in_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "me"))
    assert user_work.work_folder("results/{name}/work", "example", base=tmp_path) == tmp_path / "results/example/work"
    assert user_work.work_folder("~/notebooks/{name}", "example") == tmp_path / "me/notebooks/example"
    assert user_work.work_folder("/srv/work", "x") == user_work.work_folder("/srv/work", "y")
    with pytest.raises(StepError, match="has a ':' or ','"):
        user_work.work_folder("/srv/a:b/{name}", "x")
    command = jupyter.server_command("apptainer", tmp_path, IMAGE, tmp_path / "env", ["jupyter", "notebook"], 1, work_folder="/w/example")
    assert command[command.index("--bind") + 1] == "/w/example:/home/jovyan/work"
    other = {"working_folder": "/srv/repo", "home": "/home/jovyan"}
    assert user_work.bind("/w", other) == "/w:/srv/repo/work"
    assert user_work.tracked_roots(other) == ["/srv/repo", "/home/jovyan"]
    assert user_work.tracked_roots({"working_folder": "/home/jovyan/repo", "home": "/home/jovyan"}) == ["/home/jovyan"]


def test_only_what_users_added_or_changed_is_found(tmp_path):
    sandbox = image_sandbox(tmp_path / "sandbox")
    user_work.prepare(sandbox, IMAGE)
    assert (sandbox / "home" / "jovyan" / "work").is_dir(), "the work folder's mount point"
    assert user_work.changed_files(sandbox) == []
    changed_by_a_user(sandbox)
    assert user_work.changed_files(sandbox) == ["home/jovyan/data/new.ipynb", "home/jovyan/hello.ipynb"]


def test_changed_files_are_moved_to_the_work_folder_and_the_rest_stays(tmp_path):
    sandbox = image_sandbox(tmp_path / "sandbox")
    user_work.prepare(sandbox, IMAGE)
    changed_by_a_user(sandbox)
    lines = []
    kept = user_work.keep_changed(sandbox, tmp_path / "work", COMMIT, log=lines.append)
    assert kept.parent == tmp_path / "work" / "recovered" and kept.name.startswith(COMMIT[:12] + "-")
    assert (kept / "home/jovyan/hello.ipynb").read_text() == '{"cells": ["edited"]}'
    assert (kept / "home/jovyan/data/new.ipynb").read_text() == "{}"
    assert sorted(str(p.relative_to(kept)) for p in kept.rglob("*") if p.is_file()) == ["home/jovyan/data/new.ipynb", "home/jovyan/hello.ipynb"]
    assert len(lines) == 2 and all(line.startswith("kept home/jovyan/") for line in lines)
    assert (sandbox / "home/jovyan/data/table.csv").exists() and not (sandbox / "home/jovyan/hello.ipynb").exists()
    assert user_work.keep_changed(sandbox, tmp_path / "work", COMMIT) is None, "nothing is left to keep"
    assert oct((tmp_path / "work").stat().st_mode & 0o777) == "0o700"


def test_a_sandbox_without_a_record_has_its_whole_home_kept(tmp_path):
    """Unpacked by an older version: which files users changed is unknown, so all are kept."""
    sandbox = image_sandbox(tmp_path / "sandbox")
    (tmp_path / "image.json").write_text(json.dumps({"working_folder": "/srv/repo", "home": "/home/jovyan"}))
    (sandbox / "srv" / "repo").mkdir(parents=True)
    (sandbox / "srv" / "repo" / "analysis.ipynb").write_text("{}")
    kept = user_work.keep_changed(sandbox, tmp_path / "work", COMMIT)
    found = sorted(str(p.relative_to(kept)) for p in kept.rglob("*") if p.is_file() or p.is_symlink())
    assert found == ["home/jovyan/.bashrc", "home/jovyan/data/table.csv", "home/jovyan/hello.ipynb", "home/jovyan/link", "srv/repo/analysis.ipynb"]
    assert (kept / "home/jovyan/link").readlink().as_posix() == "/usr/share/doc"


def test_a_sandbox_whose_changed_files_cannot_be_moved_is_not_removed(tmp_path):
    sandbox = image_sandbox(tmp_path / "sandbox")
    user_work.prepare(sandbox, IMAGE)
    changed_by_a_user(sandbox)
    work = tmp_path / "work"
    work.mkdir(mode=0o500)
    try:
        with pytest.raises(StepError) as error:
            user_work.keep_changed(sandbox, work, COMMIT)
    finally:
        work.chmod(0o700)
    assert "could not move the files users changed in" in str(error.value) and "the sandbox was not removed" in str(error.value)
    assert "\n" not in str(error.value)
    assert (sandbox / "home/jovyan/hello.ipynb").read_text() == '{"cells": ["edited"]}'


def test_a_home_that_leads_out_of_the_sandbox_is_not_looked_into(tmp_path):
    outside = tmp_path / "outside" / "jovyan"
    outside.mkdir(parents=True)
    (outside / "not-the-sandboxs.txt").write_text("x")
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    (sandbox / "home").symlink_to(outside.parent)
    assert user_work.changed_files(sandbox) == []
    assert user_work.keep_changed(sandbox, tmp_path / "work", COMMIT) is None
    assert (outside / "not-the-sandboxs.txt").exists()


def test_an_image_with_a_file_where_the_work_folder_goes_is_refused_in_one_line(tmp_path):
    sandbox = image_sandbox(tmp_path / "sandbox")
    (sandbox / "home/jovyan/work").write_text("a file of the repository")
    with pytest.raises(StepError, match="the image has a file at /home/jovyan/work, where the work folder is bound"):
        user_work.prepare(sandbox, IMAGE)


def unpack_with(monkeypatch, tmp_path, make):
    """runtime.unpack_sandbox with the runtime's unpack replaced by `make(folder)`."""
    sif = tmp_path / "x.sif"
    sif.write_bytes(b"sif")
    checksum = tmp_path / "x.sif.sha256"
    checksum.write_text(files.checksum_line(files.sha256_file(sif), sif))
    monkeypatch.setattr(runtime, "run_logged", lambda command, log, step: make(tmp_path.joinpath(command[3])))
    return lambda sandbox, work: runtime.unpack_sandbox("apptainer", sif, checksum, sandbox, tmp_path / "log", IMAGE, work, record=tmp_path / "r.json")


def test_a_new_sandbox_takes_the_old_ones_place_and_its_changed_files_go_to_the_work_folder(tmp_path, monkeypatch):
    commit_folder = tmp_path / COMMIT
    commit_folder.mkdir()
    unpack = unpack_with(monkeypatch, tmp_path, image_sandbox)
    sandbox, work = commit_folder / "sandbox", tmp_path / "work"
    unpack(sandbox, work)
    assert not work.exists(), "the first unpack has nothing to keep"
    changed_by_a_user(sandbox)
    unpack(sandbox, work)
    assert (sandbox / "home/jovyan/hello.ipynb").read_text() == '{"cells": []}', "the new sandbox is the image's"
    [kept] = (work / "recovered").iterdir()
    assert (kept / "home/jovyan/hello.ipynb").read_text() == '{"cells": ["edited"]}'
    assert sorted(p.name for p in commit_folder.iterdir()) == ["sandbox"]
    assert json.loads((tmp_path / "r.json").read_text())["sandbox"] == str(sandbox.resolve())
    assert "kept home/jovyan/hello.ipynb of" in (tmp_path / "log").read_text()

    # the work folder refuses them: the old sandbox stays as it was, the new one is not swapped in
    changed_by_a_user(sandbox)
    blocked = tmp_path / "blocked"
    blocked.mkdir(mode=0o500)
    try:
        with pytest.raises(StepError, match="the sandbox was not removed"):
            unpack(sandbox, blocked / "work")
    finally:
        blocked.chmod(0o700)
    assert (sandbox / "home/jovyan/hello.ipynb").read_text() == '{"cells": ["edited"]}'
    assert sorted(p.name for p in commit_folder.iterdir()) == ["sandbox"]


def test_a_sandbox_swapped_out_whose_files_cannot_be_moved_is_set_aside_and_pruned_later(tmp_path, monkeypatch):
    """A server still running from the old sandbox writes between the first check and the swap,
    and the move then fails: the old sandbox is kept beside the new one, and a prune moves its
    files once it can."""
    commit_folder = tmp_path / "results" / "x" / COMMIT
    commit_folder.mkdir(parents=True)
    unpack = unpack_with(monkeypatch, tmp_path, image_sandbox)
    sandbox, work = commit_folder / "sandbox", tmp_path / "results" / "x" / "work"
    unpack(sandbox, work)
    calls = []
    real = user_work.keep_changed

    def failing_after_the_swap(folder, *args, **kwargs):
        calls.append(folder)
        if len(calls) == 2:
            changed_by_a_user(folder)
            raise StepError("could not move (test)")
        return real(folder, *args, **kwargs)

    monkeypatch.setattr(user_work, "keep_changed", failing_after_the_swap)
    with pytest.raises(StepError):
        unpack(sandbox, work)
    monkeypatch.setattr(user_work, "keep_changed", real)
    [aside] = [p for p in commit_folder.iterdir() if p.name.startswith("sandbox.old-")]
    assert (aside / "home/jovyan/hello.ipynb").read_text() == '{"cells": ["edited"]}'
    assert user_work.sandboxes(commit_folder) == [sandbox, aside]

    # prune of that commit (an older one, with a newer commit's SIF beside it)
    (commit_folder / "x.sif").write_bytes(b"old")
    newer = tmp_path / "results" / "x" / ("cd" * 20)
    newer.mkdir()
    (newer / "x.sif").write_bytes(b"new")
    os.utime(commit_folder / "x.sif", (1000, 1000))
    monkeypatch.chdir(tmp_path)
    retention.prune_with_log("results", 1, ["x"], tmp_path / "prune.log", "results/{name}/work")
    assert not commit_folder.exists() and newer.exists()
    [kept] = (work / "recovered").iterdir()
    assert (kept / "home/jovyan/hello.ipynb").read_text() == '{"cells": ["edited"]}'


def test_prune_keeps_a_commit_whose_changed_files_cannot_be_moved_and_says_so(tmp_path, monkeypatch):
    results = tmp_path / "results"
    old, new = results / "x" / ("1" * 40), results / "x" / ("2" * 40)
    for folder, when in ((old, 1000), (new, 2000)):
        folder.mkdir(parents=True)
        (folder / "x.sif").write_bytes(b"sif")
        os.utime(folder / "x.sif", (when, when))
    user_work.prepare(image_sandbox(old / "sandbox"), IMAGE)
    changed_by_a_user(old / "sandbox")
    (tmp_path / "blocked").mkdir(mode=0o500)
    try:
        with pytest.raises(StepError, match="kept 1 older commits whose changed files could not be moved"):
            retention.prune_with_log(results, 1, None, tmp_path / "prune.log", str(tmp_path / "blocked" / "{name}"))
    finally:
        (tmp_path / "blocked").chmod(0o700)
    assert (old / "sandbox/home/jovyan/hello.ipynb").exists()
    assert f"prune: kept {old}: could not move" in (tmp_path / "prune.log").read_text()
