"""Prompts from word loom files: OgbujiPT's TOML convention for prompt text, as mlx-tuning-fork uses it.

A loom is a TOML file of named tables, each holding one piece of language:

    lang = "en"                       # the file's default language

    [system_prompt]
    _ = "You are a claims adjuster."  # the text ("text" is the older spelling, still read)

    [question]
    _ = "Which coverage code fits this claim?\\n{claim}"
    _m = ["claim"]                    # the markers the text expects (declared; all are checked anyway)
    _fr = "..."                       # the same text in another language

A prompt is built from up to three sections, as mlx-tuning-fork's `--build-prompt` names them: one name is
the question (with the tables `system_prompt` and `context`, where present), two are system and
question, three are system, context and question. A name written `[file.txt]` takes that file's contents
(relative to the loom file). `{name}` markers are filled from the values given (the command line, a
file, a data row), then from the loom's own tables of that name; `{{` and `}}` are literal braces. A
marker nothing fills is an error that names it, and where it is.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from ftkit.common.errors import FtkitError
from ftkit.common.suggest import closest

DEFAULT_SECTIONS = ("system_prompt", "context", "question")


_MARKER = re.compile(r"\{\{|\}\}|\{([A-Za-z_][\w.\-]*)\}")


class MissingMarkers(FtkitError):
    def __init__(self, names: list[str], where: str):
        self.names = names
        super().__init__(
            f"{where}: no value for the marker{'s' if len(names) > 1 else ''} {', '.join('{' + n + '}' for n in names)}. "
            "Give each with --marker NAME=VALUE (or --markers FILE), or as a column of the data."
        )


def markers(text: str) -> list[str]:
    """The `{name}` markers in a text, in order, once each."""
    return list(dict.fromkeys(m.group(1) for m in _MARKER.finditer(text) if m.group(1)))


def fill(text: str, lookup: Callable[[str], Any] | Mapping[str, Any], where: str) -> str:
    """Replace `{name}` markers; `lookup(name)` raises KeyError for an unknown one. All missing markers
    are reported together."""
    get = lookup.__getitem__ if isinstance(lookup, Mapping) else lookup
    missing: list[str] = []

    def one(m: re.Match) -> str:
        if m.group(1) is None:
            return m.group(0)[0]  # {{ -> {, }} -> }
        try:
            value = get(m.group(1))
        except KeyError:
            missing.append(m.group(1))
            return m.group(0)
        return value if isinstance(value, str) else json.dumps(value) if isinstance(value, (dict, list)) else str(value)

    out = _MARKER.sub(one, text)
    if missing:
        raise MissingMarkers(list(dict.fromkeys(missing)), where)
    return out


@dataclass
class Loom:
    path: Path | None
    lang: str
    items: dict[str, str]  # table name -> text in `lang`
    declared: dict[str, list[str]]  # table name -> its `_m` markers

    def where(self, name: str) -> str:
        return f"{self.path or 'loom'} [{name}]"

    def text(self, name: str, values: Mapping[str, Any], _seen: tuple[str, ...] = ()) -> str:
        """A table's text with its markers filled: values first, then the loom's own tables."""
        if name not in self.items:
            raise KeyError(name)
        if name in _seen:
            raise FtkitError(f"{self.where(name)}: the markers refer back to [{name}] ({' -> '.join(_seen + (name,))}).")

        def lookup(marker: str) -> Any:
            if marker in values:
                return values[marker]
            if marker in self.items:
                return self.text(marker, values, _seen + (name,))
            raise KeyError(marker)

        return fill(self.items[name], lookup, self.where(name))


def load(path: str | Path, lang: str | None = None) -> Loom:
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FtkitError(f"{path}: no such loom file.") from None
    except tomllib.TOMLDecodeError as e:
        raise FtkitError(f"{path}: not valid TOML: {e}") from None
    return parse(raw, path, lang)


def parse(raw: dict[str, Any], path: Path | None = None, lang: str | None = None) -> Loom:
    default = raw.get("lang") if isinstance(raw.get("lang"), str) else "en"
    want = lang or default
    items, declared = {}, {}
    for key, table in raw.items():
        if not isinstance(table, dict):
            continue
        text = table.get("_", table.get("text"))
        if not isinstance(text, str):
            continue  # a table without text (metadata only) is not a prompt piece
        if table.get("lang", default) != want:
            text = table.get(f"_{want}")  # the same item in the language asked for
            if not isinstance(text, str):
                continue
        items[key] = text
        m = table.get("_m", table.get("markers", []))
        declared[key] = list(m) if isinstance(m, list) else []
    if not items:
        raise FtkitError(f"{path or 'loom'}: no prompt text in language {want!r} (tables with _ = \"...\").")
    return Loom(path, want, items, declared)


@dataclass
class Prompt:
    system: str
    context: str
    question: str

    def messages(self) -> list[dict[str, str]]:
        """As chat turns: the context joins the system prompt (mlx-tuning-fork's layout), the question is the user turn."""
        system = "\n\n".join(p for p in (self.system.strip(), self.context.strip()) if p)
        return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": self.question}]

    def text(self) -> str:
        return "\n\n".join(p for p in (self.system.strip(), self.context.strip(), self.question) if p.strip())


def section_names(build: str | list[str] | None) -> tuple[tuple[str, str, str], set[str]]:
    """(system, context, question) section names from 1-3 names, and which of them were named explicitly."""
    names = build.split() if isinstance(build, str) else list(build or [])
    if not names:
        return DEFAULT_SECTIONS, {"question"}
    if len(names) > 3:
        raise FtkitError(f"loom sections {names}: give 1 (question), 2 (system question) or 3 (system context question) names.")
    if len(names) == 1:
        return (DEFAULT_SECTIONS[0], DEFAULT_SECTIONS[1], names[0]), {"question"}
    if len(names) == 2:
        return (names[0], DEFAULT_SECTIONS[1], names[1]), {"system", "question"}
    return (names[0], names[1], names[2]), {"system", "context", "question"}


def build(loom: Loom, sections: str | list[str] | None, values: Mapping[str, Any]) -> Prompt:
    (sys_name, ctx_name, q_name), required = section_names(sections)
    parts = {}
    for role, name in (("system", sys_name), ("context", ctx_name), ("question", q_name)):
        if name.startswith("[") and name.endswith("]"):
            parts[role] = _file_section(loom, name[1:-1], values)
        elif name in loom.items:
            parts[role] = loom.text(name, values)
        elif role in required:
            close = closest(name, loom.items)
            hint = f" Did you mean [{close}]?" if close else ""
            raise FtkitError(f"{loom.path or 'loom'}: no section [{name}] (for the {role}).{hint} It has: {', '.join(loom.items)}.")
        else:
            parts[role] = ""
    return Prompt(**parts)


def _file_section(loom: Loom, name: str, values: Mapping[str, Any]) -> str:
    base = loom.path.parent if loom.path else Path.cwd()
    for candidate in (base / name, Path(name)):
        if candidate.is_file():
            return fill(candidate.read_text(encoding="utf-8"), values, str(candidate))
    raise FtkitError(f"{loom.path or 'loom'}: section [{name}] names a file, and there is no {base / name}.")


def parse_marker_args(items: list[str] | None, files: list[Path] | None = None) -> dict[str, str]:
    """`--markers FILE` (TOML or JSON, a table of name = value) then `--marker NAME=VALUE` (which wins).

    VALUE may be written `[value]`, as mlx-tuning-fork's --loom-markers takes it, or `@path` for a file's contents.
    """
    values: dict[str, str] = {}
    for f in files or []:
        f = Path(f)
        if not f.is_file():
            raise FtkitError(f"--markers {f}: no such file.")
        text = f.read_text(encoding="utf-8")
        try:
            data = json.loads(text) if f.suffix.lower() == ".json" else tomllib.loads(text)
        except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
            raise FtkitError(f"--markers {f}: not valid {'JSON' if f.suffix.lower() == '.json' else 'TOML'}: {e}") from None
        if not isinstance(data, dict):
            raise FtkitError(f"--markers {f}: expected a table of name = value.")
        values.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in data.items()})
    for item in items or []:
        name, eq, value = item.partition("=")
        if not eq or not name.strip():
            raise FtkitError(f"--marker {item!r}: expected NAME=VALUE, e.g. --marker topic=insurance.")
        value = value.strip()
        if value.startswith("@"):
            p = Path(value[1:])
            if not p.is_file():
                raise FtkitError(f"--marker {item!r}: no such file {p}.")
            value = p.read_text(encoding="utf-8")
        elif len(value) >= 2 and value[0] == "[" and value[-1] == "]":
            value = value[1:-1]
        values[name.strip()] = value
    return values
