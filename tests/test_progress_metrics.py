from __future__ import annotations

import io
import json

from rich.console import Console

from ftkit.common.console import console, status
from ftkit.train.metrics import MetricsLog, plot_losses
from ftkit.train.progress import TrainProgress

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write(run_dir, train_steps=(), valid_steps=()):
    with MetricsLog(run_dir) as log:
        for s in train_steps:
            log.log({"step": s, "kind": "train", "loss": 3.0 / s, "lr": 1e-4, "tokens_per_sec": 900.0})
        for s in valid_steps:
            log.log({"step": s, "kind": "valid", "loss": 2.5 / s})
    return log.path


def test_metrics_write_read(tmp_path):
    path = _write(tmp_path, train_steps=[1, 2, 3], valid_steps=[3])
    assert path == tmp_path / "metrics.jsonl"
    lines = path.read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(line) for line in lines)
    records = MetricsLog.read(path)
    assert [r["step"] for r in records] == [1, 2, 3, 3]
    assert records[0]["kind"] == "train" and records[0]["lr"] == 1e-4
    assert all(isinstance(r["time"], float) for r in records)


def test_metrics_flush_each_line_and_skip_partial_line(tmp_path):
    log = MetricsLog(tmp_path)
    log.log({"step": 1, "kind": "train", "loss": 1.0})
    assert len(MetricsLog.read(log.path)) == 1  # visible before close
    log.close()
    with open(log.path, "a") as f:
        f.write('{"step": 2, "kind": "tra')  # a crash mid-write
    assert [r["step"] for r in MetricsLog.read(log.path)] == [1]


def test_metrics_truncate_after_then_append(tmp_path):
    path = _write(tmp_path, train_steps=[1, 2, 3, 4, 5], valid_steps=[2, 4])
    log = MetricsLog(tmp_path)
    log.truncate_after(2)
    assert [(r["step"], r["kind"]) for r in MetricsLog.read(path)] == [(1, "train"), (2, "train"), (2, "valid")]
    log.log({"step": 3, "kind": "train", "loss": 0.5})
    log.close()
    assert [r["step"] for r in MetricsLog.read(path)] == [1, 2, 2, 3]
    assert not list(tmp_path.glob("*.tmp"))


def test_metrics_truncate_without_file(tmp_path):
    MetricsLog(tmp_path).truncate_after(10)
    assert not (tmp_path / "metrics.jsonl").exists()


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000


def test_plot_train_and_valid(tmp_path):
    path = _write(tmp_path, train_steps=range(1, 21), valid_steps=[5, 10, 20])
    out = plot_losses(path, tmp_path / "plots" / "loss.png", title="tiny run")
    assert out == tmp_path / "plots" / "loss.png"
    _assert_png(out)
    assert [p.name for p in out.parent.iterdir()] == ["loss.png"]  # no temp file left


def test_plot_only_train_or_only_valid(tmp_path):
    _assert_png(plot_losses(_write(tmp_path / "a", train_steps=[1, 2, 3]), tmp_path / "a.png"))
    _assert_png(plot_losses(_write(tmp_path / "b", valid_steps=[1, 2]), tmp_path / "b.png"))


def test_plot_nothing(tmp_path):
    path = _write(tmp_path)  # opens nothing, writes nothing
    assert plot_losses(path, tmp_path / "loss.png") is None
    with MetricsLog(tmp_path) as log:
        log.log({"step": 1, "kind": "test", "loss": 1.0})
    assert plot_losses(log.path, tmp_path / "loss.png") is None
    assert not (tmp_path / "loss.png").exists()


def _console():
    return Console(file=io.StringIO(), force_terminal=True, width=160, record=True)


def test_train_progress_renders_fields():
    con = _console()
    with TrainProgress(10, description="lora", console=con) as bar:
        for step in range(1, 6):
            bar.update(step, loss=2.0 / step, lr=2e-4, tokens_per_sec=1234.0)
        bar.update(6)  # only the step: the other fields keep their values
        bar.log("saved checkpoint at step 5")
    text = con.export_text()
    assert "saved checkpoint at step 5" in text
    assert "loss 0.4000" in text and "lr 2.00e-04" in text and "1.2k tok/s" in text
    assert "6/10" in text


def test_train_progress_shows_mfu_or_flops():
    con = _console()
    with TrainProgress(10, console=con) as bar:
        bar.update(1, loss=1.0, tokens_per_sec=900.0, mfu=0.4234, flops_per_sec=4.2e11)
    assert "MFU 42.3%" in con.export_text()
    con = _console()
    with TrainProgress(10, console=con) as bar:  # no known peak: the achieved rate instead
        bar.update(1, loss=1.0, tokens_per_sec=900.0, flops_per_sec=3.25e10)
        bar.update(2, loss=1.0, tokens_per_sec=900.0)  # a record without FLOPs keeps the field as it was
    assert "32.5 GFLOP/s" in con.export_text() and "MFU" not in con.export_text()


def test_mfu_reaches_the_trackers_and_the_report(tmp_path):
    from ftkit.ops.report import build
    from ftkit.train.tracking import numeric

    record = {"step": 2, "kind": "train", "loss": 1.0, "tokens_per_sec": 900.0, "flops_per_sec": 2e9, "mfu": 0.25}
    assert numeric(record)["train/mfu"] == 0.25 and numeric(record)["train/flops_per_sec"] == 2e9
    with MetricsLog(tmp_path) as log:
        log.log({"step": 0, "kind": "run", "backend": "torch", "device": "cpu", "peak_flops_per_sec": 8e9, "peak_source": "probe",
                 "peak_detail": "AMD EPYC CPU: best float32 GEMM rate"})
        for step, mfu in ((1, 0.2), (2, 0.25), (3, 0.3)):
            log.log({**record, "step": step, "mfu": mfu, "flops_per_sec": mfu * 8e9})
    page = build(tmp_path)
    assert 'id="plot-mfu"' in page and "median MFU" in page and "25.00%" in page
    assert "<th>mfu</th>" in page and "<th>flops_per_sec</th>" in page and "best float32 GEMM rate" in page


def test_train_progress_disabled_prints_nothing():
    # --json runs and every process but the first of a multi-process run stay silent
    con = _console()
    with TrainProgress(4, enabled=False, console=con) as bar:
        bar.update(1, loss=1.5)
        bar.log("hello")
    assert con.export_text() == ""


def test_status_and_shared_console():
    assert console() is console() and console().stderr
    con = _console()
    with status("loading model", console=con):
        pass
    with status("quiet", enabled=False):
        pass
