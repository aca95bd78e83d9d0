"""One GPU check of lrft on one GPU in a few minutes, written as a markdown report, row by row.

Nothing is downloaded: the model is LLaMA-7B's shapes (configs/model/llama7b_random.yaml) built at
random directly on the device in bfloat16. The report goes to ``$OUT/gpu.md`` when ``$OUT`` is set
(the device tool brings back only ``$OUT``), else to docs/gpu.md (``--out`` overrides both); it is
rewritten after every row, and the table the row belongs to is printed to stdout at once, so a run
cut off from outside keeps (and has shown) every finished row.

Each section runs in its own subprocess (this script with ``--section NAME``) under its own time
limit, so a crash, a hang or a sticky CUDA error in one costs only that section's rest (the row it
was on reads ``error: ...``; the section is started again after that row, at most twice). Sections,
cheapest and most informative first:

1. ``env``: device, versions, whether lrft's config and loop import, a bf16 matmul's TFLOP/s;
2. ``steps``: peak memory (``torch.cuda.max_memory_allocated``, reset per row) and real tokens/s
   of lrft lora_fa and lora against PEFT LoRA (and with A frozen); same shapes, batch, rank,
   targets, AdamW, one loss (lrft's token-weighted :func:`lrft.train.step.forward_backward`);
3. ``planner``: ``lrft memory``'s prediction (:class:`lrft.memory.plan.Planner`, the same composed
   config) beside each measured peak of section 2;
4. ``train``: the production step (scripts/gpu_train.py): lrft's forward_backward + StepPolicy
   under accelerate's bf16 autocast on packed 8 x 512 batches, checkpointing off and on, lora_fa,
   lora and PEFT, with ``lrft memory``'s prediction, model FLOPs utilisation and host syncs per row;
5. ``inits``: data-aware inits on the device: PiSSA with randomized SVD, LoRA-GA;
6. ``fp16``: an fp16 run through ``lrft.train.train`` (GradScaler): overflow steps, loss scale;
7. ``loop``: ``lrft.train.train`` in bf16: save and resume against the uninterrupted run, PiSSA
   and LoRA-GA on nf4 and int8 bases (scripts/gpu_train.py);
8. ``dropout``: the low-rank layer's dropout mask (lrft.methods.dropout), eager hash, fused hash
   and torch's dropout, which kernel really ran, whether the fused bits equal the eager ones on
   this device, and the fused kernel on more than 2^31 elements;
9. ``qlora``: lrft QLoRA-FA (nf4 base, bitsandbytes) step and prediction, last.

``--tiny`` runs the same code on CPU with tiny LLaMA shapes in seconds (tests/test_gpu_check.py).

    bash scripts/gpu_check.sh --wheels wheels                   # the device command (docs/gpu.md)
    OUT=/tmp/o bash scripts/gpu_check.sh --wheels wheels --tiny  # its CPU smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout's lrft, also when run as a plain script
sys.path.insert(0, str(ROOT / "scripts"))  # gpu_train, gpu_dropout, also from the tests

import gpu_dropout  # noqa: E402
import gpu_train  # noqa: E402

GIB = 1 << 30
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MARK = "@@gpu_check "  # a child's stdout line carrying one event (JSON) to the parent

# section -> (time limit on a GPU in s, on --tiny), in the order they run
SECTIONS: dict[str, tuple[float, float]] = {
    "env": (60, 60),
    "steps": (200, 120),
    "planner": (60, 60),
    "train": (240, 120),
    "inits": (120, 60),
    "fp16": (120, 90),
    "loop": (150, 120),
    "dropout": (90, 90),
    "qlora": (120, 60),
}
# table -> (heading, text under it, columns)
TABLES: dict[str, tuple[str, str, list[str]]] = {
    "env": ("Environment", "", ["value"]),
    "steps": (
        "Training step: memory and speed",
        "peak GiB: `torch.cuda.max_memory_allocated()` over warm-up and timed steps (reset per row, model "
        "built before the reset, so weights count).",
        ["trainable", "step ms", "tokens/s", "peak GiB"],
    ),
    "planner": (
        "`lrft memory`'s prediction against the measured peak",
        "predicted GiB: `lrft memory` (weights + optimizer state + step peak, no checkpointing) for the "
        "same composed config as the training row of the same name.",
        ["measured peak GiB", "predicted GiB", "predicted / measured"],
    ),
    "train": gpu_train.TABLE,
    "inits": (
        "Data-aware inits on the device (`method.apply` on a base already on it)",
        "",
        ["seconds", "layers", "peak GiB", "on"],
    ),
    "fp16": (
        "fp16 through lrft's loop (GradScaler)",
        "",
        ["steps", "overflow_steps", "loss scale (first, last)", "final train loss", "device"],
    ),
    "loop": gpu_train.LOOP_TABLE,
    "masks": (
        "Dropout masks (lrft.methods.dropout)",
        "Forward application x ⊙ keep; lrft regenerates the mask in backward instead of storing it.",
        ["ms per mask", "bits equal eager", "kernel run", "keep rate"],
    ),
}


def reason(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".replace("|", "/").replace("\n", " ")
    return text[:200]


def guarded(fn: Callable[[], Any]) -> Any:
    """Run one row; any failure becomes its text (``error: ...``), so one broken row never loses the
    others of its section."""
    try:
        return fn()
    except Exception as err:  # the report must go on; the reason is written down
        traceback.print_exc()
        return {"status": f"error: {reason(err)}"}
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def sticky(row: Any) -> bool:
    """A CUDA error leaves the context unusable: the section's process must end after it."""
    status = row.get("status", "") if isinstance(row, dict) else ""
    return "CUDA error" in status or "device-side assert" in status or "AcceleratorError" in status


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

    def time_steps(self, step: Callable[[int], Any]) -> float:
        """Seconds per step: ``args.warmup`` untimed calls of ``step(i)``, then ``args.steps``
        timed ones; the peak-memory counter is reset first, so the peak covers all of them."""
        a = self.args
        self.reset_peak()
        start = 0.0
        for i in range(a.warmup + a.steps):
            if i == a.warmup:
                self.sync()
                start = time.perf_counter()
            step(i)
        self.sync()
        return (time.perf_counter() - start) / a.steps

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


