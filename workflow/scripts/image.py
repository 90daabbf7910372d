"""Rules build_image and save_image: repo2docker builds the Docker image, docker save writes it
to a tarball for the runtime to convert."""

import json
import os
import subprocess
from pathlib import Path

import builder
from steps import StepError, python_tool, run_logged, temporary_sibling, write_json_atomic

LABEL_PREFIX = "repo2singularity"


def image_labels(display_url, ref, sha, subdir=""):
    """Provenance that survives into the SIF: repo2docker's own labels and ours."""
    labels = {
        "repo2docker.repo": display_url,
        "repo2docker.ref": sha,
        f"{LABEL_PREFIX}.repo": display_url,
        f"{LABEL_PREFIX}.ref": ref,
        f"{LABEL_PREFIX}.sha": sha,
    }
    if subdir:
        labels[f"{LABEL_PREFIX}.subdir"] = subdir
    return labels


def default_user_id():
    uid = os.getuid()
    return uid if uid != 0 else 1000


def repo2docker_command(source, tag, labels, user_name, user_id, subdir="", extra_args=()):
    command = [
        python_tool("repo2docker"),
        "--no-run",
        "--image-name",
        tag,
        "--user-name",
        user_name,
        "--user-id",
        str(user_id),
    ]
    for key, value in labels.items():
        command += ["--label", f"{key}={value}"]
    if subdir:
        command += ["--subdir", subdir]
    command += list(extra_args)
    # "--" keeps a source path from ever being read as an option
    return command + ["--", str(source)]


def repo2docker_version():
    result = subprocess.run([python_tool("repo2docker"), "--version"], capture_output=True, text=True, check=True)
    return result.stdout.strip()


