"""The Apptainer/SingularityCE runtime: the compression a SIF is built with, the command that
builds it from a saved image, and the writable sandbox unpacked from it."""

import os
import subprocess
import sys
from pathlib import Path

from . import user_work
from .files import now, remove_tree, replace_folder, sha256_file, temporary_sibling, write_json_atomic
from .jupyter import note
from .step import StepError, raise_deferred_signal, signals_deferred
from .tools import run_logged, say

# measured on the example image (TESTBED.md, bench/): zstd builds about 2x faster than gzip
PREFERRED_COMPRESSION = "zstd"
FALLBACK_COMPRESSION = "gzip"


def supports_mksquashfs_args(runtime):
    result = subprocess.run([runtime, "build", "--help"], capture_output=True, text=True)
    return "--mksquashfs-args" in result.stdout + result.stderr


def choose_compression(setting, mksquashfs_args_supported):
    """The compression to ask for, or None for the runtime's own default (gzip)."""
    if setting == "auto":
        return PREFERRED_COMPRESSION if mksquashfs_args_supported else None
    if setting == FALLBACK_COMPRESSION:
        return None
    if not mksquashfs_args_supported:
        raise StepError(f"sif_compression={setting} needs a runtime with 'build --mksquashfs-args'")
    return setting


def compression_arguments(compression):
    if compression is None:
        return []
    options = f"-comp {compression}"
    if compression == "zstd":
        options += " -Xcompression-level 3"
    return ["--mksquashfs-args", options]


def sif_build_command(runtime, compression, sif, tarball):
    """`build` of a SIF from a `docker save` tarball."""
    return [runtime, "build", *compression_arguments(compression), str(sif), f"docker-archive://{tarball}"]


# the fast conversion: one self-contained file, so that a builder can run it without this project
ARCHIVE_TO_SIF = Path(__file__).with_name("archive_to_sif.py")
CONVERSIONS = ("fast", "apptainer")


def fast_sif_command(python, script, runtime, compression, sif, tarball):
    """archive_to_sif.py: the saved image streamed into mksquashfs, no temporary tree. It takes
    any compression mksquashfs has, with no runtime support needed."""
    return [python, str(script), "--compression", compression or FALLBACK_COMPRESSION, "--runtime", runtime, str(tarball), str(sif)]


def conversion_command(conversion, runtime, compression, sif, tarball, python=sys.executable, script=ARCHIVE_TO_SIF):
    if conversion == "fast":
        return fast_sif_command(python, script, runtime, compression, sif, tarball)
    return sif_build_command(runtime, compression, sif, tarball)


def step_name(conversion, runtime, compression, where=""):
    how = "fast conversion" if conversion == "fast" else f"{Path(runtime).name} build"
    return f"build_sif ({how}{where}, {compression or FALLBACK_COMPRESSION})"


def check_sif(sif, checksum):
    """The SIF's sha256, as its checksum file has it, or StepError when the SIF differs."""
    expected = Path(checksum).read_text().split()[0]
    if sha256_file(sif) != expected:
        raise StepError(f"{sif} does not match its checksum {checksum}; rebuild it with: snakemake --forcerun build_sif")
    return expected


def unpack_sandbox(runtime, sif, checksum, sandbox, log, image, work_folder, record=None):
    """A writable sandbox folder from the SIF, checked against its checksum first; an existing
    sandbox is swapped for the new one in one step, so there is always one. Before that, the
    files users changed in the old one go to the work folder (`user_work`): a sandbox whose
    changed files cannot be moved stays as it is, and the unpack fails with one line. `record`:
    a file that says, once the sandbox is in place, what it was unpacked from (the rule's output)."""
    digest = check_sif(sif, checksum)
    sandbox = Path(sandbox)
    commit = sandbox.parent.name

    def keep(old):
        kept = user_work.keep_changed(old, work_folder, commit, log=lambda line: note(log, line))
        if kept:
            say(f"  unpack_sandbox: the files users changed in the old sandbox are in {kept}")

    def dispose(old):
        try:
            keep(old)
        except StepError:
            # swapped out already: out of the workspace, which goes, to a name of its own
            os.replace(old, user_work.set_aside_name(sandbox))
            raise
        remove_tree(old)

    # the runtime unpacks into a folder of its own beside the destination (build-temp-*), which a
    # killed unpack leaves behind: a private folder around the destination goes with it
    workspace = temporary_sibling(sandbox)
    workspace.mkdir(mode=0o700)
    partial = workspace / "sandbox"
    try:
        run_logged([runtime, "build", "--sandbox", str(partial), str(sif)], log, f"unpack_sandbox ({Path(runtime).name} build --sandbox)")
        os.chmod(partial, 0o755)
        user_work.prepare(partial, image)
        # a cancel waits until the old sandbox's files are kept: once swapped out, it is in the
        # workspace, which goes on the way out
        with signals_deferred():
            # before the swap, so that a refusal leaves the old sandbox where it was; and again
            # after it, for what a server still running from it wrote in between
            keep(sandbox)
            replace_folder(partial, sandbox, dispose=dispose)
        raise_deferred_signal()
        if record:
            write_json_atomic(record, {"sandbox": str(sandbox.resolve()), "sif_sha256": digest, "work_folder": str(work_folder), "unpacked": now()})
    finally:
        remove_tree(workspace)