def step_row(check: Check, build: Callable[[], tuple[Any, Any]]) -> dict:
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

    def step(_i: int) -> None:
        forward_backward(acc, model, [batch], "causal")
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = check.time_steps(step)
    return {
        "trainable": f"{trainable / 1e6:.2f}M",
        "step ms": f"{seconds * 1e3:.1f}",
        "tokens/s": f"{a.batch * a.length / seconds:,.0f}",
        "peak GiB": check.peak(),
    }


def planner_row(overrides: list[str], measured: str) -> dict:
    pred = predicted_gib(overrides)
    row = {
        "measured peak GiB": measured,
        "predicted GiB": f"{pred:.2f}" if pred >= 0.1 else f"{pred:.4f} ({pred * 1024:.1f} MiB)",
    }
    try:
        row["predicted / measured"] = f"{pred / float(measured):.3f}"
    except ValueError:  # no measured number (CPU, or the row failed)
        row["predicted / measured"] = "-"
    return row


def env_rows(check: Check) -> list[tuple[str, dict]]:
    """What ran where: device, versions (``missing`` for a package not installed), lrft's imports, and
    a bf16 matmul's rate (the reference for any utilisation figure)."""
    from importlib.metadata import PackageNotFoundError, version

    def ver(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "missing"

    rows: list[tuple[str, dict]] = []
    if check.cuda:
        prop = torch.cuda.get_device_properties(0)
        dev = f"{prop.name}, {prop.total_memory / GIB:.0f} GiB, sm_{prop.major}{prop.minor}"
    else:
        dev = "CPU (no GPU used: --tiny or none visible)"
    rows.append(("device", {"value": dev}))
    py = sys.version.split()[0]
    rows.append(("python / torch / CUDA", {"value": f"{py} / {torch.__version__} / {torch.version.cuda}"}))
    dists = ["transformers", "accelerate", "peft", "triton", "bitsandbytes", "hydra-core", "omegaconf"]
    dists += ["datasets", "safetensors"]
    rows.append(("packages", {"value": ", ".join(f"{d} {ver(d)}" for d in dists)}))

    def imports() -> dict:
        import lrft.config.compose  # hydra, omegaconf
        import lrft.train  # noqa: F401  (the loop: datasets, accelerate)

        return {"value": "ok: lrft.config.compose, lrft.train"}

    rows.append(("lrft imports", guarded(imports)))

    def matmul() -> dict:
        n = 512 if check.args.tiny else 8192
        dtype = torch.float32 if not check.cuda else torch.bfloat16
        a = torch.randn(n, n, device=check.device, dtype=dtype)
        b = torch.randn(n, n, device=check.device, dtype=dtype)
        for _ in range(3):
            a @ b
        check.sync()
        reps = 3 if check.args.tiny else 20
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        check.sync()
        tflops = 2 * n**3 * reps / (time.perf_counter() - start) / 1e12
        return {"value": f"{tflops:.1f} TFLOP/s ({n}^3, {str(dtype).split('.')[-1]}, mean of {reps})"}

    rows.append(("matmul peak", guarded(matmul)))
    return rows


Plan = list[tuple[str, str, Callable[[], Any]]]  # (table, label, row function) in order


def plan(check: Check, section: str, results: dict[str, dict[str, dict]]) -> Plan:
    """The rows of one section; ``results`` holds the rows of the sections before it."""
    ga = check.args.ga_batches
    if section == "env":
        return [("env", "env", lambda: env_rows(check))]
    if section == "steps":
        return [
            ("steps", "lrft lora_fa", lambda: step_row(check, lrft_builder(check, "lora_fa", "none"))),
            ("steps", "lrft lora", lambda: step_row(check, lrft_builder(check, "lora", "none"))),
            ("steps", "PEFT LoRA", lambda: step_row(check, peft_builder(check, False))),
            ("steps", "PEFT LoRA, A frozen", lambda: step_row(check, peft_builder(check, True))),
            (
                "steps",
                "lrft lora_fa, eager dropout kernel",
                lambda: step_row(check, lrft_builder(check, "lora_fa", "none", "eager")),
            ),
        ]
    if section == "planner":
        measured = results.get("steps", {})
        out: Plan = []
        for label, method in (("lrft lora_fa", "lora_fa"), ("lrft lora", "lora")):
            peak = measured.get(label, {}).get("peak GiB", "-")
            out.append(("planner", label, lambda m=method, p=peak: planner_row(check.overrides(m), p)))
        return out
    if section == "train":
        return gpu_train.plan(check, results, lrft_builder, peft_builder)
    if section == "inits":
        return [
            ("inits", "PiSSA, randomized SVD (svd_niter=4)",
             lambda: init_row(check, "pissa", ("method.svd_niter=4",))),
            (
                "inits",
                f"LoRA-GA ({ga} batches, svd_niter=4)",
                lambda: init_row(check, "lora_ga", (f"method.init_batches={ga}",)),
            ),
        ]  # fmt: skip
    if section == "fp16":
        return [
            ("fp16", "tiny_llama lora_fa, trainer.mixed_precision=fp16", lambda: gpu_train.fp16_row(check))
        ]
    if section == "loop":
        return gpu_train.loop_plan(check)
    if section == "dropout":
        big = "2^22 (--tiny)" if check.args.tiny else "2^31"
        return [
            ("masks", "dropout masks", lambda: gpu_dropout.mask_rows(check)),
            ("masks", f"fused, more than {big} elements", lambda: gpu_dropout.huge_mask_row(check)),
        ]
    if section == "qlora":
        label, qlora = "lrft QLoRA-FA (nf4 base)", ("lora_fa", "nf4")

        def predicted() -> dict:
            peak = results.get("steps", {}).get(label, {}).get("peak GiB", "-")
            return planner_row(check.overrides(*qlora), peak)

        return [
            ("steps", label, lambda: step_row(check, lrft_builder(check, *qlora))),
            ("planner", label, predicted),
        ]
    raise ValueError(f"unknown section {section!r}; one of {', '.join(SECTIONS)}")


def emit(event: dict) -> None:
    print(MARK + json.dumps(event), flush=True)


def run_section(args: argparse.Namespace) -> int:
    """Child: run the rows of ``args.section`` from ``args.start_row`` on; one event per row."""
    check = Check(args)
    results = json.loads(Path(args.results).read_text()) if args.results else {}
    rows = plan(check, args.section, results)
    emit({"plan": [label for _table, label, _fn in rows]})
    for i, (tbl, label, fn) in enumerate(rows):
        if i < args.start_row:
            continue
        emit({"start": label, "index": i})
        got = guarded(fn)
        for sub_label, row in got if isinstance(got, list) else [(label, got)]:
            emit({"table": tbl, "label": sub_label, "row": row})
        emit({"done": i})
        if sticky(got):
            return 3  # the parent starts the section again, in a fresh process, after this row
    return 0


class Report:
    """All rows so far, by table; rewritten to ``out`` after every row."""

    def __init__(self, args: argparse.Namespace, out: Path, cuda: bool) -> None:
        self.args, self.out, self.cuda, self.start = args, out, cuda, time.monotonic()
        self.rows: dict[str, dict[str, dict]] = {t: {} for t in TABLES}

    def add(self, tbl: str, label: str, row: dict) -> None:
        self.rows.setdefault(tbl, {})[label] = row
        self.write(finished=False)
        print(f"\n{self.table(tbl)}\n", flush=True)  # output_tail holds it even if the run is cut off

    def table(self, tbl: str) -> str:
        heading, _text, columns = TABLES[tbl]
        return f"## {heading}\n\n" + table(list(self.rows[tbl].items()), columns)

    def write(self, finished: bool) -> None:
        a = self.args
        head = "# GPU check\n\n"
        if not self.cuda:
            head += (
                "**CPU smoke run (no GPU was lent to this session) — the GPU table will replace it.** "
                "Shapes are tiny; tokens/s are CPU numbers and say nothing about a GPU.\n\n"
            )
        shape = (
            "tiny_llama shapes (configs/model/tiny_llama.yaml)" if a.tiny else "LLaMA-7B shapes, random init"
        )
        total = f"Total {time.monotonic() - self.start:.0f} s, {time.strftime('%Y-%m-%d')}."
        if not finished:
            total = "**Unfinished: the run stopped here.**"
        text = [
            head.rstrip("\n"),
            "",
            f"{shape}, base bf16, adapters fp32, r={a.r}, alpha 16, dropout 0.05 on {', '.join(TARGETS)}; "
            f"batch {a.batch} x {a.length} (all real tokens), AdamW, {a.warmup} warm-up + {a.steps} timed "
            "steps; one loss for all rows (lrft.train.step.forward_backward); `mixed_precision=no` in the "
            "step table, accelerate's bf16 autocast in the production table (scripts/gpu_train.py). Each "
            "section ran in its own process under its own time limit. " + total,
            "",
            "Device command (docs/gpu.md): `bash scripts/gpu_check.sh --wheels wheels`, carry "
            '`["wheels"]`; CPU smoke run: `OUT=/tmp/o bash scripts/gpu_check.sh --wheels wheels --tiny`.',
            "",
        ]
        for tbl, (_heading, intro, _cols) in TABLES.items():
            text += (
                [self.table(tbl), ""]
                if not intro
                else [self.table(tbl).replace("\n\n", f"\n\n{intro}\n\n", 1), ""]
            )
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text("\n".join(text))
        tmp.replace(self.out)  # never a half-written file, also when killed mid-write


def table(rows: list[tuple[str, dict]], columns: list[str]) -> str:
    """Markdown table; a row holding only a status (error / skipped) says so in its first cell."""
    out = ["| configuration | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label, row in rows:
        if "status" in row:
            out.append(f"| {label} | {row['status']} |" + " |" * (len(columns) - 1))
        else:
            out.append(f"| {label} | " + " | ".join(row.get(c, "") for c in columns) + " |")
    return "\n".join(out)


def child_argv(args: argparse.Namespace, section: str, start_row: int, results: Path) -> list[str]:
    argv = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--section",
        section,
        "--start-row",
        str(start_row),
    ]
    argv += ["--results", str(results), "--r", str(args.r), "--batch", str(args.batch)]
    argv += ["--length", str(args.length), "--warmup", str(args.warmup), "--steps", str(args.steps)]
    argv += ["--ga-batches", str(args.ga_batches)] + (["--tiny"] if args.tiny else [])
    return argv


class Forked:
    """A section's process forked from this one (``--tiny`` on CPU only: it inherits the imports,
    which a fresh interpreter pays seconds for; a CUDA run never forks, a CUDA context cannot
    survive a fork). The same interface as the ``subprocess.Popen`` the GPU run uses."""

    def __init__(self, args: argparse.Namespace, section: str, start_row: int, results: Path) -> None:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        self.pid = os.fork()
        if self.pid == 0:  # the child: its own session (killed as a group), stdout/stderr to the pipes
            rc = 1
            try:
                os.setsid()
                os.close(out_r)
                os.close(err_r)
                os.dup2(out_w, 1)
                os.dup2(err_w, 2)
                sys.stdout = os.fdopen(1, "w", buffering=1)
                sys.stderr = os.fdopen(2, "w", buffering=1)
                child = argparse.Namespace(**vars(args))
                child.section, child.start_row, child.results = section, start_row, str(results)
                rc = run_section(child)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(rc)
        os.close(out_w)
        os.close(err_w)
        self.stdout, self.stderr = os.fdopen(out_r), os.fdopen(err_r)

    def kill(self) -> None:
        os.killpg(self.pid, signal.SIGKILL)

    def wait(self) -> int:
        return os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])


