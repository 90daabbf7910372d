"""What `bash setup.sh login remote` checks of profiles/remote/builder.yaml, read as the workflow
reads it: validated against workflow/schemas/config.schema.yaml with the schema's defaults filled
in, then taken by the builder's own settings class (no default is repeated here). One line per
finding, "ok: ..." or "MISSING: ..." (setup/login.sh counts the latter):

    python -m repo2singularity.login_check profiles/remote/builder.yaml"""

import os
import sys
from pathlib import Path

import paramiko
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from . import builders
from .builders.http import HTTPBuilderSettings
from .builders.ssh import SSHBuilderSettings
from .builds import describe_validation_error

CONFIG_SCHEMA = Path(__file__).resolve().parents[2] / "schemas" / "config.schema.yaml"
# the placeholder of the shipped builder.yaml
EXAMPLE_HOST = "builder.example.org"


def validated_builder_config(path):
    """builder.yaml as a validated configuration (the schema's defaults filled in), or a line
    saying what is wrong with it."""
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        return None, f"{path}: not valid YAML: {str(error).splitlines()[-1]}"
    if not isinstance(loaded, dict) or not isinstance(loaded.get("builder"), dict):
        return None, f"{path}: no builder: mapping"
    # the one setting the shipped file leaves to fill in, said as such rather than as a schema error
    if loaded["builder"].get("kind") == "http" and not loaded["builder"].get("url"):
        return None, f"{path}: fill in url (the build service, e.g. https://builder.example:8443) under builder:"
    config = {"repo": "-", **loaded}
    try:
        validate(config, str(CONFIG_SCHEMA))
    except WorkflowError as error:
        return None, f"{path}: {describe_validation_error(error)}"
    return config, None


def service_findings(config, path, environ):
    try:
        settings = HTTPBuilderSettings.from_config(config)
    except builders.InvalidBuilder as error:
        return [(False, f"{path}: {error}")]
    found = [(True, f"build service {settings.base_url} ({path})")]
    if environ.get(settings.token_env):
        found.append((True, f"your token for the build service is in ${settings.token_env}"))
    else:
        found.append((False, f"your token for the build service: export {settings.token_env}=... (its administrator gives it to you)"))
    if settings.ca_file and not os.access(settings.ca_file, os.R_OK):
        found.append((False, f"{path}: ca_file {settings.ca_file} is not readable"))
    return found


def known_hosts_entry(host, port):
    return host if port == 22 else f"[{host}]:{port}"


def ssh_findings(config, path, environ):
    if str(config["builder"].get("host") or "") in ("", EXAMPLE_HOST):
        found = [(False, f"{path}: fill in host (and port, user): the lines `bash setup.sh builder ACCOUNT` printed on the builder")]
    else:
        try:
            target = SSHBuilderSettings.from_config(config).target
        except builders.InvalidBuilder as error:
            return [(False, f"{path}: {error}")]
        found = [(True, f"builder {target.display} ({path})")]
        entry = known_hosts_entry(target.host, target.port)
        known_hosts = Path(target.known_hosts).expanduser()
        try:
            known = paramiko.HostKeys(str(known_hosts)).lookup(entry) is not None
        except (OSError, paramiko.SSHException):
            known = False
        if known:
            found.append((True, f"the builder's host key is in {known_hosts}"))
        else:
            found.append((False, f"the builder's host key: {entry} is not in {known_hosts} (append the line `bash setup.sh builder` printed, "
                                 f"or run `ssh -p {target.port} {target.login}@{target.host} true` once and compare the fingerprint it printed)"))  # fmt: skip
    return found + key_findings(config, path, environ)


def key_findings(config, path, environ):
    key_file = str(config["builder"].get("key_file") or "")
    if key_file:
        key = Path(key_file).expanduser()
        if os.access(key, os.R_OK):
            return [(True, f"SSH key {key}")]
        return [(False, f"an SSH key: {key} (key_file in {path}) does not exist: run `ssh-keygen -t ed25519 -f {key}` and have {key}.pub "
                        "authorized on the builder (bash setup.sh builder ACCOUNT --authorize FILE)")]  # fmt: skip
    if environ.get("SSH_AUTH_SOCK") and paramiko.Agent().get_keys():
        return [(True, "SSH keys in the agent")]
    own = sorted(p for p in (Path.home() / ".ssh").glob("id_*") if p.suffix != ".pub")
    if own:
        return [(True, f"SSH key {own[0]}")]
    return [(False, "an SSH key: key_file is empty, no ssh-agent holds a key and there is no ~/.ssh/id_*: run `ssh-keygen -t ed25519`")]


def findings(path, environ=os.environ):
    """(ok, text) for each thing the remote profile needs of builder.yaml and this account."""
    config, problem = validated_builder_config(path)
    if problem:
        return [(False, problem)]
    if builders.kind_of(config) == "http":
        return service_findings(config, path, environ)
    return ssh_findings(config, path, environ)


def main(argv=None):
    path = (argv or sys.argv[1:] or ["profiles/remote/builder.yaml"])[0]
    for ok, text in findings(path):
        print(f"ok: {text}" if ok else f"MISSING: {text}")


if __name__ == "__main__":
    main()
