"""The bad-input corpus: every entry is a mistake a user makes, and each must end in one clear message.

Each case asserts exit code 2, no traceback, the place named (the file, the key, the flag) and, where
there is one, the fix; run cases also assert that the finished run already in the folder is byte for
byte what it was. Most cases go through `recipe check` or `train --dry-run`, in process (typer's
CliRunner), so the whole corpus runs in about a minute. A second table holds what ftkit does but says
out loud (warnings, exit 0).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import tomli_w
from builders import wikisql_slice
from typer.testing import CliRunner

from ftkit.cli import app

runner = CliRunner()


# ---------------------------------------------------------------- the world the cases break


@dataclass
class World:
    root: Path
    model: Path  # the tiny Llama (2 layers, context 512)
    data: Path  # wikisql slice: 24 train / 8 valid / 8 test
    run: Path  # a finished torch run (checkpoints + adapter) the run cases must leave alone
    n: int = 0

    def fresh(self, name: str = "case") -> Path:
        self.n += 1
        d = self.root / f"{name}-{self.n}"
        d.mkdir()
        return d

    def recipe(self, folder: Path | None = None, text: str | None = None, name: str = "r", **sections) -> Path:
        """A recipe file in a fresh folder (or `folder`): the good one with `sections` merged in (a value
        None removes the key), or `text` as it is."""
        folder = folder or self.fresh()
        p = folder / f"{name}.toml"
        if text is not None:
            p.write_text(text, encoding="utf-8")
            return p
        body = {
            "model": {"path": str(self.model)},
            "method": {"rank": 4, "alpha": 8},
            "data": {"path": str(self.data), "max_seq_length": 256},
            "train": {"iters": 2, "batch_size": 4, "lr": 3e-3},
            "output": {"dir": str(folder / "run")},
            "torch": {"precision": "fp32"},
        }
        for section, values in sections.items():
            target = body.setdefault(section, {})
            for k, v in values.items():
                if v is None:
                    target.pop(k, None)
                else:
                    target[k] = v
        p.write_text(tomli_w.dumps(body), encoding="utf-8")
        return p

    def data_dir(self, files: dict[str, str | bytes | list[dict]]) -> Path:
        d = self.fresh("data")
        for name, content in files.items():
            if isinstance(content, list):
                content = "".join(json.dumps(r) + "\n" for r in content)
            (d / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        return d

    def model_copy(self, drop: tuple[str, ...] = ()) -> Path:
        d = self.fresh("model")
        for f in self.model.iterdir():
            if f.name not in drop:
                shutil.copy(f, d / f.name)
        return d

    def adapter_copy(self) -> Path:
        d = self.fresh("adapter")
        shutil.copytree(self.run / "adapter", d, dirs_exist_ok=True)
        return d


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir, wikisql_dir) -> World:
    root = tmp_path_factory.mktemp("bad-inputs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FTKIT_CACHE", str(root / "cache"))
        mp.setenv("COLUMNS", "400")
        data = wikisql_slice(root / "data", train=24, valid=8, test=8)
        w = World(root, tiny_model_dir, data, root / "finished" / "run")
        (root / "finished").mkdir()
        good = w.recipe(root / "finished", train={"iters": 2, "save_every": 1, "steps_per_eval": 2})
        result = runner.invoke(app, ["train", str(good), "--backend", "torch", "--json"])
        assert result.exit_code == 0, result.output
        assert (w.run / "adapter" / "adapter_model.safetensors").is_file() and any((w.run / "checkpoints").iterdir())
        yield w


def run_hashes(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.rglob("*")) if p.is_file()}


def squeeze(text: str) -> str:
    """Without whitespace: the console wraps long lines, also inside a path."""
    return "".join(text.split())


# ---------------------------------------------------------------- the cases


@dataclass
class Case:
    family: str
    name: str
    build: Callable[[World], tuple[list[str], list[str]]]  # -> (argv, what the message must name)
    run: bool = False  # touches the finished run: its files must not change


CASES: list[Case] = []


def case(family: str, run: bool = False):
    def register(fn):
        CASES.append(Case(family, fn.__name__, fn, run))
        return fn
    return register


def check(w: World, p: Path) -> list[str]:
    return ["recipe", "check", str(p)]


def dry(w: World, p: Path) -> list[str]:
    return ["train", str(p), "--dry-run"]


# --- recipes: keys, types, values, files ---------------------------------------------------------


@case("recipes")
def missing_recipe_file(w):
    p = w.fresh() / "nope.toml"
    return ["train", str(p)], [str(p), "no such recipe file"]


@case("recipes")
def recipe_is_a_folder(w):
    d = w.fresh()
    (d / "a.toml").write_text("")
    return ["train", str(d)], [str(d), "folder", "a.toml"]


@case("recipes")
def recipe_in_cp1252(w):
    p = w.recipe()
    text = p.read_text() + '\n[log]\nrun_name = "caf\u00e9"\n'
    p.write_bytes(text.encode("cp1252"))
    line = text.count("\n", 0, text.index("caf")) + 1
    return check(w, p), [f"{p}:{line}", "UTF-8"]


@case("recipes")
def recipe_not_toml(w):
    p = w.recipe(text="[model\npath = 1\n")
    return check(w, p), [str(p), "TOML", "line 1"]


@case("recipes")
def recipe_duplicate_key(w):
    p = w.recipe(text=f'[model]\npath = "{w.model}"\npath = "x"\n[data]\npath = "{w.data}"\n')
    return check(w, p), [str(p), "TOML", "line 3"]


@case("recipes")
def recipe_empty(w):
    p = w.recipe(text="")
    return check(w, p), [str(p), "model", "required"]


@case("recipes")
def unknown_section(w):
    p = w.recipe(trian={"x": 1})
    return check(w, p), [str(p), "[trian]", "Did you mean 'train'"]


@case("recipes")
def unknown_key_typo(w):
    p = w.recipe(method={"rnak": 4})
    return check(w, p), [str(p), "method.rnak", "Did you mean 'rank'"]


@case("recipes")
def alias_learning_rate(w):
    p = w.recipe(train={"learning_rate": 1e-4})
    return check(w, p), [str(p), "train.learning_rate", "'lr'"]


@case("recipes")
def alias_num_epochs(w):
    p = w.recipe(train={"num_epochs": 2, "iters": None})
    return check(w, p), [str(p), "train.num_epochs", "'epochs'"]


@case("recipes")
def alias_num_train_epochs(w):
    p = w.recipe(train={"num_train_epochs": 2, "iters": None})
    return check(w, p), [str(p), "train.num_train_epochs", "'epochs'"]


@case("recipes")
def alias_lora_r(w):
    p = w.recipe(method={"lora_r": 16})
    return check(w, p), [str(p), "method.lora_r", "'rank'"]


@case("recipes")
def alias_r(w):
    p = w.recipe(method={"r": 16})
    return check(w, p), [str(p), "method.r", "'rank'"]


@case("recipes")
def alias_lora_alpha(w):
    p = w.recipe(method={"lora_alpha": 32})
    return check(w, p), [str(p), "method.lora_alpha", "'alpha'"]


@case("recipes")
def alias_lora_dropout(w):
    p = w.recipe(method={"lora_dropout": 0.1})
    return check(w, p), [str(p), "method.lora_dropout", "'dropout'"]


@case("recipes")
def alias_per_device_batch_size(w):
    p = w.recipe(train={"per_device_train_batch_size": 8})
    return check(w, p), [str(p), "train.per_device_train_batch_size", "'batch_size'"]


@case("recipes")
def alias_gradient_accumulation_steps(w):
    p = w.recipe(train={"gradient_accumulation_steps": 4})
    return check(w, p), [str(p), "train.gradient_accumulation_steps", "'grad_accum'"]


@case("recipes")
def alias_max_steps(w):
    p = w.recipe(train={"max_steps": 100, "iters": None})
    return check(w, p), [str(p), "train.max_steps", "'iters'"]


@case("recipes")
def alias_in_another_section(w):
    p = w.recipe(train={"lora_r": 16})
    return check(w, p), [str(p), "train.lora_r", "method.rank"]


@case("recipes")
def alias_max_seq_len_in_train(w):
    p = w.recipe(train={"max_seq_len": 512})
    return check(w, p), [str(p), "train.max_seq_len", "data.max_seq_length"]


@case("recipes")
def alias_through_set(w):
    p = w.recipe()
    return check(w, p) + ["--set", "train.learning_rate=1e-4"], ["train.learning_rate", "'lr'"]


@case("recipes")
def wrong_type(w):
    p = w.recipe(train={"batch_size": "four"})
    return check(w, p), [f"{p}:", "train.batch_size", "integer"]


@case("recipes")
def unknown_choice(w):
    p = w.recipe(method={"kind": "loraa"})
    return check(w, p), [f"{p}:", "method.kind", "'lora'"]


@case("recipes")
def negative_lr(w):
    p = w.recipe(train={"lr": -1e-4})
    return check(w, p), [f"{p}:", "train.lr", "greater than 0"]


@case("recipes")
def rank_zero(w):
    p = w.recipe(method={"rank": 0})
    return check(w, p), [f"{p}:", "method.rank", "greater than or equal to 1"]


@case("recipes")
def iters_and_epochs(w):
    p = w.recipe(train={"iters": 10, "epochs": 2})
    return check(w, p), [str(p), "train.iters", "train.epochs", "keep one"]


@case("recipes")
def iters_and_one_epoch(w):
    p = w.recipe(train={"iters": 10, "epochs": 1})
    return check(w, p), [str(p), "train.iters", "train.epochs", "keep one"]


@case("recipes")
def iters_and_epochs_both_set(w):
    p = w.recipe()
    return check(w, p) + ["--set", "train.iters=3", "--set", "train.epochs=2"], ["train.iters", "train.epochs", "keep one"]


@case("recipes")
def unknown_quantize(w):
    p = w.recipe(model={"quantize": "nf8"})
    return check(w, p), [f"{p}:", "model.quantize", "'nf4'"]


@case("recipes")
def unknown_tracker(w):
    p = w.recipe(log={"report_to": ["wandbb"]})
    return check(w, p), [f"{p}:", "log.report_to", "'wandb'"]


@case("recipes")
def unknown_max_rows_split(w):
    p = w.recipe(data={"max_rows": {"training": 5}})
    return check(w, p), [f"{p}:", "data.max_rows", "'train'"]


@case("recipes")
def mix_source_without_name(w):
    p = w.recipe(data={"mix": [{"path": str(w.data)}]})
    return check(w, p), [str(p), "data.mix.0.name", "required"]


@case("recipes")
def unknown_key_in_mix(w):
    p = w.recipe(data={"mix": [{"name": "b", "path": str(w.data), "prompt_templat": "x"}]})
    return check(w, p), [str(p), "prompt_templat", "Did you mean 'prompt_template'"]


@case("recipes")
def full_on_quantized_base(w):
    p = w.recipe(method={"kind": "full"}, model={"quantize": "nf4"})
    return check(w, p), [str(p), "method.kind = 'full'", "quantized"]


@case("recipes")
def packing_prompt_tuning(w):
    p = w.recipe(method={"kind": "prompt"}, data={"packing": "on"})
    return check(w, p), [str(p), "data.packing", "'auto' or 'off'"]


@case("recipes")
def completion_loss_on_text_without_marker(w):
    p = w.recipe(data={"format": "text", "train_on": "completion"})
    return check(w, p), [str(p), "data.response_template", "data.train_on = 'all'"]


@case("recipes")
def dpo_on_a_named_sft_format(w):
    p = w.recipe(data={"format": "completion"}, train={"objective": "dpo"})
    return check(w, p), [str(p), "train.objective = 'dpo'", "data.format = 'preference'", "train.objective = 'sft'"]


@case("recipes")
def preference_format_with_the_sft_objective(w):
    p = w.recipe(data={"format": "preference"})
    return check(w, p), [str(p), "data.format = 'preference'", "train.objective = 'dpo' or 'orpo'"]


@case("recipes")
def orpo_with_prompt_tuning(w):
    p = w.recipe(method={"kind": "prompt"}, train={"objective": "orpo"})
    return check(w, p), [str(p), "method.kind = 'prompt'", "virtual tokens", "'lora'"]


@case("recipes")
def model_path_missing(w):
    p = w.recipe(model={"path": "./no-such-model"})
    return check(w, p), [str(p), "model.path", "no-such-model", "does not exist"]


@case("recipes")
def data_path_typo_with_extension(w):
    d = w.fresh()
    (d / "data").mkdir()
    (d / "data" / "train.jsonl").write_text('{"text": "a"}\n')
    p = w.recipe(d, data={"path": "data/trian.jsonl"})
    return check(w, p), [str(p), "data.path", "trian.jsonl", "no such file", "Did you mean 'train.jsonl'"]


@case("recipes")
def data_path_typo_in_existing_folder(w):
    d = w.fresh()
    (d / "data" / "wikisql").mkdir(parents=True)
    p = w.recipe(d, data={"path": "data/wikisq"})
    return check(w, p), [str(p), "data.path", "no such file", "Did you mean 'wikisql'"]


@case("recipes")
def data_path_typo_through_set(w):
    p = w.recipe()
    return check(w, p) + ["--set", f"data.path={w.data}/trian.jsonl"], ["data.path", "trian.jsonl", "Did you mean 'train.jsonl'"]


@case("recipes")
def resume_from_missing(w):
    p = w.recipe(method={"resume_from": "runs/old/adapter"})
    return check(w, p), [str(p), "method.resume_from", "does not exist"]


@case("recipes")
def loom_file_missing(w):
    p = w.recipe(data={"loom": "prompts.toml"})
    return check(w, p), [str(p), "data.loom", "prompts.toml", "does not exist"]


@case("recipes")
def label_names_file_missing(w):
    p = w.recipe(data={"label_names": "labels.txt", "label_field": "label"})
    return check(w, p), [str(p), "data.label_names", "does not exist"]


@case("recipes")
def answer_without_choices(w):
    p = w.recipe(data={"answer_field": "answer"})
    return check(w, p), [str(p), "data.answer_field", "data.choices_field"]


@case("recipes")
def unknown_eval_task(w):
    p = w.recipe(eval={"tasks": {"wikisq": {"task": "generation"}}})
    return check(w, p), [str(p), "eval.tasks.wikisq", "no such task"]


@case("recipes")
def set_without_section(w):
    p = w.recipe()
    return check(w, p) + ["--set", "iters=3"], ["--set 'iters=3'", "SECTION.KEY=VALUE"]


@case("recipes")
def set_bad_value(w):
    p = w.recipe()
    return check(w, p) + ["--set", "train.iters=zero"], ["--set train.iters", "integer"]


@case("recipes")
def set_unknown_key(w):
    p = w.recipe()
    return check(w, p) + ["--set", "train.itres=3"], ["train.itres", "Did you mean 'iters'"]


@case("recipes")
def layers_beyond_the_model(w):
    p = w.recipe(method={"layers": 16})
    return dry(w, p), [str(p), "method.layers = 16", "2 layers", "config.json"]


@case("recipes")
def two_stages_one_bad(w):
    good, bad = w.recipe(name="a"), w.recipe(name="b", train={"lr": "fast"})
    return ["train", str(good), str(bad), "--dry-run"], [f"{bad}:", "train.lr"]


# --- data: files, rows, formats ---------------------------------------------------------------------


def with_data(w: World, files: dict, **data) -> tuple[Path, Path]:
    d = w.data_dir(files)
    return w.recipe(data={"path": str(d), **data}), d


@case("data")
def folder_without_train_file(w):
    p, d = with_data(w, {"training.jsonl": [{"text": "a"}]})
    return dry(w, p), [str(d), "no training file", "training.jsonl"]


@case("data")
def bad_json_line(w):
    p, d = with_data(w, {"train.jsonl": '{"text": "a"}\n{"text": "b"\n'})
    return dry(w, p), [f"{d / 'train.jsonl'}:2", "not valid JSON"]


@case("data")
def json_line_not_an_object(w):
    p, d = with_data(w, {"train.jsonl": '{"text": "a"}\n["b"]\n'})
    return dry(w, p), [f"{d / 'train.jsonl'}:2", "one JSON object per line"]


@case("data")
def json_file_not_a_list_of_objects(w):
    p, d = with_data(w, {"train.json": "[1, 2]"})
    return dry(w, p), [str(d / "train.json"), "list of objects"]


@case("data")
def unknown_columns(w):
    p, d = with_data(w, {"train.jsonl": [{"body": "a"}] * 4})
    return dry(w, p), [str(d / "train.jsonl"), "['body']", "data.text_field"]


@case("data")
def empty_text(w):
    p, d = with_data(w, {"train.jsonl": [{"text": "a b"}, {"text": "  "}, {"text": "c"}]}, valid_fraction=0)
    return dry(w, p), [f"{d / 'train.jsonl'}:2", "'text' is empty"]


@case("data")
def completion_not_a_string(w):
    p, d = with_data(w, {"train.jsonl": [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": 3}]}, valid_fraction=0)
    return dry(w, p), [f"{d / 'train.jsonl'}:2", "'completion' must be a string"]


@case("data")
def chat_unknown_role(w):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            {"messages": [{"role": "usr", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    p, d = with_data(w, {"train.jsonl": rows}, valid_fraction=0)
    return dry(w, p), [f"{d / 'train.jsonl'}:2", "'usr'", "system, user, assistant"]


@case("data")
def chat_unknown_role_named_format(w):
    rows = [{"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    p, d = with_data(w, {"train.jsonl": rows}, valid_fraction=0, chat_format="chatml")
    return dry(w, p), [f"{d / 'train.jsonl'}:1", "'human'", "user"]


@case("data")
def chat_message_without_content(w):
    rows = [{"messages": [{"role": "user"}, {"role": "assistant", "content": "yo"}]}]
    p, d = with_data(w, {"train.jsonl": rows}, valid_fraction=0)
    return dry(w, p), [f"{d / 'train.jsonl'}:1", "'content' must be a string"]


@case("data")
def chat_messages_not_a_list(w):
    p, d = with_data(w, {"train.jsonl": [{"messages": "hello"}]}, valid_fraction=0)
    return dry(w, p), [f"{d / 'train.jsonl'}:1", "'messages' must be a non-empty list"]


@case("data")
def chat_without_any_assistant_turn(w):
    rows = [{"messages": [{"role": "user", "content": f"hi {i}"}]} for i in range(4)]
    p, d = with_data(w, {"train.jsonl": rows}, valid_fraction=0)
    return dry(w, p), [str(d / "train.jsonl"), "none of the 4 train examples", "assistant"]


@case("data")
def csv_wrong_field_count(w):
    p, d = with_data(w, {"train.csv": "text,label\nhello,1\nworld,2,3\n"})
    return dry(w, p), [f"{d / 'train.csv'}:3", "3 fields", "header has 2"]


@case("data")
def parquet_truncated(w):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = w.fresh("data")
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(50)]}), d / "train.parquet")
    raw = (d / "train.parquet").read_bytes()
    (d / "train.parquet").write_bytes(raw[: len(raw) // 2])
    p = w.recipe(data={"path": str(d)})
    return dry(w, p), [str(d / "train.parquet"), "parquet"]


@case("data")
def parquet_garbage(w):
    p, d = with_data(w, {"train.parquet": b"not a parquet file at all" * 10})
    return dry(w, p), [str(d / "train.parquet"), "parquet"]


@case("data")
def jsonl_in_cp1252(w):
    p, d = with_data(w, {"train.jsonl": '{"text": "caf\u00e9"}\n'.encode("cp1252")})
    return dry(w, p), [str(d / "train.jsonl"), "UTF-8"]


@case("data")
def unsupported_file_type(w):
    d = w.fresh("data")
    (d / "rows.xlsx").write_bytes(b"PK")
    p = w.recipe(data={"path": str(d / "rows.xlsx")})
    return dry(w, p), [str(d / "rows.xlsx"), "unsupported file type", ".jsonl"]


@case("data")
def two_files_for_one_split(w):
    p, d = with_data(w, {"train.jsonl": [{"text": "a"}], "train.csv": "text\nb\n"})
    return dry(w, p), [str(d), "train split", "keep one"]


@case("data")
def empty_train_file(w):
    p, d = with_data(w, {"train.jsonl": ""})
    return dry(w, p), [str(d / "train.jsonl"), "no rows"]


@case("data")
def too_few_rows_to_hold_out(w):
    p, d = with_data(w, {"train.jsonl": [{"text": "a"}, {"text": "b"}]}, valid_fraction=0.5, test_fraction=0.5)
    return dry(w, p), [str(d / "train.jsonl"), "too few", "valid_fraction"]


@case("data")
def response_template_not_found(w):
    p, d = with_data(w, {"train.jsonl": [{"text": "Q: a\nA: b"}, {"text": "no marker"}]}, valid_fraction=0,
                     response_template="\nA:")
    return dry(w, p), [f"{d / 'train.jsonl'}:2", "response_template"]


@case("data")
def chat_format_on_text_rows(w):
    p, d = with_data(w, {"train.jsonl": [{"text": "a"}]}, valid_fraction=0, format="chat")
    return dry(w, p), [f"{d / 'train.jsonl'}:1", "'messages'"]


@case("data")
def template_names_a_missing_column(w):
    p, d = with_data(w, {"train.jsonl": [{"question": "a", "answer": "b"}]}, valid_fraction=0,
                     prompt_template="Q: {questoin}", completion_template=" {answer}")
    return dry(w, p), [f"{d / 'train.jsonl'}:1", "questoin"]


PAIR = {"prompt": "How many rows?\nSQL:", "chosen": " SELECT COUNT(*) FROM t", "rejected": " SELECT * FROM t"}


@case("data")
def preference_row_missing_rejected(w):
    rows = [PAIR, {"prompt": PAIR["prompt"], "chosen": PAIR["chosen"]}]
    d = w.data_dir({"train.jsonl": rows})
    p = w.recipe(data={"path": str(d), "valid_fraction": 0}, train={"objective": "dpo"})
    return dry(w, p), [f"{d / 'train.jsonl'}:2", "missing key 'rejected'", "data.rejected_field"]


@case("data")
def preference_chosen_not_a_string_or_messages(w):
    rows = [PAIR, dict(PAIR, chosen={"text": "SELECT 1"})]
    d = w.data_dir({"train.jsonl": rows})
    p = w.recipe(data={"path": str(d), "valid_fraction": 0}, train={"objective": "orpo"})
    return dry(w, p), [f"{d / 'train.jsonl'}:2", "'chosen' must be a string, a {role, content} message or a list of messages"]


@case("data")
def dpo_on_text_data(w):
    p = w.recipe(train={"objective": "dpo"})
    return dry(w, p), [str(w.data / "train.jsonl"), "train.objective = 'dpo'", "text data", "data.format = 'preference'",
                       "train.objective = 'sft'"]


@case("data")
def preference_data_with_the_sft_objective(w):
    p, d = with_data(w, {"train.jsonl": [PAIR] * 4}, valid_fraction=0)
    return dry(w, p), [str(d / "train.jsonl"), "preference pairs", "train.objective = 'dpo' or 'orpo'", "data.format"]


@case("data")
def data_summary_of_a_bad_file(w):
    p, d = with_data(w, {"train.jsonl": '{"text": "a"}\nnot json\n'})
    return ["data", "summary", str(p)], [f"{d / 'train.jsonl'}:2", "not valid JSON"]


# --- models: folders, weights, tokenizers -----------------------------------------------------------


def on_model(w: World, model: Path) -> list[str]:
    return dry(w, w.recipe(model={"path": str(model)}))


@case("models")
def model_without_tokenizer_files(w):
    m = w.model_copy(drop=("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"))
    return on_model(w, m), [str(m), "tokenizer"]


@case("models")
def model_without_config(w):
    m = w.model_copy(drop=("config.json",))
    return ["generate", "--model", str(m), "--prompt", "hi"], [str(m), "config.json"]


@case("models")
def model_config_not_json(w):
    m = w.model_copy()
    (m / "config.json").write_text("{ not json")
    return on_model(w, m), [str(m / "config.json"), "JSON"]


@case("models")
def model_weights_truncated(w):
    m = w.model_copy()
    f = m / "model.safetensors"
    size = f.stat().st_size
    f.write_bytes(f.read_bytes()[: size // 2])
    return ["generate", "--model", str(m), "--prompt", "hi"], [str(f), "damaged", str(size), str(size // 2)]


@case("models")
def model_weights_lfs_pointer(w):
    m = w.model_copy()
    (m / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 1234567\n")
    return ["generate", "--model", str(m), "--prompt", "hi"], [str(m / "model.safetensors"), "Git LFS", "1234567"]


@case("models")
def model_weights_garbage(w):
    m = w.model_copy()
    (m / "model.safetensors").write_bytes(os.urandom(4096))
    return ["generate", "--model", str(m), "--prompt", "hi"], [str(m / "model.safetensors"), "damaged"]


@case("models")
def model_weights_missing(w):
    m = w.model_copy(drop=("model.safetensors",))
    return ["generate", "--model", str(m), "--prompt", "hi"], [str(m), "safetensors"]


@case("models")
def model_shard_missing(w):
    m = w.model_copy()
    (m / "model.safetensors").rename(m / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors",
                                            "model.norm.weight": "model-00001-of-00002.safetensors"}}
    (m / "model.safetensors.index.json").write_text(json.dumps(index))
    return ["generate", "--model", str(m), "--prompt", "hi"], ["model-00002-of-00002.safetensors", "missing"]


@case("models")
def model_path_is_some_file(w):
    f = w.fresh() / "weights.txt"
    f.write_text("hello")
    return ["generate", "--model", str(f), "--prompt", "hi"], [str(f), "none of those"]


@case("models")
def generate_model_path_missing(w):
    return ["generate", "--model", "./no/such/model.gguf", "--prompt", "hi"], ["./no/such/model.gguf", "no such file"]


@case("models")
def model_hub_id_offline(w):
    return ["generate", "--model", "nobody-here/no-such-model", "--prompt", "hi"], ["nobody-here/no-such-model", "hub"]


@case("models")
def convert_into_a_read_only_place(w):
    from builders import STORIES

    return ["convert", str(STORIES / "stories260K.bin"), "--out", "/sys/ftkit-converted"], ["/sys", "--out /sys/ftkit-converted"]


@case("models")
def gguf_truncated(w):
    f = w.fresh() / "m.gguf"
    f.write_bytes(b"GGUF" + struct.pack("<I", 3) + b"\x00" * 8)
    return ["convert", str(f), "--out", str(w.fresh() / "out")], [str(f), "GGUF"]


@case("models")
def convert_unknown_file(w):
    f = w.fresh() / "m.safetensors"
    f.write_bytes(b"\x00" * 16)
    return ["convert", str(f)], [str(f), "not a GGUF file"]


@case("models")
def convert_bad_dtype(w):
    f = w.fresh() / "m.gguf"
    f.write_bytes(b"GGUF")
    return ["convert", str(f), "--dtype", "fp8"], ["dtype", "'fp8'", "bfloat16"]


@case("models")
def convert_folder_without_quantize(w):
    return ["convert", str(w.model)], [str(w.model), "--quantize"]


# --- adapters ---------------------------------------------------------------------------------------


def gen(w: World, adapter: Path, *more: str) -> list[str]:
    return ["generate", "--model", str(w.model), "--adapter", str(adapter), "--prompt", "hi", "--max-tokens", "2",
            "--backend", "torch", *more]


@case("adapters")
def adapter_missing(w):
    a = w.fresh() / "adapter"
    return gen(w, a), [str(a), "no such adapter folder"]


@case("adapters")
def adapter_folder_without_config(w):
    a = w.adapter_copy()
    (a / "adapter_config.json").unlink()
    return gen(w, a), [str(a), "adapter_config.json"]


@case("adapters")
def adapter_config_not_json(w):
    a = w.adapter_copy()
    (a / "adapter_config.json").write_text("{")
    return gen(w, a), [str(a / "adapter_config.json"), "not valid JSON"]


@case("adapters")
def adapter_without_weights(w):
    a = w.adapter_copy()
    (a / "adapter_model.safetensors").unlink()
    return gen(w, a), [str(a), "adapter_model.safetensors"]


@case("adapters")
def adapter_weights_truncated(w):
    a = w.adapter_copy()
    f = a / "adapter_model.safetensors"
    size = f.stat().st_size
    f.write_bytes(f.read_bytes()[: size - 100])
    return gen(w, a), [str(f), "damaged", str(size), str(size - 100)]


@case("adapters")
def adapter_weights_truncated_fuse(w):
    a = w.adapter_copy()
    f = a / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-64])
    return ["fuse", "--adapter", str(a), "--out", str(w.fresh() / "fused"), "--model", str(w.model), "--backend", "torch"], \
        [str(f), "damaged"]


def _rewrite_config(a: Path, **changes) -> None:
    cfg = json.loads((a / "adapter_config.json").read_text())
    cfg.update(changes)
    (a / "adapter_config.json").write_text(json.dumps(cfg))


@case("adapters")
def adapter_rank_differs_from_tensors_torch(w):
    a = w.adapter_copy()
    _rewrite_config(a, r=8)
    return gen(w, a), [str(a), "r = 8", "rank 4"]


@case("adapters")
def adapter_rank_differs_from_tensors_mlx(w):
    a = w.adapter_copy()
    _rewrite_config(a, r=8)
    return gen(w, a)[:-2] + ["--backend", "mlx"], [str(a), "r = 8", "rank 4"]


@case("adapters")
def adapter_rank_differs_from_tensors_export(w):
    a = w.adapter_copy()
    _rewrite_config(a, r=8)
    return ["export", str(a), "--out", str(w.fresh() / "a.gguf")], [str(a), "r = 8", "rank 4"]


@case("adapters")
def adapter_rank_not_a_number(w):
    a = w.adapter_copy()
    _rewrite_config(a, r="eight")
    return gen(w, a), [str(a / "adapter_config.json"), "'eight'"]


def _other_model(w: World) -> Path:
    """The tiny Llama's config with half the width (weights drawn by the config, saved without torch's help)."""
    from builders import build_tiny_llama

    if not (w.root / "other-model").is_dir():
        build_tiny_llama(w.root / "other-model", hidden=32)
    return w.root / "other-model"


@case("adapters")
def adapter_for_another_model(w):
    return ["generate", "--model", str(_other_model(w)), "--adapter", str(w.run / "adapter"), "--prompt", "hi",
            "--backend", "torch"], [str(w.run / "adapter"), "fingerprint", "model.path / --model"]


@case("adapters")
def peft_adapter_for_another_model(w):
    a = w.adapter_copy()
    (a / "ftkit.json").unlink()  # as PEFT or another tool writes it: no fingerprint to compare
    return ["generate", "--model", str(_other_model(w)), "--adapter", str(a), "--prompt", "hi", "--backend", "torch"], \
        [str(a), "different base model"]


@case("adapters")
def mlx_lm_adapter_rank_not_a_number(w):
    a = w.fresh("mlx-adapter")
    (a / "adapters.safetensors").write_bytes((w.run / "adapter" / "adapter_model.safetensors").read_bytes())
    (a / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "lora_parameters": {"rank": "eight", "scale": 2.0}}))
    return gen(w, a), [str(a / "adapter_config.json"), "lora_parameters.rank", "'eight'"]


@case("adapters")
def mlx_lm_adapter_without_scale(w):
    a = w.fresh("mlx-adapter")
    (a / "adapters.safetensors").write_bytes(b"")
    (a / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "lora_parameters": {"rank": 8}}))
    return gen(w, a), [str(a / "adapter_config.json"), "scale"]


@case("adapters")
def mlx_lm_full_fine_tune(w):
    a = w.fresh("mlx-adapter")
    (a / "adapters.safetensors").write_bytes(b"")
    (a / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "full"}))
    return gen(w, a), [str(a), "mlx_lm fuse"]


@case("adapters")
def adapter_with_rank_pattern(w):
    a = w.adapter_copy()
    _rewrite_config(a, rank_pattern={"q_proj": 2})
    return gen(w, a), [str(a), "rank_pattern"]


@case("adapters")
def adapter_of_unknown_kind(w):
    a = w.adapter_copy()
    _rewrite_config(a, peft_type="IA3")
    return gen(w, a), [str(a), "IA3"]


@case("adapters")
def adapter_from_another_base_fingerprint(w):
    a = w.adapter_copy()
    meta = json.loads((a / "ftkit.json").read_text())
    meta["base_model"]["fingerprint"] = "0" * 16
    (a / "ftkit.json").write_text(json.dumps(meta))
    return gen(w, a), [str(a), "fingerprint", "model.path / --model"]


@case("adapters")
def resume_from_adapter_of_another_rank(w):
    p = w.recipe(method={"resume_from": str(w.run / "adapter"), "rank": 8})
    return ["train", str(p), "--backend", "torch"], [str(w.run / "adapter"), "rank 4", "method.rank is 8"]


@case("adapters")
def adapter_path_typo(w):
    return gen(w, w.run / "adaptr"), [str(w.run / "adaptr"), "no such adapter folder", "Did you mean 'adapter'"]


@case("adapters")
def eval_adapter_missing(w):
    p = w.recipe()
    return ["eval", str(p), "--adapter", str(w.root / "nope"), "--backend", "torch"], [str(w.root / "nope"), "no such adapter"]


# --- runs: a finished run in the folder stays as it is ----------------------------------------------


def finished_recipe(w: World, **sections) -> Path:
    return w.recipe(w.fresh(), name="again", output={"dir": str(w.run)}, **sections)


@case("runs", run=True)
def train_into_a_finished_run(w):
    p = finished_recipe(w)
    return ["train", str(p), "--backend", "torch"], [str(w.run), "already holds a run", "--resume auto", "nothing was overwritten"]


@case("runs", run=True)
def resume_a_folder_without_checkpoints(w):
    empty = w.fresh("empty-run")
    return ["train", str(w.recipe()), "--backend", "torch", "--resume", str(empty)], [str(empty), "no complete checkpoint"]


@case("runs", run=True)
def finished_run_with_a_bad_recipe(w):
    p = finished_recipe(w, train={"lr": "fast"})
    return ["train", str(p), "--resume", "auto"], [f"{p}:", "train.lr"]


@case("runs", run=True)
def finished_run_with_bad_data(w):
    d = w.data_dir({"train.jsonl": '{"text": "a"}\n{oops\n'})
    p = finished_recipe(w, data={"path": str(d)})
    return ["train", str(p), "--backend", "torch"], [f"{d / 'train.jsonl'}:2"]


@case("runs", run=True)
def finished_run_with_a_damaged_model(w):
    m = w.model_copy()
    (m / "model.safetensors").write_bytes(b"\x00" * 64)
    p = finished_recipe(w, model={"path": str(m)})
    return ["train", str(p), "--backend", "torch"], [str(m / "model.safetensors"), "damaged"]


@case("runs", run=True)
def eval_out_into_a_read_only_place(w):
    p = finished_recipe(w)
    return ["eval", str(p), "--adapter", str(w.run / "adapter"), "--backend", "torch", "--split", "valid",
            "--out", "/sys/ftkit-eval.json"], ["/sys/ftkit-eval.json", "--out"]


@case("runs", run=True)
def eval_out_under_a_file(w):
    p = finished_recipe(w)
    blocker = w.fresh() / "a-file"
    blocker.write_text("x")
    return ["eval", str(p), "--adapter", str(w.run / "adapter"), "--backend", "torch", "--split", "valid",
            "--out", str(blocker / "eval.json")], [str(blocker), "--out"]


@case("runs", run=True)
def fuse_into_a_read_only_place(w):
    return ["fuse", "--adapter", str(w.run / "adapter"), "--out", "/sys/ftkit-fused", "--model", str(w.model),
            "--backend", "torch"], ["/sys/ftkit-fused"]


@case("runs", run=True)
def fuse_over_an_existing_folder(w):
    out = w.fresh("fused")
    (out / "keep.txt").write_text("mine")
    return ["fuse", "--adapter", str(w.run / "adapter"), "--out", str(out), "--model", str(w.model), "--backend", "torch"], \
        [str(out), "--force"]


@case("runs", run=True)
def export_into_a_read_only_place(w):
    return ["export", str(w.run / "adapter"), "--out", "/sys/ftkit.gguf"], ["/sys/ftkit.gguf"]


@case("runs", run=True)
def report_into_a_read_only_place(w):
    return ["report", str(w.run), "--out", "/sys/ftkit-report.html"], ["/sys/ftkit-report.html"]


@case("runs", run=True)
def train_into_a_read_only_output_dir(w):
    return ["train", str(w.recipe(output={"dir": "/sys/ftkit-run"})), "--backend", "torch"], ["/sys/ftkit-run"]


@case("runs", run=True)
def report_of_a_folder_that_is_no_run(w):
    d = w.fresh("not-a-run")
    return ["report", str(d)], [str(d), "metrics.jsonl"]


# --- the command line -------------------------------------------------------------------------------


def generate(w: World, *more: str) -> list[str]:
    return ["generate", "--model", str(w.model), "--backend", "torch", *more]


@case("cli")
def generate_zero_tokens(w):
    return generate(w, "--prompt", "hi", "--max-tokens", "0"), ["--max-tokens 0", ">= 1"]


@case("cli")
def generate_negative_tokens(w):
    return generate(w, "--prompt", "hi", "--max-tokens", "-5"), ["--max-tokens -5", ">= 1"]


@case("cli")
def generate_empty_prompt(w):
    return generate(w, "--prompt", ""), ["--prompt", "empty"]


@case("cli")
def generate_blank_prompt(w):
    return generate(w, "--prompt", "   \n"), ["--prompt", "empty"]


@case("cli")
def generate_prompt_and_loom(w):
    f = w.fresh() / "l.toml"
    f.write_text('[q]\n_ = "x"\n')
    return generate(w, "--prompt", "hi", "--loom", str(f)), ["--prompt", "--loom"]


@case("cli")
def generate_no_prompt(w):
    return generate(w), ["--prompt", "--loom"]


@case("cli")
def generate_unknown_format(w):
    return generate(w, "--prompt", "hi", "--format", "chatgpt"), ["--format chatgpt", "chatml"]


@case("cli")
def generate_negative_temperature(w):
    return generate(w, "--prompt", "hi", "--temperature", "-1"), ["--temperature -1", ">= 0"]


@case("cli")
def generate_top_p_zero(w):
    return generate(w, "--prompt", "hi", "--top-p", "0"), ["--top-p 0", "(0, 1]"]


@case("cli")
def generate_loom_missing(w):
    f = w.fresh() / "prompts.toml"
    return generate(w, "--loom", str(f)), [str(f)]


@case("cli")
def generate_bad_marker(w):
    f = w.fresh() / "l.toml"
    f.write_text('[question]\n_ = "Say {thing}"\n')
    return generate(w, "--loom", str(f), "--marker", "thing"), ["--marker", "NAME=VALUE"]


@case("cli")
def generate_unfilled_marker(w):
    f = w.fresh() / "l.toml"
    f.write_text('[question]\n_ = "Say {thing}"\n')
    return generate(w, "--loom", str(f), "--sections", "question"), ["thing", "question"]


@case("cli")
def eval_unknown_split(w):
    return ["eval", str(w.recipe()), "--split", "dev"], ["--split dev", "test, valid or train"]


@case("cli")
def eval_empty_split(w):
    d = w.data_dir({"train.jsonl": [{"text": f"row {i}"} for i in range(10)]})
    p = w.recipe(data={"path": str(d)})
    return ["eval", str(p), "--backend", "torch"], [str(d), "test split is empty", "data.test_fraction"]


@case("cli")
def launch_node_rank_out_of_range(w):
    return ["launch", str(w.recipe()), "--nnodes", "2", "--node-rank", "3", "--print-command"], ["--node-rank 3", "--nnodes 2"]


@case("cli")
def launch_without_distributed(w):
    return ["launch", str(w.recipe()), "--nproc-per-node", "2", "--print-command"], ["torch.distributed", "'ddp' or 'fsdp'"]


@case("cli")
def export_unknown_format(w):
    return ["export", str(w.run / "adapter"), "--format", "onnx"], ["--format onnx", "gguf"]


@case("cli")
def unknown_command(w):
    return ["trian"], ["trian"]


@case("cli")
def train_without_a_recipe(w):
    return ["train"], ["Missing argument 'recipes'"]


@case("cli")
def stop_after_negative(w):
    return ["train", str(w.recipe()), "--stop-after", "-1"], ["--stop-after"]


@case("cli")
def json_error_is_one_object(w):
    p = w.recipe(train={"learning_rate": 1e-4})
    return ["train", str(p), "--json"], ['"error"', "train.learning_rate", "'lr'"]


@case("cli")
def sweep_file_missing(w):
    f = w.fresh() / "sweep.toml"
    return ["sweep", str(f)], [str(f)]


@case("cli")
def sweep_unknown_parameter(w):
    d = w.fresh()
    base = w.recipe(d)
    (d / "s.toml").write_text(f'[sweep]\nrecipe = "{base.name}"\n[sweep.parameters]\n"train.learning_rate" = [1e-4, 3e-4]\n')
    return ["sweep", str(d / "s.toml")], ["train.learning_rate", "'lr'"]


# ---------------------------------------------------------------- the test


FAMILIES = ("recipes", "data", "models", "adapters", "runs", "cli")


def test_the_corpus_is_large_and_covers_every_family():
    assert len(CASES) >= 80, len(CASES)
    assert {c.family for c in CASES} == set(FAMILIES)
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("c", CASES, ids=[f"{c.family}-{c.name}" for c in CASES])
def test_bad_input_gives_one_clear_message(world, c: Case, monkeypatch):
    monkeypatch.setenv("FTKIT_CACHE", str(world.root / "cache"))
    monkeypatch.setenv("COLUMNS", "400")
    before = run_hashes(world.run) if c.run else None
    argv, must = c.build(world)
    result = runner.invoke(app, argv)
    out = result.output
    assert result.exit_code == 2, f"exit {result.exit_code}: {out[-3000:]}\n{result.exception!r}"
    assert "Traceback" not in out, out[-3000:]
    for needle in must:
        assert squeeze(needle) in squeeze(out), f"{needle!r} not in:\n{out[-3000:]}"
    if c.run:
        assert run_hashes(world.run) == before, "a finished run was changed"


# ---------------------------------------------------------------- done, but said out loud


@dataclass
class Said:
    name: str
    build: Callable[[World], tuple[list[str], list[str]]]
    kw: dict = field(default_factory=dict)


SAID: list[Said] = []


def said(fn):
    SAID.append(Said(fn.__name__, fn))
    return fn


@said
def every_row_longer_than_max_seq_length(w):
    p = w.recipe(data={"max_seq_length": 16})
    return dry(w, p), ["24 of 24 train examples", "data.max_seq_length = 16", "p50", "p90"]


@said
def rows_without_an_assistant_turn(w):
    rows = [{"messages": [{"role": "user", "content": f"q {i}"}, {"role": "assistant", "content": f"a {i}"}]} for i in range(6)]
    rows += [{"messages": [{"role": "user", "content": "only a question"}]}] * 2
    d = w.data_dir({"train.jsonl": rows})
    p = w.recipe(data={"path": str(d), "valid_fraction": 0})
    return dry(w, p), ["2 of 8 train examples", "no token to train on", "assistant", f"{d / 'train.jsonl'}:7"]


@said
def preference_pairs_cut_and_left_out(w):
    rows = [PAIR, dict(PAIR, rejected=PAIR["chosen"])] + [dict(PAIR, prompt=f"q {i}\nSQL:") for i in range(4)]
    d = w.data_dir({"train.jsonl": rows})
    p = w.recipe(data={"path": str(d), "valid_fraction": 0, "max_seq_length": 16}, train={"objective": "dpo", "batch_size": 2})
    return dry(w, p), ["2 of 6 train pairs", "data.max_seq_length = 16: their prompts are kept and their responses cut",
                       "1 of 6 train pairs are left out", f"{d / 'train.jsonl'}:2 (chosen and rejected are the same tokens)"]


@said
def fewer_rows_than_a_step(w):
    d = w.data_dir({"train.jsonl": [{"text": f"row {i}"} for i in range(3)]})
    p = w.recipe(data={"path": str(d), "valid_fraction": 0}, train={"batch_size": 8})
    return dry(w, p), ["3 training examples", "train.batch_size = 8", "repeat"]


@said
def empty_valid_file(w):
    d = w.data_dir({"train.jsonl": [{"text": f"row {i}"} for i in range(8)], "valid.jsonl": ""})
    p = w.recipe(data={"path": str(d)})
    return dry(w, p), [str(d / "valid.jsonl"), "no validation"]


def long_row_data(w: World) -> Path:
    """Short rows and one of about 700 tokens: longer than the tiny model's context (512)."""
    return w.data_dir({"train.jsonl": [{"text": "word " * 700}] + [{"text": f"row {i}"} for i in range(7)]})


