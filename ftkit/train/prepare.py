"""Everything a run needs before its first step: the backend, the model, the tokenizer, the data, and
where a resumed run starts."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ftkit.adapters import init
from ftkit.adapters import meta as adapter_format
from ftkit.backend.objectives import Preference
from ftkit.backend.protocol import Backend
from ftkit.backend.registry import get_backend
from ftkit.common import distributed
from ftkit.common.console import console, status
from ftkit.common.distributed import World
from ftkit.common.errors import FtkitError
from ftkit.common.fingerprints import fingerprint_model, fingerprint_tokenizer
from ftkit.data import batching
from ftkit.data.batch import Splits
from ftkit.data.preference import check_objective, sequences
from ftkit.data.token_cache import load_splits
from ftkit.models.resolve import resolve_model
from ftkit.models.tokenizer import load_tokenizer
from ftkit.recipe.schema import Recipe
from ftkit.train import checkpoint as ckpt
from ftkit.train.schedule import Schedule, make_schedule


@dataclass
class Prepared:
    """Everything decided before a model is loaded; `--dry-run` stops here."""

    recipe: Recipe
    model_path: Path
    tokenizer: Any
    splits: Splits
    schedule: Schedule
    run_dir: Path
    world: World


def prepare(recipe: Recipe, run_dir: Path | None = None) -> Prepared:

    with status(f"resolving model {recipe.model.path}"):
        model_path = resolve_model(recipe.model.path, recipe.model.revision)
        tokenizer = load_tokenizer(model_path, recipe.model.trust_remote_code)
    with status(f"reading data {recipe.data.path}"):
        splits = load_splits(recipe.data, tokenizer)
    check_objective(splits.format, recipe.train.objective, splits.sources.get("train", recipe.data.path))
    if not splits.train:
        raise FtkitError(f"{recipe.data.path}: the training split is empty.")
    world = distributed.current()
    schedule = make_schedule(recipe.train, len(splits.train), len(splits.valid), world.size)
    note = batching.step_note(len(splits.train), recipe.train.batch_size, recipe.train.grad_accum, world.size)
    if note and world.is_main:
        console().print(f"[yellow]warning:[/] {note}", highlight=False)
    return Prepared(recipe, model_path, tokenizer, splits, schedule, Path(run_dir or recipe.output.dir), world)


def find_resume(run_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint `--resume` names (auto: the run folder's latest); None starts a new run, refused
    where the folder already holds one."""
    existing = ckpt.latest_checkpoint(run_dir)
    if resume is None:
        if existing is not None or (run_dir / "adapter").exists():
            raise FtkitError(
                f"{run_dir} already holds a run (checkpoints or a final adapter). Pass --resume auto to "
                "continue it, or set output.dir (--set output.dir=...) to start a new one; nothing was overwritten."
            )
        return None
    if resume == "auto":
        return existing
    check_resume_word(resume)
    path = Path(resume)
    if (path / ckpt.STATE_FILE).is_file():
        return path
    found = ckpt.latest_checkpoint(path)
    if found is None:
        raise FtkitError(f"--resume {resume}: no complete checkpoint there (a folder with {ckpt.STATE_FILE}).")
    return found


def check_resume_word(resume: str | None) -> None:
    """`--resume` is `auto` or a folder; another word (latest, last, yes ...) is told which word it is."""
    if resume is None or resume == "auto" or Path(resume).exists():
        return
    raise FtkitError(f"--resume {resume}: no such checkpoint or run folder. The word is `auto` (--resume auto: the newest "
                     "complete checkpoint in the run folder, nothing on a fresh one); otherwise give a checkpoint or run folder.")


_WHOLE = 1 << 26  # arrays up to 64 MiB are hashed whole; larger ones by 64 evenly spaced 1 MiB blocks


