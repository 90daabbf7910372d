"""Rules build_sif and unpack_sandbox: the Apptainer/SingularityCE runtime turns the saved
image into a squashfs SIF, and the SIF into a writable sandbox folder."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import builder
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


def remote_build_sif(settings, name, sha, tarball_receipt, sif, checksum, log, compression_setting="auto"):
    """apptainer build on the builder (the SIF is kept there until it is here, so a cut
    download resumes without building again), then bring the SIF back, verified."""
    saved = json.loads(Path(tarball_receipt).read_text())
    with builder.connect(settings, log, builder.STEP_TOOLS["build_sif"]) as connection:
        paths = builder.remote_paths(connection.workdir, name, sha)
        digest = finished_remote_sif(connection, paths)
        if digest is None:
            size = connection.stat(saved["path"])
            builder.check_tarball_receipt(saved, None if size is None else {"size": size}, tarball_receipt)
            compression = choose_compression(compression_setting, connection.versions["mksquashfs_args"])
            partial = paths["sif"] + ".partial"
            build = builder.remote_command(
                ["rm", "-f", "--", partial],
                [settings.runtime, "build", *compression_arguments(compression), partial, f"docker-archive://{saved['path']}"],
            )
            # the tarball's digest is checked while the SIF is built from it (hashing it first
            # would cost the chain a full read), and the SIF takes its name only if it matched;
            # the checksum file comes last, so that it marks a finished SIF
            found_file = paths["tarball_digest"]
            try:
                connection.run_logged(
                    builder.checked_while(build, saved["path"], saved["sha256"], found_file)
                    + " && "
                    + builder.remote_command(["mv", "-f", "--", partial, paths["sif"]])
                    + " && "
                    + builder.remote_command(["sha256sum", "--", paths["sif"]])
                    + " > "
                    + builder.remote_command([paths["checksum"] + ".partial"])
                    + " && "
                    + builder.remote_command(["mv", "-f", "--", paths["checksum"] + ".partial", paths["checksum"]]),
                    log,
                    f"build_sif ({Path(settings.runtime).name} build on {settings.host}, {compression or FALLBACK_COMPRESSION})",
                )
            except StepError:
                found = connection.capture(builder.remote_command(["cat", "--", found_file]))[1].split()
                if found and found[0] != saved["sha256"]:
                    builder.check_tarball_receipt(saved, {"size": size, "sha256": found[0]}, tarball_receipt)
                raise
            digest = finished_remote_sif(connection, paths)
            if digest is None:
                raise StepError(f"the SIF built on builder {settings.host} has no checksum")
        # the tarball is no longer needed once the SIF exists
        connection.capture(builder.remote_command(["rm", "-f", "--", saved["path"]]))
        connection.download(paths["sif"], sif, digest, before_rename=lambda: write_text_atomic(checksum, f"{digest}  {Path(sif).name}\n"))
        # here and verified: nothing of this build is needed on the builder any more
        connection.capture(builder.remote_command(["rm", "-rf", "--", paths["folder"]]))


def finished_remote_sif(connection, paths):
    """The sha256 of a SIF already built on the builder, or None."""
    status, out, _ = connection.capture(builder.remote_command(["cat", "--", paths["checksum"]]))
    if status != 0 or not out.split():
        return None
    return out.split()[0]


if "snakemake" in globals():
    from steps import main

    runtime = snakemake.params.runtime
    remote = builder.settings_from_config(snakemake.config)
    if snakemake.rule == "build_sif" and remote:
        main(
            "build_sif",
            lambda: remote_build_sif(
                remote,
                snakemake.wildcards.name,
                snakemake.wildcards.sha,
                snakemake.input.tarball,
                snakemake.output.sif,
                snakemake.output.checksum,
                snakemake.log[0],
                snakemake.params.compression,
            ),
        )
    elif snakemake.rule == "build_sif":
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
