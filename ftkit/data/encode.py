"""Rows -> token ids and loss masks (text, completion, chat), and tokenizing whole splits."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ftkit.common.errors import DataError, FtkitError
from ftkit.common.suggest import did_you_mean
from ftkit.data import chat_formats
from ftkit.data.batch import Example, Splits
from ftkit.data.mapping import read_parts
from ftkit.data.rows import SPLITS, Part, detect_format

if TYPE_CHECKING:
    from ftkit.recipe.schema import DataSection


# The roles chat templates know (the tool role for tool results); anything else, a template would write
# out as if it were fine, or drop.
ROLES = ("system", "user", "assistant", "tool")


def resolve_train_on(train_on: str, fmt: str, response_template: str | None = None) -> str:
    """auto: the completion / assistant turns for completion and chat data; for text data, what follows
    data.response_template when one is set (why else set it), else every token."""
    if train_on != "auto":
        return train_on
    if fmt == "text":
        return "completion" if response_template else "all"
    return "completion"


def encode(row: dict, fmt: str, train_on: str, tokenizer: Any, data: "DataSection") -> Example:
    """One row -> ids and mask, truncated to data.max_seq_length (keeping the start).

    Errors name the key but not the row: `load_splits` adds where the row came from.
    """
    train_on = resolve_train_on(train_on, fmt, data.response_template)
    if fmt == "text":
        ids, mask = _encode_text(_string(row, data.text_field), train_on, tokenizer, data)
    elif fmt == "completion":
        prompt, completion = _string(row, data.prompt_field), _string(row, data.completion_field)
        ids, mask = _encode_completion(prompt, completion, train_on, tokenizer, data)
    elif fmt == "chat":
        ids, mask = _encode_chat(chat_messages(row, data), train_on, tokenizer, data)
    else:
        raise DataError(f"unknown data format {fmt!r}; use text, completion or chat.")
    if len(ids) > data.max_seq_length:
        return Example(ids[: data.max_seq_length], mask[: data.max_seq_length], truncated=True, length=len(ids))
    return Example(ids, mask, length=len(ids))


def _string(row: dict, key: str) -> str:
    if row.get(key) is None:
        raise DataError(f"missing key '{key}' (the row has {list(row)}).")
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"'{key}' must be a string, got {type(value).__name__}: {value!r:.60}.")
    if not value.strip():
        raise DataError(f"'{key}' is empty.")
    return value


def _messages(row: dict, key: str) -> list[dict]:
    messages = row.get(key)
    if messages is None:
        raise DataError(f"missing key '{key}' (the row has {list(row)}).")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"'{key}' must be a non-empty list of {{role, content}} messages.")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"]:
            raise DataError(f"'{key}' message {i}: needs a 'role' string ({', '.join(ROLES)}).")
        if m["role"] not in ROLES:
            raise DataError(f"'{key}' message {i}: role {m['role']!r} is not a chat role; the roles are "
                            f"{', '.join(ROLES)}.{did_you_mean(m['role'], ROLES)}")
        if not isinstance(m.get("content"), str):
            raise DataError(f"'{key}' message {i} ({m['role']}): 'content' must be a string.")
    return messages


def chat_messages(row: dict, data: "DataSection") -> list[dict]:
    """A chat row's messages; a prompt/completion row becomes a user turn and the assistant's answer.
    data.system_prompt goes first where the conversation has no system message."""
    if row.get(data.messages_field) is None and isinstance(row.get(data.prompt_field), str):
        messages = [{"role": "user", "content": _string(row, data.prompt_field)},
                    {"role": "assistant", "content": _string(row, data.completion_field)}]
    else:
        messages = _messages(row, data.messages_field)
    if data.system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": data.system_prompt}, *messages]
    return messages


def _eos_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token to append; set data.add_eos = false.")
    return tokenizer.eos_token_id


def _encode_text(text: str, train_on: str, tokenizer: Any, data: "DataSection") -> tuple[list[int], list[int]]:
    template = data.response_template if train_on == "completion" else None
    if train_on == "completion" and not template:
        raise DataError("train_on = 'completion' with text data needs data.response_template, or set data.train_on = 'all'.")
    if template is None:
        ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
        mask = [1] * len(ids)
    else:
        at = text.find(template)
        if at < 0:
            raise DataError(f"data.response_template {template!r} not found in the text.")
        ids, first = _ids_from_char(tokenizer, text, at + len(template))
        mask = [0] * first + [1] * (len(ids) - first)
    if data.add_eos and (not ids or ids[-1] != _eos_id(tokenizer)):
        ids.append(tokenizer.eos_token_id)
        mask.append(1)
    return ids, mask


def _ids_from_char(tokenizer: Any, text: str, start: int) -> tuple[list[int], int]:
    """Token ids of `text`, and the first token that reaches past character `start`.

    Character offsets make this independent of how the marker happens to tokenize (TRL's collator
    matches template tokens, which misses when BPE merges across the marker's edge). A token straddling
    `start` counts as after it: it carries the first answer characters.
    """
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        first = next((i for i, (_, end) in enumerate(enc["offset_mapping"]) if end > start), len(ids))
        return ids, first
    # Slow tokenizers have no offsets: count the prefix's tokens (can be off by one at a merge boundary).
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    return ids, min(len(tokenizer(text[:start], add_special_tokens=True)["input_ids"]), len(ids))


def _encode_completion(prompt: str, completion: str, train_on: str, tokenizer: Any, data: "DataSection") -> tuple[list[int], list[int]]:
    # Token-level concatenation on purpose: generation feeds tokenizer(prompt), so training must see
    # the prompt tokenized the same way, not as part of prompt + completion.
    p = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    c = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if data.add_eos and (not c or c[-1] != _eos_id(tokenizer)):
        c.append(tokenizer.eos_token_id)
    mask = [0] * len(p) + [1] * len(c) if train_on == "completion" else [1] * (len(p) + len(c))
    return p + c, mask


def _encode_chat(messages: list[dict], train_on: str, tokenizer: Any, data: "DataSection") -> tuple[list[int], list[int]]:
    """Render with the tokenizer's chat template; in completion mode only assistant turns are targets.

    An assistant turn's targets are its content plus the end-of-turn token(s) the template puts after
    it (`<|im_end|>` for ChatML); whitespace after the turn's last special token (ChatML's "\\n") is
    not a target, since generation stops at the end-of-turn token and never produces it.
    """
    style = data.chat_format
    if style == "auto" and not getattr(tokenizer, "chat_template", None):
        raise DataError("chat data needs a tokenizer with a chat template, and this one has none; set data.chat_format "
                        "(chatml, llama3, mistral, alpaca, phi, gemma), or use text or completion data.")
    text = _render(tokenizer, messages, generation_prompt=False, chat_format=style)
    ids = _tokens(tokenizer, text)
    if train_on == "all":
        mask = [1] * len(ids)
    else:
        mask = [0] * len(ids)
        spans = _assistant_spans_by_prefix(tokenizer, messages, ids, style)
        if spans is None:
            spans = _assistant_spans_by_offsets(tokenizer, messages, text, ids)
        for a, b in spans:
            mask[a:b] = [1] * (b - a)
    # A named format ends each turn itself (its end-of-turn marker is a target), as generation stops there.
    if style == "auto" and data.add_eos and not _ends_with_eos(tokenizer, ids):
        ids.append(_eos_id(tokenizer))
        mask.append(1 if train_on == "all" or messages[-1]["role"] == "assistant" else 0)
    return ids, mask


def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool, chat_format: str = "auto", whole: bool = True) -> str:
    """`whole`: a complete conversation (a named format may close it, as phi writes EOS); False for the
    partial renders that locate each turn."""
    if chat_format != "auto":

        try:
            return chat_formats.render(messages, chat_format, tokenizer, generation_prompt, whole=whole)
        except FtkitError as e:
            raise DataError(str(e)) from None
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja's raise_exception, e.g. "roles must alternate"
        raise DataError(f"the chat template rejected this conversation: {e}") from None


def chat_prompt_ids(messages: list[dict], chat_format: str, tokenizer: Any) -> list[int]:
    """The tokens generation feeds the model for a conversation: what a training example of it has before
    its last assistant turn's targets (the same render, the same tokenization)."""
    if chat_format == "auto" and not getattr(tokenizer, "chat_template", None):
        raise DataError("this tokenizer has no chat template; choose a prompt format (chatml, llama3, mistral, alpaca, phi, gemma).")
    return _tokens(tokenizer, _render(tokenizer, messages, generation_prompt=True, chat_format=chat_format))


