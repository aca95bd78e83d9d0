"""Split-invariant dropout: an element's mask is a function of what it is, not of where it landed.

An element of a low-rank layer's input is feature f of the token at position t of training
example e, in layer ℓ, at optimizer step s of a run with seed σ. lrft's loop tells the layers
which examples each micro-batch holds (``dropout_ids``, the example's index in the training data,
made by :class:`WithIds` and by packing), and the mask is hashed from those coordinates alone::

    example key   k_e      = mix(e·γ + salt)                  salt = mix(mix(σ) + s·γ)
    token key     k_(e,t)  = mix(k_e + t·γ₂)                   t restarts per example when packed
    row key       r        = mix(k_(e,t) + ℓ)                  ℓ = crc32 of the layer's name
    keep(e,t,ℓ,f)          = mix(r + f·γ) ≥ threshold(p)       (:func:`lrft.methods.dropout.keep_mask`)

(mix = Wellons' lowbias32 on int32, γ and γ₂ odd Weyl constants.) Nothing here depends on the
example's row in the micro-batch, the padded width, the process, the accumulation index or
packing, so batch 4, 2 × accumulation 2, 2 processes × 2 and packed rows draw the same masks and
train the same adapters (tests/test_split_dropout.py). Resume needs no RNG for it: the step is in
the key.

Shapes: ``dropout_ids`` is (B,) for padded batches (the token's position is its index along the
layer input's middle dimensions, which padding on the right does not move) or (B, T) for packed
rows (with the batch's ``position_ids``, pad tokens id −1). A layer whose input does not lead with
the batch's rows (a mixture-of-experts layer fed routed tokens, say) cannot be keyed: it falls
back to the per-call seed of :func:`~lrft.methods.dropout.new_seed` (still exact under
checkpointing and resume, but not split-invariant) and says so once.

What is stored: one (B·T,) int32 token-key tensor per micro-batch shared by every layer (ctx keeps
a reference), never a mask. The model's own dropout modules (RoBERTa's hidden dropout, T5's
``dropout_rate``) are torch's and are not keyed: README "Split-invariant arithmetic".
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from lrft.methods.dropout import _GOLDEN, _mix32

log = logging.getLogger(__name__)

_GOLDEN2 = 0x85EBCA6B - 2**32  # a second odd constant: positions step apart from examples
ID_KEY = "dropout_ids"  # the batch key the collators fill and the loop pops before the forward


def _mix_int(v: int) -> int:
    """lowbias32 on a python int, as signed int32 (the salt is made on the host, once per batch)."""
    m = 0xFFFFFFFF
    v &= m
    v ^= v >> 16
    v = (v * 0x7FEB352D) & m
    v ^= v >> 15
    v = (v * 0x846CA68B) & m
    v ^= v >> 16
    return v - 2**32 if v >= 2**31 else v


def layer_key(name: str) -> int:
    """ℓ: crc32 of the module's qualified name, as a signed int32 (the same in every process)."""
    v = zlib.crc32(name.encode())
    return v - 2**32 if v >= 2**31 else v


class _State:
    """The active micro-batch's example keys. One persistent object with tensor attributes, so a
    torch.compile'd model guards on shapes, not on a new object per micro-batch."""

    def __init__(self) -> None:
        self.on = False
        self.examples: torch.Tensor | None = None  # (B,) or (B, T) int32 k_e
        self.positions: torch.Tensor | None = None  # (B, T) int32 t, packed rows only
        self.cache: dict[Any, torch.Tensor] = {}
        self.warned: set[int] = set()


_STATE = _State()


@contextmanager
def keyed(ids: torch.Tensor | None, positions: torch.Tensor | None, seed: int, step: int) -> Iterator[None]:
    """Key the low-rank layers' dropout by ``ids`` (and packed ``positions``) for one micro-batch's
    forward AND backward (checkpoint recompute runs the forward again inside backward)."""
    if ids is None:
        yield
        return
    if ids.dim() == 2 and (positions is None or positions.shape != ids.shape):
        raise ValueError("per-token dropout ids need position_ids of the same shape")
    salt = _mix_int(_mix_int(seed) + step * (_GOLDEN & 0xFFFFFFFF))
    examples = _mix32(ids.to(torch.int32).mul(_GOLDEN).add_(salt))
    pos = positions.to(torch.int32) if ids.dim() == 2 else None
    s = _STATE
    prior = (s.on, s.examples, s.positions, s.cache)
    s.on, s.examples, s.positions, s.cache = True, examples, pos, {}
    try:
        yield
    finally:
        s.on, s.examples, s.positions, s.cache = prior


def token_keys(x: torch.Tensor, key: int) -> torch.Tensor | None:
    """k_(e,t) for each row of ``x`` viewed as (n, F), or None where ``x`` cannot be keyed (no
    active micro-batch, or its leading dimension is not the batch's rows)."""
    s = _STATE
    if not s.on or s.examples is None:
        return None
    e = s.examples
    if x.dim() < 2 or x.shape[0] != e.shape[0] or (e.dim() == 2 and tuple(x.shape[:-1]) != tuple(e.shape)):
        if key not in s.warned and not torch.compiler.is_compiling():
            s.warned.add(key)
            log.warning(
                "dropout: a low-rank layer's input %s does not lead with the batch's %s rows; its "
                "masks use a per-call seed and are not split-invariant.",
                tuple(x.shape),
                tuple(e.shape),
            )
        return None
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    compiling = torch.compiler.is_compiling()
    cached = None if compiling else s.cache.get(rows)
    if cached is not None and cached.device == x.device:
        return cached
    if e.dim() == 2:  # packed rows: positions restart per example
        tokens = _mix32(e + s.positions * _GOLDEN2).reshape(-1)
    else:  # padded: the position is the index along the middle dimensions
        m = rows // e.shape[0]
        t = torch.arange(m, dtype=torch.int32, device=e.device).mul_(_GOLDEN2)
        tokens = _mix32(e.unsqueeze(1) + t).reshape(-1)
    tokens = tokens.to(x.device)
    if not compiling:
        s.cache[rows] = tokens
    return tokens


def row_keys(tokens: torch.Tensor, key: int) -> torch.Tensor:
    """r = mix(k_(e,t) + ℓ): the (n,) row keys of one layer (made in forward and again in backward)."""
    return _mix32(tokens + key)


class WithIds(Sequence):
    """Training examples that carry their index as ``dropout_id`` (the e of the keys above)."""

    def __init__(self, rows: Any) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i, ex in enumerate(self.rows):  # the rows' own (batched) iteration
            yield {**ex, "dropout_id": i}

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.rows[index], "dropout_id": int(index)}

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        many = getattr(self.rows, "__getitems__", None)
        got = many(list(indices)) if many is not None else [self.rows[i] for i in indices]
        return [{**ex, "dropout_id": int(i)} for ex, i in zip(got, indices, strict=True)]
