"""Declarative conversion of a data set's columns into ftkit's formats, and mixing several data sets.

The recipe says how a row becomes a training example, so no data set needs a script of its own:

    [data]
    path = "PolyAI/banking77"
    label_field = "label"                                # an id into the hub's ClassLabel names, or a name
    prompt_template = "Query: {text}\\nIntent:"          # {column} markers, dotted paths for nested fields
    completion_template = " {label}"                     # {label} is the label's name

Multiple choice: `choices_field` / `answer_field` give `{choices}` (written with `choice_format`),
`{answer}` (the right choice's label) and `{answer_text}`. `columns` names columns for the templates,
with fallbacks (`{sentence = ["sentence", "content"]}` reads either). A word loom (`loom`) can build the
prompt instead of `prompt_template`. With `data.format = "chat"` the prompt becomes a user turn and the
completion the assistant's answer, written in `data.chat_format`.

Every mapped row keeps what task evaluation needs: `_task` (its [[data.mix]] source), `_gold` (the
label name, or the right choice's index) and `_raw` (the row as read), so `ftkit eval` scores exactly
the examples training saw, with each candidate answer put where the completion was.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftkit.common.errors import DataError, FtkitError
from ftkit.common.suggest import did_you_mean
from ftkit.data import loom as loom_files

if TYPE_CHECKING:
    from ftkit.recipe.schema import DataSection

from ftkit.common.console import console
from ftkit.common.hub import looks_like_hub_id
from ftkit.data.rows import SPLITS, Part, detect_format, holdout_order, read_source
from ftkit.recipe.tasks import source_section

if TYPE_CHECKING:
    from ftkit.recipe.schema import DataSection


_MISSING = object()


MAPPING_KEYS = ("columns", "prompt_template", "completion_template", "text_template", "label_field", "label_names",
                "choices_field", "answer_field", "loom", "max_rows")


LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def is_active(data: "DataSection") -> bool:
    return any(getattr(data, k) for k in MAPPING_KEYS)


def _path(row: dict, dotted: str) -> Any:
    if dotted in row:
        return row[dotted]
    value: Any = row
    for part in dotted.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
    return value


def _unlabelled(value: Any) -> bool:
    return value is None or value is _MISSING or (isinstance(value, str) and not value.strip()) or (
        isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0)  # datasets' -1: no label


def read_label_names(spec: "DataSection") -> list[str] | None:
    names = spec.label_names
    if names is None or isinstance(names, list):
        return names
    p = Path(names)
    if not p.is_file():
        raise DataError(f"data.label_names: {p} does not exist (a JSON list of names, or one name per line).")
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() == ".json":
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}: not valid JSON ({e.msg}, line {e.lineno}).") from None
        if not isinstance(loaded, list) or not all(isinstance(x, str) for x in loaded):
            raise DataError(f"{p}: expected a JSON list of label names.")
        return loaded
    return [line.strip() for line in text.splitlines() if line.strip()]


def hub_label_names(path: str, subset: str | None, column: str) -> list[str] | None:
    """A hub data set's ClassLabel names for a column (datasets keeps them in the features, not the rows)."""
    try:
        from datasets import load_dataset_builder  # lazy: optional extra
    except ImportError:
        return None
    try:
        feature = load_dataset_builder(path, subset).info.features.get(column)
    except Exception:  # no builder, offline, a script data set...: the caller asks for label_names instead
        return None
    names = getattr(feature, "names", None)
    return list(names) if names else None


def normalise_choices(raw: Any, where: str) -> list[tuple[str, str]]:
    """(label, text) per choice from the shapes data sets use."""
    if isinstance(raw, dict) and isinstance(raw.get("text"), list):
        labels = raw.get("label") or list(LETTERS[: len(raw["text"])])
        return [(str(a), str(b)) for a, b in zip(labels, raw["text"])]
    if isinstance(raw, list) and raw and all(isinstance(c, dict) and "text" in c for c in raw):
        return [(str(c.get("label", LETTERS[i])), str(c["text"])) for i, c in enumerate(raw)]
    if isinstance(raw, list) and raw and all(isinstance(c, str) for c in raw):
        return [(LETTERS[i], c) for i, c in enumerate(raw)]
    raise DataError(f"{where}: the choices must be {{label: [...], text: [...]}}, a list of {{label, text}}, or a list of strings; got {str(raw)[:80]!r}.")


