"""What each method keeps for backward, counted exactly on CPU, against PEFT and the frozen floor.

A LLaMA-architecture model (hidden 512, 4 layers, intermediate 1376, 8 heads, float32) with
adapters on all seven projections (q, k, v, o, gate, up, down), r=8, dropout 0.05, one training
forward of batch 2 x 256 tokens. :class:`lrft.memory.measure.SavedTensors` records every tensor autograd
saves (each storage once, parameters excluded). Rows:

- floor: every weight frozen, gradients flowing from the input embeddings: what the frozen model
  itself keeps so that gradients can reach any adapter; nothing an adapter adds;
- lrft's methods (LoRA-FA, LoRA, DoRA, PiSSA, LoRA-GA; full fine-tuning for reference), each
  also planned on the meta device by ``lrft memory`` (column "planned": must equal "measured");
- PEFT LoRA with A frozen (LoRA-FA the PEFT way), PEFT LoRA, PEFT DoRA, same flags.

The vocabulary is 4000: LLaMA-7B's vocabulary-to-hidden ratio (32000/4096) at hidden 512, so the
head and loss weigh what they weigh at 7B. ``--vocab 32000`` shows a tiny model whose logits
dominate everything else (the ratios then shrink: see docs/memory.md).

    python scripts/bench_activation_memory.py
    python scripts/bench_activation_memory.py --write docs/memory.md   # replace the table there
    python scripts/bench_activation_memory.py --vocab 32000 --report-only
    python scripts/bench_activation_memory.py --dropout-kernel fused      # dropout as on CUDA

``--dropout-kernel``: torch's CPU dropout multiplies by a float noise tensor and keeps it (4 bytes
an element in float32); CUDA's fused ``native_dropout`` keeps a bool mask (1 byte). PEFT's
adapters keep that mask, lrft's regenerate it, so the gap between them depends on the kernel:
``fused`` runs CUDA's kernel on the CPU to measure the GPU case.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LRFT_METHODS = ["lora_fa", "lora", "dora", "pissa", "lora_ga", "full"]
MARK_START, MARK_END = "<!-- bench_activation_memory:start -->", "<!-- bench_activation_memory:end -->"


# the benchmark's LLaMA (tests run the same code on a smaller one with the same proportions)
SHAPE = dict(
    hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8
)


def overrides(vocab: int, method: str, batch: int, length: int, shape: dict[str, int], r: int) -> list[str]:
    """The benchmark model as ``lrft memory``/``lrft train`` overrides of the tiny LLaMA config."""
    shape = dict(shape, vocab_size=vocab, max_position_embeddings=max(512, length))
    ovs = ["model=tiny_llama", *(f"model.from_config.{k}={v}" for k, v in shape.items())]
    ovs += [f"method={method}", "dataset=quickstart", f"trainer.batch_size={batch}"]
    ovs += [f"dataset.max_length={length}", f"model.target_modules=[{','.join(TARGETS)}]"]
    ovs += ["trainer.loss_chunk=0"]
    if method != "full":  # the same adapter flags for every low-rank method
        ovs += [f"method.r={r}", f"method.alpha={2 * r}", "method.dropout=0.05"]
    if method == "lora_ga":
        ovs += ["method.init_batches=1"]
    return ovs


def fused_dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False):
    """CUDA's dropout (``native_dropout``: keeps a bool mask), run on the CPU."""
    if training and 0.0 < p < 1.0:
        return torch.native_dropout(input, p, True)[0]
    return input


def measure(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> int:
    from lrft.memory.measure import saved_activation_bytes
    from lrft.model.loss import loss_sum

    model.train()
    # every row's loss from the full logits (trainer.loss_chunk=0), as transformers computes it:
    # the rows differ only in what the adapters keep (docs/memory.md measures the chunked loss)
    return saved_activation_bytes(model, lambda: loss_sum(model, batch, "causal", chunk=0))


def run(
    vocab: int,
    batch_size: int,
    length: int,
    shape: dict[str, int] = SHAPE,
    r: int = 8,
    methods: list[str] = LRFT_METHODS,
    peft_dora: bool = True,
) -> list[tuple[str, int, int | None]]:
    """(row, measured bytes, planned bytes or None) for every row."""
    import peft

    from lrft.cli.memory import compose_memory
    from lrft.memory.plan import Planner
    from lrft.methods.base import ApplyContext
    from lrft.methods.registry import METHODS, get_method
    from lrft.model.load import load_model

    torch.manual_seed(0)
    ids = torch.randint(5, vocab, (batch_size, length))
    batch = {"input_ids": ids, "labels": ids}

    def base(method: str = "lora") -> tuple[torch.nn.Module, object]:
        cfg = compose_memory(overrides(vocab, method, batch_size, length, shape, r))
        torch.manual_seed(0)
        model = load_model(cfg.model)
        model.config.use_cache = False
        return model, cfg

    rows: list[tuple[str, int, int | None]] = []
    model, _ = base()
    model.requires_grad_(False)
    model.enable_input_require_grads()  # gradients reach the embeddings' output, as adapters need
    rows.append(("floor (frozen model, input grads)", measure(model, batch), None))
    for name in [m for m in methods if m in METHODS]:
        model, cfg = base(name)
        method = get_method(name)(OmegaConf.to_object(cfg.method))
        ctx = ApplyContext(calibration=lambda: iter([batch]))  # LoRA-GA's gradient estimate
        defaults = {k: list(cfg.model[k]) for k in ("target_modules", "modules_to_save")}
        method.apply(model, defaults, ctx)
        planned = Planner(cfg).activations(batch_size).total
        rows.append((f"lrft {name}", measure(model, batch), planned))

    def peft_row(label: str, freeze_a: bool = False, dora: bool = False) -> None:
        model, _ = base()
        config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS, use_dora=dora)
        pm = peft.get_peft_model(model, config)
        if freeze_a:
            for n, p in pm.named_parameters():
                if "lora_A" in n:
                    p.requires_grad_(False)
        rows.append((label, measure(pm, batch), None))

    peft_row("PEFT LoRA, A frozen", freeze_a=True)
    peft_row("PEFT LoRA")
    if peft_dora:
        peft_row("PEFT DoRA", dora=True)
    return rows


