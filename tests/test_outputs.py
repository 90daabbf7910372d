"""Outputs appear whole, in an order that never leaves something looking finished: a SIF's
checksum only once the SIF is in place, and always one sandbox, old or new."""

import pytest

from repo2singularity import files, runtime
from repo2singularity.builders import local


class Killed(BaseException):
    """Stands for the step being killed at that moment."""


def test_a_sif_is_in_place_before_its_checksum_is_written(tmp_path, monkeypatch):
    """Issue 13 item 9: the checksum marks a finished SIF, so it is written last; a kill between
    the two leaves a SIF without a checksum (the step then reruns), never a checksum whose SIF
    is missing."""

    def fake_build(command, log, step):
        open(command[-2], "wb").write(b"sif bytes")

    monkeypatch.setattr(local, "run_logged", fake_build)
    monkeypatch.setattr(runtime, "supports_mksquashfs_args", lambda runtime: True)

    def killed(*args, **kwargs):
        raise Killed()

    monkeypatch.setattr(local, "write_text_atomic", killed)
    builder = local.LocalBuilder({"runtime": "apptainer", "sif_compression": "auto", "sif_conversion": "apptainer"}, tmp_path / "log")
    sif, checksum = tmp_path / "x.sif", tmp_path / "x.sif.sha256"
    with pytest.raises(Killed):
        builder.build_sif("x", "0" * 40, tmp_path / "image.tar", sif, checksum)
    assert sif.read_bytes() == b"sif bytes" and not checksum.exists()
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []


def folder_with(path, text):
    path.mkdir()
    (path / "marker").write_text(text)
    return path


def test_a_new_sandbox_replaces_the_old_one_in_one_step(tmp_path, monkeypatch):
    """Issue 13 item 9: the old sandbox was deleted before the new one was renamed in."""
    target = folder_with(tmp_path / "sandbox", "old")
    new = folder_with(tmp_path / "new", "new")
    (new / "read-only").mkdir(mode=0o500)
    files.replace_folder(new, target)
    assert (target / "marker").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["sandbox"]

    # killed while the old one is being removed: the new one is already in place
    newer = folder_with(tmp_path / "newer", "newer")
    monkeypatch.setattr(files, "remove_tree", lambda folder: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):
        files.replace_folder(newer, target)
    assert (target / "marker").read_text() == "newer"


def test_an_unpack_that_fails_keeps_the_sandbox_there_was(tmp_path, monkeypatch):
    target = folder_with(tmp_path / "sandbox", "old")
    sif = tmp_path / "x.sif"
    sif.write_bytes(b"sif")
    checksum = tmp_path / "x.sif.sha256"
    checksum.write_text(files.checksum_line(files.sha256_file(sif), sif))

    def failing(command, log, step):
        folder_with(__import__("pathlib").Path(command[3]), "half")
        raise Killed()

    monkeypatch.setattr(runtime, "run_logged", failing)
    with pytest.raises(Killed):
        runtime.unpack_sandbox("apptainer", sif, checksum, target, tmp_path / "log")
    assert (target / "marker").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sandbox", "x.sif", "x.sif.sha256"]
