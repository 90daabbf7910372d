"""The Builder interface: the host that builds the Docker image with repo2docker, saves it, and
makes the SIF from it. One file per kind in this package; a kind registers itself by
subclassing Builder, and its settings have their entry in workflow/schemas/config.schema.yaml
(`builder`)."""

from abc import ABC, abstractmethod
from typing import ClassVar

from ..steplog import step_log


class InvalidBuilder(Exception):
    """A builder setting that cannot work, told in one line."""


class Builder(ABC):
    kind: ClassVar[str]
    # the chain's file target that stands for the saved image: the tarball itself, or a receipt
    # naming it where it stays
    saved_image_file: ClassVar[str] = "image.tar"
    kinds: ClassVar[dict] = {}
    # a builder that fetches the commit itself (a build service): clone_source leaves source/ empty
    fetches_source: ClassVar[bool] = False
    # None: the image and SIF steps reach what only this machine has (its Docker engine, an SSH
    # connection, a token), so they are local rules. A kind whose steps may run anywhere names
    # the group they share instead: an executor (Slurm) runs the group as one job on one node,
    # where the image lives between build_image and save_image
    step_group: ClassVar[str | None] = None
    # a kind with no settings of its own is named by itself (`builder: podman`); the others are
    # a mapping with their settings and a `kind`
    named_alone: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        Builder.kinds[cls.kind] = cls

    @classmethod  # noqa: B027 (a hook that most kinds need not fill)
    def prepare_run(cls, config, environ):
        """Once per run, in the workflow's own process before any job starts: check the settings
        (InvalidBuilder in one line) and set what the run's processes inherit in `environ`."""

    def __init__(self, config, log=None):
        """`config`: the workflow's validated configuration; `log`: the step's log file."""
        self.config = config
        self.log = log
        self.step_log = step_log(log)

    @abstractmethod
    def build_image(self, spec, source, receipt):
        """repo2docker builds `spec` (an image.ImageSpec) from the `source` folder; image.json
        (`receipt`) records the image."""

    @abstractmethod
    def save_image(self, name, sha, receipt, saved):
        """The image `receipt` names, saved as a tarball; `saved` is the tarball, or the receipt
        of one that stays on the builder."""

    @abstractmethod
    def build_sif(self, name, sha, saved, sif, checksum):
        """The SIF from the saved image, here at `sif`, with its sha256 in `checksum`."""

    @abstractmethod
    def readiness(self):
        """One line: what this builder has, or StepError saying what is wrong."""
