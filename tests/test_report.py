"""ftkit report: one self-contained HTML page, rendered in headless Chromium to check the plots are there."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import pytest
from builders import PYTHONPATH, recipe_file, wikisql_slice


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Figures(HTMLParser):
    """Each <figure id=plot-*>: how many SVG paths it draws; and anything the page would fetch."""

    def __init__(self):
        super().__init__()
        self.figures, self.current, self.fetches = {}, None, []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "figure" and a.get("id", "").startswith("plot-"):
            self.current = a["id"]
            self.figures[self.current] = 0
        elif tag == "path" and self.current:
            self.figures[self.current] += 1
        if tag in ("script", "link", "img", "iframe") or "src" in a or (tag != "svg" and (a.get("href") or "").startswith("http")):
            self.fetches.append((tag, a))

    def handle_endtag(self, tag):
        if tag == "figure":
            self.current = None


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir, wikisql_dir):
    pytest.importorskip("torch")
    tmp = tmp_path_factory.mktemp("report")
    data = wikisql_slice(tmp / "data", train=48, valid=16)
    recipe = recipe_file(tmp, tiny_model_dir, data, "reported", train={"iters": 6, "steps_per_eval": 2})
    env = {**os.environ, "PYTHONPATH": PYTHONPATH, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "ftkit.cli", "train", str(recipe), "--backend", "torch", "--json"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return tmp / "run-reported"


def test_report_is_one_self_contained_page(run_dir):
    env = {**os.environ, "PYTHONPATH": PYTHONPATH}
    out = subprocess.run([sys.executable, "-m", "ftkit.cli", "report", str(run_dir), "--json"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    page = json.loads(out.stdout)["report"]
    text = open(page, encoding="utf-8").read()
    parser = Figures()
    parser.feed(text)
    assert not parser.fetches, parser.fetches  # no scripts, stylesheets, images or frames to load
    assert {"plot-loss", "plot-lr", "plot-throughput", "plot-grad-norm"} <= set(parser.figures)
    assert all(n > 20 for n in parser.figures.values()), parser.figures  # curves, axes and text drawn as paths
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last_valid = [r for r in metrics if r["kind"] == "valid"][-1]["loss"]
    assert f"{last_valid:.4f}" in text and "rank = 4" in text and "finished" in text
    assert 'id="hardware"' in text and "cores_logical" in text and 'id="timings"' in text


def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    browser = chromium()
    if browser is None:
        pytest.skip("no Chromium here (Debian: apt-get install chromium; scripts/test installs it)")
    from ftkit.ops.report import write

    page = write(run_dir, tmp_path / "report.html")
    args = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars"]
    dom = subprocess.run(args + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    parser = Figures()
    parser.feed(dom.stdout)  # the DOM Chromium built from the page
    assert {"plot-loss", "plot-lr", "plot-throughput", "plot-grad-norm"} <= set(parser.figures)
    assert all(n > 20 for n in parser.figures.values())
    shot = tmp_path / "report.png"
    done = subprocess.run(args + [f"--screenshot={shot}", "--window-size=1200,1600", page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    from PIL import Image

    img = Image.open(shot).convert("RGB")
    assert img.size == (1200, 1600)
    colours = img.resize((120, 160)).getcolors(maxcolors=1 << 16) or []
    assert len(colours) > 50  # drawn plots and text, not a blank page
    if os.environ.get("FTKIT_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["FTKIT_KEEP_SCREENSHOT"])


def test_report_of_a_folder_without_a_run_names_the_runs_inside(tmp_path):
    from ftkit.common.errors import FtkitError
    from ftkit.ops.report import write

    (tmp_path / "stage-1-pretrain").mkdir()
    (tmp_path / "stage-1-pretrain" / "metrics.jsonl").write_text("")
    with pytest.raises(FtkitError, match="stage-1-pretrain"):
        write(tmp_path)


def test_report_plots_task_metrics_nested_or_not(tmp_path):
    from ftkit.ops.report import build
    from ftkit.train.metrics import MetricsLog

    with MetricsLog(tmp_path) as log:
        log.log({"step": 0, "kind": "run", "backend": "torch", "device": "cpu", "hardware": {"cpu": "x"}})
        for s in (1, 2):
            log.log({"step": s, "kind": "train", "loss": 2.0 / s, "lr": 1e-4})
            log.log({"step": s, "kind": "valid", "loss": 1.5 / s, "accuracy": 0.4 * s, "tasks": {"sst2": {"f1": 0.3 * s}}})
    page = build(tmp_path)
    parser = Figures()
    parser.feed(page)
    assert {"plot-valid-accuracy", "plot-valid-tasks-sst2-f1"} <= set(parser.figures)
    assert "0.6000" in page and "stopped at step 2" in page  # the f1 at step 2; no final_state.json


def logged_run(run_dir):
    from ftkit.train.metrics import MetricsLog

    with MetricsLog(run_dir) as log:
        log.log({"step": 0, "kind": "run", "backend": "torch", "device": "cpu", "hardware": {"cpu": "x"}})
        log.log({"step": 1, "kind": "train", "loss": 2.0, "lr": 1e-4})
        log.log({"step": 1, "kind": "valid", "loss": 1.5})
    return run_dir


def test_report_reads_a_recipe_with_characters_outside_the_bmp(tmp_path):
    """An emoji in a template: the recipe.toml ftkit train writes (Recipe.to_toml) is read back and shown."""
    import tomllib

    from ftkit.ops.report import build
    from ftkit.recipe.schema import Recipe

    recipe = Recipe.model_validate({"name": "smile", "model": {"path": "m"},
                                    "data": {"path": "d", "prompt_template": "🙂 {question}", "text_template": "𝄞 {text}"}})
    text = recipe.to_toml()
    assert "\\ud83d" not in text.lower() and tomllib.loads(text)["data"]["prompt_template"] == "🙂 {question}"
    (logged_run(tmp_path) / "recipe.toml").write_bytes(text.encode("utf-8"))
    page = build(tmp_path)
    assert "🙂 {question}" in page and "𝄞 {text}" in page and "ftkit run: smile" in page  # the name read from the recipe


def test_report_of_a_run_with_a_broken_recipe_names_the_file(tmp_path):
    from ftkit.common.errors import FtkitError
    from ftkit.ops.report import build

    (logged_run(tmp_path) / "recipe.toml").write_text('[data]\nprompt_template = "\\ud83d\\ude42 {question}"\n')
    with pytest.raises(FtkitError, match=r"recipe\.toml: not valid TOML"):
        build(tmp_path)
