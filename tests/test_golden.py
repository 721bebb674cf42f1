"""Golden values: ten optimizer steps of every (backend, method), pinned as numbers, as torchtune keeps them.

These are golden values. Any change that moves them -- the loop, the schedule, the data order, the
loss, initialisation, a backend, a library upgrade -- fails here. A deliberate change to the numbers
updates the literals in GOLDEN in the same commit, and the commit message says why they moved. Never
loosen a tolerance to make a change pass. To print a run's values as literals to paste:

    FTKIT_PRINT_GOLDEN=1 HF_HUB_OFFLINE=1 python -m pytest -q -s tests/test_golden.py

Each case trains the config-built tiny Llama (tests/builders.py: 2 blocks, hidden 64, weights from
torch seed 0, the BPE tokenizer trained on WikiSQL) with seed 0 on completion rows made from the first
48 / 16 rows of data/wikisql (question -> SQL, loss on the SQL only), through ftkit's own path
(load_recipes -> prepare -> Trainer.run, metrics reported every step), and pins:

- the ten training losses of metrics.jsonl and the three validation losses (before, step 5, end);
- the saved adapter (the model's weights for full fine-tuning): the L1 and L2 norms over all its
  tensors, and a sha256 over each tensor rounded to DECIMALS decimals, in sorted name order.

Tolerances. The losses are compared at rel 1e-5 on both backends; torch (one thread; two gave the
same checksum) and MLX (its CPU device; mlx[cpu] links the reference BLAS) both repeat themselves here
bit for bit, run after run and in a fresh process, so the tolerance is not for noise on this platform
but for another BLAS or CPU.
Measured here: the two backends, wholly different kernels, end full fine-tuning 7e-7 apart (relative)
after ten steps, and a real change moves the losses much more: the dropout masks of MLX's generator
instead of torch's move LoRA's by 4e-4, and a learning rate 0.1% larger moves LoRA's by 2e-5 and full
fine-tuning's by 8e-5 (the soft prompt's by 3e-6 only: its norms, 2e-4, and the checksum catch it).
The norms use the same rel 1e-5.

The checksum is exact, and rounding does not make it proof against float noise once that has gone
through ten Adam steps: full fine-tuning on torch and on MLX ends with weights up to 3e-6 apart, and
289 of its 139,584 values round differently at 5 decimals (2 at 3 decimals). So the checksum holds on
the platform that pinned it and changes with anything real; on another machine where every loss and
norm still matches but the checksum does not, the difference is float-level: re-pin there, saying so.

The literals were produced on Linux x86-64 CPUs with PRODUCED_WITH, from the committed code, and were
reproduced by the working tree. torch trains on the CPU (torch.device = "cpu") in float32 with one
intra-op thread, and MLX on its CPU device, on any machine: a CUDA GPU or Apple's GPU would give other
numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from builders import WIKISQL, recipe_file

from ftkit.common.tensors import read_safetensors
from ftkit.recipe.load import load_recipes
from ftkit.train.loop import Trainer
from ftkit.train.prepare import prepare

STEPS = 10
DECIMALS = 5  # the tensors' values are ~1e-2..1 here: 5 decimals keep 3 to 5 significant digits
RTOL = {"torch": 1e-5, "mlx": 1e-5}  # see the module docstring for why, and what they were measured against

PRODUCED_WITH = {
    "platform": "Linux x86_64, Python 3.11.7",
    "torch": "2.13.0+cpu", "transformers": "5.24.0", "peft": "0.21.2", "tokenizers": "0.23.3",
    "mlx": "0.32.4", "mlx-lm": "0.32.2", "numpy": "2.4.6",
}

METHODS = {
    # dropout > 0: the dropout RNG and its per-step seeding are pinned too
    "lora": {"kind": "lora", "rank": 4, "alpha": 8, "dropout": 0.1},
    "dora": {"kind": "dora", "rank": 4, "alpha": 8, "dropout": 0.1},
    "prompt": {"kind": "prompt", "num_virtual_tokens": 4},
    "full": {"kind": "full"},
}
LR = {"lora": 3e-3, "dora": 3e-3, "prompt": 3e-3, "full": 1e-3}

# fmt: off
GOLDEN: dict[tuple[str, str], dict] = {
    ("torch", "lora"): {
        "train": [6.2469236459305035, 6.230815936992695, 6.2412039620535715, 6.218510709850993, 6.1744896000267095, 6.172644306429856, 6.164744136897662, 6.155268243018617, 6.159217780363475, 6.119399099638968],
        "valid": [6.230537414550781, 6.162470817565918, 6.127589225769043],
        "norms": [286.6638025622851, 4.510847102908609],
        "sha256": "6d9d58ac78b80ad5f3bf1232855ff7bb26c2a97ff10d50a331bbb4b46d966f53",
    },
    ("torch", "dora"): {
        "train": [6.2469236459305035, 6.230043485567167, 6.239030238560268, 6.213382139900662, 6.166331755809295, 6.166048996740108, 6.1569526031727095, 6.14638654560062, 6.153444114306295, 6.113738551284328],
        "valid": [6.230537414550781, 6.154360771179199, 6.120741367340088],
        "norms": [460.01147061813845, 7.110457939333015],
        "sha256": "568f4207be27960d14039404d42197adadeb4c52b730cb0df19b283981065022",
    },
    ("torch", "prompt"): {
        "train": [6.245516193446829, 6.232244318181818, 6.244828578404018, 6.230867701650455, 6.203135433360043, 6.214976358756744, 6.221761688931298, 6.230420268173759, 6.220479329427083, 6.1944936116536455],
        "valid": [6.238967418670654, 6.213222503662109, 6.207971572875977],
        "norms": [4.599166807376605, 0.3580981697270828],
        "sha256": "f37465bd678ab981e0e03339d33058aa5bb02e8b018e21d2227375261bf78e80",
    },
    ("torch", "full"): {
        "train": [6.2469236459305035, 6.186538101790787, 6.118190656389509, 6.007797140159354, 5.892365284455129, 5.87734919486286, 5.8172952200620225, 5.73600173841977, 5.82377635333555, 5.726775660659328],
        "valid": [6.230537414550781, 5.820556640625, 5.68209171295166],
        "norms": [2576.13942293606, 19.450512419558265],
        "sha256": "179224690b6430a70f1ad6da74daaa8eab5f4ac4dd065087ce5edbce474aa561",
    },
    ("mlx", "lora"): {
        "train": [6.246923190444263, 6.230651062804383, 6.241367449079241, 6.215806569484686, 6.174642448751335, 6.1716159299123206, 6.162180660335162, 6.152472746287677, 6.1596026048592645, 6.117894028172349],
        "valid": [6.230538368225098, 6.162615776062012, 6.127604007720947],
        "norms": [287.0575345246516, 4.512793248006018],
        "sha256": "4bd5a9288aa6f299ca2fef601ac7e839f693da7df1c5e5b5d406fb500d77d0ff",
    },
    ("mlx", "dora"): {
        "train": [6.246923190444263, 6.229738309785917, 6.238753836495536, 6.210530868429222, 6.166704748430822, 6.165029402259442, 6.154252612863788, 6.143853370179522, 6.153825042941046, 6.112853079131155],
        "valid": [6.230538368225098, 6.1542463302612305, 6.12066125869751],
        "norms": [460.3597376107864, 7.111848962803576],
        "sha256": "40cd792055b54d1857a5e5bf72f7fdc9484e758eddc2459605bdc7461d126d2c",
    },
    ("mlx", "prompt"): {
        "train": [6.245515737960588, 6.232244318181818, 6.244829450334821, 6.230869318475786, 6.203136476696047, 6.214976358756744, 6.221761223014075, 6.2304207010472075, 6.220478463680186, 6.194494074041193],
        "valid": [6.238967418670654, 6.213222980499268, 6.207972049713135],
        "norms": [4.599160673315055, 0.35809761750628444],
        "sha256": "ec7d9cf5a93b05a767dd184749e39e212594826f86fbcdd31146676a966c0505",
    },
    ("mlx", "full"): {
        "train": [6.246923190444263, 6.186538101790787, 6.118191092354911, 6.00779794857202, 5.892367371127137, 5.877351829473921, 5.817298015565362, 5.73600476853391, 5.823778950576241, 5.726779822147254],
        "valid": [6.230538368225098, 5.820558547973633, 5.682095050811768],
        "norms": [2576.1389056476455, 19.450511622557755],
        "sha256": "fce7730a6be6885162ff2056eb7d597ae5e13a8331b98b8f54f67933c3aadcde",
    },
}
# fmt: on


def qa_data(dest: Path) -> Path:
    """The question and SQL of the first 48 / 16 rows of data/wikisql as completion rows (prompt "Q: ...
    A:", completion " SELECT ..."): short rows keep MLX on a CPU quick, and the loss covers the SQL only."""
    dest.mkdir()
    for split, n in (("train", 48), ("valid", 16)):
        rows = []
        for line in (WIKISQL / f"{split}.jsonl").read_text().splitlines()[:n]:
            question, answer = json.loads(line)["text"].split("\nQ: ", 1)[1].split("\nA:", 1)
            rows.append(json.dumps({"prompt": f"Q: {question.strip()}\nA:", "completion": answer}))
        (dest / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    return dest


def saved_tensors(folder: Path, method: str) -> dict[str, np.ndarray]:
    return read_safetensors(folder / ("model.safetensors" if method == "full" else "adapter_model.safetensors"))


def norms(tensors: dict[str, np.ndarray]) -> list[float]:
    """L1 and L2 norms over all the tensors (float64 sums in sorted name order)."""
    flat = [np.asarray(tensors[k], np.float64).ravel() for k in sorted(tensors)]
    return [float(sum(np.abs(t).sum() for t in flat)), float(np.sqrt(sum((t * t).sum() for t in flat)))]


def checksum(tensors: dict[str, np.ndarray]) -> str:
    """sha256 over (name, shape, values rounded to DECIMALS) of every tensor, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = np.asarray(tensors[name], np.float64)
        q = np.rint(t * 10**DECIMALS).astype("<i8")  # integers: -0.0 and 0.0 hash the same
        h.update(f"{name}:{list(t.shape)}:".encode())
        h.update(q.tobytes())
    return h.hexdigest()


def train_case(tmp_path: Path, model: Path, data: Path, backend: str, method: str) -> dict:
    recipe = recipe_file(
        tmp_path, model, data, name=f"{backend}-{method}",
        method=METHODS[method],
        data={"cache": False},
        # 2 micro-batches of 2 per step (token-weighted accumulation), warmup then cosine, clipping at 1.0,
        # weight decay, validation and a checkpoint mid-run: the loop's whole step is in the numbers
        train={"iters": STEPS, "batch_size": 2, "grad_accum": 2, "lr": LR[method], "warmup": 2, "scheduler": "cosine",
               "weight_decay": 0.01, "steps_per_report": 1, "steps_per_eval": 5, "val_batches": 1, "save_every": 5,
               "seed": 0},
        torch={"precision": "fp32", "device": "cpu"},
    )
    (r,) = load_recipes([recipe])
    result = Trainer(prepare(r), backend, quiet=True).run()
    assert result.steps == STEPS
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [(rec["step"], rec["loss"]) for rec in records if rec["kind"] == "train"]
    valid = [(rec["step"], rec["loss"]) for rec in records if rec["kind"] == "valid"]
    assert [s for s, _ in train] == list(range(1, STEPS + 1)), train
    assert [s for s, _ in valid] == [0, 5, STEPS], valid
    tensors = saved_tensors(result.adapter, method)
    return {"train": [loss for _, loss in train], "valid": [loss for _, loss in valid],
            "norms": norms(tensors), "sha256": checksum(tensors)}


def literal(key: tuple[str, str], got: dict) -> str:
    """The run's values as GOLDEN's entry for `key`, to paste."""
    def fmt(xs: list[float]) -> str:
        return "[" + ", ".join(repr(float(x)) for x in xs) + "]"

    return (f"    (\"{key[0]}\", \"{key[1]}\"): {{\n"
            f"        \"train\": {fmt(got['train'])},\n"
            f"        \"valid\": {fmt(got['valid'])},\n"
            f"        \"norms\": {fmt(got['norms'])},\n"
            f"        \"sha256\": \"{got['sha256']}\",\n"
            f"    }},")


def check(key: tuple[str, str], got: dict) -> None:
    """Assert that a run's values are the golden ones."""
    want = GOLDEN.get(key)
    assert want is not None, f"no golden values for {key}; this run's:\n{literal(key, got)}"
    rtol = RTOL[key[0]]
    msg = (f"{key} moved off its golden values (pinned with {PRODUCED_WITH}). If that is meant, paste this run's "
           f"values and say why in the commit:\n{literal(key, got)}")
    np.testing.assert_allclose(got["train"], want["train"], rtol=rtol, atol=0, err_msg="training losses: " + msg)
    np.testing.assert_allclose(got["valid"], want["valid"], rtol=rtol, atol=0, err_msg="validation losses: " + msg)
    np.testing.assert_allclose(got["norms"], want["norms"], rtol=rtol, atol=0, err_msg="tensor norms: " + msg)
    assert got["sha256"] == want["sha256"], (
        "every loss and norm is within tolerance but the rounded tensors differ: on the platform that pinned "
        "them a change (however small), elsewhere maybe float-level differences crossing a rounding boundary. " + msg)


@pytest.fixture
def torch_one_thread():
    """One intra-op thread: the same float sums whatever the machine's core count (and no threads
    spinning against each other on a busy CI machine)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def mlx_on_cpu():
    """MLX on its CPU device (a Mac would otherwise take the GPU): the literals are CPU numbers."""
    mx = pytest.importorskip("mlx.core")
    pytest.importorskip("mlx_lm")
    before = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(before)


CASES = [(b, m) for b in ("torch", "mlx") for m in METHODS]


@pytest.mark.parametrize("backend, method", CASES, ids=[f"{b}-{m}" for b, m in CASES])
def test_golden(backend, method, tmp_path, tiny_model_dir, request):
    request.getfixturevalue("torch_one_thread" if backend == "torch" else "mlx_on_cpu")
    got = train_case(tmp_path, tiny_model_dir, qa_data(tmp_path / "data"), backend, method)
    key = (backend, method)
    if os.environ.get("FTKIT_PRINT_GOLDEN"):
        print("\n" + literal(key, got))
    check(key, got)
