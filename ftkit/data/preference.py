"""Preference rows -> `Pair`s (prompt + chosen, prompt + rejected), for train.objective dpo and orpo.

The row shapes users bring, as TRL reads them:

- `{"prompt": str, "chosen": str, "rejected": str}`: plain text, encoded as completion data is (the prompt
  tokenized with the tokenizer's special tokens, each response without, then EOS with data.add_eos);
  with a named data.chat_format the prompt becomes a user turn and each response the assistant's answer;
- `{"messages": [...], "chosen": ..., "rejected": ...}` (or `prompt` as a message list), each response a
  string, a message, or a list of messages: rendered with the chat template (data.chat_format);
- `{"chosen": [messages], "rejected": [messages]}`, the shape of hub preference sets: the messages both
  share from the start are the prompt, the differing ones the responses (TRL's implicit prompt); two strings
  without a prompt are split likewise, at a word boundary.

A chat response is encoded exactly as SFT chat encoding encodes an assistant turn (ftkit.data.encode): the
conversation rendered with it, the mask on its assistant turn(s) only. The prompt's tokens are the same in
both sequences (checked: a template that renders them differently is an error, not a silent mismatch).

Truncation as TRL's: the prompt is kept whole and the responses cut to data.max_seq_length; only a prompt
that leaves no room for a response token is cut, from the left, to its last max_seq_length // 2 tokens.
A pair whose chosen and rejected are the same tokens (before or after truncation), or whose response is
empty, is left out and counted (Splits.n_dropped, dropped_where).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ftkit.common.errors import DataError
from ftkit.data.batch import Example, Pair, Splits
from ftkit.data.encode import _encode_chat, _eos_id, _messages, length_percentiles, tokenize_splits
from ftkit.data.mapping import read_parts
from ftkit.data.rows import SPLITS, Part, detect_format

if TYPE_CHECKING:
    from ftkit.recipe.schema import DataSection


FORMAT = "preference"
OBJECTIVES = ("dpo", "orpo")


def sequences(items: Iterable[Example | Pair]) -> list[Example]:
    """Every sequence, in order: a pair's chosen then its rejected; an Example as it is."""
    out: list[Example] = []
    for e in items:
        out += [e.chosen, e.rejected] if isinstance(e, Pair) else [e]
    return out


def check_objective(fmt: str, objective: str, where: str) -> None:
    """Preference pairs train only with dpo/orpo, and dpo/orpo only on pairs: say which key to set."""
    if objective in OBJECTIVES and fmt != FORMAT:
        raise DataError(f"{where}: train.objective = '{objective}' trains on preference pairs, but this is {fmt} data. Give rows "
                        "with a prompt (or messages), a chosen and a rejected response (data.chosen_field, data.rejected_field; "
                        "data.format = 'preference'), or set train.objective = 'sft'.")
    if objective not in OBJECTIVES and fmt == FORMAT:
        raise DataError(f"{where}: these are preference pairs (chosen and rejected responses), which train with "
                        f"train.objective = 'dpo' or 'orpo', not '{objective}'. Set train.objective, or data.format to the "
                        "format to read the rows as (e.g. 'chat' for their messages).")


# ---------------------------------------------------------------- the row's prompt and responses


def _response(row: dict, key: str) -> str | list[dict]:
    if row.get(key) is None:
        raise DataError(f"missing key '{key}' (the row has {list(row)}); a preference row has a prompt (or messages), "
                        f"a chosen and a rejected response (data.chosen_field, data.rejected_field).")
    value = row[key]
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and "role" in value:
        value = [value]
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        return _messages({key: value}, key)
    raise DataError(f"'{key}' must be a string, a {{role, content}} message or a list of messages; got "
                    f"{type(value).__name__}: {value!r:.60}.")


