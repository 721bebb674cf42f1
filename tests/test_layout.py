"""The house rules that a file move could break silently: the core imports neither torch nor mlx (nor a
backend) at module level, its top level holds only packages, and no module grows into a grab bag.
The import direction itself is import-linter's contract (pyproject.toml), run by scripts/test."""

from __future__ import annotations

import subprocess
import sys

from builders import PYTHONPATH, REPO

HEAVY = ("torch", "mlx", "mlx_lm", "ftkit_torch", "ftkit_mlx", "peft", "accelerate", "bitsandbytes")


def test_every_core_module_imports_without_a_backend_or_torch():
    code = (
        "import importlib, pkgutil, sys, ftkit\n"
        "for m in pkgutil.walk_packages(ftkit.__path__, 'ftkit.'):\n"
        "    importlib.import_module(m.name)\n"
        f"print(sorted(h for h in {HEAVY!r} if h in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": PYTHONPATH, "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"imported at module level by the core: {out.stdout}"


def test_the_core_top_level_holds_packages_and_the_cli_only():
    files = sorted(p.name for p in (REPO / "ftkit").iterdir() if p.suffix == ".py")
    assert files == ["__init__.py", "cli.py"]


def test_no_core_module_is_a_grab_bag():
    # The typer app is one concern however many commands it has; everything else stays readable.
    big = {str(p.relative_to(REPO)): n for p in (REPO / "ftkit").rglob("*.py")
           if p.name != "cli.py" and (n := len(p.read_text().splitlines())) > 450}
    assert not big, f"split these by concern: {big}"
