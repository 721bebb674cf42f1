"""The `ftkit` command line. Heavy imports happen inside the commands, so `ftkit --help` is instant."""

from __future__ import annotations

import functools
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer

from ftkit import __version__
from ftkit.common.errors import FtkitError

app = typer.Typer(
    name="ftkit",
    help="Fine-tune language models (LoRA, DoRA, soft prompts, full) from one TOML recipe, on PyTorch or MLX.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Inspect a recipe's data.", no_args_is_help=True)
recipe_app = typer.Typer(help="Check recipes and list every key with its default.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(recipe_app, name="recipe")

BackendOpt = Annotated[str, typer.Option("--backend", "-b", help="auto | torch | mlx. auto: MLX on Apple silicon, torch elsewhere.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout (progress goes to stderr).")]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override a recipe key, validated like the file: --set train.iters=20 (repeatable)."),
]


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(_jsonable(obj)) + "\n")
    sys.stdout.flush()


def _fail(err: Exception, as_json: bool, code: int = 2) -> None:
    from rich.markup import escape

    from ftkit.common.console import console

    if as_json:
        _emit({"error": str(err)})
    else:
        console().print(f"[red]error:[/] {escape(str(err))}", highlight=False)
    raise typer.Exit(code)


F = TypeVar("F", bound=Callable[..., Any])

# typer's own ends of a command (an exit code, ^C, a usage error): not errors of ftkit's to report.
_PASS_THROUGH = tuple(t for t in (typer.Exit, typer.Abort, getattr(typer, "TyperException", None)) if isinstance(t, type))

# Set by the root callback on every invocation: --debug, or FTKIT_DEBUG=1 in the environment.
_debug = {"on": False}

# The argument that says what a command was working on, for the one line an unexpected error becomes.
_MAIN_ARGS = ("recipes", "recipe", "sweep_file", "src", "run_dir", "adapter", "model")


def _doing(command: Callable[..., Any], kwargs: dict[str, Any]) -> str:
    """`ftkit train r.toml`: the command and its main argument, as the user typed them (the command's
    words from its function's name: data_summary is `ftkit data summary`, eval_ is `ftkit eval`)."""
    words = ["ftkit", *command.__name__.rstrip("_").split("_")]
    for name in _MAIN_ARGS:
        value = kwargs.get(name)
        if value:
            shown = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
            return " ".join([*words, f"--{name} {shown}" if name in ("adapter", "model") else shown])
    return " ".join(words)


def _os_error(e: OSError, command: Callable[..., Any], kwargs: dict[str, Any]) -> FtkitError:
    """A file the command could not read or write, named, with what to do (a read-only or full disk ...)."""
    import errno

    place = f"{e.filename}: " if e.filename else ""
    hint = {errno.EACCES: "a read-only folder?", errno.EPERM: "a read-only folder?", errno.EROFS: "nothing can be written there",
            errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
            errno.ENOTDIR: "a part of the path is a file, not a folder", errno.EISDIR: "a folder where a file was expected"}.get(e.errno or -1)
    reason = e.strerror or str(e)
    fix = f" --out {kwargs['out']}: choose a writable place." if kwargs.get("out") else (
        " Free some space, or point the output elsewhere." if e.errno in (errno.ENOSPC, errno.EDQUOT) else "")
    return FtkitError(f"{_doing(command, kwargs)}: {place}{reason}{f' ({hint})' if hint else ''}.{fix}")


def _errors(command: F) -> F:
    """The one error handler of every command: an FtkitError (or a file the command could not read or
    write) is printed as one message, exit 2; anything else, an error ftkit did not foresee, becomes one
    line naming the command and its main argument, exit 1, with the traceback under --debug. Either way
    as JSON when the command has --json and got it.

    functools.wraps keeps the signature typer reads the options from; typer passes every parameter
    by name, so `as_json` is always a keyword here. typer.Exit and click's usage errors pass through.
    """

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        as_json = bool(kwargs.get("as_json", False))
        try:
            return command(*args, **kwargs)
        except _PASS_THROUGH:
            raise
        except FtkitError as e:
            _traceback()
            _fail(e, as_json)
        except OSError as e:
            _traceback()
            _fail(_os_error(e, command, kwargs), as_json)
        except Exception as e:  # noqa: BLE001 - the top-level handler: an error nobody foresaw becomes one line
            _traceback()
            what = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            hint = "the traceback is above" if _debug["on"] else "run with --debug for the traceback"
            message = (f"{_doing(command, kwargs)} failed: {type(e).__name__}{': ' + what if what else ''} "
                       f"(ftkit did not expect this; {hint}).")
            _fail(FtkitError(message), as_json, code=1)

    return run  # type: ignore[return-value]