def _hash_array(h: "hashlib._Hash", a: np.ndarray, dtype: type) -> None:
    """Hash `a` as `dtype` (so a cached split and an in-memory one hash alike), a large one by samples."""
    flat = np.asarray(a).reshape(-1)
    h.update(f"{len(flat)}".encode())
    block = (1 << 20) // np.dtype(dtype).itemsize
    parts = [flat] if len(flat) * np.dtype(dtype).itemsize <= _WHOLE else \
        [flat[(len(flat) - block) * i // 63 :][:block] for i in range(64)]
    for part in parts:
        h.update(np.ascontiguousarray(part, dtype=dtype).tobytes())


def data_fingerprint(train: Sequence[Any]) -> str:
    """A fingerprint of the training split's token ids and loss masks, in order: what a checkpoint's data
    position means. A token-cache split is hashed from its memory-mapped arrays (a large one by samples)."""
    if all(hasattr(train, k) for k in ("tokens", "masks", "offsets")):
        offsets, tokens, masks = train.offsets, train.tokens, train.masks
    else:
        train = sequences(train)  # preference pairs: chosen, rejected, ... as the token cache lays them out
        lengths = np.fromiter((len(e.ids) for e in train), np.int64, len(train))
        offsets = np.concatenate([np.zeros(1, np.int64), np.cumsum(lengths)])
        tokens = np.fromiter((t for e in train for t in e.ids), np.int64, int(offsets[-1]))
        masks = np.fromiter((m for e in train for m in e.mask), np.int64, int(offsets[-1]))
    h = hashlib.sha256()
    for a, dtype in ((offsets, np.int64), (tokens, np.int32), (masks, np.int8)):
        _hash_array(h, a, dtype)
    return "sha256:" + h.hexdigest()[:32]


def check_resume(state: dict[str, Any], resumed: Path, prep: Prepared, data_fp: str) -> str | None:
    """Refuse a resume that would silently train something else; return a note to print, if any."""
    total = prep.schedule.total_steps
    if state["step"] > total:
        raise FtkitError(f"{resumed} is at step {state['step']}, past this recipe's {total} steps (train.iters / "
                         "train.epochs): set them to at least that many, or start a new run (output.dir) from its adapter "
                         f"(method.resume_from = \"{resumed / 'adapter'}\").")
    saved = state.get("data_fingerprint")
    if saved is None or saved == data_fp:
        return None
    if not prep.recipe.train.allow_data_change:
        raise FtkitError(f"{resumed} was trained on other data: the training split of {prep.recipe.data.path} differs from "
                         f"the checkpoint's ({saved} vs {data_fp}), so its data position ({state['position']} examples) "
                         "would point into different examples. Resume with the data it was trained on, start a new run "
                         "(output.dir) from its adapter (method.resume_from), or pass --set train.allow_data_change=true to "
                         "go on from that position on the new data.")
    return (f"note: the training data differs from {resumed.name}'s; going on from its data position "
            f"({state['position']} examples) on the new data (train.allow_data_change).")


def start_state(resumed: Path | None, world: World) -> dict[str, Any]:
    """The run state a run starts from: step 0, or the checkpoint's."""
    if resumed is None:
        return {"step": 0, "position": 0, "trained_tokens": 0, "elapsed": 0.0, "first_valid_loss": None,
                "processes": world.size}
    state = ckpt.read_state(resumed)
    saved_by = state.get("processes", 1)
    if saved_by != world.size:
        # A step is batch_size * grad_accum examples per process: another count is another schedule.
        raise FtkitError(f"{resumed} was written by a run of {saved_by} process(es); resume it with {saved_by} "
                         f"(this run has {world.size}), or start a new run from its adapter with method.resume_from.")
    return state


@dataclass
class Loaded:
    """The backend with the model in place, and the fingerprints every adapter it saves carries."""

    backend: Backend
    model_fp: str
    tokenizer_fp: str


def load(prep: Prepared, backend_name: str, resumed: Path | None, start_adapter: Path | None) -> Loaded:
    """The model and its trainable values, ready to train: the checkpoint's, the starting adapter's, or freshly drawn."""
    recipe = prep.recipe
    model_fp, tokenizer_fp = fingerprint_model(prep.model_path), fingerprint_tokenizer(prep.tokenizer)
    load_from = resumed / "adapter" if resumed else start_adapter
    if load_from is not None and recipe.method.kind != "full":
        adapter_format.check_compatible(load_from, model_fp, tokenizer_fp)
        adapter_format.check_method(load_from, recipe.method.kind, recipe.method.rank, recipe.method.num_virtual_tokens)
    backend = get_backend(backend_name)
    model_path = prep.model_path
    if recipe.method.kind == "full" and load_from is not None:
        model_path, load_from = load_from, None
    with status(f"loading {prep.model_path.name} on {backend.name}"):
        backend.load(recipe, model_path, adapter=load_from, train=True)
        pref = Preference.of(recipe.train)
        if pref is not None and pref.uses_reference:
            backend.set_reference(reference_of(prep, start_adapter))
    if resumed is None and load_from is None and recipe.is_adapter:
        _draw_initial_adapter(backend, prep)
    backend.start_training()  # wraps for DDP/FSDP once the starting values are in place
    if resumed is not None:
        backend.load_state(resumed / "state")
    return Loaded(backend, model_fp, tokenizer_fp)


def reference_of(prep: Prepared, start_adapter: Path | None) -> Path | None:
    """DPO's reference: the weights the run started from, the same on a resume. An adapter run: the starting adapter,
    or None (the base with the adapter off). A full fine-tune: the starting model folder (a frozen second copy)."""
    if prep.recipe.method.kind == "full":
        return start_adapter or prep.model_path
    return start_adapter


def _describe_reference(prep: Prepared, start_adapter: Path | None) -> str:
    pref = Preference.of(prep.recipe.train)
    if pref is None:
        return ""
    if pref.objective == "orpo":
        return f"objective: orpo (lambda {pref.orpo_lambda}), no reference model"
    loss = pref.loss_type + (f", label smoothing {pref.label_smoothing}" if pref.label_smoothing else "")
    ref = reference_of(prep, start_adapter)
    where = ("the base with the adapter switched off (no second copy)" if ref is None else
             f"a frozen copy of {ref} (a second model in memory)" if prep.recipe.method.kind == "full" else
             f"the starting adapter {ref}, frozen")
    return f"objective: dpo (beta {pref.beta}, {loss}); reference: {where}"


def _draw_initial_adapter(backend: Backend, prep: Prepared) -> None:
    """Same recipe and seed, same starting adapter, whichever backend trains it."""
    method, seed = prep.recipe.method, prep.recipe.train.seed
    rows = lambda: backend.embedding_rows(init.prompt_init_ids(method, prep.tokenizer, seed))  # noqa: E731
    backend.set_adapter_tensors(init.draw(backend.adapter_tensors(), seed, rows if method.kind == "prompt" else None))


def other_backend_keys(recipe: Recipe, backend_name: str) -> str:
    """Non-default keys of the other backend's section: kept in the recipe (the same file runs on
    both machines) but said out loud, never silently dropped."""
    other = "mlx" if backend_name == "torch" else "torch"
    section = getattr(recipe, other)
    defaults = type(section)()
    return ", ".join(f"{other}.{k} = {v!r}" for k, v in section if v != getattr(defaults, k))


def banner(prep: Prepared, backend_name: str, info: dict[str, Any], resumed: Path | None, start_adapter: Path | None = None) -> str:
    """What a run says before its first step: method, device, parameters, data, schedule."""
    s, r, splits = prep.schedule, prep.recipe, prep.splits
    trainable, total = info.get("trainable_params", 0), info.get("total_params", 0)
    pct = 100 * trainable / total if total else 0
    procs = f" ({prep.world.size} processes x {r.train.batch_size * r.train.grad_accum})" if prep.world.size > 1 else ""
    lines = [
        f"[bold]{r.name}[/]: {r.method.kind} on {info.get('device')} ({backend_name}, {info.get('dtype')}, precision {info.get('precision')})",
        f"trainable parameters: {trainable:,} of {total:,} ({pct:.3f}%)",
        f"data: {len(splits.train)} train / {len(splits.valid)} valid / {len(splits.test)} test examples ({splits.format}, loss on {splits.train_on})",
        f"schedule: {s.total_steps} steps x {s.examples_per_step} examples{procs}, validate every {s.steps_per_eval}, report every {s.steps_per_report}, checkpoint every {s.save_every}",
    ]
    if Preference.of(r.train) is not None:
        lines.append(_describe_reference(prep, start_adapter))
    if info.get("switches"):
        lines.append("switches: " + ", ".join(f"{k} {v}" for k, v in info["switches"].items()))
    if resumed:
        lines.append(f"resumed from {resumed}")
    return "\n".join(lines)
