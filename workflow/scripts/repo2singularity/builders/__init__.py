"""Builders: where the image and SIF steps run. `builder: local` (this machine's Docker engine),
`builder: podman` (rootless Podman as the user, no Docker), or a mapping whose `kind` names
another file of this package (`ssh`: a host over SSH)."""

import importlib
import pkgutil
from dataclasses import dataclass, fields, replace

from .base import Builder, InvalidBuilder

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")


def kind_of(config):
    setting = config.get("builder", "local")
    if setting in (None, ""):
        return "local"
    if isinstance(setting, str) and getattr(Builder.kinds.get(setting), "named_alone", False):
        return setting
    if not isinstance(setting, dict):
        alone = sorted(kind for kind, builder in Builder.kinds.items() if builder.named_alone)
        raise InvalidBuilder(f"builder must be {', '.join(map(repr, alone))} or a mapping with a host, not {setting!r}")
    return setting.get("kind") or "ssh"


def builder_class(config):
    """The Builder subclass the configuration asks for, without connecting anywhere."""
    kind = kind_of(config)
    try:
        return Builder.kinds[kind]
    except KeyError:
        raise InvalidBuilder(f"builder kind {kind!r} is unknown; known: {', '.join(sorted(Builder.kinds))}") from None


def from_config(config, log=None):
    """A builder for one step: `config` is the workflow's configuration or a BuilderSettings."""
    return builder_class(config)(config, log)


@dataclass(frozen=True)
class BuilderSettings:
    """What the Docker and SIF steps read of the configuration, made once per run in common.smk
    and handed to their scripts as the `builder` param. It is no plain value on purpose:
    Snakemake records and compares only plain params (rerun-triggers `params`), so where and how
    a step runs (`builder`: a host, its key file, build slots) reruns nothing and reaches no
    record. What changes a SIF (`sif_options`) is build_sif's plain param, which its script
    hands back here (`with_sif_options`): changing one reruns build_sif and nothing before it."""

    builder: object
    runtime: str
    sif_compression: str
    sif_conversion: str

    @classmethod
    def from_config(cls, config):
        return cls(
            builder=config.get("builder", "local"),
            runtime=config["runtime"],
            sif_compression=config["sif_compression"],
            sif_conversion=config["sif_conversion"],
        )

    @property
    def sif_options(self):
        return {"runtime": self.runtime, "sif_compression": self.sif_compression, "sif_conversion": self.sif_conversion}

    def with_sif_options(self, options):
        return replace(self, **options)

    # the Builder kinds read their settings as config[key], from either this or a configuration
    def __getitem__(self, key):
        if key not in {field.name for field in fields(self)}:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key, default=None):
        try:
            return self[key]
        except KeyError:
            return default


__all__ = ["Builder", "BuilderSettings", "InvalidBuilder", "builder_class", "from_config", "kind_of"]
