"""Named prompt formats (chatml, llama3, mistral, alpaca, phi, gemma) and `auto`, the tokenizer's own
chat template, rendered to text the same way for training examples and for generation prompts.

Each named format writes exactly the text of the reference template users compare against:

- chatml: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per turn (OpenAI ChatML, Qwen, SmolLM2 - without
  SmolLM2's default system prompt), generation prompt `<|im_start|>assistant\\n`.
- llama3: BOS, then `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content|trim}<|eot_id|>` per turn
  (Meta-Llama-3-*-Instruct), generation prompt `<|start_header_id|>assistant<|end_header_id|>\\n\\n`.
- mistral: BOS, `[INST] {user} [/INST]{assistant}</s>` (Mistral-7B-Instruct-v0.2); a system prompt goes
  before the first user message, separated by a blank line (as Mistral's later templates do).
- alpaca: Stanford Alpaca's preamble (or the system prompt), `### Instruction:\\n{user}\\n\\n### Response:\\n`,
  the answer, EOS.
- phi: Phi-3 / Phi-3.5: `<|system|>\\n...<|end|>\\n<|user|>\\n...<|end|>\\n<|assistant|>\\n...<|end|>\\n`, and EOS
  after the conversation when it is a training example, as Phi-3's template writes it.
- gemma: BOS, `<start_of_turn>user\\n{content|trim}<end_of_turn>\\n<start_of_turn>model\\n...`; a system prompt
  goes before the first user message with a blank line, as Gemma 3's template does (Gemma 1/2 refuse one).

Training and generation agree token for token because both tokenize `render(...)` output: a training
example's assistant targets start where `render(messages[:i], add_generation_prompt=True)` ends, which
is exactly the prompt generation feeds the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ftkit.common.errors import FtkitError

ALPACA_PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."


@dataclass(frozen=True)
class ChatFormat:
    name: str
    bos: bool  # the reference template starts with bos_token
    system: str | None  # a system turn, {content}; None: the system prompt is merged into the first user turn
    user: str
    header: str  # the assistant turn up to its content: the generation prompt
    end: str  # what ends an assistant turn: a target, since generation must learn to produce it
    after: str  # text after an assistant turn's end (not a target; generation stops before it)
    trim: bool  # the reference template strips each message's content
    stops: tuple[str, ...]  # strings that end a generated turn ("{eos}" = the tokenizer's EOS)
    final: str = ""  # written after a whole training conversation
    description: str = ""


FORMATS: dict[str, ChatFormat] = {
    f.name: f
    for f in (
        ChatFormat("chatml", False, "<|im_start|>system\n{content}<|im_end|>\n", "<|im_start|>user\n{content}<|im_end|>\n",
                   "<|im_start|>assistant\n", "<|im_end|>", "\n", False, ("<|im_end|>",),
                   description="ChatML (Qwen, SmolLM2, OpenHermes): <|im_start|>role ... <|im_end|>"),
        ChatFormat("llama3", True, "<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
                   "<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
                   "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>", "", True, ("<|eot_id|>",),
                   description="Llama 3 Instruct: <|start_header_id|>role<|end_header_id|> ... <|eot_id|>"),
        ChatFormat("mistral", True, None, "[INST] {content} [/INST]", "", "{eos}", "", False, ("{eos}", "[INST]"),
                   description="Mistral Instruct: [INST] user [/INST]answer</s>"),
        ChatFormat("alpaca", False, "{content}\n\n", "### Instruction:\n{content}\n\n", "### Response:\n", "{eos}", "",
                   False, ("{eos}", "### Instruction:"),
                   description="Stanford Alpaca: preamble, ### Instruction:, ### Response:"),
        ChatFormat("phi", False, "<|system|>\n{content}<|end|>\n", "<|user|>\n{content}<|end|>\n", "<|assistant|>\n",
                   "<|end|>", "\n", False, ("<|end|>", "{eos}"), final="{eos}",
                   description="Phi-3 / Phi-3.5: <|user|> ... <|end|> <|assistant|>"),
        ChatFormat("gemma", True, None, "<start_of_turn>user\n{content}<end_of_turn>\n", "<start_of_turn>model\n",
                   "<end_of_turn>", "\n", True, ("<end_of_turn>",),
                   description="Gemma: <start_of_turn>user ... <end_of_turn> <start_of_turn>model"),
    )
}


NAMES = ("auto", *FORMATS)  # auto: the tokenizer's own chat template


def get(name: str) -> ChatFormat:
    if name not in FORMATS:
        raise FtkitError(f"unknown prompt format {name!r}; choose one of {', '.join(NAMES)}.")
    return FORMATS[name]


def _special(tokenizer: Any, attr: str) -> str:
    value = getattr(tokenizer, attr, None) if tokenizer is not None else None
    return value or ""


def render(messages: list[dict], name: str, tokenizer: Any, add_generation_prompt: bool, whole: bool = True) -> str:
    """The conversation as the named format writes it.

    `add_generation_prompt` ends the text with the assistant header, ready for the model's answer;
    without it, and `whole`, the text is a complete training example (phi's final EOS is written).
    """
    f = get(name)
    bos, eos = _special(tokenizer, "bos_token"), _special(tokenizer, "eos_token")
    messages = list(messages)
    system = None
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    if name == "alpaca" and system is None:
        system = ALPACA_PREAMBLE
    clean = (lambda s: s.strip()) if f.trim else (lambda s: s)
    out = [bos] if f.bos else []
    if system is not None and f.system is not None:
        out.append(f.system.format(content=clean(system)))
    merge_system = system if f.system is None else None
    for i, m in enumerate(messages):
        role, content = m["role"], clean(m["content"])
        if role == "user":
            if merge_system:
                content, merge_system = f"{clean(merge_system)}\n\n{content}", None
            out.append(f.user.format(content=content))
        elif role == "assistant":
            out.append(f.header + content + f.end.format(eos=eos) + f.after)
        elif role == "system":
            raise FtkitError(f"message {i}: the {name} format takes one system message, at the start.")
        else:
            raise FtkitError(f"message {i}: role {role!r}; the {name} format knows system, user and assistant.")
    if add_generation_prompt:
        out.append(f.header)
    elif f.final and whole:
        out.append(f.final.format(eos=eos))
    return "".join(out)


def stop_strings(name: str, tokenizer: Any) -> list[str]:
    """Strings that end a generated turn in this format (auto: none beyond the tokenizer's EOS)."""
    if name in ("auto", "none"):
        return []
    eos = _special(tokenizer, "eos_token")
    return [s.format(eos=eos) for s in get(name).stops if s.format(eos=eos)]


def missing_tokens(name: str, tokenizer: Any) -> list[str]:
    """The format's markers that this tokenizer does not have as single tokens: they are learnt as
    several ordinary tokens, which works but costs length (and is worth knowing)."""
    if name not in FORMATS:
        return []
    markers = {
        "chatml": {"<|im_start|>", "<|im_end|>"},
        "llama3": {"<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"},
        "phi": {"<|user|>", "<|assistant|>", "<|end|>", "<|system|>"},
        "gemma": {"<start_of_turn>", "<end_of_turn>"},
    }.get(name, set())  # mistral's [INST] and alpaca's headers are ordinary text by design
    vocab = tokenizer.get_vocab()
    return sorted(m for m in markers if m not in vocab)


def describe() -> str:
    return "; ".join(f"{f.name}: {f.description}" for f in FORMATS.values()) + "; auto: the tokenizer's own chat template"
