"""`ftkit convert --quantize` reaches the MLX backend through the contract, and the CLI's one error decorator."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import pytest
import typer
from typer.testing import CliRunner

from ftkit.common.errors import FtkitError


class RecordingBackend:
    """Stands in for the MLX backend: records the call and writes a quantized config."""

    def __init__(self) -> None:
        self.calls: list[tuple[Path, Path, int, int]] = []

    def quantize_folder(self, src: Path, dest: Path, bits: int, group_size: int) -> None:
        self.calls.append((src, dest, bits, group_size))
        (dest / "config.json").write_text(json.dumps({"quantization": {"bits": bits, "group_size": group_size}}))


def test_quantize_mlx_calls_the_backend_contract(tmp_path, monkeypatch):
    from ftkit.ops import quantize

    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text("{}")
    backend, asked = RecordingBackend(), []
    monkeypatch.setattr(quantize, "installed", lambda name: True)
    monkeypatch.setattr(quantize, "get_backend", lambda name: asked.append(name) or backend)
    dest = quantize.quantize_mlx(src, tmp_path / "q4", bits=4, group_size=32)
    assert asked == ["mlx"] and dest == (tmp_path / "q4").resolve()
    ((called_src, _, bits, group_size),) = backend.calls
    assert (called_src, bits, group_size) == (src, 4, 32)
    assert json.loads((dest / "config.json").read_text())["quantization"] == {"bits": 4, "group_size": 32}
    # the same bits and group size again: the cached folder, the backend not asked
    assert quantize.quantize_mlx(src, tmp_path / "q4", bits=4, group_size=32) == dest and len(backend.calls) == 1


def test_torch_backend_refuses_to_write_a_quantized_folder(tmp_path):
    pytest.importorskip("torch")
    from ftkit.backend.registry import get_backend

    with pytest.raises(FtkitError, match='model.quantize = "nf4", "fp4" or "int8".*needs the MLX backend'):
        get_backend("torch").quantize_folder(tmp_path, tmp_path / "q", 4, 64)


def _app() -> typer.Typer:
    from ftkit.cli import _errors

    app = typer.Typer()

    @app.command()
    @_errors
    def fail(code: Annotated[int, typer.Option(help="exit with this code instead")] = -1,
             as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
        if code >= 0:
            raise typer.Exit(code)
        raise FtkitError("x.toml: bad key [model]; fix it.")

    @app.command()
    @_errors
    def plain() -> None:
        raise FtkitError("no --json here")

    return app


def test_error_decorator_reports_json_text_and_passes_exit_through():
    app, runner = _app(), CliRunner()
    out = runner.invoke(app, ["fail", "--json"])
    assert out.exit_code == 2 and json.loads(out.stdout) == {"error": "x.toml: bad key [model]; fix it."}
    out = runner.invoke(app, ["fail"])
    assert out.exit_code == 2 and out.stdout == "" and "error: x.toml: bad key [model]; fix it." in out.stderr
    out = runner.invoke(app, ["plain"])
    assert out.exit_code == 2 and "error: no --json here" in out.stderr
    assert runner.invoke(app, ["fail", "--code", "3"]).exit_code == 3
    assert "--code" in runner.invoke(app, ["fail", "--help"]).stdout
