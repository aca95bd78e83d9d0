"""Peak memory and tokens/s of one DPO step: lrft LoRA-FA and LoRA against TRL DPOTrainer + PEFT LoRA.

Same model (SmolLM2-135M-Instruct from ``scripts/convert_smollm2.py``, float32, sdpa), same pairs,
same rank: adapters r=8, alpha 16, dropout 0, on all seven projections; DPO beta 0.1; AdamW
lr 1e-4 constant, no weight decay, clipping at 1.0; no gradient checkpointing. The data set is
exactly ``--pairs`` conversational pairs (those of scripts/measure_dpo_smollm2.py) and every step's
batch is all of them, so each harness trains on the very same pairs at every step (TRL and lrft
render the prompts with the same chat template; each harness's own real-token count is reported).
Systems, each in a fresh subprocess, run in a rotating order each round:

- ``lrft lora_fa`` / ``lrft lora``: ``lrft.train.train`` on a config composed from the real Hydra
  configs, as ``lrft train model=hf ... dataset=preference objective=dpo`` runs it (the reference
  is the same model with its adapters off, a second forward under no_grad);
- ``TRL+PEFT lora``: ``trl.DPOTrainer`` (trl 1.16) on ``peft.get_peft_model`` LoRA with
  ``ref_model=None`` (TRL's PEFT reference: the adapter disabled), ``gradient_checkpointing=False``
  (TRL's DPOConfig default is True), ``precompute_ref_log_probs=False``.

Timing, as scripts/bench_throughput.py: per optimizer step, wall and CPU time from the start of the
step's forward to the end of its optimizer step (lrft: around the loop's ``forward_backward`` ..
``StepPolicy.update``; TRL: a ``TrainerCallback``, step begin to step end), after ``--warmup``
untimed steps; tokens/s = real (non-pad) tokens of the chosen and rejected rows over that time.
Memory, as scripts/bench_logits_memory.py: at each timed step's start the kernel's peak-RSS counter
is reset (``/proc/self/clear_refs`` 5, VmHWM := VmRSS); "step peak" = VmHWM at the step's end
minus VmRSS at its start (what the step adds on top of weights, optimizer state and libraries);
"process peak" = VmHWM (everything resident). Medians over steps, then over rounds.

    python scripts/bench_dpo_step.py --model runs/dpo_smollm2/smollm2
    python scripts/bench_dpo_step.py --model DIR --rounds 3 --steps 4 --warmup 2 --pairs 8
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SYSTEMS = ["lrft lora_fa", "lrft lora", "TRL+PEFT lora"]
SEED = 0


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


class StepMeter:
    """Per step: wall, CPU, real tokens, step peak (VmHWM - VmRSS at the start), process peak."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self._start: tuple[float, float, int] = (0.0, 0.0, 0)

    def begin(self) -> None:
        rss = _kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        self._start = (time.perf_counter(), time.process_time(), rss)

    def end(self, real: int) -> None:
        wall, cpu, rss = self._start
        hwm = _kib("VmHWM")
        self.rows.append(
            dict(wall=time.perf_counter() - wall, cpu=time.process_time() - cpu, real=real,
                 step_peak=hwm - rss, process_peak=hwm)
        )  # fmt: skip


def write_pairs(path: Path, n: int) -> None:
    from measure_dpo_smollm2 import pair, questions

    with path.open("w") as fh:
        for q, r in questions()[:n]:
            fh.write(json.dumps(pair(q, r)) + "\n")