class Spawned(subprocess.Popen):
    """A section's process: this script with ``--section``, a fresh interpreter (the GPU run)."""

    def __init__(self, args: argparse.Namespace, section: str, start_row: int, results: Path) -> None:
        super().__init__(
            child_argv(args, section, start_row, results),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1, start_new_session=True,
        )  # fmt: skip

    def kill(self) -> None:
        os.killpg(self.pid, signal.SIGKILL)


def start_child(args: argparse.Namespace, section: str, start_row: int, results: Path) -> Forked | Spawned:
    return (Forked if args.tiny else Spawned)(args, section, start_row, results)


def preimport() -> None:
    """``--tiny``: import once, in the parent, what every forked section would import again."""
    import accelerate  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import lrft.cli.memory
    import lrft.config.compose
    import lrft.memory.plan
    import lrft.train  # noqa: F401


def pump(stream: Any, events: queue.Queue[str | None] | None, tail: deque[str] | None) -> None:
    """Forward a child's stream to stderr; event lines go to ``events`` (stdout), the last lines to
    ``tail`` (stderr, for the error row's reason)."""
    for line in stream:
        if events is not None and line.startswith(MARK):
            events.put(line[len(MARK) :])
            continue
        sys.stderr.write(line)
        if tail is not None and line.strip():
            tail.append(line.strip())
    if events is not None:
        events.put(None)


