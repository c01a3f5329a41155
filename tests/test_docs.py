"""The documents keep their promises: README.md and docs/ against the code they describe.

Fast and offline: nothing here starts a daemon. Each check first asserts that it found something to
check, so an emptied table or a renamed heading fails instead of passing vacuously.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import typing
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from dlwatchd import settings as settings_module
from dlwatchd.cli import build_parser
from dlwatchd.errors import DlwatchdError
from dlwatchd.protocol.requests import REQUEST_MODELS, InferRequest, TrainRequest
from dlwatchd.protocol.schema import schema_for
from dlwatchd.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
SCHEMAS = DOCS / "schemas"


def documents() -> list[Path]:
    """README.md and every Markdown file under docs/."""
    return [README, *sorted(DOCS.rglob("*.md"))]


def split_fences(text: str) -> tuple[list[str], list[str]]:
    """(lines outside ``` fences, lines inside them); the fence lines themselves belong to neither."""
    prose: list[str] = []
    code: list[str] = []
    inside = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            inside = not inside
            continue
        (code if inside else prose).append(line)
    return prose, code


def table_rows(lines: list[str]) -> list[list[str]]:
    """The cells of every Markdown table row (header and separator rows included)."""
    rows = []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("|") and stripped.endswith("|"):
            cells = re.split(r"(?<!\\)\|", stripped[1:-1])
            rows.append([cell.strip() for cell in cells])
    return rows


def section(text: str, heading: str) -> list[str]:
    """The prose lines of the `## heading` section of a Markdown text (up to the next `## `)."""
    prose, _ = split_fences(text)
    start = prose.index(f"## {heading}")
    end = next((i for i in range(start + 1, len(prose)) if prose[i].startswith("## ")), len(prose))
    return prose[start + 1 : end]


def code_name(cell: str) -> str | None:
    match = re.fullmatch(r"`([^`]+)`", cell)
    return match.group(1) if match else None


# ---- (a) the configuration table of README.md lists every setting ---------------------------------


def configuration_table() -> dict[str, list[str]]:
    """Setting name -> its row's cells, from the table in README.md's Configuration section."""
    rows = {}
    for cells in table_rows(section(README.read_text(encoding="utf-8"), "Configuration")):
        name = code_name(cells[0])
        if name is not None:
            rows[name] = cells
    return rows


def expected_settings(model: type[BaseModel] = Settings, prefix: str = "") -> set[str]:
    """Every Settings field, nested models spelled `outer.inner` (retention.done_days, slurm.train.gres)."""
    names = set()
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names |= expected_settings(annotation, f"{prefix}{name}.")
        else:
            names.add(f"{prefix}{name}")
    return names


def run_parser() -> Any:
    parser = build_parser()
    commands: Any = next(a for a in parser._actions if a.dest == "command")
    return commands.choices["run"]


def test_configuration_table_lists_every_setting_and_no_other() -> None:
    documented = set(configuration_table())
    expected = expected_settings()
    assert any("." in name for name in expected), "the nested retention settings were not found"
    assert len(documented) >= 10, "README.md's configuration table was not found"
    assert sorted(expected - documented) == [], "settings missing from README.md's configuration table"
    assert sorted(documented - expected) == [], "README.md's configuration table lists settings that do not exist"


def test_configuration_table_names_each_environment_variable_in_its_row() -> None:
    rows = configuration_table()
    mapping = settings_module._ENV_FIELDS
    assert mapping, "no environment variables found in dlwatchd/settings.py"
    for suffix, field in mapping.items():
        variable = settings_module.ENV_PREFIX + suffix
        assert f"`{variable}`" in rows[field][2], f"{variable} is not in the row of `{field}`"


def test_every_environment_variable_of_the_settings_is_in_the_readme() -> None:
    source = Path(settings_module.__file__).read_text(encoding="utf-8")
    suffixes = set(settings_module._ENV_FIELDS) | set(re.findall(r'ENV_PREFIX \+ "([A-Z_]+)"', source))
    variables = {settings_module.ENV_PREFIX + suffix for suffix in suffixes}
    variables |= set(re.findall(r"DLWATCHD_[A-Z_]+", source)) - {"DLWATCHD_"}
    assert "DLWATCHD_CONFIG" in variables and len(variables) > len(settings_module._ENV_FIELDS)
    readme = README.read_text(encoding="utf-8")
    assert sorted(v for v in variables if v not in readme) == []


def test_configuration_table_shows_the_flags_of_dlwatchd_run() -> None:
    rows = configuration_table()
    checked = 0
    for action in run_parser()._actions:
        if action.dest not in rows:
            continue
        flag_cell = rows[action.dest][1]
        long_flag = next(option for option in action.option_strings if option.startswith("--"))
        assert long_flag in flag_cell, f"{long_flag} is missing from the row of `{action.dest}`"
        for choice in action.choices or ():
            assert re.search(rf"(?<![\w-]){re.escape(str(choice))}(?![\w-])", flag_cell), (
                f"choice {choice!r} of {long_flag} is missing from the row of `{action.dest}`"
            )
        checked += 1
    assert checked >= 5, "too few `dlwatchd run` options matched settings"
    options = {option for action in run_parser()._actions for option in action.option_strings}
    for name, cells in rows.items():
        for flag in re.findall(r"--[a-z][a-z-]*", cells[1]):
            assert flag in options, f"the row of `{name}` shows {flag}, which `dlwatchd run` does not have"


# ---- (b) every dlwatchd command line shown in a code block parses ----------------------------------

_SHELL_STOPS = {"|", "||", "&&", ";", "&", ">", ">>", "<", "2>", "2>&1"}
_EXECUTABLE = re.compile(r"(?:[\w.~/-]*/)?dlwatchd")


def shown_commands() -> list[tuple[str, str]]:
    """(document, line) for every fenced line that runs dlwatchd (after `sudo` or VAR=value words)."""
    found = []
    for path in documents():
        _, code = split_fences(path.read_text(encoding="utf-8"))
        for line in code:
            try:
                words = shlex.split(line, comments=True)
            except ValueError:
                continue  # not shell (JSON, Java, a unit file line with an odd quote)
            while words and (words[0] == "sudo" or re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0])):
                words = words[1:]
            if words and _EXECUTABLE.fullmatch(words[0]):
                found.append((str(path.relative_to(ROOT)), line.strip()))
    return found


