"""The service's settings: a YAML file checked against workflow/schemas/service.schema.yaml,
with the schema's defaults filled in."""

import ipaddress
from pathlib import Path

import jsonschema
import yaml

from ..input_limits import capped, repeated_container, schema_message, shown
from ..registry import RegistryError, RegistrySettings

SCHEMA = Path(__file__).resolve().parents[2].parent / "schemas" / "service.schema.yaml"


class SettingsError(Exception):
    """Bad settings, told in one line."""


def with_defaults(validator_class):
    """A validator that also fills in each property's default (jsonschema's documented recipe)."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema:
                    instance.setdefault(name, subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


def load_schema():
    return yaml.safe_load(SCHEMA.read_text())


def check(values):
    """The validated settings (a new dict, defaults filled in) or SettingsError."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise SettingsError("settings: the file must hold a mapping of keys to values")
    if repeated_container(values) is not None:
        raise SettingsError("settings: YAML aliases of lists or mappings are not allowed")
    values = dict(values)
    schema = load_schema()
    validator = with_defaults(jsonschema.Draft202012Validator)(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(values))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path)
        raise SettingsError(capped(f"settings{f' at {shown(where)}' if where else ''}: {schema_message(error)}"))
    if bool(values["tls_cert"]) != bool(values["tls_key"]):
        raise SettingsError("settings: tls_cert and tls_key go together")
    if not values["tls_cert"] and not is_loopback(values["listen_address"]):
        raise SettingsError(
            f"settings: plain HTTP on {values['listen_address']} would send tokens in clear; "
            "set tls_cert and tls_key, or listen on 127.0.0.1"
        )
    for key in ("repo", "ref", "name", "builder"):
        if key in values["workflow_config"]:
            raise SettingsError(f"settings: workflow_config may not set {key!r}: the service sets it per build")
    for key in values["workflow_config"]:
        if key.startswith("registry"):
            # private builds must never reach the registry; `registry` decides which builds do
            raise SettingsError(f"settings: workflow_config may not set {key!r}: use the service's `registry` setting")
    check_registry(values["registry"])
    return values


def check_registry(registry):
    """The registry's settings make sense as the workflow's (one line otherwise). Its
    credentials are only named here, never given: the workflow reads them itself."""
    if not registry.get("url"):
        if any(registry.values()):
            raise SettingsError("settings: registry: url is missing (oras://host[:port]/namespace)")
        return
    try:
        RegistrySettings.from_url(registry["url"], mode="push", credentials_variable=registry["credentials_env"])
    except RegistryError as error:
        raise SettingsError(f"settings: {error}") from None


def is_loopback(address):
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def load(path):
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise SettingsError(f"settings: cannot read {path}: {error.strerror}") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise SettingsError(f"settings: {path}{where} is not valid YAML") from None
    return check(values)
