"""GLUE with a classification head (RoBERTa) or a generated label word (T5).

Both stream: each batch's predictions go into a :class:`~lrft.evaluate.metrics.GlueMeter` and are dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch.nn.functional as F
from torch import nn

from lrft.data.glue import TaskSpec, label_words, parse_generation
from lrft.evaluate.losses import seq2seq_loss_sum
from lrft.evaluate.metrics import GlueMeter
from lrft.evaluate.shard import Sums, no_merge

Batches = Iterable[tuple[dict[str, Any], list[Any] | None]]
Merge = Callable[[GlueMeter | None, Sums], tuple[GlueMeter | None, Sums]]

_GEN_SLACK = 2  # extra new tokens beyond the longest label word, so a near-miss still ends


def classification(model: nn.Module, batches: Batches, spec: TaskSpec, merge: Merge = no_merge) -> dict:
    """Official metrics from the head's argmax (its value for STS-B), plus the mean ``loss``
    (cross-entropy, or MSE for regression). ``merge`` combines the tallies of every process."""
    meter = GlueMeter(spec.name)
    loss_sum = 0.0
    for batch, _ in batches:
        gold = batch.pop("labels")
        logits = model(**batch).logits.float()
        if spec.is_regression:
            values = logits.view(-1)
            loss_sum += F.mse_loss(values, gold.float(), reduction="sum").item()
            meter.update(values.tolist(), gold.tolist())
        else:
            loss_sum += F.cross_entropy(logits, gold, reduction="sum").item()
            meter.update(logits.argmax(dim=-1).tolist(), gold.tolist())
    merged, sums = merge(meter, {"loss": loss_sum})
    assert merged is not None
    result: dict[str, Any] = merged.compute()
    result["loss"] = sums["loss"] / merged.n if merged.n else float("nan")
    return result


def generate_labels(
    model: nn.Module, tokenizer: Any, batches: Batches, spec: TaskSpec, merge: Merge = no_merge
) -> dict:
    """Greedy generation mapped back to labels. A generation that is no label counts as wrong
    and in ``invalid``; ``loss`` is the teacher-forced token loss on the label words."""
    words = label_words(spec)
    longest = max(len(tokenizer(w, add_special_tokens=False)["input_ids"]) for w in words)
    max_new = longest + 1 + _GEN_SLACK  # + EOS
    meter = GlueMeter(spec.name)
    invalid = 0
    loss_sum, tokens = 0.0, 0
    for batch, refs in batches:
        if refs is None:
            raise ValueError("text-to-text GLUE examples need 'ref' (encode them with encode_rows)")
        label_ids = batch.pop("labels", None)
        if label_ids is not None:
            s, t = seq2seq_loss_sum(model, batch, label_ids)
            loss_sum, tokens = loss_sum + s, tokens + t
        out = model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=max_new,
            do_sample=False,
            num_beams=1,
        )
        preds = []
        for text, ref in zip(tokenizer.batch_decode(out, skip_special_tokens=True), refs, strict=True):
            pred = parse_generation(text, spec)
            if pred is None:
                invalid += 1
                pred = wrong(ref, spec)
            preds.append(pred)
        meter.update(preds, refs)
    merged, sums = merge(meter, {"invalid": invalid, "loss": loss_sum, "tokens": tokens})
    assert merged is not None
    result: dict[str, Any] = merged.compute()
    result["invalid"] = int(sums["invalid"])
    if sums["tokens"]:
        result["loss"] = sums["loss"] / sums["tokens"]
    return result


def wrong(ref: int | float, spec: TaskSpec) -> int | float:
    """A prediction certain to be wrong, standing in for an answer that is no label at all."""
    if spec.is_regression:
        low, high = spec.label_range
        return low if ref >= (low + high) / 2 else high  # the far end of the scale
    return (int(ref) + 1) % spec.num_labels