@said
def max_seq_length_above_the_context(w):
    d = long_row_data(w)
    p = w.recipe(data={"path": str(d), "max_seq_length": 100000, "valid_fraction": 0})
    return dry(w, p), ["data.max_seq_length = 100000", f"{w.model.name}'s context of 512 tokens", "max_position_embeddings", "1 train",
                       "data.max_seq_length = 512"]


@said
def max_seq_length_above_the_context_from_the_cache(w):
    from ftkit.data import token_cache
    from ftkit.data.encode import tokenize_splits
    from ftkit.models.tokenizer import load_tokenizer
    from ftkit.recipe.load import load_recipes

    d = long_row_data(w)
    p = w.recipe(data={"path": str(d), "max_seq_length": 4096, "valid_fraction": 0})
    (r,) = load_recipes([p])
    token_cache.load(r.data, load_tokenizer(w.model), tokenize_splits)  # the tokens are in the cache, as after a run
    return dry(w, p), ["data.max_seq_length = 4096", "512", "1 train"]


@said
def default_max_seq_length_above_the_context(w):
    d = long_row_data(w)
    p = w.recipe(data={"path": str(d), "max_seq_length": None, "valid_fraction": 0})
    return dry(w, p), ["data.max_seq_length (not set: 2048, the default)", "512", "1 train"]