def _split_text(chosen: str, rejected: str) -> tuple[str, str, str]:
    """The shared leading text as the prompt, cut at a word boundary, the space before the differing word going
    with the responses (as TRL's extract_prompt)."""
    i = next((k for k, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
    while i > 0 and not chosen[i - 1].isspace():
        i -= 1
    if i > 0 and chosen[i - 1] == " ":
        i -= 1
    return chosen[:i], chosen[i:], rejected[i:]


def _shared(chosen: list[dict], rejected: list[dict]) -> int:
    return next((k for k, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))


def parse(row: dict, data: "DataSection") -> tuple[bool, Any, Any, Any]:
    """(chat, prompt, chosen, rejected): strings, or message lists when `chat`."""
    chosen, rejected = _response(row, data.chosen_field), _response(row, data.rejected_field)
    if row.get(data.messages_field) is not None:
        prompt: Any = _messages(row, data.messages_field)
    elif isinstance(row.get(data.prompt_field), list):
        prompt = _messages(row, data.prompt_field)
    elif row.get(data.prompt_field) is not None:
        prompt = row[data.prompt_field]
        if not isinstance(prompt, str):
            raise DataError(f"'{data.prompt_field}' must be a string or a list of messages, got {type(prompt).__name__}: {prompt!r:.60}.")
    elif isinstance(chosen, list) and isinstance(rejected, list):
        k = _shared(chosen, rejected)
        prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
    elif isinstance(chosen, str) and isinstance(rejected, str):
        prompt, chosen, rejected = _split_text(chosen, rejected)
    else:
        prompt = None
    if not prompt:
        raise DataError(f"no prompt: the row has no '{data.prompt_field}' or '{data.messages_field}', and its chosen and "
                        f"rejected share no leading {'messages' if isinstance(chosen, list) else 'text'} to take as the prompt.")
    chat = any(isinstance(v, list) for v in (prompt, chosen, rejected)) or data.chat_format != "auto"
    if not chat:
        return False, prompt, chosen, rejected
    turn = lambda v, role: [{"role": role, "content": v}] if isinstance(v, str) else v  # noqa: E731
    prompt = turn(prompt, "user")
    if data.system_prompt and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": data.system_prompt}, *prompt]
    return True, prompt, turn(chosen, "assistant"), turn(rejected, "assistant")


def _empty(response: str | list[dict]) -> bool:
    if isinstance(response, str):
        return not response.strip()
    return not response or not any(m["content"].strip() for m in response if m["role"] == "assistant")


# ---------------------------------------------------------------- tokens


def _text_side(response: str, tokenizer: Any, data: "DataSection") -> tuple[list[int], list[int]]:
    ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    if data.add_eos and (not ids or ids[-1] != _eos_id(tokenizer)):
        ids.append(tokenizer.eos_token_id)
    return ids, [1] * len(ids)


def _chat_side(prompt: list[dict], response: list[dict], key: str, tokenizer: Any, data: "DataSection") -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, response ids, response mask): the conversation encoded as SFT chat encoding does, cut where
    the response's first assistant turn starts (the earlier turns' targets belong to the prompt, mask 0)."""
    if response[0]["role"] != "assistant":
        raise DataError(f"'{key}': the response must start with an assistant turn, not {response[0]['role']!r}.")
    ids, mask = _encode_chat(prompt + response, "completion", tokenizer, data)
    before = sum(m["role"] == "assistant" for m in prompt)  # target runs (assistant turns) inside the prompt
    runs = [i for i in range(len(mask)) if mask[i] and (i == 0 or not mask[i - 1])]
    if len(runs) <= before:
        return ids, [], []
    at = runs[before]
    return ids[:at], ids[at:], mask[at:]


@dataclass
class Encoded:
    pair: Pair | None
    why: str | None  # why it is left out
    prompt_cut: bool
    length: int  # the longer sequence's tokens before truncation


def encode_pair(row: dict, tokenizer: Any, data: "DataSection") -> Encoded:
    """One preference row -> a Pair, or why it is left out. Errors name the key; the caller adds the row."""
    chat, prompt, chosen, rejected = parse(row, data)
    for key, response in ((data.chosen_field, chosen), (data.rejected_field, rejected)):
        if _empty(response):
            return Encoded(None, f"the {key} response is empty", False, 0)
    if chat:
        p, rc, mc = _chat_side(prompt, chosen, data.chosen_field, tokenizer, data)
        p2, rr, mr = _chat_side(prompt, rejected, data.rejected_field, tokenizer, data)
        if p != p2:
            raise DataError("the chat template renders the prompt to different tokens before the chosen and before the "
                            "rejected response, so their log-probabilities would not share a prompt; try a named "
                            "data.chat_format (chatml, llama3, ...).")
    else:
        p = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        (rc, mc), (rr, mr) = _text_side(chosen, tokenizer, data), _text_side(rejected, tokenizer, data)
    length = len(p) + max(len(rc), len(rr))
    if rc == rr:
        return Encoded(None, f"{data.chosen_field} and {data.rejected_field} are the same tokens", False, length)
    limit, n_prompt = data.max_seq_length, len(p)
    prompt_cut = n_prompt >= limit  # no room for a response token: TRL's keep_end for the prompt
    if prompt_cut:
        p = p[-(limit // 2):]
    room = limit - len(p)
    sides = []
    for r, m in ((rc, mc), (rr, mr)):
        cut = prompt_cut or len(r) > room
        sides.append(Example(p + r[:room], [0] * len(p) + m[:room], truncated=cut, length=n_prompt + len(r)))
    truncated = sides[0].truncated or sides[1].truncated
    if sides[0].ids == sides[1].ids:
        why = f"{data.chosen_field} and {data.rejected_field} are the same after truncation to data.max_seq_length = {limit}"
        return Encoded(None, why, prompt_cut, length)
    for key, side in zip((data.chosen_field, data.rejected_field), sides):
        if not any(side.mask[1:]):
            after = f" after truncation to data.max_seq_length = {limit}" if truncated else ""
            return Encoded(None, f"no {key} token to train on{after}", prompt_cut, length)
    return Encoded(Pair(sides[0], sides[1], truncated=truncated), None, prompt_cut, length)


def tokenize(data: "DataSection", tokenizer: Any) -> Splits:
    """The recipe's data tokenized: preference rows as Pairs, any other format as SFT examples (encode.tokenize_splits)."""
    parts = read_parts(data)
    if detect_format(parts["train"].rows, data, parts["train"].source) == FORMAT:
        return tokenize_pairs(parts, data, tokenizer)
    return tokenize_splits(data, tokenizer, parts)


