"""The named prompt formats write exactly what the models' own chat templates write, and training
examples and generation prompts agree token for token, for every format and `auto`."""

from __future__ import annotations

import json

import pytest
from builders import CHATML_TEMPLATE
from typer.testing import CliRunner

from ftkit.data import chat_formats
from ftkit.data.encode import chat_prompt_ids, encode
from ftkit.recipe.load import build_recipe
from ftkit.recipe.schema import DataSection

# The reference chat templates, as the models' tokenizer_config.json files ship them.
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
          "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
          "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")  # Meta-Llama-3-8B-Instruct
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == "
           "'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are "
           "supported!') }}{% endif %}{% endfor %}")  # Mistral-7B-Instruct-v0.2
GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
         "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception("
         "'Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == "
         "'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + "
         "role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}"
         "{{'<start_of_turn>model\n'}}{% endif %}")  # gemma-7b-it
PHI3 = ("{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
        "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == "
        "'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}{% if "
        "add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")  # Phi-3-mini-4k-instruct
REFERENCE = {"chatml": CHATML_TEMPLATE, "llama3": LLAMA3, "mistral": MISTRAL, "gemma": GEMMA, "phi": PHI3}
SYSTEM_OK = {"chatml", "llama3", "phi"}  # the others' reference templates refuse a system turn

CONVERSATION = [
    {"role": "system", "content": "Answer with SQL only."},
    {"role": "user", "content": "How many rows are in table 1-10015132-11?"},
    {"role": "assistant", "content": "SELECT COUNT(*) FROM 1-10015132-11"},
    {"role": "user", "content": " Which player is from Canada? "},
    {"role": "assistant", "content": "SELECT Player FROM 1-10015132-11 WHERE Nationality = 'Canada'"},
]


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir, bos_token="<|endoftext|>")  # the formats that write BOS need one


def data_for(fmt: str, **kw) -> DataSection:
    return build_recipe({"model": {"path": "m"}, "data": {"path": "-", "chat_format": fmt, **kw}}, "t", check_paths=False).data


def test_the_recipe_accepts_exactly_the_named_formats():
    assert tuple(DataSection.model_fields["chat_format"].annotation.__args__) == chat_formats.NAMES


@pytest.mark.parametrize("name", sorted(REFERENCE))
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_named_formats_render_what_the_reference_templates_render(tok, name, generation_prompt):
    messages = CONVERSATION if name in SYSTEM_OK else CONVERSATION[1:]
    if generation_prompt:
        messages = messages[:-1]
    ours = chat_formats.render(messages, name, tok, generation_prompt)
    theirs = tok.apply_chat_template(messages, chat_template=REFERENCE[name], tokenize=False, add_generation_prompt=generation_prompt)
    if name == "mistral" and generation_prompt:
        theirs = tok.apply_chat_template(messages, chat_template=MISTRAL, tokenize=False)  # no header: the text ends with [/INST]
    assert ours == theirs


def test_the_exact_strings(tok):
    one = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]
    bos, eos = tok.bos_token, tok.eos_token
    assert chat_formats.render(one, "llama3", tok, False) == (
        f"{bos}<|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nU<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nA<|eot_id|>")
    assert chat_formats.render(one, "mistral", tok, False) == f"{bos}[INST] S\n\nU [/INST]A{eos}"
    assert chat_formats.render(one, "gemma", tok, True)[-len("<start_of_turn>model\n"):] == "<start_of_turn>model\n"
    assert chat_formats.render(one, "gemma", tok, False) == (
        f"{bos}<start_of_turn>user\nS\n\nU<end_of_turn>\n<start_of_turn>model\nA<end_of_turn>\n")
    assert chat_formats.render(one, "phi", tok, False) == f"<|system|>\nS<|end|>\n<|user|>\nU<|end|>\n<|assistant|>\nA<|end|>\n{eos}"
    assert chat_formats.render(one[1:2], "alpaca", tok, True) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nU\n\n### Response:\n")
    assert chat_formats.render(one, "alpaca", tok, False) == f"S\n\n### Instruction:\nU\n\n### Response:\nA{eos}"
    assert chat_formats.stop_strings("llama3", tok) == ["<|eot_id|>"]
    assert chat_formats.stop_strings("mistral", tok) == [eos, "[INST]"]


