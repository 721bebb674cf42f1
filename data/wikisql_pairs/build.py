"""Build WikiSQL preference pairs (train.jsonl, valid.jsonl here) from ../wikisql: the right SQL preferred to a
corrupted one. prompt = the row's text up to and including "A:", chosen = " " + its SQL, rejected = that SQL with
one deliberate error, drawn per row by a generator seeded with SEED and the row's split and line number:
  column  the selected column (after any aggregate) replaced by another column of the same table;
  value   the first WHERE condition's value replaced by the first condition value of another row of the split
          (a value the question does not contain); rows without a WHERE clause always get `column`.

    python data/wikisql_pairs/build.py            # rewrite the files
    python data/wikisql_pairs/build.py --check    # exit 1 if the files differ from a fresh build
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parent / "wikisql"
SEED = 19
SPLITS = (("train", "train.jsonl"), ("valid", "valid.jsonl"))  # (split, source file): every row
SQL = re.compile(r"SELECT (?:(MAX|MIN|COUNT|SUM|AVG) )?(.*?) FROM (\S+)(?: WHERE (.*))?$")
CONDITION = re.compile(r"^(.*?) (=|>|<) (.*)$")


def parse(text: str) -> tuple[str, list[str], str, re.Match]:
    head, sql = text.split("\nA: ", 1)
    columns = head.split("\ncolumns: ", 1)[1].split("\nQ: ", 1)[0].split(", ")
    m = SQL.match(sql)
    if m is None:
        raise ValueError(f"not a WikiSQL query: {sql!r}")
    return head + "\nA:", columns, sql, m


def first_value(m: re.Match) -> str | None:
    if not m.group(4):
        return None
    cond = CONDITION.match(m.group(4).split(" AND ")[0])
    return cond.group(3) if cond else None


def corrupt(sql: str, columns: list[str], m: re.Match, kind: str, rng: random.Random, values: list[str]) -> str:
    agg, col, table, where = m.groups()
    if kind == "column":
        other = rng.choice([c for c in columns if c != col])
        return f"SELECT {agg + ' ' if agg else ''}{other} FROM {table}" + (f" WHERE {where}" if where else "")
    value = first_value(m)
    other = rng.choice([v for v in values if v != value and v.strip("'").lower() not in sql.lower()])
    first, *rest = where.split(" AND ")
    cond = CONDITION.match(first)
    return f"SELECT {agg + ' ' if agg else ''}{col} FROM {table} WHERE " + " AND ".join([f"{cond.group(1)} {cond.group(2)} {other}", *rest])


def pairs(split: str, name: str) -> list[dict]:
    rows = [json.loads(line)["text"] for line in (SOURCE / name).read_text(encoding="utf-8").splitlines()]
    parsed = [parse(t) for t in rows]
    values = sorted({v for *_, m in parsed if (v := first_value(m))})
    out = []
    for n, (prompt, columns, sql, m) in enumerate(parsed, 1):
        rng = random.Random(f"{SEED}:{split}:{n}")
        kinds = ["column", "value"] if first_value(m) and len(columns) > 1 else ["value"] if first_value(m) else ["column"]
        kind = rng.choice(kinds)
        out.append({"prompt": prompt, "chosen": " " + sql, "rejected": " " + corrupt(sql, columns, m, kind, rng, values),
                    "corruption": kind, "source": f"wikisql/{name}:{n}"})
    return out


def render(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def build(dest: Path) -> dict[str, dict[str, int]]:
    """Write every split's pairs into `dest`; per split, the pairs of each corruption."""
    dest.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, name in SPLITS:
        rows = pairs(split, name)
        (dest / f"{split}.jsonl").write_text(render(rows), encoding="utf-8")
        counts[split] = {k: sum(r["corruption"] == k for r in rows) for k in ("column", "value")}
    return counts


def main(argv: list[str]) -> int:
    if "--check" in argv:
        stale = [s for s, name in SPLITS if (HERE / f"{s}.jsonl").read_text(encoding="utf-8") != render(pairs(s, name))]
        print("stale: " + ", ".join(stale) if stale else "up to date")
        return 1 if stale else 0
    print(build(HERE))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
