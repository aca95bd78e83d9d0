"""One GPU check of lrft, run on one GPU in a few minutes, written as a markdown report (docs/gpu.md).

Nothing is downloaded: the model is LLaMA-7B's shapes (configs/model/llama7b_random.yaml) built at
random directly on the device in bfloat16. Sections, each row robust on its own (a failing row is
written as ``failed: reason`` and the next one runs; ``--budget-s`` skips what is left, with a note):

1. training step: peak memory (``torch.cuda.max_memory_allocated``, reset per row) and real
   tokens/s of lrft lora, lrft lora_fa and lrft QLoRA-FA (nf4 base) against PEFT LoRA and PEFT LoRA
   with A frozen; same shapes, batch, rank, targets, AdamW, one loss (lrft's token-weighted
   :func:`lrft.train.step.forward_backward` for every row), warm-up steps, then timed steps;
2. ``lrft memory``'s prediction (:class:`lrft.memory.plan.Planner`, the same composed config) beside
   the measured peak;
3. data-aware inits on the device: PiSSA with randomized SVD, LoRA-GA's gradient estimate + SVD;
4. an fp16 run through ``lrft.train.train`` (GradScaler): overflow steps and the final loss scale;
5. the low-rank layer's dropout mask (lrft.methods.dropout): the eager hash, the fused (compiled)
   hash and torch's own dropout, ms per mask on an MLP-wide activation, and whether the fused bits
   equal the eager ones on this device (the training rows use ``auto``: fused on CUDA; the
   "eager dropout kernel" row is lrft lora_fa with ``trainer.dropout_kernel=eager``).

``--tiny`` runs the same code on CPU with tiny LLaMA shapes in seconds (tests/test_gpu_check.py).

    bash scripts/gpu_check.sh --wheels wheels            # on the GPU machine; writes docs/gpu.md
    python scripts/gpu_check.py --tiny --out /tmp/gpu.md  # CPU smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout's lrft, also when run as a plain script

GIB = 1 << 30
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Budget:
    """Wall-clock budget of the whole check: a section that would start after it is skipped."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.start = seconds, time.monotonic()

    def spent(self) -> bool:
        return time.monotonic() - self.start > self.seconds

    def note(self) -> str:
        return f"skipped: time budget spent (--budget-s {self.seconds:g})"