def command_words(line: str) -> list[str]:
    """The arguments after the executable, up to the first shell operator."""
    words = shlex.split(line, comments=True)
    while words[0] == "sudo" or re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        words = words[1:]
    arguments = []
    for word in words[1:]:
        if word in _SHELL_STOPS or word.startswith((">", "2>")):
            break
        arguments.append(word)
    return arguments


def test_documents_show_dlwatchd_commands() -> None:
    commands = shown_commands()
    places = {place for place, _ in commands}
    assert len(commands) >= 10
    assert {"README.md", "docs/operations.md", "docs/protocol.md"} <= places


@pytest.mark.parametrize(("place", "line"), shown_commands())
def test_every_shown_command_parses(place: str, line: str) -> None:
    arguments = command_words(line)
    assert not any(re.search(r"<[^>]*>", word) for word in arguments), f"{place}: placeholder in `{line}`"
    parser = build_parser()
    asks_for_help = any(word in ("-h", "--help", "--version") for word in arguments)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            args = parser.parse_args(arguments)
    except SystemExit as exit_:
        assert asks_for_help and exit_.code == 0, f"{place}: `{line}` does not parse: {err.getvalue().strip()}"
        return
    assert args.command is not None, f"{place}: `{line}` names no command"


# ---- (c) docs/schemas/ holds exactly what the code generates ---------------------------------------


def schema_names() -> list[str]:
    """The names `dlwatchd schema NAME` accepts, as the code lists them in its error message."""
    with pytest.raises(DlwatchdError) as error:
        schema_for("no-such-schema")
    listed = error.value.message.split("valid names are: ", 1)[1].rstrip(".").split(", ")
    assert set(listed) == {*REQUEST_MODELS, "status", "heartbeat"}
    return listed


def schema_text(name: str | None) -> str:
    return json.dumps(schema_for(name), indent=2) + "\n"


def test_one_schema_file_per_name() -> None:
    names = schema_names()
    assert len(names) >= 10
    present = sorted(path.name for path in SCHEMAS.glob("*.json"))
    assert present == sorted([*(f"{name}.json" for name in names), "requests.json"])