def _traceback() -> None:
    if _debug["on"]:
        import traceback

        sys.stderr.write(traceback.format_exc())
        sys.stderr.flush()


def _recipes(paths: list[Path], sets: list[str] | None, check_paths: bool = True):
    """The recipes, checked as files (ftkit.recipe) and, where model.path is a local model folder,
    against that model: method.layers within the layers its config.json says it has."""
    from ftkit.common.errors import RecipeError
    from ftkit.recipe.load import load_recipes

    stages = load_recipes(paths, sets or [], check_paths=check_paths)
    if not check_paths:
        return stages
    from ftkit.models.folder import CONFIG, layers_problem, read_config

    problems = []
    for path, r in zip(paths, stages):
        folder = Path(r.model.path)
        if not (folder / CONFIG).is_file() or not r.is_adapter:
            continue  # a hub id or a .gguf: the backend selects the layers once it is resolved
        problem = layers_problem(folder, read_config(folder), r.method.layers)
        if problem:
            problems.append(f"{path}: {problem}")
    if problems:
        raise RecipeError(problems)
    return stages


@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Print the traceback of an error (also: FTKIT_DEBUG=1).")] = False,
) -> None:
    import os

    _debug["on"] = debug or os.environ.get("FTKIT_DEBUG", "").strip().lower() not in ("", "0", "false", "no")
    if version:
        typer.echo(f"ftkit {__version__}")
        raise typer.Exit()


