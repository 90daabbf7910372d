"""Each step's log on stdlib logging (repo2singularity/steplog.py)."""

import os
import subprocess
import sys

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
