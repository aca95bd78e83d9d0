"""Real (non-pad) training tokens/s of lrft's training loop against PEFT + transformers Trainer and TRL.

Same random-init LLaMA-architecture model (``model=tiny_llama`` reshaped by ``SHAPE``; the HF
systems load the base lrft saved), same data, same batch, LoRA r=8 alpha=16 on all seven
projections, AdamW lr 1e-4 at a constant rate, gradient clipping at 1.0. Systems:

- ``lrft plain``: :func:`lrft.train.train` on a config composed from the real Hydra configs, as
  ``lrft train`` would (random batches padded to their longest row: EpochSampler + Collator);
- ``lrft grouped``: the same with ``trainer.group_by_length=true``;
- ``lrft packed``: the same with ``dataset.packing=true``;
- ``lrft compiled``: packed with ``trainer.compile=true`` (rows padded to max_length, block mask);
- ``PEFT+Trainer``: ``peft.get_peft_model`` + ``transformers.Trainer``, dynamic padding, reading
  the examples in the order of "lrft plain"'s EpochSampler, so the two pad the very same batches;
- ``TRL packed``: ``trl.SFTTrainer`` with ``packing=True`` (best-fit decreasing, padding-free).

Data: ``--examples`` instruction rows written to a JSONL file, byte lengths log-normal (median
max_length / 4, a tail to max_length), 30-70% of each example its (unlabelled) instruction. lrft
reads the file through its own pipeline (cached, tokenized by the byte tokenizer); the HF
systems get exactly those token ids.

Timing: per optimizer step, wall clock and this process's CPU time, from the start of the step's
forward to the end of its optimizer step (the HF systems: a ``TrainerCallback``, step begin to step
end; lrft: :func:`lrft.train.loop.forward_backward` to the end of ``StepPolicy.update``, wrapped
here, nothing changed in the loop). Data loading, logging, setup (composing, tokenizing, building
and saving the model) and the first ``--warmup`` steps (compilation) are not counted. Each round
runs every system afresh for ``--warmup`` + ``--steps`` steps on the same first batches, in a
rotating order; the table gives medians over rounds of real tokens/s (pad excluded) by wall clock
and by CPU time (robust to a shared, oversubscribed machine: run with one thread), ms/step, and
"loop tok/s": real tokens over the time from one step's start to the next one's (one extra step
is run for the last boundary), which adds what each loop does between steps (data loading,
bookkeeping; lrft: RNG capture for exact resume, the metrics window).

Variants: a system name may carry lrft overrides after ``+`` ("lrft plain+trainer.dropout_kernel=fused",
several joined by ``+``); ``--lrft-overrides`` go to every lrft system (and to the untimed run that
makes the base and the token ids the HF systems share). ``--masks`` also times the
dropout-mask candidates of the low-rank layer on an activation of this model.

    python scripts/bench_throughput.py                       # all systems, dropout 0 and 0.05
    python scripts/bench_throughput.py --rounds 3 --systems "lrft plain" "PEFT+Trainer" --dropouts 0
    python scripts/bench_throughput.py --systems "lrft plain" "lrft plain+trainer.dropout_kernel=fused"
    python scripts/bench_throughput.py --masks --rounds 0    # dropout-mask costs only

Needs ``pip install trl`` for the TRL row.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import statistics
import string
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_hf, bench_dropout_masks
from bench_hf import SEED, TARGETS, Step, Steps, _sync, hf_run, plain_order  # noqa: F401 (the smoke test)

# vocab 261: the byte tokenizer of model=tiny_llama, which every system shares
SHAPE = dict(
    vocab_size=261, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
)  # fmt: skip
LRFT_KINDS = {
    "plain": [],
    "grouped": ["trainer.group_by_length=true"],
    "packed": ["dataset.packing=true"],
    "compiled": ["dataset.packing=true", "trainer.compile=true"],
}
SYSTEMS = [*(f"lrft {k}" for k in LRFT_KINDS), "PEFT+Trainer", "TRL packed"]


def write_data(path: Path, n: int, max_length: int, seed: int = SEED) -> None:
    """Alpaca-like rows whose byte-tokenized lengths (BOS + instruction + newline + output + EOS)
    are log-normal: median max_length / 4, a tail to max_length, the prompt 30-70% of each."""
    rng = random.Random(seed)
    letters = string.ascii_lowercase + "      "  # words of ~4 letters

    def text(k: int) -> str:
        return "".join(rng.choice(letters) for _ in range(k))

    with path.open("w") as fh:
        for _ in range(n):
            total = max(8, min(max_length, int(rng.lognormvariate(math.log(max_length / 4), 0.75))))
            prompt = max(3, int(total * rng.uniform(0.3, 0.7)))  # BOS + instruction + "\n"
            row = {"instruction": text(prompt - 2), "output": text(total - prompt - 1)}
            fh.write(json.dumps(row) + "\n")


@dataclass
class Bench:
    """What every system shares: the data file, the work folder, the run settings."""

    root: Path
    data: Path
    batch: int
    max_length: int
    steps: int  # optimizer steps per run: warmup + timed + 1 (the last timed step's loop boundary)
    extra: list[str] = field(default_factory=list)  # overrides for every lrft system

    def overrides(self, kind: str, dropout: float, out: Path, variant: list[str]) -> list[str]:
        shape = [f"model.from_config.{k}={str(v).lower()}" for k, v in SHAPE.items()]
        return [
            "model=tiny_llama", *shape, "model.attn_implementation=sdpa",
            "method=lora", "method.r=8", "method.alpha=16", f"method.dropout={dropout}",
            f"method.target_modules=[{','.join(TARGETS)}]",
            "optimizer=adamw", "optimizer.lr=1e-4", "optimizer.weight_decay=0.0",
            f"dataset.data_files.train={self.data}", "dataset.data_files.validation=null",
            "dataset.eval_holdout=0", "dataset.prompt_template=plain", "dataset.name=bench",
            f"dataset.max_length={self.max_length}", f"dataset.cache_dir={self.root / 'cache'}",
            f"trainer.batch_size={self.batch}", f"trainer.max_steps={self.steps}",
            "trainer.lr_scheduler=constant", "trainer.warmup_steps=0", "trainer.warmup_ratio=0",
            "trainer.max_grad_norm=1.0", "trainer.eval_every=0", "trainer.save_every=0",
            f"trainer.log_every={self.steps}", "trainer.progress=false", f"trainer.seed={SEED}",
            "trainer.save_on_interrupt=false",
            *LRFT_KINDS[kind], *self.extra, *variant, f"output_dir={out}",
        ]  # fmt: skip

    def compose(self, kind: str = "plain", dropout: float = 0.0, variant: list[str] | None = None) -> Any:
        from lrft.config.compose import compose

        return compose(self.overrides(kind, dropout, self.root / "unused", variant or []))


@dataclass
class LoopClock:
    """Per-step times of lrft's loop, taken around the names the loop calls (see :func:`clocked`)."""

    steps: list[tuple[float, float, Any, float, float]] = field(default_factory=list)
    batches: list[torch.Tensor] = field(default_factory=list)  # each step's first input_ids
    _t: tuple[float, float, Any] = (0.0, 0.0, None)

    def result(self) -> Steps:
        return [Step(w, c, int(real), t, ct) for w, c, real, t, ct in self.steps]


