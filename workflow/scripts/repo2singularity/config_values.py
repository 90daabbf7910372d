"""Setting values as `--config KEY=VALUE` hands them over: every value is a string there."""


def truthy(value):
    """A boolean setting: true, yes, 1 or on (any case) when given as a string."""
    if isinstance(value, str):
        return value.strip().lower() in ("true", "yes", "1", "on")
    return bool(value)