def tokenize_pairs(parts: dict[str, Part], data: "DataSection", tokenizer: Any) -> Splits:
    """Every split's rows as Pairs, with what truncation and leaving out did, per split."""
    if data.train_on == "all":
        raise DataError(f"{parts['train'].source}: data.train_on = 'all' with preference data: DPO and ORPO compare the "
                        "responses' log-probabilities, the prompt is never a target. Remove data.train_on.")
    out: dict[str, list[Pair]] = {}
    n_truncated, n_dropped, n_prompt_cut, lengths, dropped_where = {}, {}, {}, {}, {}
    for split in SPLITS:
        part = parts[split]
        pairs, truncated, cut, full, where_dropped = [], 0, 0, [], []
        for i, (row, where) in enumerate(zip(part.rows, part.where)):
            try:
                enc = encode_pair(row, tokenizer, data)
            except DataError as e:
                raise DataError(f"{where} ({split} row {i + 1}): {e}") from None
            truncated += enc.pair.truncated if enc.pair else enc.length > data.max_seq_length
            cut += enc.prompt_cut
            if enc.length:
                full.append(enc.length)
            if enc.pair is None:
                if len(where_dropped) < 3:
                    where_dropped.append(f"{where} ({enc.why})")
                continue
            pairs.append(enc.pair)
        if part.rows and not pairs:
            raise DataError(f"{part.source}: none of the {len(part.rows)} {split} preference rows gives a pair to train on "
                            f"(max_seq_length {data.max_seq_length}), e.g. {where_dropped[0]}.")
        out[split], n_truncated[split], n_dropped[split] = pairs, truncated, len(part.rows) - len(pairs)
        n_prompt_cut[split], lengths[split], dropped_where[split] = cut, length_percentiles(full), where_dropped
    return Splits(**out, format=FORMAT, train_on="completion", n_truncated=n_truncated,
                  sources={split: parts[split].source for split in SPLITS}, n_dropped=n_dropped, lengths=lengths,
                  dropped_where=dropped_where, n_prompt_cut=n_prompt_cut)


def longest(items: Sequence[Example | Pair]) -> list[int]:
    """Each item's longest sequence: what data.max_seq_length and the model's context bound."""
    return [max(len(e.chosen.ids), len(e.rejected.ids)) if isinstance(e, Pair) else len(e.ids) for e in items]
