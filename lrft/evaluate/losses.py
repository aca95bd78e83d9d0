"""Token-level cross-entropy for seq2seq and causal models, summed batch by batch."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lrft.data.collate import IGNORE_INDEX
from lrft.model.loss import DEFAULT_CHUNK, causal_lm_loss


def token_loss(
    model: nn.Module, batches: Iterable[tuple[dict[str, Any], Any]], task: str, merge: Any = None
) -> dict:
    """Token-weighted mean loss over every label token, and its perplexity. ``merge`` combines
    the sums of every process (see :mod:`lrft.evaluate.shard`)."""
    loss_sum, tokens = 0.0, 0
    for batch, _ in batches:
        label_ids = batch.pop("labels")
        if task == "causal":  # in chunks of positions: never the whole [tokens x vocab] logits
            with torch.no_grad():
                s = causal_lm_loss(model, batch, label_ids, DEFAULT_CHUNK).item()
            t = int((label_ids[:, 1:] != IGNORE_INDEX).sum().item())
        else:
            s, t = seq2seq_loss_sum(model, batch, label_ids)
        loss_sum, tokens = loss_sum + s, tokens + t
    if merge is not None:
        _, sums = merge(None, {"loss": loss_sum, "tokens": tokens})
        loss_sum, tokens = sums["loss"], int(sums["tokens"])
    loss = loss_sum / tokens if tokens else float("nan")
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else float("inf")}


def seq2seq_loss_sum(model: nn.Module, batch: dict[str, Any], label_ids: torch.Tensor) -> tuple[float, int]:
    prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    if prepare is not None:
        logits = model(**batch, decoder_input_ids=prepare(labels=label_ids)).logits
    else:  # models that only shift labels inside forward
        logits = model(**batch, labels=label_ids).logits
    return loss_sum_of(logits, label_ids)


def loss_sum_of(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Summed cross-entropy over the non-ignored labels, and their count.

    One row at a time: upcasting a whole batch of large-vocabulary logits to float32 at once would
    cost more memory than the forward pass itself.
    """
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for row_logits, row_labels in zip(logits, labels, strict=True):
        total += F.cross_entropy(row_logits.float(), row_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total.item(), int((labels != IGNORE_INDEX).sum().item())
