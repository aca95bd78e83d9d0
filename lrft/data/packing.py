"""Packing (``dataset.packing=true``): causal examples concatenated into rows of up to max_length.

With long-tailed lengths a padded batch spends most of its compute on padding; packed rows are
nearly full. Three things keep a packed row equivalent to its examples run one by one:

- ``position_ids`` restart at 0 for each example, so rotary/learned positions are the same;
- attention never crosses examples: :class:`PackedCollator` passes ``position_ids`` and NO
  ``attention_mask``, which is how transformers (``masking_utils.find_packed_sequence_indices``)
  detects packed sequences: sdpa/eager get a block-diagonal causal mask, flash_attention_2 takes
  its varlen path. That detection is transformers' own and version-dependent (a 4.5x release
  skips it on torch < 2.6; it is data-dependent control flow, which compilers dislike), so a
  compiled model gets the block-diagonal mask built here instead (``PackedCollator(mask=...)``, see
  :func:`block_causal_mask`): a 4D ``attention_mask`` is taken as-is by every attention
  implementation that uses ``masking_utils``;
- no prediction crosses examples: causal LMs shift labels inside the model (the logit at t is
  scored against ``labels[t + 1]``), so the logit of an example's last token would be scored on
  the next example's first token. That first label is set to -100. Unpacked, the first label of
  an example is never a target either, so the set of (logit, target) pairs is unchanged.

The loss must then be token-weighted (sum of per-token losses / number of loss tokens, see
:func:`token_loss_sum`): a per-row mean would weigh examples by which row they landed in.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import torch

from lrft.data.collate import IGNORE_INDEX


def pack_examples(examples: Sequence[dict[str, Any]], max_length: int) -> list[dict[str, list[int]]]:
    """Best-fit-decreasing packing of encoded causal examples into rows of at most ``max_length``.

    Deterministic (a function of the lengths and the order of ``examples``). No example is split:
    one longer than ``max_length`` (encode already truncates to dataset.max_length, so only when
    the two differ) is truncated to ``max_length``, as encoding does, and fills a row of its own.
    Best fit (the fullest row with room) packs as tightly as first fit and runs in O(n log n).

    Returns rows of ``input_ids``, ``labels`` and ``position_ids`` (python lists, as
    :func:`~lrft.data.encode.encode_rows` gives), in the order rows were opened; examples that
    carry a ``dropout_id`` give their rows per-token ``dropout_ids`` too (the masks follow the
    example into its row: :mod:`lrft.methods.dropout_keys`).
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    lengths = [min(len(ex["input_ids"]), max_length) for ex in examples]
    order = sorted(range(len(examples)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []  # example indices per row
    free: list[tuple[int, int]] = []  # (room left, row), sorted: best fit = first with room >= n
    for i in order:
        n = lengths[i]
        if n == 0:
            continue
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            room, row = free.pop(at)
        else:
            room, row = max_length, len(rows)
            rows.append([])
        rows[row].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, row))
    return [_concat([examples[i] for i in row], max_length) for row in rows]


def _concat(examples: list[dict[str, Any]], max_length: int) -> dict[str, list[int]]:
    tokens: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    ids: list[int] = []
    for ex in examples:
        x = list(ex["input_ids"][:max_length])
        y = list(ex["labels"][:max_length])
        if len(y) != len(x):
            raise ValueError("packing needs per-token labels (causal examples)")
        y[0] = IGNORE_INDEX  # would be predicted from the previous example's last token
        tokens += x
        labels += y
        positions += range(len(x))
        if "dropout_id" in ex:
            ids += [int(ex["dropout_id"])] * len(x)
    row = {"input_ids": tokens, "labels": labels, "position_ids": positions}
    return {**row, "dropout_ids": ids} if ids else row


#: the 4D mask convention of each attention implementation (transformers' ``sdpa_mask`` and
#: ``eager_mask``): sdpa takes a boolean keep-mask; eager *adds* the mask to the scores, so it needs
#: 0 / -inf floats (a boolean mask would add 1 and mask nothing). Others (flash_attention_2, flex)
#: have their own packed path from position_ids and get no mask.
MASK_STYLES = {"sdpa": "bool", "eager": "additive"}