def lrft_child(args: argparse.Namespace, method: str, meter: StepMeter) -> None:
    import lrft.train.loop as loop
    from lrft.config.compose import compose
    from lrft.train import train

    out = Path(tempfile.mkdtemp(dir=args.workdir, prefix="run_"))
    steps = args.warmup + args.steps
    ov = [
        "model=hf", f"model.name_or_path={args.model}", "model.attn_implementation=sdpa",
        f"model.target_modules=[{','.join(TARGETS)}]",
        "dataset=preference", f"dataset.data_files.train={args.data}", "dataset.eval_holdout=0",
        f"dataset.max_length={args.max_length}", f"dataset.cache_dir={args.workdir / 'cache'}",
        "objective=dpo", "objective.beta=0.1",
        f"method={method}", f"method.r={args.rank}", f"method.alpha={2 * args.rank}", "method.dropout=0",
        "optimizer=adamw", "optimizer.lr=1e-4", "optimizer.weight_decay=0.0",
        f"trainer.batch_size={args.pairs}", f"trainer.max_steps={steps}", "trainer.lr_scheduler=constant",
        "trainer.warmup_steps=0", "trainer.max_grad_norm=1.0", "trainer.eval_every=0",
        "trainer.save_every=0", f"trainer.log_every={steps}", "trainer.progress=false",
        f"trainer.seed={SEED}", "trainer.save_on_interrupt=false", *args.lrft_overrides,
        f"output_dir={out}",
    ]  # fmt: skip
    forward_backward, policy = loop.forward_backward, loop.StepPolicy
    real: list[int] = []

    def timed(*a: Any, **k: Any) -> Any:
        meter.begin()
        res = forward_backward(*a, **k)
        real.append(int(res.real_tokens))
        return res

    class TimedPolicy(policy):  # type: ignore[misc, valid-type]
        def update(self, *a: Any, **k: Any) -> Any:
            result = super().update(*a, **k)
            meter.end(real[-1])
            return result

    loop.forward_backward, loop.StepPolicy = timed, TimedPolicy
    try:
        train(compose(ov), out, ov)
    finally:
        loop.forward_backward, loop.StepPolicy = forward_backward, policy
        shutil.rmtree(out, ignore_errors=True)


def trl_child(args: argparse.Namespace, meter: StepMeter) -> None:
    import datasets
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="sdpa", dtype=torch.float32)
    model.config.use_cache = False
    config = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=TARGETS)
    model = peft.get_peft_model(model, config)
    rows = [json.loads(line) for line in args.data.read_text().splitlines()]
    reals: list[int] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            meter.begin()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            meter.end(reals[-1])

    dpo = DPOConfig(
        output_dir=str(args.workdir / "trl"), per_device_train_batch_size=args.pairs, learning_rate=1e-4,
        optim="adamw_torch", weight_decay=0.0, max_grad_norm=1.0, lr_scheduler_type="constant",
        use_cpu=not torch.cuda.is_available(), report_to="none", save_strategy="no",
        logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=SEED,
        max_steps=args.warmup + args.steps, beta=0.1, loss_type=["sigmoid"], max_length=args.max_length,
        gradient_checkpointing=False, precompute_ref_log_probs=False,
    )  # fmt: skip
    trainer = DPOTrainer(
        model=model, args=dpo, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok,
        callbacks=[Clock()],
    )  # fmt: skip
    collate = trainer.data_collator

    def counted(batch: list[dict]) -> dict:
        out = collate(batch)
        reals.append(int(out["attention_mask"].sum()))
        return out

    trainer.data_collator = counted
    trainer.train()