@contextmanager
def clocked(clock: LoopClock) -> Iterator[None]:
    """lrft's loop with a clock: step begin where ``forward_backward`` is called, step end where
    ``StepPolicy.update`` returns (after clip, optimizer step, zero_grad, scheduler)."""
    import lrft.train.loop as loop

    forward_backward, policy = loop.forward_backward, loop.StepPolicy

    def timed(accelerator: Any, model: Any, window: list[dict[str, Any]], *a: Any, **k: Any) -> Any:
        clock.batches.append(window[0]["input_ids"])
        _sync()
        start, cpu = time.perf_counter(), time.process_time()
        res = forward_backward(accelerator, model, window, *a, **k)
        clock._t = (start, cpu, res.real_tokens)
        return res

    class TimedPolicy(policy):  # type: ignore[misc, valid-type]
        def update(self, *a: Any, **k: Any) -> Any:
            out = super().update(*a, **k)
            _sync()
            start, cpu, real = clock._t
            end = (time.perf_counter() - start, time.process_time() - cpu)
            clock.steps.append((*end, real, start, cpu))
            return out

    loop.forward_backward, loop.StepPolicy = timed, TimedPolicy
    try:
        yield
    finally:
        loop.forward_backward, loop.StepPolicy = forward_backward, policy


def lrft_run(bench: Bench, kind: str, dropout: float, variant: list[str]) -> tuple[Steps, LoopClock]:
    """One fresh ``lrft train`` run in-process (its own run folder, removed after)."""
    from lrft.config.compose import compose
    from lrft.train import train

    out = Path(tempfile.mkdtemp(dir=bench.root, prefix="run_"))
    ov = bench.overrides(kind, dropout, out, variant)
    clock = LoopClock()
    try:
        with clocked(clock):
            train(compose(ov), out, ov)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return clock.result(), clock


