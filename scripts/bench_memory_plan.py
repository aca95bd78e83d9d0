"""The plan ``lrft memory ... memory.budget_gb=B`` chooses, for LLaMA-7B (32k vocabulary) and
Llama 3 8B (128k) at a global batch of 8 x 2048 tokens, LoRA / LoRA-FA / QLoRA-FA, under 24, 48
and 80 GiB: micro-batch x accumulation, checkpointed blocks, offload, estimated step time.

    python scripts/bench_memory_plan.py                      # prints the markdown table
    python scripts/bench_memory_plan.py --write docs/memory.md

Everything runs on the meta device from the bundled configs (no weights), exactly as
``lrft memory`` does; one planner per (model, method), its simulated peaks shared by the budgets.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

MARK_START, MARK_END = "<!-- bench_memory_plan:start -->", "<!-- bench_memory_plan:end -->"
MODELS = ["llama7b", "llama3_8b"]
METHODS = {
    "lora": ["method=lora"],
    "lora_fa": ["method=lora_fa"],
    "qlora_fa": ["method=lora_fa", "quantization=nf4"],
}
BUDGETS = [24, 48, 80]


def plans(model: str, method: list[str], budgets: list[int], batch: int, length: int) -> list[str]:
    from lrft.cli.memory import compose_memory
    from lrft.memory.choose import GIB, Chooser, divisors
    from lrft.memory.plan import Planner, optimizer_state_bytes

    cfg = compose_memory(
        [f"model={model}", *method, f"trainer.batch_size={batch}", f"dataset.max_length={length}"]
    )
    planner = Planner(cfg)
    resident = sum(planner.weights().values()) + optimizer_state_bytes(planner.optimizer)
    chooser = Chooser(planner, resident, planner.gradients(), 0)
    cells = []
    for b in budgets:
        chooser.budget = b * GIB
        c = chooser.best(divisors(batch))
        cells.append(
            "does not fit"
            if c is None
            else f"{c.batch_size} x {c.grad_accum}, {c.checkpointed}/{c.blocks}"
            f"{' + offload' if c.offload else ''}, x{c.step_time:.2f} ({c.total / GIB:.1f})"
        )
    return cells


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--write", type=Path, help="replace the table between the markers in this file")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--model", action="append", choices=MODELS, help="only these models")
    args = parser.parse_args(argv)
    lines = [
        "| model | method | " + " | ".join(f"{b} GiB" for b in BUDGETS) + " |",
        "|---|---|" + "---|" * len(BUDGETS),
    ]
    for model in args.model or MODELS:
        for name, method in METHODS.items():
            lines.append(
                f"| {model} | {name} | "
                + " | ".join(plans(model, method, BUDGETS, args.batch, args.length))
                + " |"
            )
            print(lines[-1], file=sys.stderr)
    table = "\n".join(lines)
    print(table)
    if args.write:
        doc = args.write.read_text()
        start, end = doc.index(MARK_START) + len(MARK_START), doc.index(MARK_END)
        args.write.write_text(doc[:start] + "\n" + table + "\n" + doc[end:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
