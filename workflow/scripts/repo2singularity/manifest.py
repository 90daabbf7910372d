"""Manifests: many images in one TSV or YAML file, one row per image, checked row by row with
line numbers, every problem reported at once before anything runs."""

import csv
import io
import shlex
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import yaml

from .input_limits import capped, schema_message

MAX_ROWS = 10_000
MAX_BYTES = 16 << 20
LIST_COLUMNS = ("repo2docker_args", "runtime_options")


class ManifestError(Exception):
    """All problems of a manifest, one line each: `path:line: what is wrong`."""

    def __init__(self, problems):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True)
class Row:
    line: int
    values: dict


def read_text(path):
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise ManifestError([f"{path}: manifest is {size} bytes; at most {MAX_BYTES} are read"])
        data = path.read_bytes()
    except OSError as error:
        raise ManifestError([f"{path}: cannot read manifest: {error.strerror}"]) from None
    if b"\0" in data:
        raise ManifestError([f"{path}: manifest is binary, not text"])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ManifestError([f"{path}: manifest is not UTF-8 text (byte {error.start})"]) from None


def tsv_rows(path, text):
    """Rows of a tab-separated manifest with a header line; `#` starts a comment line."""
    lines = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip() and not line.startswith("#")]
    if not lines:
        raise ManifestError([f"{path}: manifest is empty"])
    header_line, header = lines[0]
    columns = [column.strip() for column in header.split("\t")]
    problems = []
    rows = []
    for number, line in lines[1:]:
        cells = next(csv.reader(io.StringIO(line), delimiter="\t", quoting=csv.QUOTE_NONE))
        if len(cells) > len(columns):
            problems.append(f"{path}:{number}: {len(cells)} fields, but the header (line {header_line}) names {len(columns)}")
            continue
        values = {column: cell.strip() for column, cell in zip(columns, cells, strict=False) if cell.strip() != ""}
        for column in LIST_COLUMNS:
            if column in values:
                try:
                    values[column] = shlex.split(values[column])
                except ValueError as error:
                    problems.append(f"{path}:{number}: {column}: {error}")
        rows.append(Row(number, values))
    return rows, problems


class AliasInManifest(Exception):
    """A YAML anchor or alias, on the line it is found."""

    def __init__(self, line):
        self.line = line


class LineLoader(yaml.SafeLoader):
    """Remembers the line each mapping starts on; refuses anchors and aliases (`&name`, `*name`),
    which load as one object used at each place, so that a few lines could stand for 10**8 values
    to whatever checks or prints them."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise AliasInManifest(event.start_mark.line + 1)
        return super().compose_node(parent, index)

    def construct_yaml_int(self, node):
        try:
            return super().construct_yaml_int(node)
        except ValueError:  # Python reads no integer of more than 4,300 digits
            raise yaml.constructor.ConstructorError(
                None, None, f"a number of {len(node.value)} digits is too long; quote it", node.start_mark
            ) from None

    def construct_mapping(self, node, deep=False):
        mapping = super().construct_mapping(node, deep=deep)
        mapping["__line__"] = node.start_mark.line + 1
        return mapping


LineLoader.add_constructor("tag:yaml.org,2002:int", LineLoader.construct_yaml_int)


def yaml_rows(path, text):
    """Rows of a YAML manifest: a list of mappings, or a mapping with an `images:` list."""
    try:
        document = yaml.load(text, Loader=LineLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ManifestError([capped(f"{path}{where}: not valid YAML: {getattr(error, 'problem', error)}")]) from None
    except AliasInManifest as error:
        raise ManifestError(
            [f"{path}:{error.line}: YAML anchors and aliases (&name, *name) are not allowed in a manifest; write each value out"]
        ) from None
    if isinstance(document, dict) and "images" in document:
        document = document["images"]
    if not isinstance(document, list):
        raise ManifestError([f"{path}: a YAML manifest is a list of images (or has an `images:` list)"])
    rows, problems = [], []
    for item in document:
        if not isinstance(item, dict):
            problems.append(f"{path}: every image is a mapping with name, repo and ref; found {type(item).__name__}")
            continue
        line = item.pop("__line__")
        rows.append(Row(line, {key: value for key, value in item.items() if key != "__line__"}))
    return rows, problems


def load_rows(path, schema):
    """The rows that match the schema (defaults filled in), and the problems of the others."""
    text = read_text(path)
    reader = yaml_rows if str(path).endswith((".yaml", ".yml")) else tsv_rows
    rows, problems = reader(path, text)
    if len(rows) > MAX_ROWS:
        raise ManifestError([f"{path}: {len(rows)} images; at most {MAX_ROWS} in one manifest"])
    validator = jsonschema.Draft202012Validator(schema)
    valid = []
    for row in rows:
        errors = sorted(validator.iter_errors(row.values), key=lambda e: list(e.absolute_path))
        for error in errors:
            where = "/".join(str(p) for p in error.absolute_path)
            problems.append(f"{path}:{row.line}: {where + ': ' if where else ''}{schema_message(error)}")
        if errors:
            continue
        for key, subschema in schema["properties"].items():
            if "default" in subschema:
                row.values.setdefault(key, subschema["default"])
        valid.append(row)
    return valid, problems


def load_schema(path):
    with open(path) as handle:
        return yaml.safe_load(handle)
