"""Bounds on what bad input can cost: an error line that echoes a value stays one short line,
and a YAML alias cannot multiply a config or manifest before it is checked."""

SHOWN_CHARACTERS = 80
LINE_CHARACTERS = 400


def shown(value, limit=SHOWN_CHARACTERS):
    """A user's value as an error line echoes it: its repr, cut to `limit` characters with the
    full length said, so a 5,000-character ref is not printed whole."""
    text = str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}… ({len(text)} characters)"


def cut(text, limit=SHOWN_CHARACTERS):
    """`shown` without the quotes, for URLs and paths."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def capped(line, limit=LINE_CHARACTERS):
    """The last guard for any error line: its start, then how long it was."""
    return cut(line, limit)


def schema_message(error):
    """jsonschema's message with the value it starts with (the whole value, as repr) cut short."""
    instance = error.instance
    text = instance if isinstance(instance, str) else repr(instance)
    if len(text) > SHOWN_CHARACTERS:
        quoted = repr(instance)
        if quoted in error.message:
            return capped(error.message.replace(quoted, shown(text)))
    return capped(error.message)


def repeated_container(data, path=()):
    """The path of the first list or mapping reached a second time, else None.

    YAML aliases (`*name`) load as the same object at each place they are used, so 8 nested
    levels of 10 aliases are 10**8 values to anything that walks or prints the document (schema
    validation does both). Walking here stops at the first repeat, whatever the size."""
    seen = set()
    pending = [(path, data)]
    while pending:
        where, value = pending.pop()
        if not isinstance(value, (dict, list)):
            continue
        if id(value) in seen:
            return where
        seen.add(id(value))
        items = value.items() if isinstance(value, dict) else enumerate(value)
        pending.extend(((*where, key), item) for key, item in items)
    return None
