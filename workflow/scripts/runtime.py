"""Rules build_sif and unpack_sandbox: the Apptainer/SingularityCE runtime turns the saved
image into a squashfs SIF, and the SIF into a writable sandbox folder."""

import os
import shutil
import subprocess
from pathlib import Path

from steps import StepError, run_logged, sha256_file, temporary_sibling, write_text_atomic

# measured on the example image (TESTBED.md, bench/): zstd builds about 2x faster than gzip
PREFERRED_COMPRESSION = "zstd"
FALLBACK_COMPRESSION = "gzip"


def runtime_help(runtime, *args):
    result = subprocess.run([runtime, *args, "--help"], capture_output=True, text=True)
    return result.stdout + result.stderr


def supports_mksquashfs_args(runtime):
    return "--mksquashfs-args" in runtime_help(runtime, "build")


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


def build_sif(runtime, tarball, sif, checksum, log, compression_setting="auto"):
    compression = choose_compression(compression_setting, supports_mksquashfs_args(runtime))
    partial = temporary_sibling(sif, ".sif")
    try:
        run_logged(
            [runtime, "build", *compression_arguments(compression), str(partial), f"docker-archive://{tarball}"],
            log,
            f"build_sif ({Path(runtime).name} build, {compression or FALLBACK_COMPRESSION})",
        )
        os.chmod(partial, 0o644)
        digest = sha256_file(partial)
        write_text_atomic(checksum, f"{digest}  {Path(sif).name}\n")
        os.replace(partial, sif)
    finally:
        partial.unlink(missing_ok=True)


def check_sif(sif, checksum):
    expected = Path(checksum).read_text().split()[0]
    actual = sha256_file(sif)
    if actual != expected:
        raise StepError(f"{sif} does not match its checksum {checksum}; rebuild it with: snakemake --forcerun build_sif")


def unpack_sandbox(runtime, sif, checksum, sandbox, log):
    check_sif(sif, checksum)
    partial = temporary_sibling(sandbox)
    try:
        run_logged([runtime, "build", "--sandbox", str(partial), str(sif)], log, f"unpack_sandbox ({Path(runtime).name} build --sandbox)")
        os.chmod(partial, 0o755)
        if Path(sandbox).exists():
            shutil.rmtree(sandbox)
        os.replace(partial, sandbox)
    finally:
        if partial.exists():
            make_removable(partial)
            shutil.rmtree(partial, ignore_errors=True)


def make_removable(folder):
    """Sandboxes hold read-only folders; give the owner write access so they can be removed."""
    for root, dirs, _ in os.walk(folder):
        for name in dirs:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, os.stat(path).st_mode | 0o700)


if "snakemake" in globals():
    from steps import main

    runtime = snakemake.params.runtime
    if snakemake.rule == "build_sif":
        main(
            "build_sif",
            lambda: build_sif(
                runtime,
                snakemake.input.tarball,
                snakemake.output.sif,
                snakemake.output.checksum,
                snakemake.log[0],
                snakemake.params.compression,
            ),
        )
    else:
        main(
            "unpack_sandbox",
            lambda: unpack_sandbox(
                runtime, snakemake.input.sif, snakemake.input.checksum, snakemake.output.sandbox, snakemake.log[0]
            ),
        )
