"""The dropout rows of scripts/gpu_check.py: lrft's hashed dropout mask (lrft.methods.dropout),
eager and fused, against torch's dropout; which kernel really ran; the fused kernel on more than
2^31 elements."""

from __future__ import annotations

import time
from typing import Any

import torch


def kernel_ran(before: tuple[int, str]) -> str:
    """Which dropout kernel made the masks since ``before`` (``fused_status()`` then): a failed
    compile falls back to eager process-wide, and the bits-equal check would compare eager with
    eager."""
    from lrft.methods.dropout import fused_status

    calls, error = fused_status()
    if error:
        return f"eager fallback: {error[:120]}"
    return f"fused ({calls - before[0]} masks)" if calls > before[0] else "eager (fused never ran)"


def mask_rows(check: Any, p: float = 0.05, repeats: int = 20) -> list[tuple[str, dict]]:
    """ms per dropout mask applied (forward: x ⊙ keep) on a (batch, length, intermediate) bf16
    activation: lrft's hash eager and fused, and torch's dropout (one kernel, a stored mask)."""
    from lrft.config.compose import compose
    from lrft.methods.dropout import drop, fused_status, new_seed

    width = int(compose([f"model={check.model_cfg}"]).model.from_config.intermediate_size)
    x = torch.randn(check.args.batch, check.args.length, width, device=check.device, dtype=torch.bfloat16)
    seed = new_seed(check.device)
    eager = drop(x, p, seed, "eager")
    before = fused_status()
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
        row["kernel run"] = kernel_ran(before) if "fused" in label else "-"
        row["keep rate"] = f"{(fn() != 0).float().mean().item():.4f} (1 - p = {1 - p:g})"
        rows.append((label, row))
    shape = f"{tuple(x.shape)} bf16, p={p}"
    return [(f"{label} [{shape}]", row) for label, row in rows]


def huge_mask_row(check: Any, p: float = 0.05) -> dict:
    """The fused kernel on an activation of more than 2^31 elements (on the GPU; ``--tiny``: 2^22):
    int32 index arithmetic inside a compiled kernel is the risk. Equal to eager bit for bit, and the
    keep rate measured on the elements past flat index 2^31 alone (a wrapped index would repeat
    or zero the first rows' bits there)."""
    from lrft.methods.dropout import drop, fused_status, new_seed

    width = 11008  # LLaMA-7B's MLP width
    limit = 2**22 if check.args.tiny else 2**31
    n = limit // width + 1  # rows: n x width > limit
    x = torch.randn(n, width, device=check.device, dtype=torch.bfloat16)
    x[x == 0] = 1.0  # so "kept" reads as "non-zero"
    seed = new_seed(check.device)
    before = fused_status()
    fused = drop(x, p, seed, "fused")
    ran = kernel_ran(before)
    same = torch.equal(fused, drop(x, p, seed, "eager"))
    tail = fused.view(-1)[limit:]
    kept = torch.count_nonzero(tail).item() / tail.numel()
    return {
        "ms per mask": "-",
        "bits equal eager": str(same),
        "kernel run": ran,
        "keep rate": f"{kept:.4f} past element {limit:,} ({tail.numel():,} elements)",
    }