def lrft_system(bench: Bench, name: str, dropout: float) -> Callable[[], Steps]:
    """The run of a system named ``lrft KIND[+OVERRIDE...]``. Composed now, so that a bad override
    fails before anything has run. Variants must leave model and data alone: the HF systems get
    the base and the ids of the overrides without them."""
    base, *variant = name.split("+")
    kind = base.split()[1]
    bench.compose(kind, dropout, variant)
    return lambda: lrft_run(bench, kind, dropout, variant)[0]


def prepared(bench: Bench) -> tuple[list[dict[str, Any]], Any, Path]:
    """The examples as lrft's pipeline encodes them, its tokenizer, and the random-init base
    lrft's loop builds and saves (one untimed step of "lrft plain")."""
    from lrft.config.compose import compose
    from lrft.data.pipeline import prepare_split
    from lrft.model.load import load_tokenizer
    from lrft.train import train

    cfg = bench.compose()
    tok = load_tokenizer(cfg.model)
    examples = list(prepare_split(cfg.dataset, "train", cfg.model.task, tok, seed=cfg.trainer.seed))
    out = bench.root / "base_run"
    ov = bench.overrides("plain", 0.0, out, ["trainer.max_steps=1"])
    train(compose(ov), out, ov)
    return examples, tok, out / "base"


def check_system(name: str) -> str:
    """A system name, or an lrft one with ``+OVERRIDE`` variants (argparse calls this)."""
    if name in SYSTEMS or (name.startswith("lrft ") and name.split("+")[0] in SYSTEMS):
        return name
    raise argparse.ArgumentTypeError(f"unknown system {name!r}: choose from {SYSTEMS}, lrft ones +OVERRIDE")


COLUMNS = ("real tok/s", "real tok/CPU-s", "ms/step", "loop tok/s")