def _tokens(tokenizer: Any, text: str) -> list[int]:
    # The template writes any BOS itself; this is what apply_chat_template(tokenize=True) does.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _special_ids(tokenizer: Any) -> set[int]:
    # all_special_ids misses tokens registered as special only in the tokenizer file (e.g. <|im_start|>).
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_ids) | {i for i, t in added.items() if getattr(t, "special", False)}


def _ends_with_eos(tokenizer: Any, ids: list[int]) -> bool:
    """The last token, ignoring trailing whitespace tokens, is EOS (ChatML's "<|im_end|>\\n" counts)."""
    eos = tokenizer.eos_token_id
    for i in reversed(ids):
        if i == eos:
            return True
        if tokenizer.decode([i]).strip():
            return False
    return False


def _trim_turn_end(tokenizer: Any, ids: list[int], a: int, b: int) -> int:
    """End of a turn's target span: drop whitespace-only tokens after the span's last special token."""
    special = _special_ids(tokenizer)
    last = next((j for j in range(b - 1, a - 1, -1) if ids[j] in special), None)
    if last is not None and all(not tokenizer.decode([ids[j]]).strip() for j in range(last + 1, b)):
        return last + 1
    return b


def _assistant_spans_by_prefix(tokenizer: Any, messages: list[dict], ids: list[int], chat_format: str = "auto") -> list[tuple[int, int]] | None:
    """Token spans of the assistant turns: for turn i, the tokens that rendering messages[:i+1] adds to
    messages[:i] + the generation prompt. None when the template lacks the prefix property."""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        try:
            before = _tokens(tokenizer, _render(tokenizer, messages[:i], generation_prompt=True, chat_format=chat_format))
            upto = _tokens(tokenizer, _render(tokenizer, messages[: i + 1], generation_prompt=False, chat_format=chat_format, whole=False))
        except DataError:  # e.g. a template that refuses an empty or assistant-first prefix
            return None
        if upto[: len(before)] != before or ids[: len(upto)] != upto:
            return None
        spans.append((len(before), _trim_turn_end(tokenizer, upto, len(before), len(upto))))
    return spans


