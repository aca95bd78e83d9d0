"""Evaluate a model on encoded examples, streaming batch by batch.

Only per-example python numbers are kept between batches (never all logits), so memory does not
grow with the evaluation set. Everything is greedy and in eval mode, hence deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lrft.data.collate import IGNORE_INDEX, Collator
from lrft.data.glue import TaskSpec, get_task, label_words, parse_generation
from lrft.metrics import glue_metrics

_GEN_SLACK = 2  # extra new tokens beyond the longest label word, so a near-miss still ends


def evaluate_model(
    model: nn.Module,
    tokenizer: Any,
    examples: list[dict[str, Any]],
    dcfg: Any,
    task: str,
    batch_size: int,
    device: str | torch.device,
) -> dict[str, float]:
    """Metrics of ``model`` on ``examples`` (from :func:`~lrft.data.encode_rows`), always with ``n``.

    - classification (GLUE): the task's official metrics (:func:`~lrft.metrics.glue_metrics`)
      plus ``loss`` (cross-entropy, or MSE for STS-B).
    - seq2seq on GLUE: greedy generation mapped back to labels -> official metrics, ``invalid``
      (generations that are no label; they count as wrong) and the teacher-forced token ``loss``.
    - seq2seq / causal on instruction data: token-weighted mean ``loss`` on the response tokens
      and its ``perplexity``.

    The model is put in eval mode and its training mode restored afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if not examples:
                return {"n": 0}
            batches = _batches(examples, Collator(tokenizer, task, with_refs=True), batch_size, device)
            if dcfg.kind == "glue":
                spec = get_task(dcfg.subset)
                if task == "classification":
                    result = _classification(model, batches, spec)
                else:
                    result = _generate_labels(model, tokenizer, batches, spec)
            else:
                result = _token_loss(model, batches, task)
    finally:
        model.train(was_training)
    result["n"] = len(examples)
    return result


def _batches(
    examples: list[dict[str, Any]], collate: Collator, batch_size: int, device: str | torch.device
) -> Iterator[tuple[dict[str, Any], list[Any] | None]]:
    """(tensors on ``device``, the reference labels or None) for each batch, in order."""
    size = max(1, int(batch_size))
    for start in range(0, len(examples), size):
        batch = collate(examples[start : start + size])
        refs = batch.pop("refs", None)
        yield {k: v.to(device) for k, v in batch.items()}, refs


def _classification(model: nn.Module, batches: Iterator[tuple[dict[str, Any], Any]], spec: TaskSpec) -> dict:
    preds: list[int | float] = []
    labels: list[int | float] = []
    loss_sum = 0.0
    for batch, _ in batches:
        gold = batch.pop("labels")
        logits = model(**batch).logits.float()
        if spec.is_regression:
            values = logits.view(-1)
            loss_sum += F.mse_loss(values, gold.float(), reduction="sum").item()
            preds += values.tolist()
        else:
            loss_sum += F.cross_entropy(logits, gold, reduction="sum").item()
            preds += logits.argmax(dim=-1).tolist()
        labels += gold.tolist()
    result = glue_metrics(spec.name, preds, labels)
    result["loss"] = loss_sum / len(labels)
    return result


def _generate_labels(
    model: nn.Module, tokenizer: Any, batches: Iterator[tuple[dict[str, Any], Any]], spec: TaskSpec
) -> dict:
    words = label_words(spec)
    longest = max(len(tokenizer(w, add_special_tokens=False)["input_ids"]) for w in words)
    max_new = longest + 1 + _GEN_SLACK  # + EOS
    preds: list[int | float] = []
    labels: list[int | float] = []
    invalid = 0
    loss_sum, tokens = 0.0, 0
    for batch, refs in batches:
        if refs is None:
            raise ValueError("text-to-text GLUE examples need 'ref' (encode them with encode_rows)")
        label_ids = batch.pop("labels", None)
        if label_ids is not None:
            s, t = _seq2seq_loss_sum(model, batch, label_ids)
            loss_sum, tokens = loss_sum + s, tokens + t
        out = model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=max_new,
            do_sample=False,
            num_beams=1,
        )
        for text, ref in zip(tokenizer.batch_decode(out, skip_special_tokens=True), refs, strict=True):
            pred = parse_generation(text, spec)
            if pred is None:
                invalid += 1
                pred = _wrong(ref, spec)
            preds.append(pred)
            labels.append(ref)
    result = glue_metrics(spec.name, preds, labels)
    result["invalid"] = invalid
    if tokens:
        result["loss"] = loss_sum / tokens
    return result


def _wrong(ref: int | float, spec: TaskSpec) -> int | float:
    """A prediction certain to be wrong, standing in for an answer that is no label at all."""
    if spec.is_regression:
        low, high = spec.label_range
        return low if ref >= (low + high) / 2 else high  # the far end of the scale
    return (int(ref) + 1) % spec.num_labels


def _token_loss(model: nn.Module, batches: Iterator[tuple[dict[str, Any], Any]], task: str) -> dict:
    loss_sum, tokens = 0.0, 0
    for batch, _ in batches:
        label_ids = batch.pop("labels")
        if task == "causal":
            logits = model(**batch).logits
            s, t = _loss_sum(logits[:, :-1], label_ids[:, 1:])
        else:
            s, t = _seq2seq_loss_sum(model, batch, label_ids)
        loss_sum, tokens = loss_sum + s, tokens + t
    loss = loss_sum / tokens if tokens else float("nan")
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else float("inf")}


def _seq2seq_loss_sum(model: nn.Module, batch: dict[str, Any], label_ids: torch.Tensor) -> tuple[float, int]:
    prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    if prepare is not None:
        logits = model(**batch, decoder_input_ids=prepare(labels=label_ids)).logits
    else:  # models that only shift labels inside forward
        logits = model(**batch, labels=label_ids).logits
    return _loss_sum(logits, label_ids)


def _loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Summed cross-entropy over the non-ignored labels, and their count.

    One row at a time: upcasting a whole batch of large-vocabulary logits to float32 at once would
    cost more memory than the forward pass itself.
    """
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for row_logits, row_labels in zip(logits, labels, strict=True):
        total += F.cross_entropy(row_logits.float(), row_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total.item(), int((labels != IGNORE_INDEX).sum().item())