def supervise(args: argparse.Namespace, report: Report, section: str, limit: float, results: Path) -> None:
    """Parent: run one section's child under ``limit`` seconds; every row it reports goes into the
    report at once; a crash, a kill at the limit or a sticky error marks the row it was on and the
    section goes on in a fresh process after that row (at most twice)."""
    deadline = time.monotonic() + limit
    start_row, planned, tries = 0, [], 0
    table_of = {"env": "env", "dropout": "masks", "fp16": "fp16", "inits": "inits", "planner": "planner"}
    table_of.update(train="train", loop="loop")
    while tries < 3:
        tries += 1
        results.write_text(json.dumps(report.rows))
        proc = start_child(args, section, start_row, results)
        events: queue.Queue[str | None] = queue.Queue()
        tail: deque[str] = deque(maxlen=8)

        threads = [
            threading.Thread(target=pump, args=(proc.stdout, events, None), daemon=True),
            threading.Thread(target=pump, args=(proc.stderr, None, tail), daemon=True),
        ]
        for t in threads:
            t.start()
        current: tuple[str, str, int] | None = None  # (table, label, index) of the row running
        done = start_row
        timed_out = False
        while True:
            try:
                raw = events.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                timed_out = True
                break
            if raw is None:
                break
            event = json.loads(raw)
            if "plan" in event:
                planned = event["plan"]
            elif "start" in event:
                current = (table_of.get(section, "steps"), event["start"], event["index"])
            elif "table" in event:
                report.add(event["table"], event["label"], event["row"])
                if current is not None:
                    current = (event["table"], current[1], current[2])
            elif "done" in event:
                done, current = event["done"] + 1, None
        if timed_out:
            proc.kill()
        rc = proc.wait()
        for t in threads:
            t.join(timeout=5)
        if rc == 0 and not timed_out:
            return
        why = f"timed out after {limit:.0f} s (section {section})" if timed_out else f"process exit {rc}"
        if not timed_out and tail:
            why += f": {tail[-1]}"
        why = why.replace("|", "/")[:200]
        if current is not None:  # the row it was on: an error row, and the section goes on after it
            report.add(current[0], current[1], {"status": f"error: {why}"})
            done = current[2] + 1
        elif not planned:  # died before it said what it would run
            report.add(table_of.get(section, "steps"), f"section {section}", {"status": f"error: {why}"})
            return
        if timed_out or done >= len(planned):
            for label in planned[done:]:
                report.add(table_of.get(section, "steps"), label, {"status": f"error: not run: {why}"})
            return
        start_row = done
    for label in planned[start_row:]:
        report.add(
            table_of.get(section, "steps"), label, {"status": "error: not run: section failed 3 times"}
        )


