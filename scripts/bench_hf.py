"""The Hugging Face side of scripts/bench_throughput.py: PEFT + transformers Trainer (dynamic
padding, the very batches of lrft's plain loop) and TRL SFTTrainer (packing), timed per step.

Shared with bench_throughput.py: the step record, the sampler order of "lrft plain", the clock
sync. Run bench_throughput.py, not this module.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEED = 0


class Step(NamedTuple):
    """One optimizer step: its compute window (wall and CPU seconds), its real tokens, and the
    clocks at its start (the next step's start minus this one's is the whole loop iteration)."""

    wall: float
    cpu: float
    real: int
    start: float
    cpu_start: float


Steps = list[Step]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def plain_order(n: int) -> list[int]:
    """The first epoch's order of "lrft plain" (the loop's sampler, seeded as the loop seeds it)."""
    from lrft.train.state import EpochSampler

    return list(EpochSampler(n, SEED))


@dataclass
class HFRecord:
    """What an HF run saw: per-step times and the batches its collator made."""

    steps: Steps
    batches: list[dict[str, torch.Tensor]]


def hf_run(kind: str, bench: Any, examples: list[dict], tok: Any, base: Path, dropout: float) -> HFRecord:
    """PEFT + Trainer (dynamic padding) or TRL SFTTrainer (packing), a fresh model and trainer."""
    import datasets
    import peft
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from lrft.data.collate import Collator

    model = AutoModelForCausalLM.from_pretrained(base, attn_implementation="sdpa")
    model.config.use_cache = False
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=TARGETS)
    model = peft.get_peft_model(model, config)
    model.train()
    times: list[tuple[float, float, float, float]] = []
    batches: list[dict[str, torch.Tensor]] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            _sync()
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            _sync()
            end = (time.perf_counter() - self.t0, time.process_time() - self.c0)
            times.append((*end, self.t0, self.c0))

    def counted(collate: Callable) -> Callable:
        def wrapped(rows: list[dict]) -> dict:
            out = collate(rows)
            batches.append(out)
            return out

        return wrapped

    common = dict(
        output_dir=str(bench.root / "hf"), per_device_train_batch_size=bench.batch, learning_rate=1e-4,
        optim="adamw_torch", weight_decay=0.0, max_grad_norm=1.0, lr_scheduler_type="constant",
        use_cpu=not torch.cuda.is_available(), report_to="none", save_strategy="no",
        logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=SEED,
        max_steps=bench.steps,
    )  # fmt: skip
    if kind == "trl":
        from trl import SFTConfig, SFTTrainer

        mask = [[int(y != -100) for y in ex["labels"]] for ex in examples]
        ds = datasets.Dataset.from_dict(
            {"input_ids": [ex["input_ids"] for ex in examples], "completion_mask": mask}
        )
        args = SFTConfig(**common, packing=True, max_length=bench.max_length, completion_only_loss=True)
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[Clock()]
        )
    else:  # the batches of "lrft plain": its order, read in sequence, padded by lrft's Collator
        rows = [{k: examples[i][k] for k in ("input_ids", "labels")} for i in plain_order(len(examples))]
        ds = datasets.Dataset.from_list(rows)
        args = TrainingArguments(**common, remove_unused_columns=False)
        collate = Collator(tok, "causal")
        trainer = Trainer(
            model=model, args=args, train_dataset=ds, data_collator=collate, callbacks=[Clock()]
        )
        trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(ds)
    trainer.data_collator = counted(trainer.data_collator)
    trainer.train()
    reals = [
        int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches
    ]
    steps = [Step(w, c, k, t, ct) for (w, c, t, ct), k in zip(times, reals[: len(times)], strict=True)]
    return HFRecord(steps, batches)
