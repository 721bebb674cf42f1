"""The sampler's options on hand-made logits, stop strings across tokens, streaming, --colorize, and
seeded determinism on a real tiny model on both backends."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from ftkit.common.errors import FtkitError
from ftkit.evaluate.generate import (
    BANDS,
    Sampling,
    TextStream,
    band_style,
    complete,
    distribution,
    legend,
    penalize,
    pick,
    probability,
    steps,
)

LOGITS = np.log(np.array([0.50, 0.25, 0.15, 0.07, 0.03]))


class FakeBackend:
    """next_logits from a table: the logits depend on the last token only (a Markov chain)."""

    name = "fake"

    def __init__(self, table: dict[int, np.ndarray], default: np.ndarray):
        self.table, self.default, self.calls = table, default, []

    def next_logits(self, new_ids, state):
        self.calls.append(list(new_ids))
        return self.table.get(new_ids[-1], self.default).copy(), (state or 0) + len(new_ids)


class FakeTokenizer:
    """Tokens are strings; decode joins them (special tokens included, as TextStream asks)."""

    def __init__(self, pieces: list[str], eos: int | None = None):
        self.pieces, self.eos_token_id = pieces, eos

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.pieces[i] for i in ids)

    def get_vocab(self):
        return {p: i for i, p in enumerate(self.pieces)}


def draws(s: Sampling, n: int = 4000, logits=LOGITS) -> np.ndarray:
    rng = np.random.default_rng(s.seed)
    return np.bincount([pick(logits, s, rng) for _ in range(n)], minlength=len(logits)) / n


def test_greedy_is_argmax_and_temperature_flattens_or_sharpens():
    assert pick(LOGITS, Sampling(), np.random.default_rng(0)) == 0
    hot, cold = distribution(LOGITS, Sampling(temperature=2.0)), distribution(LOGITS, Sampling(temperature=0.5))
    assert np.allclose(distribution(LOGITS, Sampling(temperature=1.0)), [0.50, 0.25, 0.15, 0.07, 0.03])
    assert hot[4] > 0.03 > cold[4] and hot[0] < 0.5 < cold[0]
    freq = draws(Sampling(temperature=1.0, seed=1))
    assert np.abs(freq - [0.50, 0.25, 0.15, 0.07, 0.03]).max() < 0.03  # draws follow the distribution


def test_top_k_top_p_and_min_p_cut_the_tail():
    assert np.count_nonzero(distribution(LOGITS, Sampling(temperature=1.0, top_k=2))) == 2
    assert np.allclose(distribution(LOGITS, Sampling(temperature=1.0, top_k=2)), [2 / 3, 1 / 3, 0, 0, 0])
    # the smallest set whose mass reaches top_p: 0.5 + 0.25 = 0.75 >= 0.7, so two tokens
    assert np.count_nonzero(distribution(LOGITS, Sampling(temperature=1.0, top_p=0.7))) == 2
    assert np.count_nonzero(distribution(LOGITS, Sampling(temperature=1.0, top_p=0.76))) == 3
    # min_p 0.2: keep p >= 0.2 * 0.5 = 0.1
    p = distribution(LOGITS, Sampling(temperature=1.0, min_p=0.2))
    assert np.count_nonzero(p) == 3 and p.sum() == pytest.approx(1.0)
    freq = draws(Sampling(temperature=1.0, top_k=3, seed=2))
    assert freq[3] == 0 and freq[4] == 0


def test_repetition_penalty_follows_ctrl_and_its_context_size():
    logits = np.array([2.0, 1.9, -1.0, 0.5])
    out = penalize(logits, [0, 2, 0], 2.0)
    assert out.tolist() == [1.0, 1.9, -2.0, 0.5]  # positive divided, negative multiplied, once per token
    assert pick(logits, Sampling(repetition_penalty=1.5), np.random.default_rng(0), [0]) == 1
    # outside the last N tokens, a token is not penalised
    assert pick(logits, Sampling(repetition_penalty=1.5, repetition_context_size=1), np.random.default_rng(0), [0, 3]) == 0


def test_same_seed_same_output_other_seed_other_output():
    uniform = np.zeros(50)
    be = FakeBackend({}, uniform)
    run = lambda seed: [s.token for s in steps(be, [1], 20, Sampling(temperature=1.0, seed=seed), set())]  # noqa: E731
    assert run(7) == run(7) and run(7) != run(8)


def test_stop_ids_and_max_tokens_and_the_kv_cache_protocol():
    table = {0: np.array([0.0, 5.0, 0.0]), 1: np.array([0.0, 0.0, 5.0])}
    be = FakeBackend(table, np.array([5.0, 0.0, 0.0]))
    out = [s.token for s in steps(be, [0], 10, Sampling(), {2})]
    assert out == [1]  # 0 -> 1 -> 2 (a stop id: not yielded)
    assert be.calls == [[0], [1]]  # the prompt once, then one token at a time
    assert len(list(steps(FakeBackend({}, np.array([5.0, 0.0])), [0], 3, Sampling(), set()))) == 3


def test_probabilities_are_the_models_own():
    assert probability(LOGITS, 1) == pytest.approx(0.25)
    be = FakeBackend({}, LOGITS)
    (first,) = list(steps(be, [0], 1, Sampling(temperature=0.3, top_k=2, seed=0), set()))
    assert first.prob == pytest.approx([0.50, 0.25, 0.15, 0.07, 0.03][first.token])


def test_stop_string_across_tokens_is_never_shown():
    tok = FakeTokenizer(["Hel", "lo ", "ST", "OP", " more"])
    stream = TextStream(tok, ["STOP"])
    shown = []
    for t in (0, 1, 2, 3, 4):
        shown += [p for p, _ in stream.add(t)]
    shown += [p for p, _ in stream.finish()]
    assert "".join(shown) == "Hello " == stream.text and stream.stopped
    assert "ST" not in "".join(shown)


def test_stop_string_starting_inside_a_token():
    tok = FakeTokenizer(["ab", "c\nS", "TOPd"])
    stream = TextStream(tok, ["\nSTOP"])
    pieces = [p for t in (0, 1, 2) for p, _ in stream.add(t)]
    assert "".join(pieces) == "abc" == stream.text


def test_a_held_back_prefix_that_does_not_become_a_stop_is_shown():
    tok = FakeTokenizer(["x", "ST", "ay"])
    stream = TextStream(tok, ["STOP"])
    assert [p for p, _ in stream.add(0)] == ["x"]
    assert stream.add(1) == []  # "ST" may start "STOP"
    assert "".join(p for p, _ in stream.add(2)) == "STay"


def test_an_unfinished_utf8_character_waits():
    class Bytes(FakeTokenizer):
        def decode(self, ids, skip_special_tokens=False):
            return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")

    tok = Bytes(["é".encode()[:1], "é".encode()[1:], b"!"])
    stream = TextStream(tok, [])
    assert stream.add(0) == []
    assert "".join(p for p, _ in stream.add(1)) == "é"


def test_complete_reports_finish_and_pieces_keep_their_tokens_probability():
    tok = FakeTokenizer(["a", "b", "<end>"], eos=None)
    be = FakeBackend({0: np.log(np.array([0.1, 0.8, 0.1])), 1: np.log(np.array([0.1, 0.1, 0.8]))}, np.log(np.array([0.6, 0.3, 0.1])))
    got = []
    res = complete(be, tok, [0], 10, Sampling(), ["<end>"], on_text=got.extend)
    assert res.text == "b" and res.finish == "stop" and res.tokens == 1  # <end> is a whole token: a stop id
    assert got == [("b", pytest.approx(0.8))]
    res = complete(be, tok, [2], 2, Sampling(), [])
    assert res.finish == "length" and res.tokens == 2 and res.text == "ab"


def test_bands_cover_every_probability_and_the_legend_names_them():
    assert band_style(1.0) == BANDS[0][1] and band_style(0.0) == BANDS[-1][1]
    assert [band_style(p) for p in (0.85, 0.7, 0.5, 0.3, 0.1)] == [style for _, style in BANDS]
    text = legend()
    assert all(style in text for _, style in BANDS) and "80-100%" in text and "0-20%" in text


def test_bad_sampling_values_are_errors():
    with pytest.raises(FtkitError, match="top-p"):
        Sampling(top_p=0).check()
    with pytest.raises(FtkitError, match="min-p"):
        Sampling(min_p=1.0).check()
    with pytest.raises(FtkitError, match="repetition-penalty"):
        Sampling(repetition_penalty=0).check()


# ---------------------------------------------------------------- a real tiny model


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_seeded_sampling_is_deterministic_on_each_backend(backend, tiny_model_dir):
    if backend == "mlx":
        pytest.importorskip("mlx")
    from ftkit.evaluate.inference import open_model

    be, tok, _ = open_model(str(tiny_model_dir), backend, None)
    ids = list(tok("table: 1-10015132-11\nQ:", add_special_tokens=True)["input_ids"])
    s = Sampling(temperature=0.9, top_p=0.95, min_p=0.02, top_k=50, repetition_penalty=1.3, seed=11)
    a = [x.token for x in steps(be, ids, 16, s, set())]
    b = [x.token for x in steps(be, ids, 16, s, set())]
    c = [x.token for x in steps(be, ids, 16, Sampling(**{**s.__dict__, "seed": 12}), set())]
    assert a == b and a != c and len(a) == 16


def test_cli_generate_streams_stops_and_colorizes(tiny_model_dir):
    from ftkit.cli import app

    runner = CliRunner()
    base = ["generate", "--model", str(tiny_model_dir), "--prompt", "table:", "--max-tokens", "24", "--backend", "torch",
            "--temperature", "1.0", "--seed", "3"]  # greedy, the random model says EOS at once
    plain = json.loads(runner.invoke(app, [*base, "--json"]).stdout)
    assert plain["tokens"] == 24 and plain["finish"] == "length"
    # a stop string taken from the middle of what the model says ends the text right before it
    text = plain["text"]
    at = next(i for i in range(3, len(text) - 1) if text[i:i + 2].isalnum() and text[i:i + 2].isascii() and text[i:i + 2] not in text[:i + 1])
    cut = text[at:at + 2]
    stopped = json.loads(runner.invoke(app, [*base, "--stop", cut, "--json"]).stdout)
    assert stopped["text"] == plain["text"][: plain["text"].index(cut)] and stopped["finish"] == "stop"
    streamed = runner.invoke(app, [*base, "--stop", cut])
    assert streamed.exit_code == 0 and streamed.stdout == stopped["text"] + "\n"
    colored = runner.invoke(app, [*base, "--colorize", "--json"])
    probs = json.loads(colored.stdout)["probabilities"]
    assert len(probs) == 24 and all(0 < p <= 1 for p in probs)
    shown = runner.invoke(app, [*base, "--colorize"])
    assert "\x1b[" in shown.stdout and "token probability" in shown.stderr
    bad = runner.invoke(app, [*base, "--top-p", "0", "--json"])
    assert bad.exit_code == 2 and "top-p" in json.loads(bad.stdout)["error"]
