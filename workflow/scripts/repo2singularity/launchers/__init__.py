"""Launchers: where Jupyter runs, one file per place. The `launch_on` setting names the kind
for a launch; a recorded server (launch.json's "launched_on") names the kind that stops it."""

import importlib
import pkgutil

from .base import Launcher, LaunchRequest

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")


def from_config(config):
    return Launcher.kinds[config["launch_on"]](config)


def for_connection(connection):
    return Launcher.kinds[connection.get("launched_on", "local")]()


__all__ = ["LaunchRequest", "Launcher", "for_connection", "from_config"]
