"""Recorded Jupyter servers (launch.json): launch one and record it, replace an earlier one
instead of orphaning it, list them, and stop them, whichever launcher started them."""

import json
import sys
from datetime import UTC, datetime
from pathlib import Path

from . import launchers, user_work
from .files import write_json_atomic
from .jupyter import OWNER_ONLY, note, now
from .steplog import step_log
from .tools import say


def record_file(connection_file):
    """A copy of launch.json that Snakemake does not know: it deletes launch.json before it
    relaunches (after a change of settings), and the copy still names the server to replace."""
    return Path(connection_file).with_name(".launch.record.json")


def record_launch(connection_file, connection):
    write_json_atomic(record_file(connection_file), connection, mode=OWNER_ONLY)
    write_json_atomic(connection_file, connection, mode=OWNER_ONLY)


def mark_ended(connection_file, connection, **extra):
    connection = {**connection, "ended": now(), **extra}
    write_json_atomic(Path(connection_file).with_name("launch.ended.json"), connection, mode=OWNER_ONLY)
    record_file(connection_file).unlink(missing_ok=True)


def describe(connection):
    return launchers.for_connection(connection).describe(connection)


def retire_previous(connection_file):
    """A relaunch replaces the server this folder launched before, instead of orphaning it."""
    record = record_file(connection_file)
    if record.exists():
        connection = json.loads(record.read_text())
        if launchers.for_connection(connection).stop(connection):
            say(f"  launch_jupyter: stopped the previous server ({describe(connection)})")
        mark_ended(connection_file, connection, replaced=True)


def launch(launcher, request):
    """Start a server with `launcher` (replacing the one this folder launched before) and
    record it in launch.json, readable by its owner only."""
    retire_previous(request.connection_file)
    if request.work_folder:
        # made here, on the submitting host, for a Slurm job too: the runtime binds only folders that exist
        user_work.make_work_folder(request.work_folder)
    connection = launcher.launch(request)
    if request.work_folder:
        connection["work_folder"] = str(request.work_folder)
    record_launch(request.connection_file, connection)
    note(request.log, f"the server answers at {connection['url']} ({describe(connection)})")
    return connection


def stop(connection_file):
    """Stop the server a launch.json names and move the file aside as ended."""
    connection_file = Path(connection_file)
    connection = json.loads(connection_file.read_text())
    was_running = launchers.for_connection(connection).stop(connection)
    mark_ended(connection_file, connection)
    connection_file.unlink()
    return was_running


def running(connection):
    return launchers.for_connection(connection).running(connection)


def launched(results, names=None):
    """Every launch.json under results, optionally only of the given image names."""
    for connection_file in sorted(Path(results).glob("*/*/launch.json")):
        if connection_file.parent.is_symlink():  # results/{name}/latest
            continue
        if not names or connection_file.parent.parent.name in names:
            yield connection_file


def stop_all(results, names=None):
    return [(connection_file, stop(connection_file)) for connection_file in launched(results, names)]


def age(started, at=None):
    """'2h05m', '3m12s' or '40s' since an ISO timestamp."""
    at = at or datetime.now(UTC)
    seconds = max(0, int((at - datetime.fromisoformat(started)).total_seconds()))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def server_rows(results, names=None):
    rows = []
    for connection_file in launched(results, names):
        connection = json.loads(connection_file.read_text())
        rows.append(
            {
                "name": connection_file.parent.parent.name,
                "sha": connection_file.parent.name[:12],
                "state": "running" if running(connection) else "ended",
                "age": age(connection["started"]),
                "where": describe(connection),
                "slurm_job_id": connection.get("slurm_job_id", ""),
                "url": connection["url"],
                "details": str(connection_file),
            }
        )
    return rows


def format_servers(rows):
    if not rows:
        return "no Jupyter servers recorded"
    columns = ["name", "sha", "state", "age", "where", "url", "details"]
    widths = {column: max(len(column), *(len(str(row[column])) for row in rows)) for column in columns}
    lines = ["  ".join(column.upper().ljust(widths[column]) for column in columns)]
    lines += ["  ".join(str(row[column]).ljust(widths[column]) for column in columns) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def connection_message(connection_file):
    connection = json.loads(Path(connection_file).read_text())
    if not running(connection):
        return (
            f"The Jupyter server recorded in {connection_file} no longer runs; "
            "`snakemake --cores 1 stop`, then run again to launch a new one."
        )
    lines = [
        f"Jupyter is running ({describe(connection)}) from {connection['sandbox']}",
        f"  open: {connection['url_with_token']}",
    ]
    if connection.get("work_folder"):
        lines.append(f"  save your work in work/ (kept in {connection['work_folder']}, outside the sandbox)")
    if connection.get("ssh_tunnel"):
        lines.append(f"  from your own machine: {connection['ssh_tunnel']}, then open {connection['tunnel_url']}")
    if connection.get("idle_timeout"):
        lines.append(f"  it stops itself after {connection['idle_timeout']} s without activity")
    return "\n".join(
        lines
        + [
            f"  details: {connection_file} (readable by you only); server log: {connection['log']}",
            "  list servers: snakemake --cores 1 servers; stop: snakemake --cores 1 stop",
        ]
    )


def report_stopped(results, names, log):
    for connection_file, was_running in stop_all(results, names):
        line = f"{connection_file.parent}: Jupyter {'stopped' if was_running else 'was no longer running'}"
        say(line)
        step_log(log).info(line)


def report_servers(results, log):
    table = format_servers(server_rows(results))
    Path(log).write_text(table + "\n")
    print(table, file=sys.stderr)