@app.command()
@_errors
def train(
    recipes: Annotated[list[Path], typer.Argument(help="Recipe file(s). Several run as stages, each from the adapter the one before produced.")],
    backend: BackendOpt = "auto",
    resume: Annotated[Optional[str], typer.Option(help="'auto': continue from the newest complete checkpoint in the run folder (a no-op for a fresh folder); or a checkpoint/run folder.")] = None,
    set_: SetOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate, read the data, print the schedule's step counts; load no model.")] = False,
    stop_after: Annotated[Optional[int], typer.Option("--stop-after", min=0, help="Stop after this step with a checkpoint (a time-limited job slot); --resume auto goes on from it.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Train: LoRA, DoRA, soft prompt or full fine-tuning, as the recipe says."""
    stages = _recipes(recipes, set_)
    from ftkit.train.tracking import require

    require(stages)  # a tracker in log.report_to that is not installed: said before any data or model is read
    if dry_run:
        from ftkit.data.batching import step_note
        from ftkit.train.prepare import prepare
        from ftkit.train.stages import stage_dirs

        plans = []
        for recipe, run_dir in zip(stages, stage_dirs(stages)):
            prep = prepare(recipe, run_dir)
            note = step_note(len(prep.splits.train), recipe.train.batch_size, recipe.train.grad_accum, prep.world.size)
            if note:
                from ftkit.common.console import console

                console().print(f"[yellow]warning:[/] {recipe.name}: {note}", highlight=False)
            plans.append({"stage": recipe.name, "run_dir": str(run_dir), "format": prep.splits.format,
                          "train_on": prep.splits.train_on, "examples": {k: len(getattr(prep.splits, k)) for k in ("train", "valid", "test")},
                          **prep.schedule.as_dict()})
        if as_json:
            _emit({"dry_run": True, "stages": plans})
        else:
            _print_plans(plans)
        return
    from ftkit.train.stages import run_stages

    results = run_stages(stages, backend, resume=resume, quiet=as_json, stop_after=stop_after)
    from ftkit.common.distributed import current

    if not current().is_main:
        return  # the first process reports for the run
    last = results[-1]
    if as_json:
        _emit({"adapter": str(last.adapter), "run_dir": str(last.run_dir), "backend": last.backend,
               "first_valid_loss": results[0].first_valid_loss, "last_valid_loss": last.last_valid_loss,
               "last_train_loss": last.last_train_loss, "steps": last.steps, "stages": [r.as_dict() for r in results]})
        return
    from ftkit.common.console import console

    for r in results:
        first = f"{r.first_valid_loss:.4f}" if r.first_valid_loss is not None else "-"
        lastv = f"{r.last_valid_loss:.4f}" if r.last_valid_loss is not None else "-"
        if r.steps < r.total_steps:
            ckpt = r.run_dir / "checkpoints"
            console().print(f"[yellow]stopped[/] {r.name} after step {r.steps} of {r.total_steps}; checkpoint in {ckpt}: "
                            "run again with --resume auto to go on")
        else:
            console().print(f"[green]done[/] {r.name}: {r.steps} steps in {r.seconds:.0f} s, validation loss {first} -> {lastv}; adapter: {r.adapter}")


@app.command()
@_errors
def launch(
    recipes: Annotated[list[Path], typer.Argument(help="Recipe file(s), as for `ftkit train`.")],
    nproc_per_node: Annotated[int, typer.Option("--nproc-per-node", min=1, help="Processes on this node: one per GPU.")] = 1,
    nnodes: Annotated[int, typer.Option("--nnodes", min=1, help="Nodes (machines) in the job.")] = 1,
    node_rank: Annotated[int, typer.Option("--node-rank", min=0, help="This node's index, 0 .. nnodes-1; node 0 hosts the rendezvous.")] = 0,
    main_address: Annotated[str, typer.Option("--main-address", help="Address of node 0, reachable from every node.")] = "127.0.0.1",
    main_port: Annotated[int, typer.Option("--main-port", help="Free TCP port on node 0.")] = 29500,
    resume: Annotated[Optional[str], typer.Option(help="As for `ftkit train`: 'auto' continues from the newest complete checkpoint.")] = None,
    backend: Annotated[str, typer.Option("--backend", "-b", help="torch: the one backend that runs several processes.")] = "torch",
    set_: SetOpt = None,
    stop_after: Annotated[Optional[int], typer.Option("--stop-after", min=0, help="As for `ftkit train`: stop after this step with a checkpoint.")] = None,
    print_command: Annotated[bool, typer.Option("--print-command", help="Print the `accelerate launch` line and exit.")] = False,
) -> None:
    """Train on several GPUs or nodes (torch backend): `accelerate launch` runs `ftkit train` in every process.

    The recipe's torch.distributed says how: 'ddp' (a full copy of the model per GPU) or 'fsdp' (each GPU holds a shard of every decoder layer). Run the same command on every node, each with its own --node-rank; output.dir must be on storage all nodes share. SIGTERM, SIGINT or SIGUSR1 reach every worker: they checkpoint the same step and launch exits 75, as train does.
    """
    import shlex
    import tempfile

    from ftkit.common.distributed import launch_command
    from ftkit.train.interrupt import run_forwarding

    if backend not in ("torch", "auto"):
        raise FtkitError(f"--backend {backend}: ftkit launch runs the torch backend; MLX trains in one process (ftkit train).")
    if node_rank >= nnodes:
        raise FtkitError(f"--node-rank {node_rank} is out of range for --nnodes {nnodes} (0 .. {nnodes - 1}).")
    stages = _recipes(recipes, set_)
    total = nproc_per_node * nnodes
    for recipe in stages:
        if total > 1 and recipe.torch.distributed == "none":
            raise FtkitError(f"{recipe.name}: torch.distributed = 'none' cannot use {total} processes; set torch.distributed = "
                             "'ddp' or 'fsdp' in the recipe, or pass --set torch.distributed=fsdp.")
    train_args = [str(r.resolve()) for r in recipes] + ["--backend", "torch"]
    train_args += ["--resume", resume] if resume else []
    train_args += ["--stop-after", str(stop_after)] if stop_after is not None else []
    for item in set_ or []:
        train_args += ["--set", item]
    cmd = launch_command(train_args, nproc_per_node=nproc_per_node, nnodes=nnodes, node_rank=node_rank,
                         main_address=main_address, main_port=main_port)
    line = shlex.join(cmd)
    if print_command:
        sys.stdout.write(line + "\n")
        return
    from ftkit.common.console import console

    console().print(f"[dim]{line}[/]")
    with tempfile.TemporaryDirectory(prefix="ftkit-launch-") as tmp:  # where a worker stopped by a signal says so
        raise typer.Exit(run_forwarding(cmd, Path(tmp) / "status"))


def _print_plans(plans: list[dict[str, Any]]) -> None:
    from rich.table import Table

    from ftkit.common.console import console

    for p in plans:
        t = Table(title=f"{p['stage']}  ->  {p['run_dir']}", show_header=False)
        for k, v in p.items():
            if k not in ("stage", "run_dir"):
                t.add_row(k, str(v if v is not None else "all"))
        console().print(t)


@app.command("eval")
@_errors
def eval_(
    recipe: Annotated[Path, typer.Argument(help="The recipe whose data (its eval.split, test by default) to evaluate on, with its \\[eval] task metrics.")],
    adapter: Annotated[Optional[Path], typer.Option(help="Adapter folder (or a full fine-tune's model folder). Without it: the base model.")] = None,
    split: Annotated[Optional[str], typer.Option(help="test | valid | train (default: the recipe's eval.split, test).")] = None,
    compare: Annotated[Optional[bool], typer.Option("--compare/--no-compare", help="Also evaluate the base model, for a before/after table (default: on with --adapter when the recipe has \\[eval] tasks).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Where to save the JSON result (default: <run folder>/eval-<split>.json, when there are tasks or a comparison).")] = None,
    backend: BackendOpt = "auto",
    set_: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Loss, perplexity and the recipe's \\[eval] task metrics (accuracy, macro-F1, exact match ...), base vs adapter; on preference data, preference accuracy (chosen above rejected)."""
    from ftkit.evaluate.evaluation import evaluate_recipe

    if split not in (None, "test", "valid", "train"):
        raise FtkitError(f"--split {split}: choose test, valid or train.")
    (r,) = _recipes([recipe], set_)
    result = evaluate_recipe(r, backend, adapter, split, compare, out)
    if as_json:
        _emit(result)
        return
    from ftkit.common.console import console

    if result.get("before") is None and not result["tasks"] and "preference_accuracy" not in result:
        console().print(f"{result['split']}: loss {result['loss']:.4f}, perplexity {result['perplexity']:.3f} "
                        f"({result['examples']} examples, {result['target_tokens']} target tokens, {result['backend']})")
        return
    _print_eval(result)


def _print_eval(result: dict[str, Any]) -> None:
    from rich.table import Table

    from ftkit.common.console import console
    from ftkit.evaluate.evaluation import comparison_rows

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    compared = result.get("before") is not None
    t = Table(title=f"{result['split']} split, {result['examples']} examples ({result['backend']})")
    t.add_column("metric")
    if compared:
        t.add_column("base", justify="right")
    t.add_column("adapter" if result.get("adapter") else "base", justify="right")
    if compared:
        t.add_column("change", justify="right")
    for name, before, after in comparison_rows(result):
        change = f"{after - before:+.4f}" if isinstance(before, (int, float)) and isinstance(after, (int, float)) else "-"
        t.add_row(name, *([cell(before)] if compared else []), cell(after), *([change] if compared else []))
    console().print(t)
    for name, m in result["tasks"].items():
        if m.get("top_confusions"):
            pairs = ", ".join(f"{c['gold']} -> {c['predicted']} ({c['count']})" for c in m["top_confusions"])
            console().print(f"{name}: top confusions: {pairs}", highlight=False)
    if result.get("saved"):
        console().print(f"saved: {result['saved']}")


@app.command()
@_errors
def generate(
    model: Annotated[str, typer.Option(help="Base model: local folder, .gguf file, or hub id.")],
    prompt: Annotated[Optional[str], typer.Option(help="The prompt (or build one with --loom).")] = None,
    adapter: Annotated[Optional[Path], typer.Option(help="Adapter folder (or a full fine-tune's model folder).")] = None,
    format_: Annotated[str, typer.Option("--format", "-f", help="Prompt format: none (the text as it is) | auto (the tokenizer's chat template) | chatml | llama3 | mistral | alpaca | phi | gemma. Use the recipe's data.chat_format to match training.")] = "none",
    chat: Annotated[bool, typer.Option(help="Same as --format auto.")] = False,
    system: Annotated[Optional[str], typer.Option(help="System prompt (a chat format's system turn; with --format none, text before the prompt).")] = None,
    loom: Annotated[Optional[Path], typer.Option(help="Build the prompt from a word loom TOML file (OgbujiPT's format).")] = None,
    sections: Annotated[Optional[str], typer.Option("--sections", "--build-prompt", help='With --loom: "question", "system question" or "system context question" section names; a name written \\[file.txt] takes that file.')] = None,
    marker: Annotated[Optional[list[str]], typer.Option("--marker", "-m", help="Fill a {marker} in the loom: NAME=VALUE, NAME=[VALUE] or NAME=@FILE (repeatable).")] = None,
    markers: Annotated[Optional[list[Path]], typer.Option("--markers", help="A TOML or JSON file of marker values (repeatable; --marker wins).")] = None,
    max_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 128,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass (1 = off).")] = 1.0,
    min_p: Annotated[float, typer.Option(help="Drop tokens below this fraction of the likeliest one's probability (0 = off).")] = 0.0,
    top_k: Annotated[int, typer.Option(help="Sample among the k likeliest (0 = off).")] = 0,
    repetition_penalty: Annotated[float, typer.Option(help="Penalise tokens seen in the last --repetition-context-size tokens (1 = off; 1.1-1.3 typical).")] = 1.0,
    repetition_context_size: Annotated[int, typer.Option(help="How many recent tokens (prompt included) the repetition penalty looks at.")] = 20,
    stop: Annotated[Optional[list[str]], typer.Option(help="Stop when the text contains this string, which is not printed (repeatable; the format's end of turn is one already).")] = None,
    seed: Annotated[int, typer.Option(help="Sampling seed: same seed, same output.")] = 0,
    colorize: Annotated[bool, typer.Option("--colorize/--no-colorize", help="Colour each generated token by the model's probability of it (a legend on stderr gives the bands).")] = False,
    backend: BackendOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Generate from a base model, optionally with an adapter: sampling options, prompt formats, word loom prompts, streaming."""
    from ftkit.data import chat_formats
    from ftkit.data import loom as looms
    from ftkit.evaluate.generate import (
        Sampling,
        band_style,
        complete,
        legend,
        prompt_ids,
    )
    from ftkit.evaluate.inference import open_model

    fmt = "auto" if chat and format_ == "none" else format_
    if fmt not in ("none", *chat_formats.NAMES):
        raise FtkitError(f"--format {fmt}: choose none, {', '.join(chat_formats.NAMES)}.")
    if (prompt is None) == (loom is None):
        raise FtkitError("give the prompt with --prompt, or build it with --loom (one of the two).")
    if prompt is not None and not prompt.strip():
        raise FtkitError("--prompt is empty: give the text to continue (or build a prompt with --loom).")
    if max_tokens < 1:
        raise FtkitError(f"--max-tokens {max_tokens}: must be >= 1 (the most tokens to generate).")
    sampling = Sampling(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, min_p=min_p,
                        repetition_penalty=repetition_penalty, repetition_context_size=repetition_context_size).check()
    messages = None
    if loom is not None:
        built = looms.build(looms.load(loom), sections, looms.parse_marker_args(marker, markers))
        messages = built.messages()
    elif marker or markers:
        prompt = looms.fill(prompt, looms.parse_marker_args(marker, markers), "--prompt")
    be, tok, _ = open_model(model, backend, adapter)
    ids = prompt_ids(tok, fmt, prompt, messages, system)
    stops = list(stop or []) + chat_formats.stop_strings(fmt, tok)
    missing = chat_formats.missing_tokens(fmt, tok)
    if missing and not as_json:
        from ftkit.common.console import console

        console().print(f"[yellow]note:[/] this tokenizer has no {', '.join(missing)} token: the {fmt} format writes "
                        "them as ordinary text (fine if the adapter was trained so; else the model has not seen them).", highlight=False)
    if colorize and not as_json:
        from ftkit.common.console import console

        console().print(legend())
    out_console = None
    if colorize and not as_json:
        from rich.console import Console

        out_console = Console(file=sys.stdout, force_terminal=True, highlight=False)

    def show(parts: list[tuple[str, float]]) -> None:
        for piece, prob in parts:
            if out_console is not None:
                from rich.text import Text

                out_console.print(Text(piece, style=band_style(prob)), end="")
            else:
                sys.stdout.write(piece)
        sys.stdout.flush()

    result = complete(be, tok, ids, max_tokens, sampling, stops, on_text=None if as_json else show)
    if as_json:
        out = {"text": result.text, "tokens": result.tokens, "prompt_tokens": len(ids), "finish": result.finish,
               "format": fmt, "backend": be.name}
        if colorize:
            out["probabilities"] = result.probs
        _emit(out)
    else:
        sys.stdout.write("\n")


@app.command()
@_errors
def info(as_json: JsonOpt = False) -> None:
    """The detected hardware, the installed backends, and which one `auto` picks and why."""
    from ftkit.backend.hardware import detect, render
    from ftkit.common.console import console

    data = detect()
    if as_json:
        _emit(data)
    else:
        console().print(render(data))


@app.command()
@_errors
def convert(
    src: Annotated[Path, typer.Argument(help="A .gguf file (llama.cpp, Ollama), a llama2.c .bin checkpoint, or (with --quantize) a model folder.")],
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default: ftkit's cache, ~/.cache/ftkit/...).")] = None,
    dtype: Annotated[str, typer.Option(help="auto | bfloat16 | float16 | float32. auto: bfloat16 for GGUF, float32 for llama2.c.")] = "auto",
    quantize: Annotated[Optional[int], typer.Option(help="Then quantize to this many bits in MLX's format (4 or 8 for QLoRA on the MLX backend).")] = None,
    group_size: Annotated[int, typer.Option(help="With --quantize: weights per quantization scale.")] = 64,
    force: Annotated[bool, typer.Option(help="Convert again even when a finished conversion is cached.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Turn a GGUF (or llama2.c) model into a Hugging Face folder both backends load, or quantize a model folder for MLX; cached."""
    from ftkit.common.console import console
    from ftkit.models.convert import convert as do_convert
    from ftkit.ops.quantize import quantize_mlx

    note = None if as_json else console().print
    if src.is_dir():
        if quantize is None:
            raise FtkitError(f"{src} is a model folder already; to quantize it for MLX pass --quantize 4 (or 8).")
        folder = quantize_mlx(src, out, quantize, group_size, force)
    elif quantize is None:
        folder = do_convert(src, out, dtype=dtype, force=force, progress=note)
    else:
        folder = quantize_mlx(do_convert(src, None, dtype=dtype, force=force, progress=note), out, quantize, group_size, force)
    if as_json:
        _emit({"model": str(folder), "quantized": {"bits": quantize, "group_size": group_size} if quantize else None})
    else:
        console().print(f"{'quantized' if quantize else 'converted'}: {folder}")


@app.command()
@_errors
def fuse(
    adapter: Annotated[Path, typer.Option(help="Adapter folder (ftkit, PEFT or mlx_lm).")],
    out: Annotated[Path, typer.Option(help="Folder to write the merged model to.")],
    model: Annotated[Optional[str], typer.Option(help="Base model (default: the one the adapter records).")] = None,
    dequantize: Annotated[bool, typer.Option(help="Write full-precision weights when the base is quantized.")] = False,
    force: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
    backend: BackendOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Merge a LoRA/DoRA adapter into its base and write a plain Hugging Face model folder."""
    from ftkit.evaluate.evaluation import writable
    from ftkit.ops.fuse import fuse as do_fuse

    writable(out, "--out")
    result = do_fuse(adapter, out, model=model, backend_name=backend, dequantize=dequantize, force=force)
    if as_json:
        _emit(result)
    else:
        from ftkit.common.console import console

        console().print(f"fused ({result['backend']}): {result['model']}")


@data_app.command("summary")
@_errors
def data_summary(
    recipe: Annotated[Path, typer.Argument(help="Recipe file.")],
    set_: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Examples per split, token-length percentiles, and how many would be truncated."""
    from ftkit.data.stats import summarize
    from ftkit.data.token_cache import load_splits
    from ftkit.models.tokenizer import load_tokenizer

    (r,) = _recipes([recipe], set_)
    from ftkit.models.resolve import resolve_model

    tok = load_tokenizer(resolve_model(r.model.path, r.model.revision), r.model.trust_remote_code)
    splits = load_splits(r.data, tok)
    summary = summarize(splits, r.data.max_seq_length)
    out = {"format": splits.format, "train_on": splits.train_on, "max_seq_length": r.data.max_seq_length, "splits": summary}
    if as_json:
        _emit(out)
        return
    from rich.table import Table

    from ftkit.common.console import console

    t = Table(title=f"{r.data.path}  ({splits.format}, loss on {splits.train_on}, max_seq_length {r.data.max_seq_length})")
    order = ["count", "truncated", "dropped", "p50", "p90", "p99", "max", "tokens", "target_tokens"]
    present = {k for v in summary.values() if isinstance(v, dict) for k in v}
    cols = [c for c in order if c in present] + sorted(present - set(order))
    t.add_column("split")
    for c in cols:
        t.add_column(c, justify="right")
    for name, row in summary.items():
        if isinstance(row, dict):
            t.add_row(name, *[str(row.get(c, "")) for c in cols])
    console().print(t)


@recipe_app.command("defaults")
@_errors
def recipe_defaults(as_json: JsonOpt = False) -> None:
    """Every recipe key with its default and meaning."""
    from ftkit.recipe.load import defaults_table

    rows = defaults_table()
    if as_json:
        _emit({key: {"default": d, "help": h} for key, d, h in rows})
        return
    from rich.table import Table

    from ftkit.common.console import console

    t = Table("key", "default", "meaning")
    for row in rows:
        t.add_row(*row)
    console().print(t)


@recipe_app.command("check")
@_errors
def recipe_check(
    recipes: Annotated[list[Path], typer.Argument(help="Recipe file(s).")],
    set_: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Validate recipe files (keys, types, paths, combinations) and print the resolved recipe."""
    stages = _recipes(recipes, set_)
    if as_json:
        _emit({"ok": True, "stages": [r.to_toml_dict() for r in stages]})
    else:
        for r in stages:
            sys.stdout.write(f"# {r.name}\n{r.to_toml()}\n")


@app.command()
@_errors
def sweep(
    sweep_file: Annotated[Path, typer.Argument(help="A sweep TOML: [sweep] (method, metric, parameters, paired ...) and a base recipe (sweep.recipe, or its sections in the same file).")],
    resume: Annotated[bool, typer.Option("--resume", help="Skip the trials that finished; run the rest (an interrupted trial continues from its checkpoint).")] = False,
    parallel: Annotated[Optional[int], typer.Option("--parallel", min=1, help="Trials at a time (default: sweep.parallel); with GPUs each trial is pinned to one.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Sweep folder (default: sweep.output_dir, else runs/<sweep file name>).")] = None,
    backend: Annotated[Optional[str], typer.Option("--backend", "-b", help="auto | torch | mlx (default: sweep.backend, else auto).")] = None,
    wandb_agent: Annotated[Optional[str], typer.Option("--wandb-agent", help="Run a W&B sweep's agent (SWEEP_ID, or entity/project/SWEEP_ID) with ftkit as its function: W&B picks the values.")] = None,
    count: Annotated[Optional[int], typer.Option("--count", min=1, help="With --wandb-agent: trials this agent runs.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Run a base recipe over a search space (grid, random, paired values), one run folder per trial, and rank the trials."""
    from ftkit.common.console import console
    from ftkit.ops import sweep as sweeps

    spec = sweeps.load_sweep(sweep_file, {"parallel": parallel, "output_dir": str(out.resolve()) if out else None, "backend": backend},
                            need_space=not wandb_agent)
    if wandb_agent:
        import importlib.util

        from ftkit.train.tracking import PACKAGES

        if importlib.util.find_spec("wandb") is None:
            raise FtkitError(f"--wandb-agent needs the wandb package: {PACKAGES['wandb'][1]}")
        sweeps.run_wandb_agent(spec, wandb_agent, count)
        return
    say = (lambda _m: None) if as_json else (lambda m: console().print(m, highlight=False))
    ranked = sweeps.run(spec, resume=resume, say=say)
    if as_json:
        _emit(json.loads((spec.output_dir / sweeps.RESULTS_JSON).read_text()))
        return
    console().print(sweeps.results_table(spec, ranked))
    console().print(f"results: {spec.output_dir / sweeps.RESULTS_CSV}")
    if any(t.status != "done" for t in ranked):
        raise typer.Exit(1)


@app.command()
@_errors
def export(
    src: Annotated[Path, typer.Argument(help="An adapter folder (ftkit, PEFT or mlx_lm; or a hub id), or with --merged also a fused model folder.")],
    format: Annotated[str, typer.Option("--format", help="gguf: for llama.cpp and Ollama. mlx: mlx-lm's adapter folder (mlx_lm.generate --adapter-path, mlx_lm.server, LM Studio).")] = "gguf",
    merged: Annotated[bool, typer.Option("--merged", help="Write the fused model (the adapter merged into its base) instead of the adapter (gguf only).")] = False,
    outtype: Annotated[Optional[str], typer.Option("--outtype", help="gguf: f32 | f16 | bf16 | q8_0. Default: f32 for an adapter, f16 for --merged. mlx: f32.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="The .gguf file, or the mlx-lm adapter folder (default: beside the adapter, named after the run).")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="The base model (default: the one the adapter records).")] = None,
    backend: BackendOpt = "auto",
    force: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Write an adapter as a GGUF LoRA (llama.cpp --lora, Ollama ADAPTER), or with --merged the fused model as GGUF;
    with --format mlx as mlx-lm's adapter folder (adapters.safetensors + adapter_config.json)."""
    from ftkit.ops import export_gguf

    if format not in ("gguf", "mlx"):
        raise FtkitError(f"--format {format}: ftkit exports gguf and mlx (for safetensors, the adapter folder is PEFT's format already; `ftkit fuse` writes a fused model folder).")
    if format == "mlx" and merged:
        raise FtkitError("--merged is for --format gguf; for mlx-lm, `ftkit fuse ADAPTER --out DIR` writes the fused model folder, which mlx-lm loads as a model (mlx_lm.generate --model DIR).")
    if format == "mlx" and outtype not in (None, "f32"):
        raise FtkitError(f"--outtype {outtype} is for --format gguf; an mlx-lm adapter is written in f32.")
    if out is not None:
        from ftkit.evaluate.evaluation import writable

        writable(out, "--out")
    if format == "mlx":
        from ftkit.ops.export_mlx import export_mlx

        result = export_mlx(src, out, model=model, force=force)
        if as_json:
            _emit(result)
            return
        from ftkit.common.console import console

        where = "by full module path" if result["full_paths"] else f"in the last {result['num_layers']} blocks"
        console().print(f"wrote {result['mlx']} (mlx-lm {result['fine_tune_type']}, {result['modules']} modules {where}, "
                        f"rank {result['rank']}, scale {result['scale']:g})")
        console().print(f"  mlx-lm: mlx_lm.generate --model {result['base_model'] or 'BASE'} --adapter-path {result['mlx']}")
        return
    if merged:
        result = export_gguf.export_merged(src, out, model=model, outtype=outtype or "f16", backend=backend, force=force)
    else:
        result = export_gguf.export_lora(src, out, model=model, outtype=outtype or "f32", force=force)
    if as_json:
        _emit(result)
        return
    from ftkit.common.console import console

    what = "fused model" if merged else f"LoRA, {result['modules']} modules, rank {result['rank']}, alpha {result['alpha']:g}"
    console().print(f"wrote {result['gguf']} ({result['bytes'] / 2**20:.2f} MiB, {result['outtype']}, {what})")
    if not merged:
        console().print(f"  llama.cpp: llama-cli -m BASE.gguf --lora {result['gguf']}   Ollama: ADAPTER {result['gguf']} in the Modelfile")


@app.command()
@_errors
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run folder (a recipe's output.dir): metrics.jsonl, recipe.toml ...")],
    out: Annotated[Optional[Path], typer.Option("--out", help="The HTML file (default: RUN_DIR/report.html).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Write one self-contained HTML page about a run: loss curves, learning rate, eval metrics, recipe, hardware, timings."""
    from ftkit.ops.report import write

    if out is not None:
        from ftkit.evaluate.evaluation import writable

        writable(out, "--out")
    page = write(run_dir, out)
    if as_json:
        _emit({"report": str(page), "bytes": page.stat().st_size})
    else:
        from ftkit.common.console import console

        console().print(f"report: {page}  (open it in a browser; it loads nothing from the network)")


@app.command()
@_errors
def push(
    src: Annotated[Path, typer.Argument(help="An adapter folder, a fused model folder, or a run folder (its adapter/ is pushed).")],
    repo: Annotated[str, typer.Option("--repo", help="The hub repository, user/name or org/name (created if missing).")],
    private: Annotated[bool, typer.Option("--private", help="Create the repository private.")] = False,
    base_model: Annotated[Optional[str], typer.Option("--base-model", help="The base model's hub id, for the card and the uploaded configs (default: the one recorded, if it is a hub id).")] = None,
    message: Annotated[Optional[str], typer.Option("--message", "-m", help="Commit message.")] = None,
    revision: Annotated[Optional[str], typer.Option("--revision", help="Branch to commit to (default: main).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Upload an adapter (or a fused model) to the Hugging Face hub with a generated model card. The token: HF_TOKEN or `hf auth login`."""
    from ftkit.ops.publish import push as do_push

    result = do_push(src, repo, private=private, base_model=base_model, message=message, revision=revision)
    if as_json:
        _emit(result)
    else:
        from ftkit.common.console import console

        console().print(f"pushed {len(result['files'])} files to {repo}{' (private)' if private else ''}: {result['url']}")
        if not result["base_model"]:
            console().print("[yellow]note:[/] the base model is a local path; pass --base-model ORG/NAME so that others can load the adapter")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
