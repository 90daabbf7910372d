"""The run summary of a manifest: per image up to date, built or failed (with the log and the
last lines of the error), and how long its steps took, as JSON and as a Markdown table."""

import csv
import time
from pathlib import Path

from .files import write_json_atomic, write_text_atomic
from .shared_sifs import PULLED, PUSHED
from .tools import tail


def step_outputs(saved_image):
    """Each step's output, in chain order: the first one missing names the step that failed.
    `saved_image`: the file that stands for the saved image (the builder's saved_image_file)."""
    return (
        ("clone_source", "source"),
        ("build_image", "image.json"),
        ("save_image", saved_image),
        ("build_sif", "{name}.sif"),
    )


def sif_path(results, name, sha):
    return Path(results, name, sha, f"{name}.sif")


def step_seconds(folder, since):
    """Seconds spent by the steps that ran since `since`, from their benchmark files."""
    total = 0.0
    for benchmark in Path(folder, "benchmarks").glob("*.tsv"):
        if benchmark.stat().st_mtime < since:
            continue
        with open(benchmark) as handle:
            for record in csv.DictReader(handle, delimiter="\t"):
                total += float(record.get("s") or 0)
    return round(total, 1)


def failed_step(folder, name, saved_image):
    for step, output in step_outputs(saved_image):
        if step == "save_image" and (folder / f"{name}.sif").exists():
            continue  # the saved image is temporary: gone once the SIF exists
        if not (folder / output.format(name=name)).exists():
            return step
    return None


STATUSES = ("built", "built and pushed", "built (push failed)", "pulled", "up to date", "failed")


def sif_status(folder, name, started, pushing):
    """How a SIF that is here came to be this run: pulled, or built (and pushed, or not)."""
    pulled = folder / PULLED.format(name=name)
    if pulled.exists() and pulled.stat().st_mtime >= started:
        return "pulled", None
    if not pushing:
        return "built", None
    pushed = folder / PUSHED.format(name=name)
    if pushed.exists() and pushed.stat().st_mtime >= started:
        return "built and pushed", None
    return "built (push failed)", (folder / "logs" / "push_sif.log").resolve()


def image_rows(results, resolution, sifs_before, started, saved_image, pushing=False, from_registry=()):
    """One row per image; `from_registry`: the names whose SIF was to be pulled this run."""
    rows = []
    for build in resolution.builds:
        folder = Path(results, build.name, build.sha)
        row = {"name": build.name, "repo": build.repository.display_url, "ref": build.resolved_ref, "sha": build.sha}
        row["seconds"] = step_seconds(folder, started)
        if sif_path(results, build.name, build.sha).exists():
            row["sif_bytes"] = sif_path(results, build.name, build.sha).stat().st_size
            if build.name in sifs_before:
                row["status"] = "up to date"
            else:
                row["status"], push_log = sif_status(folder, build.name, started, pushing)
                if push_log:
                    row.update(log=str(push_log), error=tail(push_log, 5) or "(no log: not started)")
        else:
            step = "pull_sif" if build.name in from_registry else failed_step(folder, build.name, saved_image) or "build_sif"
            log = (folder / "logs" / f"{step}.log").resolve()
            row.update(status="failed", step=step, log=str(log), error=tail(log, 5) or "(no log: not started)")
        rows.append(row)
    for name, error in sorted(resolution.failures.items()):
        rows.append({"name": name, "status": "failed", "step": "resolve", "error": error, "seconds": 0.0})
    return sorted(rows, key=lambda row: row["name"])


def markdown(rows, elapsed):
    # built, up to date and failed always; the registry's statuses where there are any
    always = ("built", "up to date", "failed")
    counts = ", ".join(
        f"{sum(row['status'] == status for row in rows)} {status}"
        for status in STATUSES
        if status in always or any(row["status"] == status for row in rows)
    )
    lines = [
        "# repo2singularity run summary",
        "",
        f"{len(rows)} images: {counts or 'none'}; {elapsed:.0f} s.",
        "",
        "| name | status | commit | seconds | details |",
        "|---|---|---|---:|---|",
    ]
    for row in rows:
        error = " ".join(row.get("error", "").split())[-300:].replace("|", "\\|")
        if row["status"] == "failed":
            details = f"{row['step']} failed: {error}" + (f" (log: `{row['log']}`)" if row.get("log") else "")
        else:
            details = f"{row['sif_bytes'] / 1e6:.0f} MB SIF"
            if error:
                details += f"; push failed: {error} (log: `{row['log']}`)"
        lines.append(f"| {row['name']} | {row['status']} | {row.get('sha', '')[:12]} | {row['seconds']} | {details} |")
    return "\n".join(lines) + "\n"


def write_summary(results, resolution, sifs_before, started, saved_image, pushing=False, from_registry=()):
    """Write results/summary.json and results/summary.md; return the number of images that failed
    (a failed push counts: the run did not do what it was asked)."""
    elapsed = time.time() - started
    rows = image_rows(results, resolution, sifs_before, started, saved_image, pushing, from_registry)
    failed = sum(row["status"] in ("failed", "built (push failed)") for row in rows)
    write_json_atomic(Path(results, "summary.json"), {"images": rows, "failed": failed, "seconds": round(elapsed, 1)})
    write_text_atomic(Path(results, "summary.md"), markdown(rows, elapsed))
    return failed


def image_card(name, sha, receipt, sif, benchmarks):
    """A small HTML table for `snakemake --report`: what was built, and how long each step took."""
    import html
    import json

    image = json.loads(Path(receipt).read_text())
    labels = image.get("labels", {})
    rows = [
        ("name", name),
        ("repository", labels.get("repo2singularity.repo", "")),
        ("ref", labels.get("repo2singularity.ref", "")),
        ("commit", sha),
        ("image", image["tag"]),
        ("repo2docker", image.get("repo2docker_version", "")),
        ("SIF size", f"{Path(sif).stat().st_size / 1e6:.1f} MB"),
    ]
    for benchmark in sorted(b for b in benchmarks if Path(b).exists()):
        with open(benchmark) as handle:
            record = next(csv.DictReader(handle, delimiter="\t"), {})
        rows.append((f"{Path(benchmark).stem} (s)", record.get("s", "")))
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>\n"



def write_card(name, sha, receipt, sif, benchmarks, card):
    write_text_atomic(card, image_card(name, sha, receipt, sif, benchmarks))