def answer_index(raw: Any, choices: list[tuple[str, str]], where: str) -> int | None:
    if _unlabelled(raw):
        return None
    labels = [c[0] for c in choices]
    if isinstance(raw, str):
        s = raw.strip()
        if s in labels:
            return labels.index(s)
        texts = [c[1] for c in choices]
        if s in texts:
            return texts.index(s)
        if s.isdigit() and int(s) < len(choices):
            return int(s)
    elif isinstance(raw, int) and 0 <= raw < len(choices):
        return raw
    raise DataError(f"{where}: the answer {raw!r} is not one of the choices' labels {labels}, an index, or a choice's text.")


@dataclass
class Mapper:
    """Maps the raw rows of one source; built once per source and split."""

    spec: "DataSection"
    task: str | None
    pairs: bool = False  # a mix source: text rows split at response_template into prompt and completion
    out: Any = None  # the section whose field names the mapped rows use ([data]'s, for every source of a mix)
    _names: list[str] | None = None
    _names_read: bool = False
    _loom: Any = None
    dropped: int = 0

    def __post_init__(self):
        if self.spec.loom:
            self._loom = loom_files.load(self.spec.loom)

    @property
    def chat(self) -> bool:
        return self.spec.format == "chat"

    def label_names(self, raw_example: Any = None) -> list[str] | None:
        if not self._names_read:
            self._names = read_label_names(self.spec)
            if self._names is None and self.spec.label_field and isinstance(raw_example, int):

                if looks_like_hub_id(self.spec.path) and not Path(self.spec.path).exists():
                    self._names = hub_label_names(self.spec.path, self.spec.subset, self._column(self.spec.label_field))
            self._names_read = True
        return self._names

    def _column(self, name: str) -> str:
        alts = self.spec.columns.get(name, name)
        return alts if isinstance(alts, str) else alts[0]

    def value(self, row: dict, name: str) -> Any:
        alts = self.spec.columns.get(name, [name])
        for alt in [alts] if isinstance(alts, str) else alts:
            v = _path(row, alt)
            if v is not _MISSING:
                return v
        return _MISSING

    def label(self, row: dict, where: str) -> str | None:
        raw = self.value(row, self.spec.label_field)
        if _unlabelled(raw):
            return None
        if isinstance(raw, bool):
            raw = int(raw)
        names = self.label_names(raw)
        if isinstance(raw, str) and (names is None or raw.strip() in names):
            return raw.strip()
        if names is None:
            raise DataError(f"{where}: the label {raw!r} ({self.spec.label_field}) is a class id; set data.label_names to name the classes.")
        idx = raw if isinstance(raw, int) else int(raw) if isinstance(raw, str) and raw.strip().isdigit() else None
        if idx is None or not 0 <= idx < len(names):
            raise DataError(f"{where}: the label {raw!r} is not one of the {len(names)} label_names, nor an id "
                            f"0..{len(names) - 1}.{did_you_mean(raw, names)}")
        return names[idx]

    def extras(self, row: dict, where: str) -> dict[str, Any] | None:
        """The derived template values ({label}, {choices}, {answer}, ...); None when the row has no gold answer."""
        out: dict[str, Any] = {}
        if self.task is not None:
            out["task"] = self.task
        if self.spec.label_field:
            name = self.label(row, where)
            if name is None:
                return None
            names = self.label_names()
            out.update(label=name, label_names=", ".join(names) if names else name,
                       label_id=names.index(name) if names and name in names else name)
        if self.spec.choices_field:
            raw = self.value(row, self.spec.choices_field)
            if raw is _MISSING:
                raise DataError(f"{where}: no column {self.spec.choices_field!r} (data.choices_field); the row has {list(row)}.")
            choices = normalise_choices(raw, where)
            out["choices"] = "\n".join(self.spec.choice_format.format(label=a, text=b) for a, b in choices)
            out["_choices"] = choices
            if self.spec.answer_field:
                idx = answer_index(self.value(row, self.spec.answer_field), choices, where)
                if idx is None:
                    return None
                out.update(answer=choices[idx][0], answer_text=choices[idx][1], answer_index=idx, _answer=idx)
        return out

    def lookup(self, row: dict, extras: dict[str, Any]) -> Callable[[str], Any]:
        def get(name: str) -> Any:
            if name in extras and not name.startswith("_"):
                return extras[name]
            v = self.value(row, name)
            if v is _MISSING:
                raise KeyError(name)
            return v

        return get

    def completion(self, row: dict, extras: dict[str, Any], where: str) -> str | None:
        if self.spec.completion_template is not None:
            return loom_files.fill(self.spec.completion_template, self.lookup(row, extras), f"{where}: data.completion_template")
        if "answer" in extras:
            return extras["answer"]
        if "label" in extras:
            return extras["label"]
        return None

    def prompt(self, row: dict, extras: dict[str, Any], where: str) -> tuple[str | None, str | None]:
        """(system, prompt) from the loom or prompt_template; (None, None) when neither builds it."""
        get = self.lookup(row, extras)
        if self._loom is not None:
            values = _Values(get)
            built = loom_files.build(self._loom, self.spec.loom_sections, values)
            if self.chat:
                system = "\n\n".join(p for p in (built.system.strip(), built.context.strip()) if p)
                return system or None, built.question
            return None, built.text()
        if self.spec.prompt_template is not None:
            return None, loom_files.fill(self.spec.prompt_template, get, f"{where}: data.prompt_template")
        return None, None

    def map(self, row: dict, where: str) -> dict | None:
        """The row in ftkit's formats, with `_task`, `_gold` and `_raw`; None when it has no gold answer."""
        s = self.spec
        extras = self.extras(row, where)
        if extras is None:
            self.dropped += 1
            return None
        out = dict(row)
        for name in s.columns:
            v = self.value(row, name)
            if v is not _MISSING:
                out[name] = v
        system, prompt = self.prompt(row, extras, where)
        completion = self.completion(row, extras, where)
        if s.text_template is not None:
            out[s.text_field] = loom_files.fill(s.text_template, self.lookup(row, extras), f"{where}: data.text_template")
        if prompt is None and self.pairs and s.response_template and isinstance(out.get(s.text_field), str):
            text = out[s.text_field]
            at = text.find(s.response_template)
            if at < 0:
                raise DataError(f"{where}: response_template {s.response_template!r} is not in the text.")
            prompt, completion = text[: at + len(s.response_template)], completion or text[at + len(s.response_template):]
        if prompt is None and (s.label_field or s.choices_field or s.completion_template) and isinstance(out.get(s.prompt_field), str):
            prompt = out[s.prompt_field]
        if prompt is not None:
            if completion is None:
                completion = out.get(s.completion_field)
            o = self.out or s
            if self.chat:
                system = system if system is not None else s.system_prompt
                out[o.messages_field] = ([{"role": "system", "content": system}] if system else []) + [
                    {"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            else:
                out[o.prompt_field], out[o.completion_field] = prompt, completion
        out["_task"] = self.task
        out["_raw"] = row
        out["_gold"] = extras.get("_answer", extras.get("label"))
        return out

    def candidates(self, mapped: dict, where: str, names: list[str] | None = None) -> tuple[list[str], list[str]]:
        """The completions to score for a row (one per label or choice), and the label / choice names.

        `names`: the label set when data.label_names gives none (ftkit eval collects it from the data)."""
        raw = mapped["_raw"]
        extras = self.extras(raw, where) or {}
        if "_choices" in extras:
            out = []
            for i, (label, text) in enumerate(extras["_choices"]):
                out.append(self.completion(raw, {**extras, "answer": label, "answer_text": text, "answer_index": i}, where))
            return out, [c[0] for c in extras["_choices"]]
        names = self.label_names() or names
        if not names:
            raise FtkitError(f"{where}: classification needs the label set: set data.label_names.")
        return [self.completion(raw, {**extras, "label": n}, where) for n in names], list(names)


class _Values(dict):
    """A row's values as a mapping for the loom (which looks names up with `in` and [])."""

    def __init__(self, get: Callable[[str], Any]):
        super().__init__()
        self._get = get

    def __contains__(self, key: object) -> bool:
        try:
            self._get(str(key))
            return True
        except KeyError:
            return False

    def __getitem__(self, key: str) -> Any:
        return self._get(key)


def apply(parts: dict, data: "DataSection", pairs: bool = False, names_from: Any = None) -> dict:
    """Map every split's rows (nothing to do without mapping keys) and apply data.max_rows.

    `pairs`: a source of a mix, whose rows must all become prompt/completion (or chat) examples."""

    if not is_active(data) and not pairs:
        return parts
    out = {}
    for split, part in parts.items():
        mapper = Mapper(data, data.name, pairs=pairs, out=names_from)
        rows, where = [], []
        for row, w in zip(part.rows, part.where):
            try:
                mapped = mapper.map(row, w)
            except loom_files.MissingMarkers as e:
                raise DataError(str(e)) from None
            if mapped is not None:
                rows.append(mapped)
                where.append(w)
        if mapper.dropped:
            console().print(f"[yellow]note:[/] {part.source}: {mapper.dropped} of {len(part.rows)} {split} rows have no label "
                            "(empty, or -1 as datasets writes an unlabelled test split) and are left out.")
        n = data.max_rows.get(split)
        source = part.source
        if n is not None and len(rows) > n:
            keep = sorted(holdout_order(len(rows), data.split_seed)[:n])
            rows, where = [rows[i] for i in keep], [where[i] for i in keep]
            source = f"{part.source} (a sample of {n}, seed {data.split_seed})"
        out[split] = Part(rows, where, source)
    return out


def read_mix(data: "DataSection") -> dict:
    """data's own rows and every [[data.mix]] source's, each mapped with its own keys, split by split."""

    sources = [data.model_copy(update={"mix": []})] + [source_section(data, m) for m in data.mix]
    merged = {split: Part([], [], "(none)") for split in SPLITS}
    formats = {}
    for spec in sources:
        parts = apply(read_source(spec), spec, pairs=True, names_from=data)
        if parts["train"].rows:
            formats[spec.name or "data"] = detect_format(parts["train"].rows, data, parts["train"].source)
        for split in SPLITS:
            a, b = merged[split], parts[split]
            source = "; ".join(x for x in (a.source, b.source) if x != "(none)") or "(none)"
            merged[split] = Part(a.rows + b.rows, a.where + b.where, source)
    if len(set(formats.values())) > 1:
        listed = ", ".join(f"{k}: {v}" for k, v in formats.items())
        raise DataError(f"data.mix: the sources map to different formats ({listed}); give each a prompt_template "
                        "(or response_template) and a completion_template, so that all are completion (or, with "
                        "data.format = 'chat', chat) data.")
    return merged


def read_rows(data: "DataSection") -> dict[str, list[dict]]:
    """Split name ("train", "valid", "test") -> raw rows; missing splits are carved out of train or empty."""
    return {name: part.rows for name, part in read_parts(data).items()}


def read_parts(data: "DataSection") -> dict[str, Part]:
    """Every split's rows, mapped into ftkit's formats by the recipe's column mapping (ftkit.mapping),
    and with data.mix: every source's, mixed."""

    if data.mix:
        return read_mix(data)
    return apply(read_source(data), data)
