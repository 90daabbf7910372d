"""What the config says about the registry (no secret), and the OCI names it must obey."""

import os
import re
from dataclasses import dataclass

from ..config_values import truthy
from .errors import InvalidRegistrySetting

MODES = ("off", "pull", "push")

# OCI distribution spec: repository path components and tags
COMPONENT_PATTERN = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
TAG_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
DIGEST_PATTERN = re.compile(r"sha256:[0-9a-f]{64}")
HOST_PATTERN = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?")


@dataclass(frozen=True)
class RegistrySettings:
    """What the config says about the registry. Holds no secret (Snakemake may pickle it):
    credentials_variable is the NAME of an environment variable, read at run time."""

    host: str
    namespace: str = ""
    mode: str = "off"
    credentials_variable: str = ""
    ca_file: str = ""
    plain_http: bool = False

    @classmethod
    def from_url(cls, url, **settings):
        """Parse a `registry` setting such as oras://registry.example.org:5000/lab/binder."""
        url = str(url).strip()
        scheme, separator, rest = url.partition("://")
        if not separator or scheme != "oras":
            raise InvalidRegistrySetting("registry: give an oras:// URL, e.g. oras://registry.example.org/lab/binder")
        authority, _, path = rest.partition("/")
        if "@" in rest:
            # said without echoing the URL: the part before @ may be a password
            raise InvalidRegistrySetting(
                "registry: the URL may not hold credentials (user:password@); use `apptainer registry login`, "
                "a docker-style auth file, or registry_credentials_env"
            )
        if not HOST_PATTERN.fullmatch(authority):
            raise InvalidRegistrySetting(f"registry: {authority!r} is not a host[:port]")
        if "?" in path or "#" in path:
            raise InvalidRegistrySetting("registry: the URL may not have a query or fragment")
        namespace = path.strip("/")
        for component in namespace.split("/") if namespace else []:
            if not COMPONENT_PATTERN.fullmatch(component):
                raise InvalidRegistrySetting(
                    f"registry: the namespace part {component!r} is not a valid repository name (lowercase letters, digits, . _ -)"
                )
        mode = settings.pop("mode", "off")
        if mode not in MODES:
            raise InvalidRegistrySetting(f"registry_mode: {mode!r} is not one of {', '.join(MODES)}")
        variable = settings.get("credentials_variable", "")
        if variable and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", variable):
            raise InvalidRegistrySetting(f"registry_credentials_env: {variable!r} is not an environment variable name")
        return cls(host=authority.lower(), namespace=namespace, mode=mode, **settings)

    @classmethod
    def from_config(cls, config):
        """The settings of a workflow config, or None when the registry is off or not set."""
        if not config.get("registry") or config.get("registry_mode", "off") == "off":
            return None
        return cls.from_url(
            config["registry"],
            mode=config.get("registry_mode", "off"),
            credentials_variable=config.get("registry_credentials_env", ""),
            ca_file=os.path.expanduser(config.get("registry_ca_file", "")),
            plain_http=truthy(config.get("registry_plain_http", False)),
        )

    @property
    def display(self):
        return f"{self.host}/{self.namespace}" if self.namespace else self.host

    def repository(self, name):
        if not COMPONENT_PATTERN.fullmatch(name):
            raise InvalidRegistrySetting(f"{name!r} is not a valid repository name (lowercase letters, digits, . _ -)")
        return f"{self.namespace}/{name}" if self.namespace else name

    def reference(self, name, tag):
        return f"{self.host}/{self.repository(name)}:{tag}"

    @property
    def hostname(self):
        if self.host.startswith("["):
            return self.host[1:].split("]", 1)[0]
        return self.host.rsplit(":", 1)[0]