def table(names: list[str], stats: dict[str, dict[str, list[float]]]) -> None:
    """Medians over rounds, and ratios of medians against the HF systems at the same dropout."""
    refs = ("PEFT+Trainer", "TRL packed")
    print(f"| system | {' | '.join(COLUMNS)} | {' | '.join(f'vs {k}' for k in refs)} |")
    print("|---" * (1 + len(COLUMNS) + len(refs)) + "|")
    for n in names:
        p = n.split("(dropout ")[1].rstrip(")")
        med = {k: statistics.median(v) for k, v in stats[n].items()}
        cells = [f"{med[k]:.0f}" for k in COLUMNS]
        for k in refs:
            ref = stats.get(f"{k} (dropout {p})")
            if ref is None:
                cells.append("-")
                continue
            w, c, lp = (
                med[col] / statistics.median(ref[col]) for col in (COLUMNS[0], COLUMNS[1], COLUMNS[3])
            )
            cells.append(f"{w:.2f}x wall, {c:.2f}x CPU, {lp:.2f}x loop")
        print(f"| {n} | {' | '.join(cells)} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per system and round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per system and round")
    parser.add_argument("--threads", type=int, default=1, help="1: CPU time ~ compute (no spinning)")
    parser.add_argument("--dropouts", type=float, nargs="+", default=[0.0, 0.05])
    parser.add_argument(
        "--systems", nargs="+", default=SYSTEMS, type=check_system,
        help=f"of {SYSTEMS}; an lrft one may add overrides: 'lrft plain+trainer.dropout_kernel=fused'",
    )  # fmt: skip
    parser.add_argument(
        "--lrft-overrides", nargs="*", default=[], metavar="KEY=VALUE",
        help="Hydra overrides for every lrft system (e.g. trainer.dropout_kernel=fused)",
    )  # fmt: skip
    parser.add_argument("--masks", action="store_true", help="also time the dropout-mask candidates")
    parser.add_argument("--workdir", type=Path, help="keep data, cache and base here (default: a temp dir)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.masks:  # scripts/bench_dropout_masks.py, on this model's MLP activation
        from bench_dropout_masks import mask_costs

        shape = (args.batch, args.max_length, SHAPE["intermediate_size"])
        for name, cost in mask_costs(shape, 0.05).items():
            print(f"mask {name:30s} {cost:8.2f} CPU ms  ({shape}, p=0.05)")
    if not args.rounds:
        return 0
    from lrft.errors import UserError

    root = args.workdir or Path(tempfile.mkdtemp(prefix="bench_throughput_"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        return run(args, root)
    except UserError as err:  # a bad --lrft-overrides or +OVERRIDE: lrft's own message
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)


def run(args: argparse.Namespace, root: Path) -> int:
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()  # the per-run tokenizing and saving bars would bury the table
    hf_logging.disable_progress_bar()
    write_data(root / "data.jsonl", args.examples, args.max_length)
    # one more step: its start ends the last timed step's loop iteration
    bench = Bench(root, root / "data.jsonl", args.batch, args.max_length, args.warmup + args.steps + 1)
    bench.extra = list(args.lrft_overrides)
    runs: dict[str, Callable[[], Steps]] = {}
    lrft_runs = {(s, p): lrft_system(bench, s, p) for p in args.dropouts for s in args.systems if "lrft" in s}
    examples, tok, base = prepared(bench)
    for p in args.dropouts:
        for s in args.systems:
            if s.startswith("lrft"):
                runs[f"{s} (dropout {p:g})"] = lrft_runs[s, p]
            else:
                kind = "trl" if s.startswith("TRL") else "peft"
                runs[f"{s} (dropout {p:g})"] = lambda k=kind, p=p: (
                    hf_run(k, bench, examples, tok, base, p).steps
                )
    # per system, one value per round: real tokens per second of the steps' compute windows (wall
    # and this process's CPU time), ms per step, and real tokens per second of whole loop iterations
    stats: dict[str, dict[str, list[float]]] = {n: {k: [] for k in COLUMNS} for n in runs}
    names = list(runs)
    for r in range(args.rounds):
        shift = r % len(names)
        for n in names[shift:] + names[:shift]:
            record = runs[n]()
            if len(record) != bench.steps:
                raise RuntimeError(f"{n}: {len(record)} steps recorded, expected {bench.steps}")
            steps, after = record[args.warmup : -1], record[args.warmup + 1 :]
            secs, cpus, real = (sum(getattr(s, k) for s in steps) for k in ("wall", "cpu", "real"))
            loop = sum(b.start - a.start for a, b in zip(steps, after, strict=True))
            values = (real / secs, real / cpus, secs / len(steps) * 1e3, real / loop)
            for key, value in zip(COLUMNS, values, strict=True):
                stats[n][key].append(value)
            line = f"{real / secs:6.0f} tok/s {real / cpus:6.0f} tok/CPU-s {real / loop:6.0f} loop tok/s"
            print(f"round {r} {n:40s} {line}", flush=True)
    lengths = [len(ex["input_ids"]) for ex in examples]
    s, a = SHAPE, args
    print(
        f"\nLLaMA hidden {s['hidden_size']}, {s['num_hidden_layers']} layers, vocab {s['vocab_size']}, "
        f"batch {a.batch}, max_length {a.max_length}, {a.examples} examples (tokens: median "
        f"{statistics.median(lengths):g}, max {max(lengths)}), LoRA r=8 on 7 projections, {a.threads} "
        f"thread(s), medians of {a.rounds} rounds x {a.steps} steps after {a.warmup} warmup, "
        f"torch {torch.__version__}" + (f", lrft overrides {a.lrft_overrides}" if a.lrft_overrides else "")
    )
    print()
    table(names, stats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
