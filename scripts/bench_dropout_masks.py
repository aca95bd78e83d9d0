"""CPU time to make and apply one dropout mask of the low-rank layer, per candidate.

The candidates docs/performance.md compares: lrft's hash of (element index, seed tensor) through
the eager kernel and the fused one (``lrft.methods.dropout``, ``trainer.dropout_kernel``), the
old per-call ``torch.Generator`` draw, torch's native dropout with its RNG state replayed, and a
stored bool mask. One thread, this process's CPU time, alternated calls, medians.

    python scripts/bench_dropout_masks.py                       # 8 x 128 x 344, p = 0.05
    python scripts/bench_dropout_masks.py --shape 8 512 11008 --repeats 20
    python scripts/bench_throughput.py --masks --rounds 0      # the same, on that bench's model
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's lrft


def mask_costs(shape: tuple[int, ...], p: float, repeats: int = 40) -> dict[str, float]:
    """CPU ms to make and apply one dropout mask, per candidate, on an activation of ``shape``."""
    from lrft.methods.dropout import drop, new_seed

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

    seed = new_seed(x.device)  # lrft's: a hash of (index, seed tensor); 1/(1-p) in the scale
    candidates = [
        ("hash (lrft), eager kernel", lambda: drop(x, p, seed, "eager")),
        ("hash (lrft), fused kernel", lambda: drop(x, p, seed, "fused")),
        ("rand+ge, Generator (old)", old_rand),
        ("native dropout + RNG replay", native_replay),
        ("bool mask (stored)", bool_mask),
    ]
    for _, fn in candidates:  # warm-up; compiles the fused kernel
        fn()
    times: dict[str, list[float]] = {name: [] for name, _ in candidates}
    for _ in range(repeats):  # alternating, CPU time of this process (robust to a shared machine)
        for name, fn in candidates:
            t = time.process_time()
            fn()
            times[name].append(time.process_time() - t)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def main(argv: list[str] | None = None) -> int:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--shape", type=int, nargs="+", default=[8, 128, 344])
    parser.add_argument("--p", type=float, default=0.05)
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    shape = tuple(args.shape)
    print(f"| candidate ({shape}, p={args.p}, 1 thread) | CPU ms per mask applied |\n|---|---:|")
    for name, cost in mask_costs(shape, args.p, args.repeats).items():
        print(f"| {name} | {cost:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