def child(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    meter = StepMeter()
    if args.child.startswith("lrft"):
        lrft_child(args, args.child.split()[1], meter)
    else:
        trl_child(args, meter)
    if len(meter.rows) != args.warmup + args.steps:
        raise RuntimeError(
            f"{args.child}: {len(meter.rows)} steps recorded, expected {args.warmup + args.steps}"
        )
    print("RESULT " + json.dumps(meter.rows[args.warmup :]), flush=True)
    return 0


def run_child(args: argparse.Namespace, system: str) -> list[dict[str, float]]:
    cmd = [
        sys.executable, __file__, "--child", system, "--model", str(args.model), "--data", str(args.data),
        "--workdir", str(args.workdir), "--pairs", str(args.pairs), "--rank", str(args.rank),
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
        "--max-length", str(args.max_length), "--lrft-overrides", *args.lrft_overrides,
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(args.threads))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(
        f"{system} failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=HERE.parent / "runs" / "dpo_smollm2" / "smollm2")
    parser.add_argument("--pairs", type=int, default=8, help="pairs per step (= the whole data set)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per system and round")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="1: CPU time ~ compute (no spinning)")
    parser.add_argument("--systems", nargs="+", default=SYSTEMS, choices=SYSTEMS)
    parser.add_argument(
        "--lrft-overrides", nargs="*", default=[], metavar="KEY=VALUE",
        help="Hydra overrides for the lrft systems (e.g. trainer.loss_chunk=0)",
    )  # fmt: skip
    parser.add_argument("--workdir", type=Path, help="default: a temp dir")
    parser.add_argument("--json", type=Path, help="also write the per-round results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.model = args.model.resolve()
    if args.child:
        return child(args)
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"{args.model}: no model; python scripts/convert_smollm2.py {args.model}")
    own = args.workdir is None
    args.workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_dpo_step_")).resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.data = args.workdir / "pairs.jsonl"
    write_pairs(args.data, args.pairs)
    try:
        return run(args)
    finally:
        if own:
            shutil.rmtree(args.workdir, ignore_errors=True)


COLUMNS = ("tok/s", "tok/CPU-s", "s/step", "real tokens/step", "step peak MiB", "process peak MiB")


def run(args: argparse.Namespace) -> int:
    stats: dict[str, dict[str, list[float]]] = {s: {c: [] for c in COLUMNS} for s in args.systems}
    start = time.perf_counter()
    for r in range(args.rounds):
        shift = r % len(args.systems)
        for system in args.systems[shift:] + args.systems[:shift]:
            rows = run_child(args, system)
            med = {k: statistics.median(row[k] for row in rows) for k in rows[0]}
            real = sum(row["real"] for row in rows)
            values = (
                real / sum(row["wall"] for row in rows), real / sum(row["cpu"] for row in rows),
                med["wall"], med["real"], med["step_peak"] / 2**20, med["process_peak"] / 2**20,
            )  # fmt: skip
            for key, value in zip(COLUMNS, values, strict=True):
                stats[system][key].append(value)
            print(
                f"round {r} {system:16s} "
                + ", ".join(f"{k} {v:.1f}" for k, v in zip(COLUMNS, values, strict=True)),
                flush=True,
            )
    import peft
    import transformers
    import trl

    print(
        f"\n{args.model.name}, float32, {args.pairs} pairs per step (the same {args.pairs} every step), "
        f"max_length {args.max_length}, r={args.rank} on 7 projections, {args.threads} thread(s), medians of "
        f"{args.rounds} rounds x {args.steps} steps after {args.warmup} warmup; torch {torch.__version__}, "
        f"transformers {transformers.__version__}, peft {peft.__version__}, trl {trl.__version__}; "
        + (f"lrft overrides {args.lrft_overrides}; " if args.lrft_overrides else "")
        + f"load average at the end {os.getloadavg()[0]:.1f}; {time.perf_counter() - start:.0f} s\n"
    )
    ref = stats.get("TRL+PEFT lora")
    print(f"| system | {' | '.join(COLUMNS)} | tok/CPU-s vs TRL | step peak vs TRL |")
    print("|---" + "|---:" * (len(COLUMNS) + 2) + "|")
    for system in args.systems:
        med = {k: statistics.median(v) for k, v in stats[system].items()}
        cells = [f"{med[c]:.0f}" if c != "s/step" else f"{med[c]:.2f}" for c in COLUMNS]
        if ref:
            cells.append(f"{med['tok/CPU-s'] / statistics.median(ref['tok/CPU-s']):.2f}x")
            cells.append(f"{med['step peak MiB'] / statistics.median(ref['step peak MiB']):.2f}x")
        else:
            cells += ["-", "-"]
        print(f"| {system} | {' | '.join(cells)} |")
    if args.json:
        args.json.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "stats": stats}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
