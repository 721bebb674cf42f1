"""Reading recipes: TOML, --set overrides, paths relative to the file, errors that name file, line and key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tomllib
from pydantic import (
    BaseModel,
    ValidationError,
)

from ftkit.common.errors import RecipeError
from ftkit.common.hub import looks_like_hub_id
from ftkit.common.suggest import closest, did_you_mean, missing_path
from ftkit.recipe.checks import _check_combinations
from ftkit.recipe.schema import KEY_ALIASES, EvalTask, MixSource, Recipe

PATH_KEYS = {("model", "path"), ("data", "path"), ("method", "resume_from"), ("output", "dir"), ("log", "tensorboard_dir"),
             ("data", "loom"), ("data", "label_names")}


def _section_fields(section: str) -> list[str]:
    ann = Recipe.model_fields.get(section)
    if ann is None or not isinstance(ann.annotation, type) or not issubclass(ann.annotation, BaseModel):
        return []
    return list(ann.annotation.model_fields)


def _parse_value(raw: str) -> Any:
    """A --set value is read as a TOML value when it parses, else as a bare string; null unsets a key
    ('none' stays a string: several keys have it as a choice)."""
    if raw.lower() == "null":
        return None
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def parse_overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise RecipeError([f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. --set train.iters=20"])
        key, raw = item.split("=", 1)
        section, field = key.strip().split(".", 1)
        *inner, last = field.split(".")  # eval.tasks.wikisql.max_tokens: a key of a nested table
        target = out.setdefault(section, {})
        for part in inner:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise RecipeError([f"--set {item!r}: {key.strip()} sets a key inside {part}, which another --set gives a value."])
        target[last] = _parse_value(raw.strip())
    return out


def resolve_paths(data: dict[str, Any], base: Path) -> None:
    """Paths in a recipe file are relative to that file; --set paths to the working directory."""
    for section, key in PATH_KEYS:
        value = data.get(section, {}).get(key) if isinstance(data.get(section), dict) else None
        if not isinstance(value, str) or value.startswith(("/", "~")):
            continue
        candidate = (base / value).resolve()
        if key == "dir" or candidate.exists() or not looks_like_hub_id(value, base):
            data[section][key] = str(candidate)
    mix = data["data"].get("mix") if isinstance(data.get("data"), dict) else None
    for source in mix if isinstance(mix, list) else []:
        if isinstance(source, dict):  # each [[data.mix]] source's paths, like data's own
            resolve_paths({"data": source}, base)


def _merge(into: dict[str, Any], extra: dict[str, Any]) -> None:
    """--set values over the file's: tables merge key by key (nested ones too), other values replace."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _unknown_keys(data: dict[str, Any], where: str, overridden: set[tuple[str, str]] = frozenset()) -> list[str]:
    errors = []
    sections = list(Recipe.model_fields)
    for section, values in data.items():
        if section not in Recipe.model_fields:
            errors.append(f"{where}: unknown section [{section}].{did_you_mean(section, sections)} Allowed: {', '.join(sections)}.")
            continue
        if not isinstance(values, dict):
            continue
        fields = _section_fields(section)
        for key in values:
            if key not in fields:
                place = f"--set {section}.{key}" if (section, key) in overridden else where
                errors.append(f"{place}: unknown key {section}.{key}.{suggest_key(section, key, fields)}")
    return errors


def suggest_key(section: str, key: str, fields: list[str]) -> str:
    """The did-you-mean for an unknown key: another tool's name for an ftkit key (learning_rate -> lr;
    lora_r in [train] -> method.rank), else the closest key of the section."""
    best = closest(key, fields, KEY_ALIASES)  # an alias answers "section.key"; a field has no dot
    if best is None:
        return ""
    if "." not in best:
        return f" Did you mean '{best}'?"
    alias_section, alias_key = best.split(".", 1)
    shown = alias_key if alias_section == section else best
    return f" Did you mean '{shown}'? ({key} is another tool's name; ftkit's key is {best}.)"


def _line_of(text: str, section: str, key: str) -> int | None:
    current = None
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if s.startswith("[") and s.endswith("]"):
            current = s.strip("[]").strip()
        elif current == section and s.split("=", 1)[0].strip() == key:
            return n
    return None


