"""The README and docs/ stay true to the code: links resolve, the config keys and Snakemake
targets they name exist, the README stays short and leads to every page. Reads files only."""

import re
import shlex

import pytest
import yaml

from .conftest import PROJECT

README = PROJECT / "README.md"
DOCS = sorted((PROJECT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
SCHEMA = yaml.safe_load((PROJECT / "workflow" / "schemas" / "config.schema.yaml").read_text())
CONFIG_KEYS = set(SCHEMA["properties"])
RULES = {
    match
    for source in [PROJECT / "Snakefile", *sorted((PROJECT / "workflow" / "rules").glob("*.smk"))]
    for match in re.findall(r"^(?:local)?rule (\w+):", source.read_text(), re.MULTILINE)
}
MAX_README_LINES = 200

FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`([^`]+)`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# Snakemake options that take one value, and those that take every value up to the next option
ONE_VALUE = {"--cores", "-c", "--jobs", "-j", "--profile", "--report", "--directory", "-d", "--snakefile", "-s"}
MANY_VALUES = {"--config", "-C", "--configfile", "--configfiles", "--forcerun", "-R", "--resources", "--set-resources"}
SHELL_OPERATORS = re.compile(r"\s(?:&&|\|\||;|\||\d?>>?&?\d?)\s|;\s")


def text_of(page):
    return page.read_text()


def prose(text):
    """The page without fenced code blocks or inline code, where links live."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading):
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page):
    return {slug(line.lstrip("#")) for line in FENCE.sub("", text_of(page)).splitlines() if line.startswith("#")}


def relative_links(page):
    for target in LINK.findall(prose(text_of(page))):
        if not re.match(r"[a-z][a-z0-9+.-]*:", target):
            yield target


def snakemake_commands(page):
    """Every `snakemake ...` command of a page, as its words: in code blocks (line by line, with
    continuation lines joined and comments dropped) and in inline code."""
    text = text_of(page)
    candidates = []
    for block in FENCE.findall(text):
        joined = re.sub(r"\\\n\s*", " ", "\n".join(block.splitlines()[1:-1]))
        candidates += [line.split(" #")[0] for line in joined.splitlines()]
    candidates += [" ".join(code.split()) for code in INLINE_CODE.findall(FENCE.sub("", text))]
    for candidate in candidates:
        if "snakemake" not in candidate:
            continue
        for command in SHELL_OPERATORS.split(f" {candidate} "):
            words = shlex.split(command.strip())
            while words and not re.search(r"(^|/)snakemake$", words[0]):
                words = words[1:]
            if words:
                yield words[1:]


def parse_snakemake(words):
    """(targets, config keys, forced rules) of a snakemake command line."""
    targets, keys, forced = [], [], []
    option = None
    for word in words:
        if word.startswith("-"):
            option = word.split("=")[0]
            if option in ("--config", "-C") and "=" in word[len(option) + 1 :]:
                keys.append(word[len(option) + 1 :].split("=")[0])
            continue
        if option in ONE_VALUE:
            option = None
        elif option in ("--config", "-C"):
            keys.append(word.split("=")[0])
        elif option in ("--forcerun", "-R"):
            forced.append(word)
        elif option in MANY_VALUES:
            pass
        else:
            targets.append(word)
    return targets, keys, forced


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_relative_link_resolves(page):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target} (no {linked.relative_to(PROJECT) if linked.is_relative_to(PROJECT) else linked})")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target} (no heading #{anchor})")
    assert not broken, f"{page.name}: broken links: {broken}"


def test_readme_is_short():
    lines = len(text_of(README).splitlines())
    assert lines < MAX_README_LINES, f"README.md has {lines} lines; move details to a page under docs/"


def test_readme_links_every_docs_page():
    linked = {(README.parent / target.partition("#")[0]).resolve() for target in relative_links(README)}
    unlinked = [page.name for page in DOCS if page.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


def test_readme_states_the_test_command():
    # .ci/run runs "the README's test command"
    assert "bash setup.sh test" in text_of(README)


def test_config_keys_named_in_the_readme_exist():
    """The configuration table's keys, and every backticked snake_case word, is a setting of the
    schema (or a rule: `check_builder`, `unpack_sandbox`, ...)."""
    text = FENCE.sub("", text_of(README))
    table_keys = [
        key
        for row in re.findall(r"^\| (`[^|]+`) \|", text, re.MULTILINE)
        for key in INLINE_CODE.findall(row)
    ]
    assert table_keys, "the README has no configuration table"
    unknown = [key for key in table_keys if key not in CONFIG_KEYS and key not in ("local", "slurm", "remote")]
    words = {word for code in INLINE_CODE.findall(text) for word in re.findall(r"^[a-z][a-z0-9]*(?:_[a-z0-9]+)+$", code)}
    unknown += sorted(word for word in words if word not in CONFIG_KEYS and word not in RULES)
    assert not unknown, f"README.md names settings the schema does not have: {unknown}"


def test_the_parser_reads_snakemake_command_lines():
    assert parse_snakemake(shlex.split("--cores 2 build --config repo=x ref=y")) == (["build"], ["repo", "ref"], [])
    assert parse_snakemake(shlex.split("--profile remote --forcerun save_image -n")) == ([], [], ["save_image"])
    assert parse_snakemake(shlex.split("--report r.html --config manifest=m")) == ([], ["manifest"], [])


FILE_NAME = re.compile(r"[a-z0-9_./-]+\.(?:py|sh|smk|yaml|yml|tsv|md)")
PROJECT_FILES = [
    path.relative_to(PROJECT).as_posix()
    for path in PROJECT.rglob("*")
    if not any(part in (".venv", ".git", "results", ".snakemake") for part in path.relative_to(PROJECT).parts)
]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_files_named_exist(page):
    """A file a page names in code (`bench/sif.py`, `builders/base.py`) is in the project: by
    its path from the top, or as the end of one."""
    codes = INLINE_CODE.findall(FENCE.sub("", text_of(page)))
    # what runs make (results/...) is no file of the project
    named = {code for code in codes if FILE_NAME.fullmatch(code) and not code.startswith("results/")}
    missing = sorted(
        name
        for name in named
        if not (PROJECT / name).exists() and not any(f.endswith("/" + name.lstrip("./")) for f in PROJECT_FILES)
    )
    assert not missing, f"{page.name} names files the project does not have: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_snakemake_commands_name_real_targets_and_settings(page):
    commands = list(snakemake_commands(page))
    problems = []
    for words in commands:
        targets, keys, forced = parse_snakemake(words)
        line = "snakemake " + " ".join(words)
        problems += [f"{line}: no rule {target}" for target in targets if target not in RULES and not target.startswith("results/")]
        problems += [f"{line}: no rule {rule}" for rule in forced if rule not in RULES]
        problems += [f"{line}: no setting {key}" for key in keys if key not in CONFIG_KEYS]
    assert not problems, problems
    if page == README:
        assert commands, "the README shows no snakemake command"


def setup_actions():
    """The first words `setup.sh` takes: the patterns of its first `case "$action"`."""
    text = (PROJECT / "setup.sh").read_text()
    block = text[text.index('case "$action" in') :].split("esac", 1)[0]
    return {word.strip() for pattern in re.findall(r"^\s+([a-z| -]+)\)", block, re.MULTILINE) for word in pattern.split("|")}


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_setup_commands_name_real_actions(page):
    actions = setup_actions()
    assert {"example", "test", "builder", "login"} <= actions, actions
    named = set(re.findall(r"bash setup\.sh ([a-z][a-z-]*)", text_of(page)))
    assert named <= actions, f"{page.name} names setup.sh actions it does not have: {sorted(named - actions)}"
