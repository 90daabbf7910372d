"""The run summary of a manifest: which step it blames, and which log it points at."""

import json

from repo2singularity import builds, summary
from repo2singularity.repository import Repository

SHA = "0123456789abcdef0123456789abcdef01234567"


def failed_image(tmp_path, saved_image, outputs):
    folder = tmp_path / "results" / "x" / SHA
    (folder / "logs").mkdir(parents=True)
    for output in outputs:
        (folder / output).mkdir() if output == "source" else (folder / output).write_text("{}")
    for step in ("save_image", "build_sif"):
        (folder / "logs" / f"{step}.log").write_text(f"{step} said this\n")
    resolution = builds.Resolution([builds.BuildSpec("x", Repository("https://example.org/x"), "main", sha=SHA, resolved_ref="main")], {})
    summary.write_summary(tmp_path / "results", resolution, set(), 0, saved_image)
    return json.loads((tmp_path / "results" / "summary.json").read_text())["images"][0]


def test_a_remote_sif_step_that_failed_is_blamed_on_build_sif(tmp_path):
    """Issue 13 item 5: a remote build keeps image.tar on the builder and a receipt here."""
    row = failed_image(tmp_path, "image.tar.receipt.json", ["source", "image.json", "image.tar.receipt.json"])
    assert (row["status"], row["step"]) == ("failed", "build_sif")
    assert row["log"].endswith("/logs/build_sif.log") and "build_sif said this" in row["error"]


def test_a_local_save_that_failed_is_blamed_on_save_image(tmp_path):
    row = failed_image(tmp_path, "image.tar", ["source", "image.json"])
    assert (row["status"], row["step"]) == ("failed", "save_image")
    assert row["log"].endswith("/logs/save_image.log")
