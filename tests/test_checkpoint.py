import json

from ftkit.common.atomic import atomic_dir, write_json_atomic
from ftkit.train import checkpoint as ckpt


def make_complete(run, step):
    with atomic_dir(ckpt.checkpoint_dir(run, step)) as tmp:
        (tmp / "adapter").mkdir()
        write_json_atomic(tmp / ckpt.STATE_FILE, {"step": step})


def test_latest_complete_checkpoint_ignores_partial_writes(tmp_path):
    run = tmp_path / "run"
    make_complete(run, 10)
    make_complete(run, 20)
    # a crash mid-write leaves a temporary folder, and a folder without its state file
    partial = run / "checkpoints" / ".step-000030.tmp-999"
    partial.mkdir()
    (partial / ckpt.STATE_FILE).write_text(json.dumps({"step": 30}))
    (run / "checkpoints" / "step-000040").mkdir()
    assert ckpt.latest_checkpoint(run).name == "step-000020"
    assert ckpt.read_state(ckpt.latest_checkpoint(run)) == {"step": 20}
    removed = ckpt.clean_partial(run)
    assert partial in removed and not partial.exists()


def test_atomic_dir_failure_keeps_the_old_folder(tmp_path):
    dest = tmp_path / "adapter"
    with atomic_dir(dest) as tmp:
        (tmp / "v").write_text("1")
    try:
        with atomic_dir(dest) as tmp:
            (tmp / "v").write_text("2")
            raise RuntimeError("killed mid-write")
    except RuntimeError:
        pass
    assert (dest / "v").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
    with atomic_dir(dest) as tmp:
        (tmp / "v").write_text("3")
    assert (dest / "v").read_text() == "3"


def test_prune_keeps_the_newest(tmp_path):
    for s in (1, 2, 3, 4):
        make_complete(tmp_path, s)
    ckpt.prune(tmp_path, 2)
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step-000003", "step-000004"]
