"""The workflow stays formatted (snakefmt) and lint-clean but for the conda/container lint; the
Python is ruff-clean (pyproject.toml's configuration)."""

import subprocess
import sys
from pathlib import Path

from .conftest import PROJECT

BIN = Path(sys.executable).parent


def test_snakefmt_check():
    # the workflow's own files, not results/ (sandboxes hold unreadable folders)
    paths = [str(PROJECT / "Snakefile"), str(PROJECT / "workflow")]
    result = subprocess.run([BIN / "snakefmt", "--check", *paths], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_snakemake_lint_has_only_the_host_tool_lint():
    result = subprocess.run([sys.executable, PROJECT / ".ci" / "lint.py"], capture_output=True, text=True, cwd=PROJECT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_check():
    result = subprocess.run([BIN / "ruff", "check", "--no-cache", "."], capture_output=True, text=True, cwd=PROJECT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_scripts_take_their_settings_from_their_params():
    """Issue 18: one route for settings into a job. A script that rebuilt settings from
    snakemake.config would read what no param records, so a change of them would rerun
    nothing (docs/development.md)."""
    readers = [script.name for script in (PROJECT / "workflow" / "scripts").glob("*.py") if "snakemake.config" in script.read_text()]
    assert readers == []
