"""Evaluate a model on encoded examples, streaming batch by batch.

Training calls :func:`evaluate_model` every ``trainer.eval_every`` steps and ``lrft eval`` calls it
too (with a progress callback), so the two can never disagree.
Only metric accumulators live between batches (a confusion matrix, sums), never logits, so memory
is flat in the number of examples. Everything is greedy and in eval mode, hence deterministic.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lrft.data.collate import Collator
from lrft.data.encode import encode_rows
from lrft.data.glue import get_task
from lrft.evaluate import causal_glue
from lrft.evaluate.glue import classification, generate_labels
from lrft.evaluate.losses import token_loss
from lrft.evaluate.scoring import OnBatch
from lrft.evaluate.shard import FILLER, Shard


def evaluate_model(
    model: nn.Module,
    tokenizer: Any,
    examples: list[dict[str, Any]],
    dcfg: Any,
    task: str,
    batch_size: int,
    device: str | torch.device,
    on_batch: OnBatch = None,
    accelerator: Any = None,
    lockstep: bool = False,
    objective: Any = None,
) -> dict[str, Any]:
    """Metrics of ``model`` on ``examples`` (from :func:`encode_for_eval`), always with ``n``.

    - classification (GLUE): the task's official metrics (:func:`~lrft.evaluate.metrics.glue_metrics`)
      plus ``loss`` (cross-entropy, or MSE for STS-B).
    - seq2seq on GLUE: greedy generation mapped back to labels -> official metrics, ``invalid``
      (generations that are no label; they count as wrong) and the teacher-forced token ``loss``.
    - causal on GLUE (evaluation only): the likeliest answer word after a prompt -> official
      metrics, ``truncated`` prompts and the reference answer's mean log-likelihood.
    - seq2seq / causal on instruction data: token-weighted mean ``loss`` on the response tokens
      and its ``perplexity``.
    - preference pairs: the ``objective``'s loss and TRL's ``rewards/*``, ``logps/*`` per pair.

    ``on_batch(examples_done)`` is called after each batch (``lrft eval``'s progress bar).
    With ``accelerator`` (several processes), each process scores every W-th batch and the tallies
    merge: every process returns the metrics of the whole set (see :mod:`lrft.evaluate.shard`).
    ``lockstep`` (a sharded model; token losses and preference pairs, not GLUE): every process runs
    the same number of forwards, padding with batches whose labels are all ignored (and that
    preference metrics skip: see :data:`~lrft.evaluate.shard.FILLER`).
    The model is put in eval mode and its training mode restored afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if not examples:
                return {"n": 0}
            shard = Shard(accelerator, lockstep)
            size = max(1, int(batch_size))
            if lockstep and dcfg.kind == "glue":
                raise ValueError("lockstep evaluation scores token losses only, not GLUE metrics")
            if dcfg.kind == "glue" and task == "causal":
                spec = get_task(dcfg.subset)
                pad = _pad_id(tokenizer)
                mine = [ex for i, ex in enumerate(examples) if shard.mine(i // size)]
                result = causal_glue.score_choices(model, mine, spec, size, pad, on_batch, shard.merge)
            else:
                collate = Collator(tokenizer, task, with_refs=True)
                batches = _batches(examples, collate, size, device, on_batch, shard)
                if dcfg.kind == "glue":
                    spec = get_task(dcfg.subset)
                    if task == "classification":
                        result = classification(model, batches, spec, shard.merge)
                    else:
                        result = generate_labels(model, tokenizer, batches, spec, shard.merge)
                elif dcfg.kind == "preference":  # the run's objective on held-out pairs
                    from lrft.evaluate.preference import preference_metrics
                    from lrft.objectives import get_objective

                    scorer = get_objective({"objective": objective})
                    if scorer is None:
                        from lrft.errors import UserError

                        raise UserError(
                            "preference pairs are scored with a preference run's objective (its "
                            "loss and rewards against its reference): give checkpoint=RUN_DIR."
                        )
                    result = preference_metrics(model, batches, scorer, shard.merge)
                else:
                    result = token_loss(model, batches, task, shard.merge)
    finally:
        model.train(was_training)
    result["n"] = len(examples)
    return result


def encode_for_eval(rows: list[dict[str, Any]], dcfg: Any, task: str, tokenizer: Any) -> list[dict[str, Any]]:
    """:func:`~lrft.data.encode_rows`, plus the evaluation-only causal-LM-on-GLUE prompts."""
    if dcfg.kind == "glue" and task == "causal":
        return causal_glue.encode(rows, get_task(dcfg.subset), tokenizer, int(dcfg.max_length))
    return encode_rows(rows, dcfg, task, tokenizer)


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad) if pad is not None else 0  # padded positions are masked: any id will do


def _batches(
    examples: list[dict[str, Any]],
    collate: Collator,
    batch_size: int,
    device: str | torch.device,
    on_batch: OnBatch = None,
    shard: Shard | None = None,
) -> Iterator[tuple[dict[str, Any], list[Any] | None]]:
    """(tensors on ``device``, the reference labels or None) for each of this process's batches,
    then its lockstep fillers, whose second item is :data:`~lrft.evaluate.shard.FILLER`."""
    size = max(1, int(batch_size))
    starts = range(0, len(examples), size)
    for index, start in enumerate(starts):
        if shard is not None and not shard.mine(index):
            continue
        chunk = examples[start : start + size]
        batch = collate(chunk)
        refs = batch.pop("refs", None)
        yield {k: v.to(device) for k, v in batch.items()}, refs
        if on_batch is not None:  # the consumer asked for the next batch: this one is done
            on_batch(len(chunk))
    for _ in range(shard.fillers(len(starts)) if shard is not None else 0):
        # a forward in step with the other ranks that scores nothing: every label ignored
        batch = collate(examples[:size])
        batch.pop("refs", None)
        batch["labels"] = torch.full_like(batch["labels"], -100)
        yield {k: v.to(device) for k, v in batch.items()}, FILLER
