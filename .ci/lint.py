"""Fail on every `snakemake --lint` finding except the conda/container one: these rules drive
host tools (Docker, repo2docker, Apptainer) by design and cannot run inside a container."""

import json
import re
import subprocess
import sys
from pathlib import Path

ALLOWED = {"Specify a conda environment or container for each rule."}

SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
PROJECT = Path(__file__).resolve().parent.parent
result = subprocess.run([SNAKEMAKE, "--lint", "json"], capture_output=True, text=True, cwd=PROJECT)
try:
    # Snakemake prints JSON when the CLI passes the format on (9.27.1 does not yet)
    report = json.loads(result.stdout)
    titles = [lint["title"] for group in report.values() for item in group for lint in item.get("lints", [])]
except (json.JSONDecodeError, AttributeError, TypeError):
    titles = re.findall(r"^    \* (.+?):?$", result.stderr + result.stdout, re.MULTILINE)
if result.returncode not in (0, 1) or (result.returncode == 1 and not titles):
    sys.exit(f"snakemake --lint failed to run:\n{result.stderr[-3000:]}")
unexpected = [title for title in titles if title not in ALLOWED]
for title in unexpected:
    print(f"lint: {title}")
print(f"snakemake --lint: {len(titles)} findings, {len(unexpected)} not allowed")
sys.exit(1 if unexpected else 0)