def targets(tok, ex) -> list[str]:
    """Each run of target tokens, decoded."""
    runs, cur = [], []
    for i, m in zip(ex.ids, ex.mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    return runs + ([tok.decode(cur)] if cur else [])


@pytest.mark.parametrize("name", chat_formats.NAMES)
def test_training_and_generation_agree_token_for_token(tok, name):
    data = data_for(name)
    ex = encode({"messages": CONVERSATION}, "chat", "auto", tok, data)
    answers = [i for i, m in enumerate(CONVERSATION) if m["role"] == "assistant"]
    starts = [i for i in range(1, len(ex.mask)) if ex.mask[i] and not ex.mask[i - 1]]
    assert len(starts) == len(answers)
    for turn, start in zip(answers, starts):
        # the prompt generation builds for the conversation so far is exactly what precedes the answer's targets
        assert chat_prompt_ids(CONVERSATION[:turn], name, tok) == ex.ids[:start]
    end = "" if name == "auto" else chat_formats.get(name).end.format(eos=tok.eos_token)
    got = targets(tok, ex)
    assert got[0].startswith(CONVERSATION[2]["content"]) and got[1].startswith(CONVERSATION[4]["content"])
    if name != "auto":
        assert got[0].rstrip("\n") == CONVERSATION[2]["content"] + end  # the end of turn is learnt, not what follows it


def test_agreement_on_a_sentencepiece_tokenizer(stories_model_dir):
    from transformers import AutoTokenizer

    sp = AutoTokenizer.from_pretrained(stories_model_dir)
    for name in chat_formats.FORMATS:
        data = data_for(name)
        conv = [{"role": "user", "content": "Once upon a time"}, {"role": "assistant", "content": "there was a cat."}]
        ex = encode({"messages": conv}, "chat", "auto", sp, data)
        start = ex.mask.index(1)
        assert chat_prompt_ids(conv[:1], name, sp) == ex.ids[:start], name


def test_the_same_chatml_as_the_tokenizers_own_template(tok):
    """Our chatml on a tokenizer whose template is ChatML: the same ids and the same mask as `auto`."""
    a = encode({"messages": CONVERSATION}, "chat", "auto", tok, data_for("chatml"))
    b = encode({"messages": CONVERSATION}, "chat", "auto", tok, data_for("auto", add_eos=False))
    assert a.ids == b.ids and a.mask == b.mask


def test_completion_rows_as_chat_and_the_system_prompt(tok):
    data = data_for("llama3", format="chat", system_prompt="Be terse.")
    ex = encode({"prompt": "Q?", "completion": "A."}, "chat", "auto", tok, data)
    text = tok.decode(ex.ids)
    assert "system<|end_header_id|>\n\nBe terse.<|eot_id|>" in text and text.endswith("A.<|eot_id|>")
    assert targets(tok, ex) == ["A.<|eot_id|>"]


def test_format_errors_name_the_problem(tok):
    from ftkit.common.errors import DataError, FtkitError

    with pytest.raises(FtkitError, match="unknown prompt format"):
        chat_formats.get("vicuna")
    bad = [{"role": "user", "content": "a"}, {"role": "system", "content": "late"}]
    with pytest.raises(DataError, match="one system message, at the start"):
        encode({"messages": bad}, "chat", "auto", tok, data_for("chatml"))
    assert chat_formats.missing_tokens("llama3", tok) == ["<|end_header_id|>", "<|eot_id|>", "<|start_header_id|>"]
    assert chat_formats.missing_tokens("chatml", tok) == []


def test_cli_generate_builds_the_training_prompt(tiny_model_dir, tok):
    from ftkit.cli import app

    runner = CliRunner()
    for fmt in ("chatml", "alpaca", "auto"):
        out = runner.invoke(app, ["generate", "--model", str(tiny_model_dir), "--prompt", "How many rows?", "--format", fmt,
                                  "--system", "SQL only.", "--max-tokens", "2", "--backend", "torch", "--json"])
        assert out.exit_code == 0, out.output
        msgs = [{"role": "system", "content": "SQL only."}, {"role": "user", "content": "How many rows?"}]
        from transformers import AutoTokenizer

        t = AutoTokenizer.from_pretrained(tiny_model_dir)
        assert json.loads(out.stdout)["prompt_tokens"] == len(chat_prompt_ids(msgs, fmt, t)), fmt