@pytest.mark.parametrize("name", [*sorted({*REQUEST_MODELS, "status", "heartbeat"}), None])
def test_schema_file_equals_the_generated_schema(name: str | None) -> None:
    path = SCHEMAS / f"{name or 'requests'}.json"
    assert path.exists(), f"{path.relative_to(ROOT)} is missing; run `make schemas`"
    assert path.read_text(encoding="utf-8") == schema_text(name), (
        f"{path.relative_to(ROOT)} is out of date; run `make schemas`"
    )


# ---- (d) relative links point to files (and headings) that exist -----------------------------------

_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a Markdown file (duplicates get -1, -2, ...)."""
    prose, _ = split_fences(path.read_text(encoding="utf-8"))
    anchors: set[str] = set()
    counts: dict[str, int] = {}
    for line in prose:
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).lower()).replace(" ", "-")
        count = counts.get(slug, 0)
        counts[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def relative_links() -> list[tuple[Path, str]]:
    links = []
    for path in documents():
        prose, _ = split_fences(path.read_text(encoding="utf-8"))
        for line in prose:
            for target in _LINK.findall(re.sub(r"`[^`]*`", "", line)):
                if not re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
                    links.append((path, target))
    return links


def test_relative_links_resolve() -> None:
    links = relative_links()
    assert len(links) >= 10
    assert any(path == README for path, _ in links)
    broken = []
    for path, target in links:
        file_part, _, anchor = target.partition("#")
        destination = (path.parent / file_part).resolve() if file_part else path
        if not destination.exists():
            broken.append(f"{path.relative_to(ROOT)}: {target} (no such file)")
        elif anchor and destination.suffix == ".md" and anchor not in heading_anchors(destination):
            broken.append(f"{path.relative_to(ROOT)}: {target} (no such heading)")
    assert broken == []


# ---- docs/engine.md: the option tables show the code's defaults ------------------------------------


def _model_of(annotation: Any) -> type[BaseModel] | None:
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def option_field(key: str) -> Any:
    """The pydantic field of a documented key: `options.*` of an inference request, else of a training."""
    model: type[BaseModel] | None = InferRequest if key.startswith("options.") else TrainRequest
    field = None
    for part in key.split("."):
        assert model is not None and part in model.model_fields, f"`{key}` is not a request field"
        field = model.model_fields[part]
        model = _model_of(field.annotation)
    return field


def option_rows() -> list[tuple[str, str]]:
    """(key, default cell) of every `| key | default | notes |` table in docs/engine.md."""
    prose, _ = split_fences((DOCS / "engine.md").read_text(encoding="utf-8"))
    rows, in_table = [], False
    for line in prose:
        cells = table_rows([line])
        if not cells:
            in_table = False
        elif cells[0][:2] == ["key", "default"]:
            in_table = True
        elif in_table and len(cells[0]) >= 2 and code_name(cells[0][0]):
            rows.append((code_name(cells[0][0]) or "", cells[0][1]))
    return rows


@pytest.mark.skipif(not (DOCS / "engine.md").exists(), reason="docs/engine.md is not there")
def test_engine_option_tables_show_the_code_defaults() -> None:
    rows = option_rows()
    assert len(rows) >= 20, "the option tables of docs/engine.md were not found"
    wrong = []
    for key, cell in rows:
        field = option_field(key)
        if cell == "required":
            if not field.is_required():
                wrong.append(f"`{key}` is documented as required but has a default")
            continue
        if field.is_required():
            wrong.append(f"`{key}` is documented with default {cell} but is required")
            continue
        documented = json.loads(cell.strip("`"))
        default = field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            same = type(default).model_validate(documented) == default
        else:
            same = documented == (default.value if hasattr(default, "value") else default)
        if not same:
            wrong.append(f"`{key}`: documented {cell}, the code's default is {default!r}")
    assert wrong == []


# ---- docs/operations.md: the network filesystems that `watch = auto` polls ------------------------


def test_operations_lists_every_network_filesystem_type() -> None:
    filesystems = pytest.importorskip("dlwatchd.watch.filesystems")
    types = sorted(filesystems.NETWORK_TYPES)
    assert {"nfs", "nfs4", "cifs"} <= set(types)
    text = (DOCS / "operations.md").read_text(encoding="utf-8")
    assert [name for name in types if f"`{name}`" not in text] == []
