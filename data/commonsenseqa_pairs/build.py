"""Build the CommonsenseQA preference pairs (train.jsonl, valid.jsonl here) from the shipped slice in
../commonsenseqa: prompt = the question and its choices as recipes/commonsense_qa.toml's prompt template writes
them, chosen = the right choice's text (its completion template), rejected = one wrong choice's, drawn by a
generator seeded with SEED and the question's id (so a pair does not depend on which other rows are built).

    python data/commonsenseqa_pairs/build.py            # rewrite the files
    python data/commonsenseqa_pairs/build.py --check    # exit 1 if the files differ from a fresh build

The prompt and the responses come from ftkit's own column mapping (ftkit.data.mapping), given the ready
recipe's [data] keys, so they are the text that recipe trains and `ftkit eval` scores.
"""

from __future__ import annotations

import json
import random
import sys
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SOURCE = REPO / "data" / "commonsenseqa"
RECIPE = REPO / "recipes" / "commonsense_qa.toml"
SEED = 19
# (split, source file, rows taken from its start)
SPLITS = (("train", "train.jsonl", None), ("valid", "valid.jsonl", 100))
KEYS = ("columns", "choices_field", "answer_field", "prompt_template", "completion_template", "choice_format")


def pairs(split: str, name: str, limit: int | None) -> list[dict]:
    from ftkit.data.mapping import Mapper
    from ftkit.recipe.schema import DataSection

    section = tomllib.loads(RECIPE.read_text(encoding="utf-8"))["data"]
    spec = DataSection(path=str(SOURCE), **{k: section[k] for k in KEYS if k in section})
    mapper = Mapper(spec, task=None)
    lines = (SOURCE / name).read_text(encoding="utf-8").splitlines()
    out = []
    for n, line in enumerate(lines[:limit], 1):
        row, where = json.loads(line), f"{SOURCE / name}:{n}"
        mapped = mapper.map(row, where)
        texts, _ = mapper.candidates(mapped, where)
        gold = mapped["_gold"]
        wrong = [i for i, t in enumerate(texts) if t != texts[gold]]  # a choice with the right one's text is not wrong
        pick = random.Random(f"{SEED}:{row['id']}").choice(wrong)
        out.append({"id": row["id"], "prompt": mapped["prompt"], "chosen": texts[gold], "rejected": texts[pick]})
    return out


def render(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def build(dest: Path) -> dict[str, int]:
    """Write every split's pairs into `dest`; the row count per split."""
    dest.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, name, limit in SPLITS:
        rows = pairs(split, name, limit)
        (dest / f"{split}.jsonl").write_text(render(rows), encoding="utf-8")
        counts[split] = len(rows)
    return counts


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(REPO))
    if "--check" in argv:
        stale = [s for s, name, limit in SPLITS if (HERE / f"{s}.jsonl").read_text(encoding="utf-8") != render(pairs(s, name, limit))]
        print("stale: " + ", ".join(stale) if stale else "up to date")
        return 1 if stale else 0
    print(build(HERE))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
