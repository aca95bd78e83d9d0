"""Real (non-pad) training tokens/s of lrft against PEFT + transformers Trainer and TRL SFTTrainer.

Same random-init LLaMA-architecture model (scaled to a CPU), same data (instruction-like
examples, prompt unlabelled, long-tailed lengths), same batch, LoRA r=8 on all seven projections,
AdamW, gradient clipping at 1.0. Systems:

- ``lrft plain``: random batches padded to their longest row (the loop's EpochSampler + Collator);
- ``lrft grouped``: :class:`lrft.data.sampling.LengthGroupedSampler` batches;
- ``lrft packed``: :func:`lrft.data.packing.pack_examples` rows through ``PackedCollator``;
- ``lrft compiled``: packed rows (padded to max_length, one shape, block mask) through ``torch.compile``;
- ``PEFT+Trainer``: ``peft.get_peft_model`` + ``transformers.Trainer``, dynamic padding;
- ``TRL packed``: ``trl.SFTTrainer`` with ``packing=True`` (best-fit decreasing, padding-free).

The lrft side does not run lrft's training loop (being rewritten): it drives the layer, sampler
and packing with a minimal step that mirrors the loop: forward, token-weighted loss
(:func:`lrft.data.packing.token_loss_sum`), backward, clip, AdamW, zero_grad. The HF systems
are timed from a ``TrainerCallback`` (step begin to step end); PEFT+Trainer reads the examples in
the order "lrft plain" batches them, so the two pad the same batches. Each round runs every
system for ``--warmup`` + ``--steps`` optimizer steps on the same first batches, systems in a
rotating order; the table gives medians over rounds of real tokens/s (pad excluded) by wall
clock and by this process's CPU time (robust to a shared, oversubscribed machine: run with one
thread), and ms/step. ``--masks`` also times the dropout-mask
candidates of the low-rank layer on an activation of this model.

    python scripts/bench_throughput.py                       # all systems, dropout 0 and 0.05
    python scripts/bench_throughput.py --rounds 3 --systems "lrft plain" "PEFT+Trainer" --dropouts 0
    python scripts/bench_throughput.py --masks --rounds 0    # dropout-mask costs only

Needs ``pip install trl`` for the TRL row.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPE = dict(
    vocab_size=1000, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
)  # fmt: skip
SYSTEMS = ["lrft plain", "lrft grouped", "lrft packed", "lrft compiled", "PEFT+Trainer", "TRL packed"]


def make_data(n: int, max_length: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """Alpaca-like lengths: log-normal totals (median max_length / 4, a tail to max_length), a
    prompt of 30-70% of them (labels -100), token ids uniform over the vocabulary."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        total = max(8, min(max_length, int(rng.lognormvariate(math.log(max_length / 4), 0.75))))
        prompt = max(1, int(total * rng.uniform(0.3, 0.7)))
        ids = [1] + [rng.randrange(5, SHAPE["vocab_size"]) for _ in range(total - 2)] + [2]
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def base_model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE, attn_implementation="sdpa"))
    model.config.use_cache = False
    return model


class Pad:
    """A tokenizer stand-in for lrft's Collator."""

    pad_token_id, eos_token_id = 0, 2


