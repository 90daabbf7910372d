"""Each step's log on stdlib logging (repo2singularity/steplog.py)."""

import os
import subprocess
import sys

from repo2singularity import downloads
from repo2singularity.steplog import step_log


def test_lines_go_to_their_own_log_between_a_tools_output_and_no_file_stays_open(tmp_path):
    first, second = tmp_path / "first.log", tmp_path / "second.log"
    step_log(first).info("one")
    # a tool the step runs appends to the same file meanwhile
    subprocess.run([sys.executable, "-c", f"open({str(first)!r}, 'a').write('tool output\\n')"], check=True)
    step_log(first).info("two\nlines")
    step_log(second).info("other")
    assert first.read_text() == "one\ntool output\ntwo\nlines\n"
    assert second.read_text() == "other\n"
    assert step_log(first) is step_log(str(first))
    open_files = subprocess.run(["ls", "-l", f"/proc/{os.getpid()}/fd"], capture_output=True, text=True).stdout
    assert str(first) not in open_files and str(second) not in open_files


def test_no_log_drops_the_lines(tmp_path):
    step_log(None).info("nowhere")
    step_log("").info("nowhere")
    assert list(tmp_path.iterdir()) == []


def test_every_transfer_meters_alike(monkeypatch):
    """One progress line and one rate limit for downloads, pulls, pushes and saves."""
    monkeypatch.setattr(downloads, "PROGRESS_SECONDS", 0)
    lines = []
    limited = downloads.TransferMeter("pull", "x:abc", 4_000_000, report=lines.append, environ={downloads.RATE_LIMIT_VARIABLE: "20000000"})
    limited.advance(2_000_000)
    limited.advance(2_000_000)
    # 4 MB at 20 MB/s takes at least 0.2 s, whatever the sender's speed
    assert limited.seconds >= 0.19
    assert lines[-1].startswith("  pull x:abc [########################] 100%  4.0 of 4.0 MB, ")
    unlimited = downloads.TransferMeter("push", "x:abc", 1, report=None, limited=False, environ={downloads.RATE_LIMIT_VARIABLE: "1"})
    unlimited.advance(10_000_000)
    assert unlimited.limit == 0  # pushes and saves are not held back
    # an estimated total that is passed stops the bar full, with no time left
    assert downloads.progress_line("img", 300, 200, 0, 1.0, verb="save").startswith("  save img [########################] 100%  0.0 of 0.0 MB")
