"""Builders: where the image and SIF steps run. `builder: local` (this machine's Docker engine),
`builder: podman` (rootless Podman as the user, no Docker), or a mapping whose `kind` names
another file of this package (`ssh`: a host over SSH)."""

import importlib
import pkgutil

from .base import Builder, InvalidBuilder

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")


def kind_of(config):
    setting = config.get("builder", "local")
    if setting in (None, "", "local"):
        return "local"
    # a kind without settings is named by itself
    if setting == "podman":
        return setting
    if not isinstance(setting, dict):
        raise InvalidBuilder(f"builder must be 'local', 'podman' or a mapping with a host, not {setting!r}")
    return setting.get("kind") or "ssh"


def builder_class(config):
    """The Builder subclass the configuration asks for, without connecting anywhere."""
    kind = kind_of(config)
    try:
        return Builder.kinds[kind]
    except KeyError:
        raise InvalidBuilder(f"builder kind {kind!r} is unknown; known: {', '.join(sorted(Builder.kinds))}") from None


def from_config(config, log=None):
    return builder_class(config)(config, log)


__all__ = ["Builder", "InvalidBuilder", "builder_class", "from_config", "kind_of"]