def lrft_system(kind: str, data: list[dict], batch: int, max_length: int, dropout: float) -> Callable:
    """A closure that runs ``steps`` optimizer steps, returning [(seconds, real tokens)] per step."""
    import lrft
    from lrft.data.collate import Collator
    from lrft.data.packing import PackedCollator, batch_token_stats, pack_examples, token_loss_sum
    from lrft.data.sampling import LengthGroupedSampler

    model = lrft.apply_method(base_model(), "lora", r=8, alpha=16, dropout=dropout, target_modules=TARGETS)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    if kind in ("packed", "compiled"):
        # compiled: rows padded to max_length (one shape, no recompiles) with the explicit block
        # mask, as the loop does (sdpa: a boolean keep-mask)
        rows = pack_examples(data, max_length)
        pad_to, mask = (max_length, "bool") if kind == "compiled" else (None, None)
        collate = PackedCollator(0, pad_to=pad_to, mask=mask)
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
        batches = [[rows[i] for i in order[j : j + batch]] for j in range(0, len(order) - batch + 1, batch)]
    else:
        rows, collate = data, Collator(Pad(), "causal")
        if kind == "grouped":
            groups = LengthGroupedSampler([len(r["input_ids"]) for r in rows], batch, seed=0).batches()
        else:
            perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
            groups = [perm[j : j + batch] for j in range(0, len(perm), batch)]
        batches = [[rows[i] for i in g] for g in groups if len(g) == batch]
    tensors = [collate(b) for b in batches]
    forward = torch.compile(model) if kind == "compiled" else model

    def run(steps: int) -> list[tuple[float, float, int]]:
        out = []
        for i in range(steps):  # every round the same batches: rounds compare like with like
            b = dict(tensors[i % len(tensors)])
            real = int(batch_token_stats(b)[0])
            start, cpu = time.perf_counter(), time.process_time()
            labels = b.pop("labels")
            total, count = token_loss_sum(forward(**b).logits, labels)
            (total / count).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            out.append((time.perf_counter() - start, time.process_time() - cpu, real))
        return out

    return run


def hf_system(kind: str, data: list[dict], batch: int, max_length: int, dropout: float) -> Callable:
    """PEFT + Trainer (dynamic padding) or TRL SFTTrainer (packing); a new trainer per round."""
    import datasets
    import peft
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from lrft.data.collate import Collator
    from lrft.models import byte_tokenizer

    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=TARGETS)
    model = peft.get_peft_model(base_model(), config)
    model.train()

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[tuple[float, float]] = []

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.times.append((time.perf_counter() - self.t0, time.process_time() - self.c0))

    def counted(collate: Callable, reals: list[int]) -> Callable:
        def wrapped(examples: list[dict]) -> dict:
            out = collate(examples)
            mask = out.get("attention_mask")
            reals.append(int(mask.sum()) if mask is not None else out["input_ids"].numel())
            return out

        return wrapped

    common = dict(
        output_dir="/tmp/bench_throughput", per_device_train_batch_size=batch, learning_rate=1e-4,
        optim="adamw_torch", max_grad_norm=1.0, lr_scheduler_type="constant", use_cpu=True,
        report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, seed=0,
    )  # fmt: skip
    if kind == "trl":
        from trl import SFTConfig, SFTTrainer

        mask = [[int(y != -100) for y in ex["labels"]] for ex in data]
        ds = datasets.Dataset.from_dict(
            {"input_ids": [ex["input_ids"] for ex in data], "completion_mask": mask}
        )
        tok = byte_tokenizer("llama")
    else:
        # the batches of "lrft plain": same permutation, read in order
        perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist()
        ds = datasets.Dataset.from_list([data[i] for i in perm])

    def run(steps: int) -> list[tuple[float, float, int]]:
        clock, reals = Clock(), []
        if kind == "trl":
            args = SFTConfig(
                **common, max_steps=steps, packing=True, max_length=max_length, completion_only_loss=True
            )
            trainer = SFTTrainer(
                model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[clock]
            )
        else:
            args = TrainingArguments(**common, max_steps=steps, remove_unused_columns=False)
            trainer = Trainer(
                model=model,
                args=args,
                train_dataset=ds,
                data_collator=Collator(Pad(), "causal"),
                callbacks=[clock],
            )
            trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(ds)
        trainer.data_collator = counted(trainer.data_collator, reals)
        trainer.train()
        return [(w, c, k) for (w, c), k in zip(clock.times, reals[: len(clock.times)], strict=True)]

    return run


