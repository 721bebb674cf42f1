"""Make bench/data/chat/train.jsonl: real single-turn chats of varied length, for bench/speed.py.

    python bench/data/make_chat.py [--shared /work/shared/data]

Half the rows are BANKING77 customer queries (short to long) answered with their intent label, half are
CommonsenseQA questions with their five choices answered with the right one, in a seeded order. Each
conversation is system + user + assistant, so `mlx_lm lora --mask-prompt` and ftkit's assistant-only
loss train on the same turn. The output is committed (see PROVENANCE.md): the benchmark never needs
the shared folder.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
PER_SOURCE = 600
SEED = 0
BANKING_SYSTEM = "Classify the customer's banking question into one of the 77 BANKING77 intents."
CSQA_SYSTEM = "Answer the multiple-choice question with the letter and text of the right choice."


def banking(shared: Path, rng: random.Random) -> list[dict]:
    with (shared / "banking77" / "train.csv").open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    return [{"messages": [{"role": "system", "content": BANKING_SYSTEM},
                          {"role": "user", "content": r["text"].strip()},
                          {"role": "assistant", "content": r["category"]}]}
            for r in rng.sample(rows, PER_SOURCE)]


def csqa(shared: Path, rng: random.Random) -> list[dict]:
    lines = (shared / "commonsenseqa" / "v1.11" / "train_rand_split.jsonl").read_text(encoding="utf-8").splitlines()
    out = []
    for line in rng.sample(lines, PER_SOURCE):
        q = json.loads(line)
        choices = {c["label"]: c["text"] for c in q["question"]["choices"]}
        user = q["question"]["stem"].strip() + "\n" + "\n".join(f"{k}. {v}" for k, v in choices.items())
        out.append({"messages": [{"role": "system", "content": CSQA_SYSTEM},
                                 {"role": "user", "content": user},
                                 {"role": "assistant", "content": f"{q['answerKey']}. {choices[q['answerKey']]}"}]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", type=Path, default=HERE.parents[2] / "shared" / "data")
    args = ap.parse_args()
    rng = random.Random(SEED)
    rows = banking(args.shared, rng) + csqa(args.shared, rng)
    rng.shuffle(rows)
    dest = HERE / "chat" / "train.jsonl"
    dest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"{dest}: {len(rows)} conversations")


if __name__ == "__main__":
    main()
