"""The low-rank layer's dropout: a keep-mask hashed from (element index, seed), eager or fused.

:class:`~lrft.methods.layers.LowRankFn` never stores a dropout mask: forward draws a 4-byte seed
tensor and backward regenerates the identical mask from it, so LoRA-FA stays at the frozen-model
activation floor. The mask is a counter-based hash (Wellons' lowbias32 after a Weyl step), not a
``torch.Generator`` draw: no ``.item()``, no host sync, no Generator per call, and torch.compile
traces it as plain integer arithmetic with no graph break (docs/performance.md has the
candidates measured against each other).

Two kernels compute the same bits:

- ``eager``: the hash as ~15 elementwise torch ops. Each one is a pass over an int32 tensor of the
  activation's size, so on a GPU it is ~15 memory-bound kernel launches per mask where torch's
  dropout is one;
- ``fused``: the same function through ``torch.compile`` (inductor), once per process: one kernel
  that reads x and writes x ⊙ keep (a Triton kernel on a GPU, vectorized C++ on a CPU). Integer
  arithmetic is exact, so it is bit-identical to ``eager`` (tests/test_dropout.py). Compiling it
  costs seconds once (about 6-10 s on a CPU, cold); if the compiler is missing or fails, lrft
  says so once and uses ``eager``.

``auto`` (the default, ``trainer.dropout_kernel``) is ``fused`` on CUDA, where the passes cost
the most, and ``eager`` elsewhere (short CPU runs and tests would spend more compiling than
they save). Inside a torch.compile'd model the layer always traces the eager ops, which inductor
fuses with the rest of the graph anyway.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from lrft.schema import DROPOUT_KERNELS

log = logging.getLogger(__name__)


_GOLDEN = 0x9E3779B9 - 2**32  # odd int32 constants (as signed values, so int32 tensors accept them)
_M1, _M2 = 0x7FEB352D, 0x846CA68B - 2**32


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """Wellons' lowbias32 integer hash on int32, in place (wrapping multiplies, logical shifts).

    In place, so at most two int32 temporaries of the activation's size are alive at once (the
    activation-memory plan counts the mask as one float tensor; see tests/test_memory.py).
    """
    for shift, keep, mult in ((16, 0xFFFF, _M1), (15, 0x1FFFF, _M2), (16, 0xFFFF, None)):
        h ^= (h >> shift).bitwise_and_(keep)
        if mult is not None:
            h *= mult
    return h


def new_seed(device: torch.device) -> torch.Tensor:
    """A fresh int32 seed drawn from the global RNG on ``device`` (the unkeyed path: a layer
    called outside lrft's loop); redrawn identically by checkpoint recompute (which restores the RNG)."""
    return torch.randint(0, 2**31 - 1, (), dtype=torch.int32, device=device)


def seed_rows(n: int, seed: torch.Tensor) -> torch.Tensor:
    """Row keys (n,) int32 of the unkeyed path: a hash of (row index in the tensor, seed)."""
    h = torch.arange(n, dtype=torch.int32, device=seed.device)
    return _mix32(h.mul_(_GOLDEN).add_(seed))  # a Weyl step first: neighbouring rows land far apart


def _rows_of(like: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """``key`` is a 0-d seed (keys by row index) or the (n,) row keys of ``like`` viewed as (n, F)."""
    n = like.numel() // max(1, like.shape[-1]) if like.dim() else 1
    if key.dim() == 0:
        return seed_rows(n, key)
    if key.numel() != n:
        raise ValueError(f"{key.numel()} row keys for a tensor of {n} rows of {like.shape[-1]}")
    return key


def _threshold(p: float) -> int:
    # h is uniform over int32: keep the top (1 − p) share of its range
    return int(-(2**31) + round(p * 2**32))


def _keep_rows(rows: torch.Tensor, features: int, p: float) -> torch.Tensor:
    """(n, features) bool keep-mask: element (i, f) kept iff mix(rows[i] + f·golden) is high.

    ``rows`` are already-mixed int32 keys (one per token or row), so one hash per element makes
    its bit; the (n, features) int32 tensor is the only mask-sized temporary.
    """
    f = torch.arange(features, dtype=torch.int32, device=rows.device).mul_(_GOLDEN)
    return _mix32(rows.unsqueeze(-1) + f) >= _threshold(p)


def keep_mask(like: torch.Tensor, p: float, key: torch.Tensor) -> torch.Tensor:
    """Bool keep-mask of ``like``'s shape, P(keep) = 1 − p, a pure function of (row key, feature).

    ``key``: a 0-d int32 seed (row keys hashed from the row's index in ``like`` viewed as
    (n, F)) or the (n,) row keys themselves (:class:`DropoutKeys`: from the example, the position,
    the layer, the step and the seed, so the bits do not depend on how the batch was split).
    Indices are int32 and wrap beyond 2³² rows (the pattern repeats; nothing else changes).
    """
    features = like.shape[-1] if like.dim() else 1
    return _keep_rows(_rows_of(like, key), features, p).view(like.shape)


def dropout_mask(like: torch.Tensor, p: float, key: torch.Tensor) -> torch.Tensor:
    """The keep-mask scaled by 1/(1-p), in ``like``'s dtype: the dropout LowRankFn applies (it
    multiplies by :func:`keep_mask` and folds 1/(1-p) into its scale; tests compare with this)."""
    return keep_mask(like, p, key).to(like.dtype).mul_(1.0 / (1.0 - p))


def _drop_eager(x: torch.Tensor, p: float, rows: torch.Tensor) -> torch.Tensor:
    """x (n, F) ⊙ keep(rows (n,), F): the function both kernels compute."""
    return x * _keep_rows(rows, x.shape[-1], p)


_fused: Callable[..., torch.Tensor] | None = None
_fused_failed = False
_fused_error = ""  # the compile failure, for fused_status()
_fused_calls = 0  # masks the compiled kernel really made in this process


def _drop_fused(x: torch.Tensor, p: float, rows: torch.Tensor) -> torch.Tensor:
    """``_drop_eager`` compiled once per process, on (rows, features): one dynamic kernel serves
    every shape of input; it recompiles only per dtype and per p (a handful, far below dynamo's
    limit). The (n,) row keys are made eagerly, outside it: they are 1/F of the work."""
    global _fused, _fused_failed, _fused_error, _fused_calls
    if _fused is None:
        _fused = torch.compile(_drop_eager, dynamic=True, fullgraph=True)
    try:
        # detach(): a plain tensor, not a view, so dynamo guards on no base tensor's shape
        out = _fused(x.detach(), p, rows)
        _fused_calls += 1
        return out
    except Exception as err:  # no C++ compiler / no Triton / a compiler bug: same bits, slower
        _fused_failed = True
        _fused_error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        log.warning(
            "trainer.dropout_kernel: compiling the fused dropout kernel failed (%s: %s); using the "
            "eager kernel (the same mask, more memory passes). Set trainer.dropout_kernel=eager to "
            "skip the attempt.",
            type(err).__name__,
            str(err).splitlines()[0] if str(err) else "",
        )
        return _drop_eager(x, p, rows)


def fused_status() -> tuple[int, str]:
    """(masks the compiled kernel made in this process, why it stopped being used: "" if it never
    failed). A failed compile falls back to eager for the whole process, silently after one
    warning: a benchmark or a bits-equal check must read this to know which kernel it measured."""
    return _fused_calls, _fused_error


def fused_for(kernel: str, device: torch.device) -> bool:
    """Whether ``kernel`` ("auto" | "eager" | "fused") runs the compiled kernel on ``device``."""
    if kernel not in DROPOUT_KERNELS:
        raise ValueError(f"dropout kernel must be one of {DROPOUT_KERNELS}, got {kernel!r}")
    if _fused_failed or device.type not in ("cuda", "cpu"):  # meta (the memory planner), mps...
        return False
    return kernel == "fused" or (kernel == "auto" and device.type == "cuda")


def drop(x: torch.Tensor, p: float, key: torch.Tensor, kernel: str = "auto") -> torch.Tensor:
    """x ⊙ keep_mask(x, p, key) (unscaled: the caller folds 1/(1-p) into its own scale)."""
    features = x.shape[-1] if x.dim() else 1
    x2, rows = x.reshape(-1, features), _rows_of(x, key)
    if torch.compiler.is_compiling() or not fused_for(kernel, x.device):
        return _drop_eager(x2, p, rows).view(x.shape)
    return _drop_fused(x2, p, rows).view(x.shape)
