"""Generate the bundled quickstart instruction set (lrft/data/quickstart/*.jsonl), deterministically.

The tasks are tiny and regular (reverse, capitalise, repeat or spell a word, count on by one) so
that a randomly initialised byte-level model visibly learns them within a few dozen steps, and
every row stays under 80 bytes. Train and validation never share a (task, argument) pair.

    python scripts/make_quickstart_data.py            # rewrite the files
    python scripts/make_quickstart_data.py --check    # exit 1 if the files are out of date
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable
from pathlib import Path

SEED = 1234
N_TRAIN, N_VALIDATION = 400, 60
MAX_ROW_BYTES = 80
OUT_DIR = Path(__file__).resolve().parent.parent / "lrft" / "data" / "quickstart"

_WORD_BLOCK = """
ant ape arm art axe bag bat bed bee bell bird boat bone book bow box boy bus cake cap car cat
cow cup day dog door duck ear egg eye fan fish fox frog gate gift goat hat hen hill home horn
ice ink jam jar key kid king kite lamp leaf leg lion lip map milk moon mouse nest net nose nut
oak owl pan pen pig pin pot rain rat ring road rock rose rug sea seed ship shoe sky sock star
sun tea tent tie toe top toy tree van web wind wing wolf yak zoo bread chair cloud drum flag
glass grape horse juice lemon mango melon note paper queen river salt snake spoon stone table
tiger train water whale zebra apple baby candy dance earth field ghost heart honey house lake
light money music night ocean party plant smile snow storm sugar sweet tooth wheel
"""
WORDS = _WORD_BLOCK.split()

Task = tuple[str, Callable[[str], str]]
WORD_TASKS: list[Task] = [
    ("Reverse the word.", lambda w: w[::-1]),
    ("Write the word in capitals.", str.upper),
    ("Repeat the word twice.", lambda w: f"{w} {w}"),
    ("Spell the word with dashes.", lambda w: "-".join(w)),
]


def all_rows() -> list[dict[str, str]]:
    rows = [
        {"instruction": instruction, "input": word, "output": fn(word)}
        for instruction, fn in WORD_TASKS
        for word in WORDS
    ]
    rows += [{"instruction": f"What comes after {n}?", "input": "", "output": str(n + 1)} for n in range(100)]
    return rows


def make_splits() -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    rows = all_rows()
    if len(set(WORDS)) != len(WORDS):
        raise SystemExit("WORDS holds duplicates")
    if len(rows) < N_TRAIN + N_VALIDATION:
        raise SystemExit(f"only {len(rows)} rows; add words")
    for row in rows:
        size = sum(len(v.encode()) for v in row.values())
        if size >= MAX_ROW_BYTES:
            raise SystemExit(f"row too long ({size} bytes): {row}")
    random.Random(SEED).shuffle(rows)
    return rows[:N_TRAIN], rows[N_TRAIN : N_TRAIN + N_VALIDATION]


def to_jsonl(rows: list[dict[str, str]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only verify the files are up to date")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    train, validation = make_splits()
    stale = []
    for name, rows in (("train.jsonl", train), ("validation.jsonl", validation)):
        path = args.out / name
        text = to_jsonl(rows)
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(str(path))
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path} ({len(rows)} rows)")
    if stale:
        print("out of date: " + ", ".join(stale) + " (run scripts/make_quickstart_data.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