def guarded(fn: Callable[[], dict[str, str]], budget: Budget) -> dict[str, str]:
    """Run one row; any failure becomes its text, so one broken row never loses the others."""
    if budget.spent():
        return {"status": budget.note()}
    try:
        return fn()
    except Exception as err:  # the report must go on; the reason is written down
        traceback.print_exc()
        reason = f"{type(err).__name__}: {err}".replace("|", "/").replace("\n", " ")
        return {"status": f"failed: {reason[:200]}"}
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class Check:
    """Shapes and device of this run, and the helpers every section shares."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.cuda = torch.cuda.is_available() and not args.tiny
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.model_cfg = "tiny_llama" if args.tiny else "llama7b_random"

    def overrides(self, method: str, quant: str = "none", extra: tuple[str, ...] = ()) -> list[str]:
        a = self.args
        return [
            f"model={self.model_cfg}",
            "model.dtype=bfloat16",
            f"method={method}",
            f"method.r={a.r}",
            f"method.target_modules=[{','.join(TARGETS)}]",
            f"quantization={quant}",
            "optimizer=adamw",
            f"trainer.batch_size={a.batch}",
            f"dataset.max_length={a.length}",
            *extra,
        ]

    def base(self, quant: bool = False) -> torch.nn.Module:
        """The random bf16 base, built on the device itself (no fp32 copy, no host round trip)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        from lrft.config.compose import compose

        mcfg = compose([f"model={self.model_cfg}"]).model
        config = AutoConfig.for_model(mcfg.arch, **dict(mcfg.from_config))
        torch.manual_seed(0)
        with torch.device(self.device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        if next(model.parameters()).dtype != torch.bfloat16:  # a transformers that ignored dtype=
            model = model.to(torch.bfloat16)
        model.config.use_cache = False
        return quantize_nf4(model, self.device) if quant else model

    def batch(self, vocab: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(5, vocab, (self.args.batch, self.args.length), generator=gen).to(self.device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            self.sync()
            torch.cuda.reset_peak_memory_stats()

    def peak(self) -> str:
        return f"{torch.cuda.max_memory_allocated() / GIB:.2f}" if self.cuda else "n/a (CPU)"


def quantize_nf4(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Swap every decoder linear for a bitsandbytes NF4 ``Linear4bit`` (double quant, bf16 compute),
    one layer at a time, as ``quantization=nf4`` stores them; the lm_head stays bf16 (QLoRA's skip).
    Done in place because lrft's ``quantize_built`` round-trips through a saved folder, which at 7B
    costs minutes and a second copy of the weights."""
    import bitsandbytes as bnb

    from lrft.model.quantization import keep_canonical_layout

    for mod in list(model.model.modules()):
        for child, lin in list(mod.named_children()):
            if type(lin) is not torch.nn.Linear:
                continue
            q = bnb.nn.Linear4bit(
                lin.in_features, lin.out_features, bias=lin.bias is not None,
                compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4", device="meta",
            )  # fmt: skip
            q.weight = bnb.nn.Params4bit(
                lin.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4", module=q
            ).to(device)  # quantizes
            if lin.bias is not None:
                q.bias = torch.nn.Parameter(lin.bias.data, requires_grad=False)
            setattr(mod, child, q)
            del lin
    keep_canonical_layout(model)
    return model


def predicted_gib(overrides: list[str]) -> float:
    """``lrft memory``'s total for this config (weights + optimizer + step peak), no checkpointing."""
    from lrft.cli.memory import compose_memory
    from lrft.memory.plan import Planner

    return Planner(compose_memory(overrides)).plan().total(False) / GIB


def step_row(check: Check, build: Callable[[], tuple[Any, Any]], overrides: list[str] | None) -> dict:
    """Warm-up, then timed optimizer steps of one configuration; peak over all its steps."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from lrft.train.step import forward_backward

    a = check.args
    AcceleratorState._reset_state()
    acc = Accelerator(mixed_precision="no", cpu=not check.cuda)
    model, opt = build()
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    batch = check.batch(model.config.vocab_size)
    check.reset_peak()
    start = 0.0
    for i in range(a.warmup + a.steps):
        if i == a.warmup:
            check.sync()
            start = time.perf_counter()
        forward_backward(acc, model, [batch], "causal")
        opt.step()
        opt.zero_grad(set_to_none=True)
    check.sync()
    seconds = (time.perf_counter() - start) / a.steps
    row = {
        "trainable": f"{trainable / 1e6:.2f}M",
        "step ms": f"{seconds * 1e3:.1f}",
        "tokens/s": f"{a.batch * a.length / seconds:,.0f}",
        "peak GiB": check.peak(),
    }
    del model, opt, batch
    if overrides is None:
        row["predicted GiB"] = "- (not an lrft config)"
        return row
    try:
        pred = predicted_gib(overrides)
        row["predicted GiB"] = f"{pred:.2f}" if pred >= 0.1 else f"{pred:.4f} ({pred * 1024:.1f} MiB)"
        if check.cuda:
            row["predicted / measured"] = f"{pred / float(row['peak GiB']):.3f}"
    except Exception as err:  # the measurement stands without the prediction
        traceback.print_exc()
        row["predicted GiB"] = f"failed: {type(err).__name__}: {str(err)[:120]}"
    return row


def lrft_builder(
    check: Check, method: str, quant: str, kernel: str = "auto"
) -> Callable[[], tuple[Any, Any]]:
    def build() -> tuple[Any, Any]:
        from omegaconf import OmegaConf

        from lrft.config.compose import compose
        from lrft.methods import get_method
        from lrft.methods.base import ApplyContext
        from lrft.methods.layers import use_dropout_kernel
        from lrft.optim import build_optimizer

        cfg = compose(check.overrides(method, quant))
        m = get_method(cfg.method.name)(OmegaConf.to_object(cfg.method))
        model = m.apply(check.base(quant != "none"), {"target_modules": TARGETS}, ApplyContext())
        use_dropout_kernel(model, kernel)  # what trainer.dropout_kernel does in the loop
        groups = m.param_groups(model, cfg.optimizer.weight_decay)
        return model, build_optimizer(groups, cfg.optimizer, in_backward=m.updates_in_backward)

    return build


def peft_builder(check: Check, freeze_a: bool) -> Callable[[], tuple[Any, Any]]:
    def build() -> tuple[Any, Any]:
        import peft

        config = peft.LoraConfig(r=check.args.r, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS)
        model = peft.get_peft_model(check.base(), config)  # adapters in float32, as lrft's
        if freeze_a:
            for name, p in model.named_parameters():
                if "lora_A" in name:
                    p.requires_grad_(False)
        params = [p for p in model.parameters() if p.requires_grad]
        return model, torch.optim.AdamW(params, lr=2e-4)

    return build


def init_row(check: Check, method: str, extra: tuple[str, ...]) -> dict:
    """Time ``method.apply`` (injection + data-aware init) on a base already on the device."""
    from omegaconf import OmegaConf

    from lrft.config.compose import compose
    from lrft.methods import get_method
    from lrft.methods.base import ApplyContext

    cfg = compose(check.overrides(method, extra=extra))
    m = get_method(cfg.method.name)(OmegaConf.to_object(cfg.method))
    model = check.base()
    batch = check.batch(model.config.vocab_size)
    check.reset_peak()
    check.sync()
    start = time.perf_counter()
    model = m.apply(model, {"target_modules": TARGETS}, ApplyContext(calibration=lambda: iter([batch] * 64)))
    check.sync()
    seconds = time.perf_counter() - start
    layers = sum(1 for mod in model.modules() if hasattr(mod, "lora_A"))
    on = {str(mod.lora_A.device) for mod in model.modules() if hasattr(mod, "lora_A")}
    return {"seconds": f"{seconds:.1f}", "layers": str(layers), "peak GiB": check.peak(), "on": ",".join(on)}


def fp16_row(check: Check) -> dict:
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


def mask_rows(check: Check, p: float = 0.05, repeats: int = 20) -> list[tuple[str, dict]]:
    """ms per dropout mask applied (forward: x ⊙ keep) on a (batch, length, intermediate) bf16
    activation: lrft's hash eager and fused, and torch's dropout (one kernel, a stored mask)."""
    from lrft.config.compose import compose
    from lrft.methods.dropout import drop, new_seed

    width = int(compose([f"model={check.model_cfg}"]).model.from_config.intermediate_size)
    x = torch.randn(check.args.batch, check.args.length, width, device=check.device, dtype=torch.bfloat16)
    seed = new_seed(check.device)
    eager = drop(x, p, seed, "eager")
    same = torch.equal(drop(x, p, seed, "fused"), eager)  # also compiles the fused kernel
    candidates = {
        "lrft hash, eager (~15 ops)": lambda: drop(x, p, seed, "eager"),
        "lrft hash, fused (one compiled kernel)": lambda: drop(x, p, seed, "fused"),
        "torch.nn.functional.dropout": lambda: torch.nn.functional.dropout(x, p, training=True),
    }
    rows = []
    for label, fn in candidates.items():
        fn()
        check.sync()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        check.sync()
        row = {"ms per mask": f"{(time.perf_counter() - start) / repeats * 1e3:.3f}"}
        row["bits equal eager"] = str(same) if "fused" in label else "-"
        rows.append((label, row))
    shape = f"{tuple(x.shape)} bf16, p={p}"
    return [(f"{label} [{shape}]", row) for label, row in rows]


def table(rows: list[tuple[str, dict]], columns: list[str]) -> str:
    """Markdown table; a row holding only a status (failed / skipped) says so in its first cell."""
    out = ["| configuration | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label, row in rows:
        if "status" in row:
            out.append(f"| {label} | {row['status']} |" + " |" * (len(columns) - 1))
        else:
            out.append(f"| {label} | " + " | ".join(row.get(c, "") for c in columns) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny LLaMA on CPU, 2 timed steps (smoke test)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "gpu.md")
    p.add_argument("--budget-s", type=float, default=420.0)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--batch", type=int, default=None, help="default 8 (GPU), 2 (--tiny)")
    p.add_argument("--length", type=int, default=None, help="default 512 (GPU), 64 (--tiny)")
    p.add_argument("--warmup", type=int, default=None, help="default 3 (GPU), 1 (--tiny)")
    p.add_argument("--steps", type=int, default=None, help="timed steps: default 10 (GPU), 2 (--tiny)")
    p.add_argument("--ga-batches", type=int, default=2, help="LoRA-GA init_batches")
    args = p.parse_args(argv)
    for key, gpu, tiny in (("batch", 8, 2), ("length", 512, 64), ("warmup", 3, 1), ("steps", 10, 2)):
        if getattr(args, key) is None:
            setattr(args, key, tiny if args.tiny else gpu)
    if args.tiny:
        torch.set_num_threads(1)
    check, budget = Check(args), Budget(args.budget_s)
    print(f"gpu_check: device {check.device}, model {check.model_cfg}", file=sys.stderr)
    qlora = ("lora_fa", "nf4")
    train_rows = [
        ("lrft lora", lrft_builder(check, "lora", "none"), check.overrides("lora")),
        ("lrft lora_fa", lrft_builder(check, "lora_fa", "none"), check.overrides("lora_fa")),
        (
            "lrft lora_fa, eager dropout kernel",
            lrft_builder(check, "lora_fa", "none", "eager"),
            check.overrides("lora_fa"),
        ),
        ("lrft QLoRA-FA (nf4 base)", lrft_builder(check, *qlora), check.overrides(*qlora)),
        ("PEFT LoRA", peft_builder(check, False), None),
        ("PEFT LoRA, A frozen", peft_builder(check, True), None),
    ]
    steps: list[tuple[str, dict]] = []
    inits: list[tuple[str, dict]] = []
    fp16: list[tuple[str, dict]] = []
    masks: list[tuple[str, dict]] = []

    def run(into: list, label: str, fn: Callable[[], dict]) -> None:
        print(f"gpu_check: {time.monotonic() - budget.start:.1f}s {label}", file=sys.stderr)
        into.append((label, guarded(fn, budget)))
        write_report(args, check, budget, steps, inits, fp16, masks, finished=False)  # a kill keeps rows

    for label, build, ov in train_rows:
        run(steps, label, lambda b=build, o=ov: step_row(check, b, o))
    ga = args.ga_batches
    for label, method, extra in (
        ("PiSSA, randomized SVD (svd_niter=4)", "pissa", ("method.svd_niter=4",)),
        (f"LoRA-GA ({ga} batches, svd_niter=4)", "lora_ga", (f"method.init_batches={ga}",)),
    ):
        run(inits, label, lambda m=method, e=extra: init_row(check, m, e))
    run(fp16, "tiny_llama lora_fa, trainer.mixed_precision=fp16", lambda: fp16_row(check))
    print(f"gpu_check: {time.monotonic() - budget.start:.1f}s dropout masks", file=sys.stderr)
    got = guarded(lambda: {"rows": mask_rows(check)}, budget)  # type: ignore[dict-item]
    masks.extend(got.get("rows", [("dropout masks", got)]))
    write_report(args, check, budget, steps, inits, fp16, masks, finished=True)
    return 0


def write_report(
    args: argparse.Namespace,
    check: Check,
    budget: Budget,
    steps: list,
    inits: list,
    fp16: list,
    masks: list,
    finished: bool,
) -> None:
    """The whole report, rewritten after every row: a run killed from outside keeps its rows."""
    import transformers

    dev = torch.cuda.get_device_name(0) if check.cuda else "CPU"
    head = (
        "# GPU check\n\n"
        if check.cuda
        else "# GPU check\n\n**CPU smoke run (no GPU was lent to this session) — the GPU table will "
        "replace it.** Shapes are tiny; tokens/s are CPU numbers and say nothing about a GPU.\n\n"
    )
    shape = "LLaMA-7B shapes, random init"
    if args.tiny:
        shape = "tiny_llama shapes (configs/model/tiny_llama.yaml)"
    total = f"Total {time.monotonic() - budget.start:.0f} s."
    if not finished:
        total = "**Unfinished: the run stopped here.**"
    columns = ["trainable", "step ms", "tokens/s", "peak GiB", "predicted GiB", "predicted / measured"]
    text = [
        head.rstrip("\n"),
        "",
        f"Device: {dev}; torch {torch.__version__}, transformers {transformers.__version__}; {shape}, "
        f"base bf16, adapters fp32, r={args.r}, alpha 16, dropout 0.05 on {', '.join(TARGETS)}; batch "
        f"{args.batch} x {args.length} (all real tokens), AdamW, {args.warmup} warm-up + {args.steps} timed "
        f"steps; one loss for all rows (lrft.train.step.forward_backward). " + total,
        "",
        "Run on a GPU machine (writes this file): `bash scripts/gpu_check.sh --wheels wheels` "
        "(see the script's header for the wheels; with this project's device tool: command "
        '`bash scripts/gpu_check.sh --wheels wheels`, carry `["wheels"]`, timeout_s 540); CPU smoke run: '
        "`python scripts/gpu_check.py --tiny`.",
        "",
        "## Training step: memory and speed; `lrft memory`'s prediction",
        "",
        "peak GiB: `torch.cuda.max_memory_allocated()` over warm-up and timed steps (reset per row, model "
        "built before the reset, so weights count). predicted GiB: `lrft memory` (weights + optimizer state "
        "+ step peak, no checkpointing) for the same composed config.",
        "",
        table(steps, columns),
        "",
        "## Data-aware inits on the device (`method.apply` on a base already on it)",
        "",
        table(inits, ["seconds", "layers", "peak GiB", "on"]),
        "",
        "## fp16 through lrft's loop (GradScaler)",
        "",
        table(fp16, ["steps", "overflow_steps", "loss scale (first, last)", "final train loss", "device"]),
        "",
        "## Dropout masks (lrft.methods.dropout)",
        "",
        "Forward application x ⊙ keep; lrft regenerates the mask in backward instead of storing it.",
        "",
        table(masks, ["ms per mask", "bits equal eager"]),
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(text))
    if finished:
        print(f"gpu_check: wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
