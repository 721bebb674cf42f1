"""The core loop on the torch backend, on a config-built tiny Llama: semantics, not speed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from builders import recipe_file  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from ftkit.common.errors import AdapterMismatchError, FtkitError
from ftkit.data.batching import step_indices
from ftkit.recipe.load import load_recipes
from ftkit.train.loop import Trainer
from ftkit.train.prepare import prepare
from ftkit.train.stages import run_stages


def trainer_for(path: Path, sets=()) -> Trainer:
    (recipe,) = load_recipes([path], list(sets))
    return Trainer(prepare(recipe), "torch", quiet=True)


def adapter_tensors(folder: Path) -> dict[str, np.ndarray]:
    return load_file(str(folder / "adapter_model.safetensors"))


def test_lora_trains_and_writes_the_common_format(tmp_path, tiny_model_dir, small_data):
    result = trainer_for(recipe_file(tmp_path, tiny_model_dir, small_data)).run()
    assert result.steps == 6 and result.backend == "torch"
    assert result.last_valid_loss < result.first_valid_loss
    folder = result.adapter
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    meta = json.loads((folder / "ftkit.json").read_text())
    assert meta["backend"] == "torch" and meta["step"] == 6 and meta["base_model"]["fingerprint"].startswith("sha256:")
    assert meta["trained_tokens"] > 0
    tensors = adapter_tensors(folder)
    assert tensors and all("lora_A" in k or "lora_B" in k for k in tensors)
    # every linear layer of both blocks (q k v o gate up down), and not the output head
    assert len(tensors) == 2 * 7 * 2
    assert not any("lm_head" in k for k in tensors)
    run = result.run_dir
    assert (run / "loss.png").stat().st_size > 1000
    kinds = [json.loads(line)["kind"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert kinds.count("train") == 6 and kinds.count("valid") == 3  # before, at step 3, at the end
    assert "[train]" in (run / "recipe.toml").read_text()


def test_adapter_loads_in_plain_peft_with_equal_logits(tmp_path, tiny_model_dir, small_data):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    t = trainer_for(recipe_file(tmp_path, tiny_model_dir, small_data))
    result = t.run()
    ids = [5, 17, 42, 99, 7, 300]
    ours, _ = t.backend.next_logits(ids, None)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(result.adapter)).eval()
    with torch.no_grad():
        theirs = peft_model(torch.tensor([ids])).logits[0, -1].numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    with torch.no_grad(), peft_model.disable_adapter():
        plain = peft_model(torch.tensor([ids])).logits[0, -1].numpy()
    assert np.abs(theirs - plain).max() > 1e-4  # the adapter really changes the output


def test_token_weighted_accumulation_equals_the_big_batch(tmp_path, tiny_model_dir, small_data):
    """4 micro-batches of 1 give the gradient of one batch of 4: every target token weighs the same."""
    from ftkit.data.batch import make_batch

    t = trainer_for(recipe_file(tmp_path, tiny_model_dir, small_data, method={"dropout": 0.0}))
    prep = t.prep
    from ftkit.backend.registry import get_backend

    be = get_backend("torch")
    be.load(prep.recipe, prep.model_path, adapter=None, train=True)
    # make lora_B non-zero so that lora_A gets a gradient too
    with torch.no_grad():
        for n, p in be.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    examples = prep.splits.train[:4]
    assert len({len(e.ids) for e in examples}) > 1  # different lengths: a mean of means would differ
    pad = prep.tokenizer.pad_token_id

    def grads():
        return {n: p.grad.clone() for n, p in be.model.named_parameters() if p.requires_grad}

    big = make_batch(examples, pad)
    be.forward_backward(big, 1.0 / big.n_targets)
    g_big = grads()
    be.model.zero_grad(set_to_none=True)
    smalls = [make_batch([e], pad) for e in examples]
    total = sum(b.n_targets for b in smalls)
    for b in smalls:
        be.forward_backward(b, 1.0 / total)
    g_acc = grads()
    for n in g_big:
        torch.testing.assert_close(g_acc[n], g_big[n], rtol=1e-4, atol=1e-7)
    # and the loop agrees end to end: grad_accum 4 x batch 1 == batch 4 after training
    a = trainer_for(recipe_file(tmp_path, tiny_model_dir, small_data, "a", train={"iters": 3, "save_every": 10})).run()
    b = trainer_for(recipe_file(tmp_path, tiny_model_dir, small_data, "b",
                                train={"iters": 3, "batch_size": 1, "grad_accum": 4, "save_every": 10})).run()
    ta, tb = adapter_tensors(a.adapter), adapter_tensors(b.adapter)
    for k in ta:
        np.testing.assert_allclose(ta[k], tb[k], rtol=1e-3, atol=1e-6)


def test_resume_after_a_stop_ends_with_the_same_adapter(tmp_path, tiny_model_dir, small_data):
    # dropout > 0 so that the RNG state has to be restored as well
    kw = dict(method={"dropout": 0.1})
    whole = trainer_for(recipe_file(tmp_path, tiny_model_dir, small_data, "whole", **kw)).run()
    part = recipe_file(tmp_path, tiny_model_dir, small_data, "part", **kw)
    stopped = trainer_for(part).run(stop_after=3)
    assert stopped.steps == 3 and not (stopped.run_dir / "adapter").exists()
    with pytest.raises(FtkitError, match="--resume auto"):
        trainer_for(part).run()  # never silently overwrite a run
    resumed = trainer_for(part).run(resume="auto")
    assert resumed.resumed_from and resumed.resumed_from.endswith("step-000003")
    assert resumed.steps == 6
    ta, tb = adapter_tensors(whole.adapter), adapter_tensors(resumed.adapter)
    for k in ta:
        np.testing.assert_allclose(ta[k], tb[k], rtol=1e-5, atol=1e-7)
    steps = [json.loads(x)["step"] for x in (resumed.run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]  # the log was not duplicated across the restart


def test_resume_skips_a_checkpoint_left_half_written(tmp_path, tiny_model_dir, small_data):
    part = recipe_file(tmp_path, tiny_model_dir, small_data, "crash")
    trainer_for(part).run(stop_after=4)  # checkpoints at 2 and 4
    run = tmp_path / "run-crash" / "checkpoints"
    # simulate a crash while step 4's checkpoint was being written: no state file in it
    (run / "step-000004" / "trainer_state.json").unlink()
    (run / ".step-000006.tmp-1234").mkdir()
    resumed = trainer_for(part).run(resume="auto")
    assert resumed.resumed_from.endswith("step-000002") and resumed.steps == 6


def test_dora_and_last_n_layers(tmp_path, tiny_model_dir, small_data):
    p = recipe_file(tmp_path, tiny_model_dir, small_data, method={"kind": "dora", "layers": 1}, train={"iters": 2})
    result = trainer_for(p).run()
    cfg = json.loads((result.adapter / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True and cfg["layers_to_transform"] == [1]
    keys = adapter_tensors(result.adapter)
    assert any("lora_magnitude_vector" in k for k in keys)
    assert all(".layers.1." in k for k in keys)


def test_full_fine_tune_writes_a_model_folder(tmp_path, tiny_model_dir, small_data):
    p = recipe_file(tmp_path, tiny_model_dir, small_data, method={"kind": "full"}, train={"iters": 3, "lr": 1e-3})
    t = trainer_for(p)
    result = t.run()
    info = result.info
    assert info["trainable_params"] == info["total_params"]
    folder = result.adapter
    assert (folder / "config.json").exists() and (folder / "model.safetensors").exists()
    assert not (folder / "adapter_config.json").exists()
    assert (folder / "tokenizer.json").exists() and (folder / "ftkit.json").exists()
    assert result.last_valid_loss < result.first_valid_loss


def test_lora_keeps_the_base_frozen(tmp_path, tiny_model_dir, small_data):
    t = trainer_for(recipe_file(tmp_path, tiny_model_dir, small_data, train={"iters": 1}))
    t.run()
    trainable = {n for n, p in t.backend.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    counted = sum(v.size for v in adapter_tensors(t.run_dir / "adapter").values())
    assert counted == t.backend.describe()["trainable_params"]


def test_stages_continue_from_the_previous_adapter(tmp_path, tiny_model_dir, small_data):
    first = recipe_file(tmp_path, tiny_model_dir, small_data, "pre", train={"iters": 2})
    second = recipe_file(tmp_path, tiny_model_dir, small_data, "instruct", train={"iters": 2})
    results = run_stages(load_recipes([first, second]), "torch", quiet=True)
    assert [r.name for r in results] == ["pre", "instruct"]
    meta = json.loads((results[1].adapter / "ftkit.json").read_text())
    assert meta["recipe"]["method"]["resume_from"] == str(results[0].adapter)
    # stage 2 started where stage 1 ended: its first validation equals stage 1's last
    assert results[1].first_valid_loss == pytest.approx(results[0].last_valid_loss, rel=1e-5)


def test_adapter_on_the_wrong_base_is_refused(tmp_path, tiny_model_dir, small_data):
    from builders import build_tiny_llama

    result = trainer_for(recipe_file(tmp_path, tiny_model_dir, small_data, train={"iters": 1})).run()
    other = build_tiny_llama(tmp_path / "other", seed=1)
    p = recipe_file(tmp_path, other, small_data, "other", method={"resume_from": str(result.adapter)})
    with pytest.raises(AdapterMismatchError, match="fingerprint"):
        trainer_for(p).run()
    p = recipe_file(tmp_path, tiny_model_dir, small_data, "rank", method={"resume_from": str(result.adapter), "rank": 8})
    with pytest.raises(AdapterMismatchError, match="rank 4"):
        trainer_for(p).run()


def test_data_order_is_a_seeded_stream():
    a = step_indices(10, seed=3, position=0, size=25)
    assert sorted(a[:10]) == list(range(10)) and sorted(a[10:20]) == list(range(10))  # each epoch once
    assert step_indices(10, 3, 13, 5) == a[13:18]  # resumable from any position
    assert step_indices(10, 4, 0, 10) != a[:10]


def test_trains_without_mlx_installed(tmp_path, tiny_model_dir, small_data):
    """A GPU pod with only `ftkit[torch]`: nothing on the torch path imports mlx."""
    from builders import train_hiding

    p = recipe_file(tmp_path, tiny_model_dir, small_data, train={"iters": 2, "save_every": 2})
    result = train_hiding(p, "torch", ["mlx", "mlx_lm"])
    assert result["backend"] == "torch" and result["steps"] == 2


@pytest.mark.parametrize("quantize", ["nf4", "fp4", "int8"])
def test_qlora_trains_on_a_bitsandbytes_base(tmp_path, tiny_model_dir, small_data, quantize):
    pytest.importorskip("bitsandbytes")
    import warnings

    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
    p = recipe_file(tmp_path, tiny_model_dir, small_data, model={"quantize": quantize}, train={"iters": 6, "save_every": 6, "lr": 1e-2})
    trainer = trainer_for(p)
    res = trainer.run()
    assert res.info["quantization"].startswith(quantize)
    layer = trainer.backend.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert type(layer).__name__ == ("Linear8bitLt" if quantize == "int8" else "Linear4bit")
    assert res.last_valid_loss < res.first_valid_loss - 0.05


@pytest.mark.parametrize("optimizer", ["adamw", "adam", "sgd", "adafactor", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "paged_lion_8bit"])
def test_every_optimizer_steps(tmp_path, tiny_model_dir, small_data, optimizer):
    if optimizer not in ("adamw", "adam", "sgd", "adafactor"):
        pytest.importorskip("bitsandbytes")
    p = recipe_file(tmp_path, tiny_model_dir, small_data, train={"iters": 3, "save_every": 3, "optimizer": optimizer, "lr": 1e-2})
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        res = trainer_for(p).run()
    paged_notes = [w for w in seen if "pages state to the CPU" in str(w.message)]
    assert len(paged_notes) == (1 if optimizer.startswith("paged") and not torch.cuda.is_available() else 0)
    b = [v for k, v in adapter_tensors(res.adapter).items() if "lora_B" in k]
    assert all(np.isfinite(v).all() for v in b) and any(np.abs(v).max() > 0 for v in b)


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_prompt_and_prefix_adapters_reload_in_plain_peft(tmp_path, tiny_model_dir, small_data, kind):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    p = recipe_file(tmp_path, tiny_model_dir, small_data, method={"kind": kind, "num_virtual_tokens": 6}, train={"iters": 4, "save_every": 4, "lr": 3e-2})
    trainer = trainer_for(p)
    res = trainer.run()
    cfg = json.loads((res.adapter / "adapter_config.json").read_text())
    assert cfg["peft_type"] == {"prompt": "PROMPT_TUNING", "prefix": "PREFIX_TUNING"}[kind]
    ids = torch.tensor([list(range(5, 40))])
    be = trainer.backend
    be.model.eval()
    with torch.no_grad():
        ours = be.model(input_ids=ids).logits[:, be.n_virtual:]
        plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(res.adapter)).eval()
        theirs = plain(input_ids=ids).logits[:, be.n_virtual:]
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(input_ids=ids).logits
    assert ours.shape == base.shape
    assert (ours - theirs).abs().max() <= 1e-5
    assert (ours - base).abs().max() > 1e-2  # the adapter changes the output
    assert res.last_valid_loss < res.first_valid_loss
    # and through ftkit's own inference path: greedy generation reuses the cache the virtual tokens started
    from ftkit.evaluate.generate import Sampling, generate
    from ftkit.evaluate.inference import load_for_inference
    from ftkit.models.tokenizer import load_tokenizer

    (recipe,) = load_recipes([p])
    again = load_for_inference(recipe, "torch", res.adapter, tiny_model_dir, load_tokenizer(tiny_model_dir))
    prompt = list(range(5, 40))
    tokens = list(generate(again, prompt, 4, Sampling(), set()))
    # The reference is plain PEFT's forward over the whole sequence at every step, without a cache:
    # PeftModel.generate (peft 0.21, transformers 5.24) gives other, wrong tokens for prompt learning.
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(4):
            ids.append(int(plain(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    assert tokens == ids[len(prompt):]


def test_qlora_gradients_do_not_change_after_a_validation(tmp_path, tiny_model_dir, small_data):
    # bitsandbytes repacks 4-bit weights for AVX512-BF16 CPUs at the first no-grad forward; after that
    # its kernel has no autograd, so the LoRA gradients below the first adapted layer would be lost.
    pytest.importorskip("bitsandbytes")
    from ftkit.backend.registry import get_backend
    from ftkit.data.batch import make_batch

    p = recipe_file(tmp_path, tiny_model_dir, small_data, model={"quantize": "nf4"})
    (recipe,) = load_recipes([p])
    prep = prepare(recipe)
    batch = make_batch(prep.splits.train[:4], prep.tokenizer.pad_token_id)

    def grads(validate_first: bool) -> dict[str, np.ndarray]:
        be = get_backend("torch")
        be.load(recipe, prep.model_path, adapter=None, train=True)
        be.set_adapter_tensors({k: np.full_like(v, 0.01) for k, v in be.adapter_tensors().items()})
        be.start_training()
        if validate_first:
            be.eval_loss(batch)
        be.forward_backward(batch, 1.0 / batch.n_targets)
        return {n: p.grad.numpy().copy() for n, p in be.model.named_parameters() if p.requires_grad}

    plain, after = grads(False), grads(True)
    assert plain.keys() == after.keys() and all(np.abs(g).max() > 0 for g in plain.values())
    for name in plain:
        np.testing.assert_allclose(after[name], plain[name], rtol=1e-5, atol=1e-8, err_msg=name)


def test_a_non_finite_loss_stops_the_run_before_it_reaches_a_checkpoint(tmp_path, tiny_model_dir, small_data, monkeypatch):
    # Losses stay on the device between reports; a NaN is still caught before the next checkpoint.
    from ftkit_torch.backend import TorchBackend

    p = recipe_file(tmp_path, tiny_model_dir, small_data, train={"iters": 8, "save_every": 2, "steps_per_report": 8})
    real, calls = TorchBackend.forward_backward, []

    def poisoned(self, batch, scale, sync=True):
        calls.append(1)
        loss = real(self, batch, scale, sync)
        return loss * float("nan") if len(calls) > 3 else loss  # from step 4 (one micro-batch a step)

    monkeypatch.setattr(TorchBackend, "forward_backward", poisoned)
    with pytest.raises(FtkitError, match=r"steps 1-4: the loss is nan"):
        trainer_for(p).run()
    assert [c.name for c in sorted((tmp_path / "run-r" / "checkpoints").glob("step-*"))] == ["step-000002"]
