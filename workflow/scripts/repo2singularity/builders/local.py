"""`builder: local`: the Docker engine of the machine the workflow runs on. repo2docker runs as
a command (it drives `docker buildx` itself); everything else talks to the engine through the
`docker` SDK, as repo2docker does."""

import hashlib
import json
import os
import subprocess
from pathlib import Path

from .. import runtime
from ..downloads import CHUNK, TransferMeter
from ..files import checksum_line, sha256_file, temporary_sibling, write_json_atomic, write_text_atomic
from ..image import image_missing, image_receipt, repo2docker_command
from ..step import StepError
from ..tools import python_tool, run_logged, say
from .base import Builder


class LocalBuilder(Builder):
    kind = "local"
    named_alone = True
    saved_image_file = "image.tar"
    engine_name = "Docker"

    def __init__(self, config, log=None):
        super().__init__(config, log)
        self.runtime = config["runtime"]
        self.compression_setting = config["sif_compression"]
        self.conversion = config["sif_conversion"]
        self._engine = None

    @property
    def engine_address(self):
        return os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")

    def engine_gone(self, step):
        return StepError(f"{step} failed: the Docker engine does not answer at {self.engine_address}; start it (bash setup.sh check) and run again")

    def engine(self, step):
        import docker

        if self._engine is None:
            try:
                self._engine = docker.from_env(timeout=120)
            except docker.errors.DockerException:
                raise self.engine_gone(step) from None
        return self._engine

    def engine_answers(self):
        import docker

        try:
            return docker.from_env(timeout=20).ping()
        except (docker.errors.DockerException, OSError):
            return False

    def inspect(self, tag, step):
        import docker

        try:
            return self.engine(step).api.inspect_image(tag)
        except docker.errors.ImageNotFound:
            return None
        except docker.errors.DockerException:
            raise self.engine_gone(step) from None

    def build_image(self, spec, source, receipt):
        step = "build_image (repo2docker)"
        repo2docker = python_tool("repo2docker")
        try:
            run_logged(repo2docker_command(repo2docker, source, spec), self.log, step)
        except StepError:
            if not self.engine_answers():
                raise self.engine_gone(step) from None
            raise
        details = self.inspect(spec.tag, step)
        if details is None:
            raise StepError(f"repo2docker finished but Docker has no image {spec.tag}")
        version = subprocess.run([repo2docker, "--version"], capture_output=True, text=True, check=True).stdout.strip()
        engine = f"docker {self.engine(step).version().get('Version', '')}".strip()
        write_json_atomic(receipt, image_receipt(details, spec.tag, spec.user_name, version, engine))

    def save_image(self, name, sha, receipt, saved):
        """The image as a tarball, streamed from the engine with a byte count on the terminal
        and its sha256 taken on the way (written to the log)."""
        import docker

        step = "save_image (docker save)"
        image, details = self.image_to_save(receipt, saved, step)
        partial = temporary_sibling(saved, ".tar")
        digest = hashlib.sha256()
        # the image's size in the engine: about what the tarball will be
        meter = TransferMeter("save", image["tag"], details.get("Size") or 0, limited=False)
        try:
            with open(partial, "wb") as target:
                try:
                    for chunk in self.engine(step).api.get_image(image["tag"], chunk_size=CHUNK):
                        target.write(chunk)
                        digest.update(chunk)
                        meter.advance(len(chunk))
                except (docker.errors.DockerException, OSError) as error:
                    if not self.engine_answers():
                        raise self.engine_gone(step) from None
                    raise StepError(f"{step} failed: {error}") from None
                target.flush()
                os.fsync(target.fileno())
            os.replace(partial, saved)
        finally:
            partial.unlink(missing_ok=True)
        self.step_log.info(f"saved {image['tag']} to {saved}: {meter.done} bytes, sha256 {digest.hexdigest()}")
        say(f"  {step}: done in {meter.seconds:.0f} s ({meter.done / 1e6:.0f} MB)")

    def image_to_save(self, receipt, saved, step):
        """The image `receipt` names and the engine's details of it; StepError when the engine no
        longer has that very image."""
        image = json.loads(Path(receipt).read_text())
        details = self.inspect(image["tag"], step)
        if details is None or details["Id"] != image["image_id"]:
            raise StepError(image_missing(image, receipt, self.engine_name))
        self.step_log.info(f"saving {image['tag']} ({image['image_id'][:19]}) to {saved}")
        return image, details

    def build_sif(self, name, sha, saved, sif, checksum):
        # the fast conversion runs mksquashfs itself: every compression it has
        supported = self.conversion == "fast" or runtime.supports_mksquashfs_args(self.runtime)
        compression = runtime.choose_compression(self.compression_setting, supported)
        partial = temporary_sibling(sif, ".sif")
        try:
            run_logged(
                runtime.conversion_command(self.conversion, self.runtime, compression, partial, saved),
                self.log,
                runtime.step_name(self.conversion, self.runtime, compression),
            )
            os.chmod(partial, 0o644)
            digest = sha256_file(partial)
            os.replace(partial, sif)
        finally:
            partial.unlink(missing_ok=True)
        # the checksum comes last: it marks a finished SIF
        write_text_atomic(checksum, checksum_line(digest, sif))

    def readiness(self):
        return "builder: local (this machine); `bash setup.sh check` says what it lacks"