def mask_costs(shape: tuple[int, ...], p: float, repeats: int = 40) -> dict[str, float]:
    """CPU ms to make and apply one dropout mask, per candidate, on an activation of ``shape``."""
    from lrft.methods.dropout import keep_mask as _keep
    from lrft.methods.dropout import new_seed as _new_seed

    x = torch.randn(shape)

    def old_rand() -> torch.Tensor:  # before: rand + ge from a per-call Generator
        gen = torch.Generator().manual_seed(1234)
        return x * torch.rand(x.shape, generator=gen).ge_(p).to(x.dtype).div_(1 - p)

    def native_replay() -> torch.Tensor:  # torch's dropout kernel, its RNG state replayed
        state = torch.get_rng_state()
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(state)
            return torch.nn.functional.dropout(x, p, True)

    def bool_mask() -> torch.Tensor:  # what a stored 1-byte mask costs to make
        return x * (torch.rand(x.shape) >= p) * (1 / (1 - p))

    seed = _new_seed(x.device)

    def hash_mask() -> torch.Tensor:  # lrft's: a hash of (index, seed tensor); 1/(1-p) in the scale
        return x * _keep(x, p, seed)

    candidates = [
        ("hash (lrft)", hash_mask),
        ("rand+ge, Generator (old)", old_rand),
        ("native dropout + RNG replay", native_replay),
        ("bool mask (stored)", bool_mask),
    ]
    for _, fn in candidates:
        fn()
    times: dict[str, list[float]] = {name: [] for name, _ in candidates}
    for _ in range(repeats):  # alternating, CPU time of this process (robust to a shared machine)
        for name, fn in candidates:
            t = time.process_time()
            fn()
            times[name].append(time.process_time() - t)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


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
    parser.add_argument("--systems", nargs="+", default=SYSTEMS, choices=SYSTEMS)
    parser.add_argument("--masks", action="store_true", help="also time the dropout-mask candidates")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = make_data(args.examples, args.max_length)
    if args.masks:
        shape = (args.batch, args.max_length, SHAPE["intermediate_size"])
        for name, ms in mask_costs(shape, 0.05).items():
            print(f"mask {name:30s} {ms:8.2f} CPU ms  ({shape}, p=0.05)")
    runs: dict[str, Callable] = {}
    for p in args.dropouts:
        for s in args.systems:
            name = f"{s} (dropout {p:g})"
            if s.startswith("lrft"):
                runs[name] = lrft_system(s.split()[1], data, args.batch, args.max_length, p)
            else:
                runs[name] = hf_system(
                    "trl" if s.startswith("TRL") else "peft", data, args.batch, args.max_length, p
                )
    wall: dict[str, list[float]] = {n: [] for n in runs}  # real tokens per second, per round
    cpu: dict[str, list[float]] = {n: [] for n in runs}  # real tokens per CPU-second of this process
    ms: dict[str, list[float]] = {n: [] for n in runs}
    names = list(runs)
    for r in range(args.rounds):
        shift = r % len(names)
        for n in names[shift:] + names[:shift]:
            steps = runs[n](args.warmup + args.steps)[args.warmup :]
            secs, cpus, real = (sum(s[i] for s in steps) for i in range(3))
            wall[n].append(real / secs)
            cpu[n].append(real / cpus)
            ms[n].append(secs / len(steps) * 1e3)
            line = f"round {r} {n:32s} {real / secs:6.0f} tok/s {real / cpus:6.0f} tok/CPU-s"
            print(line, flush=True)
    if not args.rounds:
        return 0
    s, a = SHAPE, args
    print(
        f"\nLLaMA hidden {s['hidden_size']}, {s['num_hidden_layers']} layers, vocab {s['vocab_size']}, "
        f"batch {a.batch}, max_length {a.max_length}, {a.examples} examples, LoRA r=8 on 7 projections, "
        f"{a.threads} thread(s), medians of {a.rounds} rounds x {a.steps} steps, torch {torch.__version__}\n"
    )
    refs = ("PEFT+Trainer", "TRL packed")
    print("| system | real tok/s | real tok/CPU-s | ms/step | vs PEFT+Trainer | vs TRL packed |")
    print("|---|---|---|---|---|---|")
    for n in names:
        p = n.split("(dropout ")[1].rstrip(")")
        cells = []
        for k in refs:
            ref = f"{k} (dropout {p})"
            if ref not in runs:
                cells.append("-")
                continue
            w = statistics.median(wall[n]) / statistics.median(wall[ref])
            c = statistics.median(cpu[n]) / statistics.median(cpu[ref])
            cells.append(f"{w:.2f}x wall, {c:.2f}x CPU")
        med_w, med_c, med_ms = (statistics.median(v[n]) for v in (wall, cpu, ms))
        print(f"| {n} | {med_w:.0f} | {med_c:.0f} | {med_ms:.0f} | {cells[0]} | {cells[1]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
