"""The docs stay in step with the code: docs/configuration.md lists every key of
common.CONFIG_KEYS with its default and no other key, every relative link between the docs
leads somewhere, and the README still holds the commands that .ci/run runs."""

import re
import tomllib

import pytest
from conftest import ROOT

import common

DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
KEY_ROW = re.compile(r"^\| `(\w+)` \| ([^|]*) \|")
# `## [jobs]` or, for an array of tables, `## [[jobs.suite]]`, whose keys are jobs.suite[].x
TABLE_HEADING = re.compile(r"^## `\[(\[?)([\w.]+)\]?\]`")


def code_keys(spec=common.CONFIG_KEYS, prefix=""):
    """{"dotted.key": default} of every key the code accepts."""
    keys = {}
    for key, rule in spec.items():
        if isinstance(rule, dict):
            keys.update(code_keys(rule, f"{prefix}{key}."))
        elif isinstance(rule, list):  # an array of tables: the array, and each entry's keys
            keys[prefix + key] = []
            keys.update(code_keys(rule[0], f"{prefix}{key}[]."))
        else:
            keys[prefix + key] = rule[1]
    return keys


def documented_keys(text):
    """{"dotted.key": default as written} from the key tables of docs/configuration.md: a
    `## [table]` heading starts that TOML table's keys, any other `## ` heading the top level's."""
    keys, table = {}, ""
    for line in text.splitlines():
        if line.startswith("## "):
            heading = TABLE_HEADING.match(line)
            table = heading[2] + ("[]." if heading[1] else ".") if heading else ""
        elif row := KEY_ROW.match(line):
            key = table + row[1]
            assert key not in keys, f"docs/configuration.md documents key '{key}' twice"
            keys[key] = row[2].strip()
    return keys


def parse_default(written):
    if written == "required":
        return common.REQUIRED
    assert written.startswith("`") and written.endswith("`"), f"{written!r} is not `toml`"
    return tomllib.loads(f"v = {written.strip('`')}")["v"]


def test_the_configuration_doc_lists_every_key_of_the_code_and_no_other():
    documented = documented_keys((ROOT / "docs" / "configuration.md").read_text())
    code = code_keys()
    missing = sorted(set(code) - set(documented))
    unknown = sorted(set(documented) - set(code))
    assert not missing, f"keys of common.CONFIG_KEYS missing from docs/configuration.md: {missing}"
    assert not unknown, f"keys in docs/configuration.md that the code does not take: {unknown}"


def test_the_configuration_doc_gives_each_keys_default_as_the_code_has_it():
    documented = documented_keys((ROOT / "docs" / "configuration.md").read_text())
    for key, default in code_keys().items():
        written = parse_default(documented[key])
        # A number documented without a decimal point is fine for a float key.
        types = (type(default), int) if isinstance(default, float) else (type(default),)
        assert written == default and type(written) in types, \
            f"docs/configuration.md gives key '{key}' the default {documented[key]}; " \
            f"the code has {default!r}"


def test_the_key_table_parser_sees_a_missing_key():
    text = "## Top\n| `a` | `1` | x |\n## `[evaluator]`\n| `command` | `[]` | y |\n" \
        "## `[[jobs.suite]]`\n| `repeats` | `1` | z |\n"
    assert documented_keys(text) == {"a": "`1`", "evaluator.command": "`[]`",
                                     "jobs.suite[].repeats": "`1`"}


def links(text):
    """The targets of the markdown links and images in text, code spans left out."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\]\(([^)\s]+)\)", text)


def anchors(text):
    """The anchors GitHub makes of a markdown file's headings."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"^#+ (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: path.name)
def test_each_relative_link_leads_to_a_file_and_heading_that_exist(doc):
    for target in links(doc.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:: not ours to check offline
        path, _, anchor = target.partition("#")
        linked = (doc.parent / path).resolve() if path else doc
        assert linked.exists(), f"{doc.name} links to {target}, which does not exist"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked.read_text()), \
                f"{doc.name} links to {target}: {linked.name} has no heading '{anchor}'"


def test_the_readme_holds_the_install_step_and_test_command_that_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    commands = [line for line in ci if line.startswith(("python3 -m venv", ".venv/bin/python"))]
    assert len(commands) == 2
    for command in commands:
        assert command in readme, f"README.md lacks the command .ci/run runs: {command}"