def checks(rows: list[tuple[str, int, int | None]]) -> list[tuple[str, float, float, bool]]:
    """The inequalities issue #7 requires: (claim, left / right, bound, holds)."""
    b = {name: measured for name, measured, _ in rows}
    floor, fa, lora = b["floor (frozen model, input grads)"], b["lrft lora_fa"], b["lrft lora"]
    peft_fa, peft_lora = b["PEFT LoRA, A frozen"], b["PEFT LoRA"]
    return [
        ("lrft lora_fa <= 1.05 x floor", fa / floor, 1.05, fa <= 1.05 * floor),
        ("lrft lora_fa <= PEFT LoRA-A-frozen / 1.4", peft_fa / fa, 1.4, fa * 1.4 <= peft_fa),
        ("lrft lora < PEFT lora (dropout 0.05)", peft_lora / lora, 1.0, lora < peft_lora),
    ]


def markdown(rows: list[tuple[str, int, int | None]], header: str) -> str:
    floor = rows[0][1]
    lines = [header, "", "| | saved for backward | x floor | planned on meta |", "|---|---:|---:|---:|"]
    for name, measured, planned in rows:
        plan = "" if planned is None else f"{planned / 2**20:.2f} MiB"
        lines.append(f"| {name} | {measured / 2**20:.2f} MiB | {measured / floor:.3f} | {plan} |")
    lines += ["", "| check | ratio | bound | holds |", "|---|---:|---:|---|"]
    for claim, ratio, bound, ok in checks(rows):
        lines.append(f"| {claim} | {ratio:.3f} | {bound} | {'yes' if ok else 'NO'} |")
    return "\n".join(lines)


def write(path: Path, text: str) -> None:
    doc = path.read_text()
    start, end = doc.index(MARK_START) + len(MARK_START), doc.index(MARK_END)
    path.write_text(doc[:start] + "\n" + text + "\n" + doc[end:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vocab", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--write", type=Path, help="replace the table between the markers in this file")
    parser.add_argument("--report-only", action="store_true", help="exit 0 even if a check fails")
    parser.add_argument("--dropout-kernel", choices=["torch", "fused"], default="torch")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.dropout_kernel == "fused":
        torch.nn.functional.dropout = fused_dropout
    rows = run(args.vocab, args.batch, args.length)
    out = Console()
    title = (
        f"saved activations: LLaMA hidden 512, 4 layers, vocab {args.vocab}, float32, "
        f"batch {args.batch} x {args.length}, r=8, dropout 0.05 ({args.dropout_kernel} dropout kernel, "
        f"torch {torch.__version__})"
    )
    table = Table(title=title, title_justify="left")
    for col in ("", "saved for backward", "x floor", "planned on meta"):
        table.add_column(col, justify="right" if col else "left")
    for name, measured, planned in rows:
        plan = "" if planned is None else f"{planned / 2**20:.2f} MiB"
        table.add_row(name, f"{measured / 2**20:.2f} MiB", f"{measured / rows[0][1]:.3f}", plan)
    out.print(table)
    results = checks(rows)
    for claim, ratio, bound, ok in results:
        out.print(f"{'[green]PASS' if ok else '[red]FAIL'}[/] {claim}: ratio {ratio:.3f} (bound {bound})")
    mismatched = [name for name, measured, planned in rows if planned is not None and planned != measured]
    for name in mismatched:
        out.print(f"[red]FAIL[/] {name}: planned on meta != measured")
    if args.write:
        write(args.write, markdown(rows, f"`{' '.join(sys.argv)}` ({title})"))
    failed = not all(ok for *_, ok in results) or bool(mismatched)
    return 0 if args.report_only or not failed else 1


if __name__ == "__main__":
    sys.exit(main())