def block_causal_mask(position_ids: torch.Tensor, style: str = "bool") -> torch.Tensor:
    """(batch, 1, len, len) causal mask that never crosses the examples of packed rows.

    An example starts wherever the position does not follow the previous one (+1), the rule of
    transformers' ``find_packed_sequence_indices``; token q attends to k iff k <= q and both lie in
    the same example. ``style="bool"``: True = attend (sdpa); ``"additive"``: float32 0 / finfo.min
    (eager adds it to the scores; float32 promotes bf16/fp16 scores, softmax runs in float32 anyway).
    """
    if style not in ("bool", "additive"):
        raise ValueError(f"mask style must be 'bool' or 'additive', got {style!r}")
    first = position_ids[:, :1] - 1
    example = (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)  # (batch, len)
    n = position_ids.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=position_ids.device).tril()
    keep = (example[:, :, None] == example[:, None, :]) & causal  # (batch, q, k)
    keep = keep[:, None]
    if style == "bool":
        return keep
    zero = torch.zeros((), dtype=torch.float32)
    return torch.where(keep, zero, torch.finfo(torch.float32).min)


class PackedCollator:
    """Batches packed rows: right-padded ``input_ids``/``labels``/``position_ids``.

    Padding gets positions 0, 1, ... of its own, so it is one more packed sequence: real tokens
    come first and attend only within their example (causal), pad tokens only among themselves,
    and their labels are -100. ``pad_to`` pads every batch to that width (one shape for
    ``torch.compile``, no recompiles). ``mask=None`` (default): no ``attention_mask``, transformers
    finds the examples from position_ids; ``mask="bool"``/``"additive"`` (:data:`MASK_STYLES`):
    an explicit 4D :func:`block_causal_mask`, for compiled models.
    """

    def __init__(self, pad_id: int, pad_to: int | None = None, mask: str | None = None) -> None:
        if mask not in (None, "bool", "additive"):
            raise ValueError(f"mask must be None, 'bool' or 'additive', got {mask!r}")
        self.pad_id = int(pad_id)
        self.pad_to = pad_to
        self.mask = mask

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("cannot collate an empty list of rows")
        width = max(max(len(r["input_ids"]) for r in rows), self.pad_to or 0)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        positions = torch.arange(width, dtype=torch.long).repeat(len(rows), 1)
        keyed = "dropout_ids" in rows[0]
        example_ids = torch.full((len(rows), width), -1, dtype=torch.long) if keyed else None
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.as_tensor(r["input_ids"], dtype=torch.long)
            labels[i, :n] = torch.as_tensor(r["labels"], dtype=torch.long)
            positions[i, :n] = torch.as_tensor(r["position_ids"], dtype=torch.long)
            positions[i, n:] = torch.arange(width - n)
            if example_ids is not None:
                example_ids[i, :n] = torch.as_tensor(r["dropout_ids"], dtype=torch.long)
        batch = {"input_ids": ids, "labels": labels, "position_ids": positions}
        if example_ids is not None:  # per token, pad −1; popped by the loop (lrft.methods.dropout_keys)
            batch["dropout_ids"] = example_ids
        if self.mask is not None:
            batch["attention_mask"] = block_causal_mask(positions, self.mask)
        return batch


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of per-token cross-entropies, number of loss tokens) of a causal batch, on device.

    Shifts as transformers' causal LMs do (logit t scores ``labels[t + 1]``; -100 ignored). The
    step's loss is the sum over micro-batches and ranks divided by the summed count, so every
    token weighs the same however the batch was split or packed. No host sync.
    """
    shift_logits = logits[..., :-1, :].float()
    shift_labels = labels[..., 1:].to(logits.device)
    total = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return total, (shift_labels != IGNORE_INDEX).sum()


def batch_token_stats(
    batch: dict[str, torch.Tensor], pad_id: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(real tokens, padded positions) of a batch as 0-d tensors on its device, with no host sync.

    A padded batch: real tokens are ``attention_mask``'s ones. A packed batch (no attention_mask
    or a 4D block mask, :class:`PackedCollator`): each row's padding is its trailing run of
    ``pad_id`` tokens (default: the row's last token) whose labels are -100; a real example ends
    with a labelled token (its response or EOS), so the run stops there even when EOS is the pad
    id. Padded = numel − real: the padding share is padded / (real + padded), real tokens/s is
    real / step time.
    """
    ids = batch["input_ids"]
    # torch.full writes the value on the device; torch.tensor(int, device=cuda) is a blocking copy
    numel = torch.full((), ids.numel(), dtype=torch.long, device=ids.device)
    mask = batch.get("attention_mask")
    labels = batch.get("labels")
    if mask is not None and mask.dim() == 2:  # a 4D mask is packing's block mask, not padding
        real = mask.sum()
    elif labels is not None and labels.shape == ids.shape:
        pad = ids[:, -1:] if pad_id is None else pad_id  # a Python scalar: no copy
        padding = (ids == pad) & (labels == IGNORE_INDEX)
        tail = padding.flip(-1).to(torch.int32).cumprod(-1).sum()  # trailing run, per row, summed
        real = numel - tail
    else:
        real = numel.clone()
    return real, numel - real
