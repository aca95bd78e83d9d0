"""Benchmark the cached data pipeline (lrft.data.pipeline) on a large generated dataset.

Generates N rows (default 1M) of Alpaca-sized instruction data (or chat conversations with
``--kind chat`` once lrft has that dataset kind), trains a small BPE tokenizer on a sample (no
download), then launches two fresh processes one after the other: the first with a cold cache
(reads, validates, tokenizes, writes the cache), the second with the warm cache. Each reports the
time until the first training batch is ready and its peak memory. ``--old-rows K`` also times the
list pipeline (``encode_rows(load_rows(...))``) on the first K rows, for comparison.

    python scripts/bench_data_pipeline.py --rows 1000000 --workdir /tmp/lrft-bench --num-proc 2

Memory is reported two ways: ``peak_rss`` (ru_maxrss: every resident page, including the pages of
the memory-mapped cache, which the kernel can drop at will) and ``peak_anon`` (the process's own
heap, sampled every 20 ms: what the data really costs). ``data_*`` subtract the process's memory
after its imports and tokenizer load, i.e. memory "beyond the model".
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


# --- row generators (pluggable: add one here, pick it with --kind) ------------------------------


def _sentences(seed: int, n: int = 20000) -> list[str]:
    rng = random.Random(seed)
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    weights = [26 - i for i in range(26)]
    words = ["".join(rng.choices(letters, weights, k=rng.randint(2, 9))) for _ in range(3000)]
    return [
        " ".join(rng.choices(words, k=rng.randint(5, 16))).capitalize() + rng.choice(".?!") for _ in range(n)
    ]


def instruction_rows(n: int, seed: int) -> Iterator[dict[str, Any]]:
    """Alpaca-like lengths: ~60-char instruction, input in 40% of rows, ~300-char output."""
    pool, rng = _sentences(seed), random.Random(seed + 1)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choices(pool, k=rng.randint(lo, hi)))

    for _ in range(n):
        yield {
            "instruction": text(1, 1),
            "input": text(1, 3) if rng.random() < 0.4 else "",
            "output": text(1, 7),
        }


def chat_rows(n: int, seed: int) -> Iterator[dict[str, Any]]:
    """OpenAI-style conversations: an optional system turn, then 1-2 user/assistant exchanges."""
    pool, rng = _sentences(seed), random.Random(seed + 1)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choices(pool, k=rng.randint(lo, hi)))

    for _ in range(n):
        messages = [{"role": "system", "content": text(1, 1)}] if rng.random() < 0.3 else []
        for _turn in range(rng.randint(1, 2)):
            messages += [
                {"role": "user", "content": text(1, 3)},
                {"role": "assistant", "content": text(1, 6)},
            ]
        yield {"messages": messages}


GENERATORS: dict[str, Callable[[int, int], Iterator[dict[str, Any]]]] = {
    "instruction": instruction_rows,
    "chat": chat_rows,
}


def generate(path: Path, kind: str, rows: int, seed: int) -> None:
    with path.open("w") as fh:
        for row in GENERATORS[kind](rows, seed):
            fh.write(json.dumps(row) + "\n")


def train_tokenizer(folder: Path, seed: int) -> None:
    """An 8k-token BPE trained on the generated text, with a ChatML template: realistic token
    counts (a byte-level tokenizer would make every example 4x longer) with no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=8000, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(_sentences(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    fast.save_pretrained(folder)


# --- one measured launch ------------------------------------------------------------------------


class AnonPeak:
    """Peak RssAnon of this process, sampled in a thread (ru_maxrss also counts mapped files)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def now() -> int:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(0.02)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self.now())


def child(args: argparse.Namespace) -> None:
    import psutil

    started = psutil.Process().create_time()
    anon = AnonPeak()
    import torch
    from transformers import AutoTokenizer

    from lrft.data import Collator, encode_rows, load_rows
    from lrft.data.pipeline import prepare_split
    from lrft.schema import DataFiles, DatasetConfig
    from lrft.train import EpochSampler

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    base_anon = AnonPeak.now()
    dcfg = DatasetConfig(
        name="bench",
        kind=args.kind,
        data_files=DataFiles(train=str(args.data)),
        max_length=args.max_length,
        num_proc=args.num_proc,
        max_train_samples=args.limit,
    )
    tick = time.time()
    if args.mode == "old":
        examples = encode_rows(load_rows(dcfg, "train"), dcfg, "causal", tokenizer)
    else:
        examples = prepare_split(dcfg, "train", "causal", tokenizer, cache_dir=args.cache)
    prepared = time.time() - tick
    loader = torch.utils.data.DataLoader(
        examples,
        batch_size=8,
        sampler=EpochSampler(len(examples), 0),
        collate_fn=Collator(tokenizer, "causal"),
    )
    batch = next(iter(loader))
    ready = time.time()
    peak_anon = anon.stop()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
    gib = 1024**3
    result = {
        "mode": args.mode,
        "rows": len(examples),
        "first_batch_s": round(ready - started, 2),
        "prepare_s": round(prepared, 2),
        "cpu_s": round(cpu, 1),  # all processes' CPU time: on a shared machine, wall time is not
        "peak_rss_gib": round(peak_rss / gib, 3),
        "peak_anon_gib": round(peak_anon / gib, 3),
        "data_rss_gib": round((peak_rss - base_rss) / gib, 3),
        "data_anon_gib": round((peak_anon - base_anon) / gib, 3),
        "worker_peak_rss_gib": round(workers / gib, 3),
        "batch_shape": list(batch["input_ids"].shape),
    }
    print("RESULT " + json.dumps(result), flush=True)


def launch(args: argparse.Namespace, mode: str, limit: int | None = None) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        mode,
        "--workdir",
        str(args.workdir),
        "--kind",
        args.kind,
        "--rows",
        str(args.rows),
        "--max-length",
        str(args.max_length),
        "--num-proc",
        str(args.num_proc),
    ]
    if limit is not None:
        cmd += ["--limit", str(limit)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="true")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{mode} launch failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--kind", choices=sorted(GENERATORS), default="instruction")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lrft-bench"))
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--old-rows", type=int, default=0, help="also time the list pipeline on K rows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", choices=("cold", "warm", "old"), help=argparse.SUPPRESS)
    parser.add_argument("--limit", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.data = args.workdir / f"{args.kind}-{args.rows}.jsonl"
    args.tokenizer = str(args.workdir / "tokenizer")
    args.cache = args.workdir / "cache"
    if args.child:
        args.mode = args.child
        return child(args)

    args.workdir.mkdir(parents=True, exist_ok=True)
    if not args.data.is_file():
        tick = time.time()
        generate(args.data, args.kind, args.rows, args.seed)
        print(f"generated {args.rows:,} {args.kind} rows in {time.time() - tick:.0f} s: {args.data}")
    if not Path(args.tokenizer, "tokenizer.json").is_file():
        train_tokenizer(Path(args.tokenizer), args.seed)
    size = args.data.stat().st_size / 1024**2
    print(f"data file {size:,.0f} MiB; cache in {args.cache}")
    shutil.rmtree(args.cache, ignore_errors=True)
    results = [launch(args, "cold"), launch(args, "warm")]
    if args.old_rows:
        results.append(launch(args, "old", limit=args.old_rows))
    for r in results:
        print(json.dumps(r))
    cache_mib = sum(f.stat().st_size for f in args.cache.rglob("*") if f.is_file()) / 1024**2
    print(f"cache size {cache_mib:,.0f} MiB")


if __name__ == "__main__":
    main()