def _format_validation(err: ValidationError, where: str, text: str | None, overridden: set[tuple[str, str]]) -> list[str]:
    out = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        if e["type"] == "extra_forbidden" and len(loc) <= 2:
            continue  # reported by _unknown_keys with a suggestion
        key = ".".join(loc)
        if e["type"] == "extra_forbidden":  # inside a nested table: [[data.mix]], [eval.tasks.NAME]
            fields = list(MixSource.model_fields) + list(EvalTask.model_fields)
            out.append(f"{where}: unknown key {key}.{did_you_mean(loc[-1], fields)}")
            continue
        if len(loc) >= 2 and (loc[0], loc[1]) in overridden:
            place = f"--set {loc[0]}.{loc[1]}"
        else:
            line = _line_of(text, loc[0], loc[1]) if text and len(loc) >= 2 else None
            place = f"{where}:{line}" if line else where
        msg = e["msg"]
        if e["type"] == "missing":
            msg = "required key is missing"
        ctx = e.get("ctx") or {}
        if "expected" in ctx:
            msg = f"{msg}"
        out.append(f"{place}: {key}: {msg} (got {e.get('input')!r})" if e["type"] != "missing" else f"{place}: {key}: {msg}")
    return out


def _read_toml(path: Path) -> tuple[dict[str, Any], str]:
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.toml"))
        listed = f" It holds {', '.join(found[:8])}{' ...' if len(found) > 8 else ''}." if found else " It holds no .toml file."
        raise RecipeError([f"{path}: is a folder; give a recipe file in it, e.g. {path / (found[0] if found else 'RECIPE.toml')}.{listed}"])
    if not path.exists():
        raise RecipeError([f"{path}: no such recipe file.{missing_path(path)}"])
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise RecipeError([(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x}); a recipe must be saved as UTF-8 "
                            "(TOML's encoding): re-save it as UTF-8 in your editor.")]) from None
    text = text.removeprefix("\ufeff")  # a BOM, as some Windows editors write UTF-8
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as e:
        raise RecipeError([f"{path}: not valid TOML: {e}"]) from None


def _one_length(data: dict[str, Any], overridden: set[tuple[str, str]]) -> None:
    """train.iters and train.epochs say the same thing, so a run takes one: a --set (or a sweep value) of
    one replaces the file's other; both in one place stay, for the check to refuse."""
    train = data.get("train")
    if not isinstance(train, dict):
        return
    for given, other in (("iters", "epochs"), ("epochs", "iters")):
        if ("train", given) in overridden and ("train", other) not in overridden and train.get(given) is not None:
            train.pop(other, None)


def build_recipe(
    data: dict[str, Any], where: str, text: str | None = None, check_paths: bool = True,
    overridden: set[tuple[str, str]] = frozenset(),
) -> Recipe:
    _one_length(data, set(overridden))
    errors = _unknown_keys(data, where, set(overridden))
    recipe = None
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        errors += _format_validation(e, where, text, set(overridden))
    if recipe is not None and check_paths:
        errors += _check_combinations(recipe, where)
    if errors:
        raise RecipeError(errors)
    return recipe


def load_recipes(paths: list[Path], overrides: list[str] | None = None, check_paths: bool = True) -> list[Recipe]:
    """One Recipe per file (stages). --set overrides apply to every stage."""
    extra = parse_overrides(overrides or [])
    if extra:
        resolve_paths(extra, Path.cwd())
    recipes, errors = [], []
    for path in paths:
        path = Path(path)
        try:
            data, text = _read_toml(path)
            resolve_paths(data, path.parent.resolve())
            _merge(data, json.loads(json.dumps(extra)))
            data.setdefault("name", path.stem)
            overridden = {(sec, key) for sec, values in extra.items() for key in values}
            recipe = build_recipe(data, str(path), text, check_paths, overridden)
            if recipe.output.dir is None:
                recipe.output.dir = str(Path.cwd() / "runs" / recipe.name)
            recipes.append(recipe)
        except RecipeError as e:
            errors += e.problems
    if errors:
        raise RecipeError(errors)
    return recipes


def defaults_table() -> list[tuple[str, str, str]]:
    """(key, default, description) for every recipe key: the one place defaults are documented."""
    rows = []
    for section, field in Recipe.model_fields.items():
        model = field.annotation
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            continue
        for key, f in model.model_fields.items():
            default = "(required)" if f.is_required() else repr(f.default)
            rows.append((f"{section}.{key}", default, f.description or ""))
    return rows