def docker_answers():
    try:
        return subprocess.run(["docker", "version"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def run_docker_step(command, log, step):
    """Run a step that needs the Docker engine; if it fails because the engine is gone, say so."""
    try:
        run_logged(command, log, step)
    except StepError:
        if not docker_answers():
            where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
            raise StepError(
                f"{step} failed: the Docker engine does not answer at {where}; start it (bash setup.sh check) and run again"
            ) from None
        raise


def inspect_image(tag):
    result = subprocess.run(["docker", "image", "inspect", tag], capture_output=True, text=True)
    if result.returncode != 0:
        return None
    return json.loads(result.stdout)[0]


def image_environment(image_config):
    return dict(item.partition("=")[::2] for item in image_config.get("Env") or [])


def working_folder(image_config):
    """Where the repository lives in the image: repo2docker's REPO_DIR, else WORKDIR."""
    return image_environment(image_config).get("REPO_DIR") or image_config.get("WorkingDir") or "/"


def image_receipt(details, tag, user_name, repo2docker_version):
    """What image.json records of a built image (`details`: docker image inspect's)."""
    config = details.get("Config") or {}
    return {
        "image_id": details["Id"],
        "tag": tag,
        "repo2docker_version": repo2docker_version,
        "labels": config.get("Labels") or {},
        "working_folder": working_folder(config),
        "home": image_environment(config).get("HOME") or f"/home/{user_name}",
        "created": details.get("Created"),
        "size_bytes": details.get("Size"),
    }


def build_image(source, tag, labels, receipt, log, user_name, user_id, subdir="", extra_args=()):
    command = repo2docker_command(source, tag, labels, user_name, user_id or default_user_id(), subdir, extra_args)
    run_docker_step(command, log, "build_image (repo2docker)")
    details = inspect_image(tag)
    if details is None:
        raise StepError(f"repo2docker finished but Docker has no image {tag}")
    write_json_atomic(receipt, image_receipt(details, tag, user_name, repo2docker_version()))


def save_image(receipt, tarball, log):
    image = json.loads(Path(receipt).read_text())
    details = inspect_image(image["tag"])
    if details is None or details["Id"] != image["image_id"]:
        raise StepError(
            f"Docker no longer has image {image['tag']} ({image['image_id'][:19]}) named in {receipt}; "
            "rebuild it with: snakemake --forcerun build_image"
        )
    partial = temporary_sibling(tarball, ".tar")
    try:
        run_docker_step(["docker", "save", "--output", str(partial), image["tag"]], log, "save_image (docker save)")
        os.replace(partial, tarball)
    finally:
        partial.unlink(missing_ok=True)


# ------------------------------------------------------------------ on a builder over SSH


def remote_docker_step(connection, command, log, step):
    """A Docker step on the builder; if it fails because the engine there is gone, say so."""
    try:
        connection.run_logged(command, log, step)
    except StepError:
        status, _, _ = connection.capture(builder.remote_command(["docker", "version"]))
        if status != 0:
            raise StepError(
                f"{step} failed: the Docker engine on builder {connection.settings.display} does not answer; "
                "start it there and run again"
            ) from None
        raise


def remote_inspect_image(connection, tag):
    status, out, _ = connection.capture(builder.remote_command(["docker", "image", "inspect", tag]))
    if status != 0:
        return None
    return json.loads(out)[0]


def remote_build_image(settings, name, sha, source, tag, labels, receipt, log, user_name, user_id, subdir="", extra_args=()):
    """Send the clone to the builder, run repo2docker there with the same arguments as a local
    build (once a build slot is free), and write the receipt here."""
    with builder.connect(settings, log, builder.STEP_TOOLS["build_image"]) as connection:
        paths = builder.remote_paths(connection.workdir, name, sha)
        connection.log(f"sending {source} to {paths['source']}")
        connection.send_folder(source, paths["source"])
        command = repo2docker_command(paths["source"], tag, labels, user_name, user_id or default_user_id(), subdir, extra_args)
        command[0] = settings.repo2docker
        build = builder.with_build_slot(builder.remote_command(command), paths["build_slots"], settings.max_builds)
        remote_docker_step(connection, build, log, "build_image (repo2docker)")
        details = remote_inspect_image(connection, tag)
        if details is None:
            raise StepError(f"repo2docker finished but Docker on builder {settings.host} has no image {tag}")
        # the image holds everything now; the unpacked source is not needed on the builder
        connection.capture(builder.remote_command(["rm", "-rf", "--", paths["source"]]))
        remove_old_remote_images(connection, name, tag, settings.keep_images)
        found = image_receipt(details, tag, user_name, connection.versions["repo2docker"])
        write_json_atomic(receipt, {**found, "builder": settings.describe()})


def remove_old_remote_images(connection, name, tag, keep):
    """The builder keeps the newest `keep` images of this name. An image whose chain is still
    under way there (another run's: its work folder exists until its SIF has been fetched)
    stays, and so does one that cannot go (a container uses it); the log says so."""
    repository = tag.rsplit(":", 1)[0]
    status, listing, _ = connection.capture(
        builder.remote_command(["docker", "image", "ls", "--format", "{{.CreatedAt}}\t{{.Repository}}:{{.Tag}}", "--", repository])
    )
    old = builder.images_to_remove(listing, tag, keep) if status == 0 else []
    folders = {old_tag: builder.remote_paths(connection.workdir, name, old_tag.rsplit(":", 1)[1])["folder"] for old_tag in old}
    under_way = connection.existing(folders.values()) if folders else set()
    if under_way:
        connection.log(f"kept on the builder, still being made into SIFs: {' '.join(t for t, f in folders.items() if f in under_way)}")
    old = [old_tag for old_tag in old if folders[old_tag] not in under_way]
    if old:
        status, out, err = connection.capture(builder.remote_command(["docker", "image", "rm", "--", *old]))
        connection.log(f"removed older images of {repository} on the builder (keep_images: {keep}): {' '.join(old)}")
        if status != 0:
            connection.log(f"  some stay: {builder.last_line(err or out)}")


def remote_save_image(settings, name, sha, receipt, tarball_receipt, log):
    """docker save on the builder; the tarball stays there and a receipt names it here."""
    image = json.loads(Path(receipt).read_text())
    with builder.connect(settings, log, builder.STEP_TOOLS["save_image"]) as connection:
        details = remote_inspect_image(connection, image["tag"])
        builder.check_image_receipt(image, details and details["Id"], settings, receipt)
        paths = builder.remote_paths(connection.workdir, name, sha)
        partial = paths["tarball"] + ".partial"
        remote_docker_step(
            connection,
            builder.remote_command(
                ["mkdir", "-p", "--", paths["folder"]],
                ["docker", "save", "--output", partial, image["tag"]],
                ["mv", "-f", "--", partial, paths["tarball"]],
            ),
            log,
            "save_image (docker save)",
        )
        size = connection.stat(paths["tarball"])
        digest = connection.sha256(paths["tarball"])
        if size is None or digest is None:
            raise StepError(f"docker save finished but builder {settings.host} has no {paths['tarball']}")
        write_json_atomic(
            tarball_receipt,
            {**settings.describe(), "path": paths["tarball"], "size_bytes": size, "sha256": digest, "tag": image["tag"], "image_id": image["image_id"]},
        )


if "snakemake" in globals():
    from steps import main

    remote = builder.settings_from_config(snakemake.config)
    name, sha = snakemake.wildcards.name, snakemake.wildcards.sha
    if snakemake.rule == "build_image":
        arguments = (
            snakemake.input.source,
            snakemake.params.tag,
            snakemake.params.labels,
            snakemake.output.receipt,
            snakemake.log[0],
            snakemake.params.user_name,
            snakemake.params.user_id,
            snakemake.params.subdir,
            snakemake.params.extra_args,
        )
        if remote:
            main("build_image", lambda: remote_build_image(remote, name, sha, *arguments))
        else:
            main("build_image", lambda: build_image(*arguments))
    elif remote:
        main(
            "save_image",
            lambda: remote_save_image(remote, name, sha, snakemake.input.receipt, snakemake.output.tarball, snakemake.log[0]),
        )
    else:
        main("save_image", lambda: save_image(snakemake.input.receipt, snakemake.output.tarball, snakemake.log[0]))