def default_out() -> Path:
    out = os.environ.get("OUT")
    return Path(out) / "gpu.md" if out else ROOT / "docs" / "gpu.md"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny LLaMA on CPU, 2 timed steps (smoke test)")
    p.add_argument(
        "--out", type=Path, default=None, help="default $OUT/gpu.md if $OUT is set, else docs/gpu.md"
    )
    p.add_argument("--budget-s", type=float, default=420.0, help="all sections together")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated, in the order to run")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--batch", type=int, default=None, help="default 8 (GPU), 2 (--tiny)")
    p.add_argument("--length", type=int, default=None, help="default 512 (GPU), 64 (--tiny)")
    p.add_argument("--warmup", type=int, default=None, help="default 3 (GPU), 1 (--tiny)")
    p.add_argument("--steps", type=int, default=None, help="timed steps: default 10 (GPU), 2 (--tiny)")
    p.add_argument("--ga-batches", type=int, default=2, help="LoRA-GA init_batches")
    p.add_argument("--section", help=argparse.SUPPRESS)  # the child process of one section
    p.add_argument("--start-row", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--results", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for key, gpu, tiny in (("batch", 8, 2), ("length", 512, 64), ("warmup", 3, 1), ("steps", 10, 2)):
        if getattr(args, key) is None:
            setattr(args, key, tiny if args.tiny else gpu)
    if args.tiny:
        torch.set_num_threads(1)
    if args.section:
        return run_section(args)
    out = args.out or default_out()
    cuda = torch.cuda.is_available() and not args.tiny
    report = Report(args, out, cuda)
    if args.tiny:
        preimport()
    print(f"gpu_check: report in {out}, device {'cuda' if cuda else 'cpu'}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        for section in [s for s in args.sections.split(",") if s]:
            left = args.budget_s - (time.monotonic() - report.start)
            own = SECTIONS[section][1 if args.tiny else 0]
            print(
                f"gpu_check: {time.monotonic() - report.start:.1f}s section {section}",
                file=sys.stderr,
                flush=True,
            )
            if left < 5:
                tbl = {"env": "env", "dropout": "masks"}.get(
                    section, section if section in TABLES else "steps"
                )
                report.add(
                    tbl,
                    f"section {section}",
                    {"status": f"skipped: time budget spent (--budget-s {args.budget_s:g})"},
                )
                continue
            supervise(args, report, section, min(own, left), Path(tmp) / "results.json")
    report.write(finished=True)
    print(f"gpu_check: wrote {out}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