@said
def max_seq_length_above_the_context_with_short_rows(w):
    p = w.recipe(data={"max_seq_length": 100000})
    return dry(w, p), ["data.max_seq_length = 100000", "512", "no example is longer than 512"]


@pytest.mark.parametrize("s", SAID, ids=[s.name for s in SAID])
def test_done_but_said(world, s: Said, monkeypatch):
    monkeypatch.setenv("FTKIT_CACHE", str(world.root / "cache"))
    monkeypatch.setenv("COLUMNS", "400")
    argv, must = s.build(world)
    result = runner.invoke(app, argv)
    assert result.exit_code == 0, result.output[-3000:]
    for needle in must:
        assert squeeze(needle) in squeeze(result.output), f"{needle!r} not in:\n{result.output[-3000:]}"


# ---------------------------------------------------------------- the top-level handler


def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(world, monkeypatch):
    from ftkit.recipe import load

    def broken(*a, **k):
        raise ValueError("cannot reshape array of size 3 into shape (2,2)")

    monkeypatch.setattr(load, "load_recipes", broken)
    p = world.recipe()
    result = runner.invoke(app, ["recipe", "check", str(p)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    out = squeeze(result.output)
    assert squeeze(f"ftkit recipe check {p}") in out and "cannotreshape" in out and "--debug" in out
    assert len([line for line in result.output.splitlines() if line.strip()]) <= 3

    debug = runner.invoke(app, ["--debug", "recipe", "check", str(p)])
    assert debug.exit_code == 1 and "Traceback" in debug.output and "cannot reshape" in debug.output
    monkeypatch.setenv("FTKIT_DEBUG", "1")
    env = runner.invoke(app, ["recipe", "check", str(p)])
    assert env.exit_code == 1 and "Traceback" in env.output

    monkeypatch.delenv("FTKIT_DEBUG")
    as_json = runner.invoke(app, ["recipe", "check", str(p), "--json"])
    assert as_json.exit_code == 1 and "cannot reshape" in json.loads(as_json.stdout)["error"]


def test_max_seq_length_is_checked_against_the_model_whether_or_not_the_tokens_are_cached(world, monkeypatch, capsys):
    """The library path (no CLI): load_splits checks the examples' lengths against the model's context
    after reading them, from the cache or not, so a rerun whose tokens are cached says it like the first."""
    from ftkit.common.console import console
    from ftkit.data.encode import tokenize_splits
    from ftkit.data.token_cache import load, load_splits
    from ftkit.models.tokenizer import load_tokenizer
    from ftkit.recipe.schema import DataSection

    monkeypatch.setenv("FTKIT_CACHE", str(world.root / "cache"))
    tok = load_tokenizer(world.model)
    data = DataSection(path=str(long_row_data(world)), max_seq_length=1024, valid_fraction=0)
    load(data, tok, tokenize_splits)  # cached
    for cache in (True, False):
        with console().capture() as said:
            load_splits(data.model_copy(update={"cache": cache}), tok)
        assert "max_position_embeddings=512" in squeeze(said.get()) and "1train" in squeeze(said.get())
    with console().capture() as said:
        assert len(load_splits(data.model_copy(update={"max_seq_length": 512}), tok).train) == 8  # cut to the context
    assert "context" not in said.get() and "cut to it" in said.get()
