"""Time one optimizer step (forward + backward + AdamW) of lrft LoRA and LoRA-FA against PEFT LoRA.

The tiny LLaMA of configs/model/tiny_llama.yaml, adapters on all seven projections (r=8, alpha 16,
dropout 0.05), one batch reused by every model, on CPU. The models take turns step by step (the
order rotates each round), so machine load drifts hit all of them alike; each round gives a
ratio lrft / PEFT and the median over rounds is reported.

``--dropout-kernel`` picks the kernel of lrft's dropout mask (lrft.methods.dropout: ``eager``
torch ops, or ``fused``, compiled once into one kernel; the same bits); ``--dropout 0`` takes
dropout out of the comparison.

    python scripts/bench_speed.py
    python scripts/bench_speed.py --rounds 60 --dropout-kernel fused
    python scripts/bench_speed.py --profile          # where lrft's step spends its time
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import torch
from omegaconf import OmegaConf

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(kind: str, dropout: float, kernel: str = "eager") -> torch.nn.Module:
    from lrft.config.compose import compose
    from lrft.methods.layers import use_dropout_kernel
    from lrft.methods.registry import get_method
    from lrft.model.load import load_model

    cfg = compose(["model=tiny_llama", "method=lora" if kind == "peft" else f"method={kind}"])
    torch.manual_seed(0)
    model = load_model(cfg.model)
    model.config.use_cache = False
    if kind == "peft":
        import peft

        config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=TARGETS)
        return peft.get_peft_model(model, config).train()
    method_cfg = OmegaConf.to_object(cfg.method)
    method_cfg.r, method_cfg.alpha, method_cfg.dropout, method_cfg.target_modules = 8, 16, dropout, TARGETS
    model = get_method(kind)(method_cfg).apply(model).train()
    use_dropout_kernel(model, kernel)
    return model


def stepper(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Any:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> float:
        start = time.perf_counter()
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return step


def main(argv: list[str] | None = None) -> int:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: least noise)")
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--dropout-kernel", choices=["eager", "fused"], default="eager")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's top ops for lrft lora")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ids = torch.randint(5, 261, (args.batch, args.length))
    batch = {"input_ids": ids, "labels": ids}
    names = ["lrft lora", "lrft lora_fa", "PEFT lora"]
    kinds = ["lora", "lora_fa", "peft"]
    models = [build(k, args.dropout, args.dropout_kernel) for k in kinds]
    steps = {n: stepper(m, batch) for n, m in zip(names, models, strict=True)}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % 3 :] + names[: r % 3]
        for n in order:
            times[n].append(steps[n]())
    peft_t = times["PEFT lora"]
    print(
        f"one step (fwd+bwd+AdamW), tiny_llama, batch {args.batch} x {args.length}, "
        f"dropout {args.dropout} ({args.dropout_kernel} kernel), {args.threads} thread(s), "
        f"{args.rounds} rounds, torch {torch.__version__}"
    )
    print(f"{'':14s} {'median ms':>10s} {'ratio vs PEFT (median of rounds)':>34s}")
    for n in names:
        ratio = statistics.median(a / b for a, b in zip(times[n], peft_t, strict=True))
        print(f"{n:14s} {statistics.median(times[n]) * 1e3:10.2f} {ratio:34.3f}")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                steps["lrft lora"]()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    return 0


if __name__ == "__main__":
    sys.exit(main())
