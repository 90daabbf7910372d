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
        runtime.unpack_sandbox("apptainer", sif, checksum, target, tmp_path / "log", {"working_folder": "/w", "home": "/w"}, tmp_path / "work")
    assert (target / "marker").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sandbox", "x.sif", "x.sif.sha256"]


def test_the_hashing_writer_writes_and_hashes_every_chunk_in_order(tmp_path, monkeypatch):
    """Downloads (registry pulls, the builder's SIF) write and hash on two threads; a resumed
    download hands in the digest of what the file already holds."""
    import hashlib
    import os

    monkeypatch.setattr(files, "FLUSH_BYTES", 1000)
    synced = []
    real_fdatasync = os.fdatasync
    monkeypatch.setattr(files.os, "fdatasync", lambda fd: (synced.append(fd), real_fdatasync(fd)))
    chunks = [bytes([index]) * (97 + index) for index in range(200)]
    path = tmp_path / "download"
    path.write_bytes(b"already here")
    with open(path, "r+b") as handle:
        handle.seek(len(b"already here"))
        with files.HashingWriter(handle, hashlib.sha256(b"already here")) as writer:
            for chunk in chunks:
                writer.write(chunk)
            digest = writer.finish()
    whole = b"already here" + b"".join(chunks)
    assert path.read_bytes() == whole
    assert digest == hashlib.sha256(whole).hexdigest()
    # flushed every 1000 bytes or so while the chunks arrived, not only at the end
    assert len(synced) >= len(whole) // 2000


def test_the_hashing_writer_gives_a_write_error_to_the_caller(tmp_path):
    with open(tmp_path / "read-only", "wb") as created:
        created.write(b"")
    with open(tmp_path / "read-only", "rb") as handle:
        with files.HashingWriter(handle) as writer:
            writer.write(b"x" * 10)
            with pytest.raises(OSError):
                writer.finish()
