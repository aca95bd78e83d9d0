"""The production-path rows of scripts/gpu_check.py: the step ``lrft train`` runs, measured.

Not a hand-built step: the model and optimizer go through ``accelerator.prepare`` with
``mixed_precision="bf16"`` (accelerate wraps the forward in bf16 autocast), the step is
:func:`lrft.train.step.forward_backward` + :class:`lrft.train.policy.StepPolicy` (token-weighted
loss, gradient clipping at ``trainer.max_grad_norm``, the step-1 gradient check, one host sync per
step), and the batch is packed as ``dataset.packing=true`` packs it: ``rows`` rows of ``length``
real tokens, each several documents (:func:`lrft.data.packing.pack_examples`, position_ids, no
padding). Gradient checkpointing off and on (:func:`lrft.model.activations.checkpoint_blocks`,
non-reentrant, every block). PEFT runs the same batch under the same accelerator, as users run it
with Trainer: adapters in float32, its own mean loss, clipping at 1.0, the same non-reentrant
checkpointing.

Model FLOPs utilisation: useful FLOPs per token / measured bf16 matmul peak (section ``env``).
Useful FLOPs per token = sum over matmul weights (every 2-D parameter but the embedding table) of
6 x numel if trainable (forward, input gradient, weight gradient) else 4 x numel (a frozen weight
still passes the input gradient back), plus attention 12 x layers x hidden x s̄, where s̄ is the
mean number of keys a token attends to (causal, within its own document). Checkpointing's second
forward is not useful work, so it lowers MFU by design.
"""

from __future__ import annotations

import json
import random
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

COLUMNS = ["checkpointing", "step ms", "real tokens/s", "peak GiB"]
COLUMNS += ["predicted GiB", "predicted / measured", "MFU", "host syncs / step"]
TABLE = (
    "The production step: `forward_backward` + `StepPolicy` under bf16 autocast, packed batches",
    "What `lrft train` runs with model.dtype=bfloat16 and trainer.mixed_precision=bf16: accelerate's "
    "autocast, lrft's loss and step policy (clipping, one host sync per step), batches packed from "
    "documents of random length, no padding. predicted GiB: `lrft memory` for the same config "
    "(trainer.gradient_checkpointing as in the row). MFU: useful FLOPs per token (6 x trainable + "
    "4 x frozen matmul weights, + 12 x layers x hidden x mean attended keys) x tokens/s over the "
    "env section's matmul TFLOP/s. host syncs / step: the warnings of "
    "`torch.cuda.set_sync_debug_mode('warn')` over one more step, with where the first ones came "
    "from (lrft's policy makes one by design).",
    COLUMNS,
)


def packed_batch(vocab: int, rows: int, length: int, eos: int = 2) -> dict[str, torch.Tensor]:
    """``rows`` packed rows of exactly ``length`` real tokens (documents of 1/8 to 1/2 of a row,
    the last one filling the rest), collated as the loop collates ``dataset.packing=true``."""
    from lrft.data.packing import PackedCollator, pack_examples

    rng = random.Random(0)
    out = []
    for _ in range(rows):
        docs, room = [], length
        while room > 0:
            n = room if room < length // 4 else rng.randint(max(2, length // 8), max(2, length // 2))
            n = min(n, room)
            ids = [rng.randrange(5, vocab) for _ in range(n - 1)] + [eos]
            docs.append({"input_ids": ids, "labels": list(ids)})
            room -= n
        (row,) = pack_examples(docs, length)  # they sum to length: one row
        out.append(row)
    return PackedCollator(pad_id=0)(out)


