"""Run the real workflow as a user would: `snakemake` in a working folder of the test's own."""

import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def snakemake(workdir, *args, config=None, check=True, timeout=1800, **popen):
    command = [SNAKEMAKE, "--snakefile", str(PROJECT / "Snakefile"), "--directory", str(workdir), "--cores", "2"]
    command += list(args)
    if config:
        command += ["--config", *(f"{key}={value}" for key, value in config.items())]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **popen)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake failed ({result.returncode}):\n{result.stdout}\n{result.stderr[-6000:]}")
    return result


def last_line(result):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""