def _assistant_spans_by_offsets(tokenizer: Any, messages: list[dict], text: str, ids: list[int]) -> list[tuple[int, int]]:
    """Fallback for templates whose partial renders are not prefixes of the full one (a message count in
    a header, earlier reasoning dropped, ...): find each message's content in the rendered text, in
    order, and take the tokens covering an assistant's content plus one special token right after it."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("this chat template needs character offsets to find the assistant turns, which only fast tokenizers give.")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    if list(enc["input_ids"]) != ids:
        raise DataError("tokenizing the rendered conversation twice gave different ids.")
    special = _special_ids(tokenizer)
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        content = m["content"].strip()  # templates often trim
        at = text.find(content, cursor) if content else -1
        if at < 0:
            if m["role"] == "assistant":
                raise DataError(f"assistant message {i}: its content is not in the conversation the chat template renders.")
            continue
        cursor = at + len(content)
        if m["role"] != "assistant":
            continue
        a = next(j for j, (_, end) in enumerate(offsets) if end > at)
        b = next((j for j in range(a, len(ids)) if offsets[j][0] >= cursor), len(ids))
        if b < len(ids) and ids[b] in special:
            b += 1
        spans.append((a, b))
    return spans


def tokenize_splits(data: "DataSection", tokenizer: Any, parts: dict[str, Part] | None = None) -> Splits:
    """SFT examples; `parts`: the rows, already read. Preference rows: ftkit.data.preference.tokenize (which builds
    on this module, so this one cannot call it)."""
    parts = read_parts(data) if parts is None else parts
    fmt = detect_format(parts["train"].rows, data, parts["train"].source)
    if fmt == "preference":
        raise DataError(f"{parts['train'].source}: preference rows (chosen, rejected) are tokenized as pairs by "
                        "ftkit.data.preference.tokenize, not as SFT examples.")
    train_on = resolve_train_on(data.train_on, fmt, data.response_template)
    if fmt == "text" and train_on == "completion" and not data.response_template:
        raise DataError(
            f"{parts['train'].source}: train_on = 'completion' with text data needs data.response_template "
            "(the marker after which the completion starts), or set data.train_on = 'all'."
        )
    out: dict[str, list[Example]] = {}
    n_truncated, n_dropped, lengths, dropped_where = {}, {}, {}, {}
    for split in SPLITS:
        part = parts[split]
        examples, truncated, dropped, full, where_dropped = [], 0, 0, [], []
        for i, (row, where) in enumerate(zip(part.rows, part.where)):
            try:
                ex = encode(row, fmt, train_on, tokenizer, data)
            except DataError as e:
                raise DataError(f"{where} ({split} row {i + 1}): {e}") from None
            truncated += ex.truncated
            full.append(ex.length or len(ex.ids))
            if not any(ex.mask[1:]):  # mask[0] predicts nothing; such an example adds no loss
                dropped += 1
                if len(where_dropped) < 3:
                    where_dropped.append(f"{where} ({_why_no_target(row, ex, fmt, train_on, data)})")
                continue
            examples.append(ex)
        if part.rows and not examples:
            raise DataError(
                f"{part.source}: none of the {len(part.rows)} {split} examples has a token to train on "
                f"(loss on {train_on}, max_seq_length {data.max_seq_length}), e.g. {where_dropped[0]}. Check data.train_on, "
                "data.response_template, or raise data.max_seq_length."
            )
        out[split], n_truncated[split], n_dropped[split] = examples, truncated, dropped
        lengths[split], dropped_where[split] = length_percentiles(full), where_dropped
    sources = {split: parts[split].source for split in SPLITS}
    return Splits(**out, format=fmt, train_on=train_on, n_truncated=n_truncated, sources=sources, n_dropped=n_dropped,
                  lengths=lengths, dropped_where=dropped_where)


def length_percentiles(lengths: list[int]) -> dict[str, int]:
    """p50, p90, p99 (nearest rank: always an actual example's length) and max of a split's lengths."""
    ordered = sorted(lengths)
    if not ordered:
        return {}
    def at(p: int) -> int:
        return ordered[max(math.ceil(p / 100 * len(ordered)) - 1, 0)]

    return {"p50": at(50), "p90": at(90), "p99": at(99), "max": ordered[-1]}


def _why_no_target(row: dict, ex: Example, fmt: str, train_on: str, data: DataSection) -> str:
    """Why an example has no token to train on, in a few words for the message that leaves it out."""
    if fmt == "chat" and train_on == "completion":
        try:
            roles = [m["role"] for m in chat_messages(row, data)]
        except DataError:
            roles = []
        if "assistant" not in roles:
            return "no assistant turn; with data.train_on = 'completion' only assistant turns are trained"
    if ex.truncated:
        return f"the prompt fills data.max_seq_length = {data.max_seq_length}"
    if fmt == "text" and train_on == "completion":
        return "nothing after data.response_template"
    return f"no target token with data.train_on = '{train_on}'"