def flops_per_token(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """Useful training FLOPs per real token (the module docstring's formula)."""
    weights = 0
    for name, p in model.named_parameters():
        if p.dim() == 2 and "embed_tokens" not in name:
            weights += (6 if p.requires_grad else 4) * p.numel()
    cfg = model.config if hasattr(model, "config") else model.base_model.model.config
    mean_keys = (batch["position_ids"].float() + 1).mean().item()  # every token real: no padding
    return weights + 12 * cfg.num_hidden_layers * cfg.hidden_size * mean_keys


def matmul_tflops(results: dict[str, dict[str, dict]]) -> float | None:
    value = results.get("env", {}).get("matmul peak", {}).get("value", "")
    found = re.match(r"([\d.]+) TFLOP/s", value)
    return float(found.group(1)) if found else None


def production_row(check: Any, build: Any, ckpt: bool, peft: bool, overrides: list[str] | None,
                   results: dict[str, dict[str, dict]]) -> dict:  # fmt: skip
    """Warm-up, then timed steps of one configuration under bf16 autocast; peak over all of them."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from lrft.model.activations import checkpoint_blocks

    a = check.args
    AcceleratorState._reset_state()
    acc = Accelerator(mixed_precision="bf16", cpu=not check.cuda)
    model, opt = build()
    checkpoint_blocks(model.base_model.model if peft else model, 10**6 if ckpt else 0)
    model, opt = acc.prepare(model, opt)
    model.train()
    batch = {k: v.to(acc.device) for k, v in packed_batch(model.config.vocab_size, a.batch, a.length).items()}
    step = peft_step(acc, model, opt) if peft else lrft_step(acc, model, opt)
    seconds = check.time_steps(lambda i: step(batch, i))
    tokens = batch["input_ids"].numel()  # every position is a real token: the rows are full
    row = {
        "checkpointing": "every block" if ckpt else "off",
        "step ms": f"{seconds * 1e3:.1f}",
        "real tokens/s": f"{tokens / seconds:,.0f}",
        "peak GiB": check.peak(),
    }
    row.update(prediction(overrides, ckpt, row["peak GiB"]))
    peak = matmul_tflops(results)
    achieved = flops_per_token(acc.unwrap_model(model), batch) * tokens / seconds / 1e12
    row["host syncs / step"] = count_syncs(check, step, batch, a.warmup + a.steps)
    row["MFU"] = f"{achieved / peak:.1%} ({achieved:.3g} TFLOP/s)" if peak else f"- ({achieved:.3g} TFLOP/s)"
    return row


def count_syncs(check: Any, step: Any, batch: dict[str, torch.Tensor], i: int) -> str:
    """Host synchronisations one step makes, by CUDA's own sync debug mode (a no-op on CPU)."""
    import warnings
    from collections import Counter

    if not check.cuda:
        return "n/a (CPU)"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(batch, i)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    where = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
    top = ", ".join(f"{k} x{n}" for k, n in where.most_common(4))
    return f"{sum(where.values())} ({top})" if where else "0"


def lrft_step(acc: Any, model: Any, opt: Any) -> Any:
    from omegaconf import OmegaConf

    from lrft.schema import TrainerConfig
    from lrft.train.policy import StepPolicy
    from lrft.train.state import TrainState
    from lrft.train.step import forward_backward

    policy = StepPolicy(acc, OmegaConf.structured(TrainerConfig()))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    state = TrainState(total=10**6, steps_per_epoch=10**6)

    def step(batch: dict[str, torch.Tensor], i: int) -> None:
        res = forward_backward(acc, model, [batch], "causal", autocast=policy.autocast, step=i)
        policy.update(model, opt, sched, res, state)
        state.pos.step += 1

    return step


def peft_step(acc: Any, model: Any, opt: Any) -> Any:
    def step(batch: dict[str, torch.Tensor], i: int) -> None:
        loss = model(**batch).loss  # transformers' mean over the labelled tokens
        acc.backward(loss)
        acc.clip_grad_norm_(model.parameters(), 1.0)  # Trainer's max_grad_norm default
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def prediction(overrides: list[str] | None, ckpt: bool, measured: str) -> dict:
    if overrides is None:
        return {"predicted GiB": "-", "predicted / measured": "-"}
    from lrft.cli.memory import compose_memory
    from lrft.memory.plan import Planner

    extra = ["trainer.mixed_precision=bf16", f"trainer.gradient_checkpointing={ckpt}"]
    cfg = compose_memory([*overrides, *extra])
    pred = Planner(cfg).plan().total(ckpt) / 2**30
    row = {"predicted GiB": f"{pred:.2f}" if pred >= 0.1 else f"{pred * 1024:.1f} MiB"}
    try:
        row["predicted / measured"] = f"{pred / float(measured):.3f}"
    except ValueError:  # CPU: no measured peak
        row["predicted / measured"] = "-"
    return row


def plan(check: Any, results: dict[str, dict[str, dict]], lrft_builder: Any, peft_builder: Any) -> list:
    """(table, label, row function) of the section: lrft lora_fa and lora, then PEFT, each with
    checkpointing off and on."""
    out = []
    for ckpt in (False, True):
        tag = ", checkpointed" if ckpt else ""
        for method in ("lora_fa", "lora"):
            over = check.overrides(method)
            build = lrft_builder(check, method, "none")
            row = lambda b=build, c=ckpt, o=over: production_row(check, b, c, False, o, results)  # noqa: E731
            out.append(("train", f"lrft {method}{tag}", row))
        build = peft_builder(check, False)
        row = lambda b=build, c=ckpt: production_row(check, b, c, True, None, results)  # noqa: E731
        out.append(("train", f"PEFT LoRA{tag}", row))
    return out


LOOP_TABLE = (
    "Through `lrft.train.train` on the device: resume, quantized bases with data-aware inits",
    "tiny_llama, model.dtype=bfloat16, trainer.mixed_precision=bf16. The resumed row trains 4 steps "
    "with a checkpoint every 2, then a second run resumes from step 2 into a new folder: its final "
    "adapter against the uninterrupted one's. FSDP2 needs 2 processes (one per GPU) and is not run on "
    "one GPU.",
    ["steps", "final train loss", "seconds", "device", "check"],
)


def loop_overrides(check: Any, method: str, quant: str, steps: int) -> list[str]:
    return [
        "model=tiny_llama", "model.dtype=bfloat16", f"method={method}", f"quantization={quant}",
        "trainer.mixed_precision=bf16", f"trainer.max_steps={steps}", "trainer.batch_size=4",
        "trainer.log_every=1", f"trainer.cpu={str(not check.cuda).lower()}",
    ]  # fmt: skip


def loop_row(check: Any, method: str, quant: str) -> dict:
    """3 steps of ``method`` on a ``quant`` base through lrft's own loop."""
    from lrft.config.compose import compose
    from lrft.train import train

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-loop-") as tmp:
        s = train(compose(loop_overrides(check, method, quant, 3)), Path(tmp) / "run").summary
    loss = s.get("train_loss")
    ok = isinstance(loss, float) and loss == loss and s.get("skipped_steps") == 0
    return {
        "steps": str(s.get("steps")),
        "final train loss": f"{loss:.4f}" if isinstance(loss, float) else "?",
        "seconds": f"{time.perf_counter() - start:.1f}",
        "device": check.device.type,
        "check": "finite loss, no skipped step" if ok else f"FAILED: {s}",
    }


def resume_row(check: Any) -> dict:
    """4 steps, checkpoint every 2; a second run resumes from step 2: the final adapters compared."""
    from safetensors.torch import load_file

    from lrft.config.compose import compose
    from lrft.train import train

    start = time.perf_counter()
    over = [*loop_overrides(check, "lora_fa", "none", 4), "trainer.save_every=2"]
    with tempfile.TemporaryDirectory(prefix="gpu-check-resume-") as tmp:
        whole = train(compose(over), Path(tmp) / "whole").summary
        step2 = Path(tmp) / "whole" / "checkpoints" / "step-00000002"
        resumed = train(compose([*over, f"trainer.resume={step2}"]), Path(tmp) / "resumed").summary
        a = load_file(Path(tmp) / "whole" / "final" / "trainable.safetensors")
        b = load_file(Path(tmp) / "resumed" / "final" / "trainable.safetensors")
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    return {
        "steps": f"{whole.get('steps')} (resumed at 2: {resumed.get('steps')})",
        "final train loss": f"{whole['train_loss']:.4f} / {resumed['train_loss']:.4f}",
        "seconds": f"{time.perf_counter() - start:.1f}",
        "device": check.device.type,
        "check": f"max abs diff of the final adapters {diff:.3g}" + (" (bit-identical)" if diff == 0 else ""),
    }


def loop_plan(check: Any) -> list:
    out = [("loop", "lora_fa, save every 2 steps and resume", lambda: resume_row(check))]
    for method in ("pissa", "lora_ga"):
        for quant in ("nf4", "int8"):
            row = lambda m=method, q=quant: loop_row(check, m, q)  # noqa: E731
            out.append(("loop", f"{method} on a {quant} base", row))
    return out


def fp16_row(check: Any) -> dict:
    """A few fp16 steps through lrft's own loop: the GradScaler's overflows are skipped, counted."""
    from lrft.config.compose import compose
    from lrft.train import train

    steps = 3 if check.args.tiny else 30
    overrides = ["model=tiny_llama", "method=lora_fa", "trainer.mixed_precision=fp16", "trainer.log_every=1"]
    overrides += [f"trainer.max_steps={steps}", "trainer.batch_size=4"]
    overrides.append(f"trainer.cpu={str(not check.cuda).lower()}")
    cfg = compose(overrides)
    with tempfile.TemporaryDirectory(prefix="gpu-check-fp16-") as tmp:
        run = train(cfg, Path(tmp) / "run")
        lines = (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()
        records = [json.loads(x) for x in lines if x.strip()]
    scales = [r["loss_scale"] for r in records if "loss_scale" in r]
    s = run.summary
    return {
        "steps": str(s.get("steps", steps)),
        "overflow_steps": str(s.get("overflow_steps")),
        "loss scale (first, last)": f"{scales[0]:g}, {scales[-1]:g}" if scales else "not logged",
        "final train loss": f"{s['train_loss']:.4f}" if isinstance(s.get("train_loss"), float) else "?",
        "device": check.device.type,
    }
