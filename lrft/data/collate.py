"""Batch encoded examples into right-padded tensors for ``model(**batch)``."""

from __future__ import annotations

from typing import Any

import torch

from lrft.errors import UserError

IGNORE_INDEX = -100
TASKS = ("causal", "classification", "seq2seq")


class Collator:
    """Pads a list of examples from :func:`~lrft.data.encode.encode_rows` into a batch.

    ``input_ids`` are right-padded with the tokenizer's pad id and ``attention_mask`` marks the real
    tokens (built from the lengths, so a pad id shared with EOS is harmless); ``token_type_ids``
    are padded with 0. ``labels`` are padded with -100 for causal/seq2seq, and for classification
    become a long tensor (float for a regression task such as STS-B).

    Preference pairs (``rejected_input_ids``, :mod:`lrft.data.preference`) become 2B rows: the B
    chosen sequences, then the B rejected ones in the same order. KTO's examples stay B rows, with
    their mismatched rows beside them (``kl_input_ids``, ``kl_attention_mask``, ``kl_labels``) and
    ``desirable`` (B,).

    Every key of the returned dict goes straight into ``model(**batch)``, except ``dropout_ids``
    (examples that carry a ``dropout_id``: the loop pops it to key the dropout masks) and ``refs``: with
    ``with_refs=True`` (used by the evaluator) a batch of text-to-text GLUE examples also holds
    ``batch["refs"]``, a python list of their reference labels, which the caller must
    ``batch.pop("refs")`` before the forward pass. Training leaves ``with_refs`` off.
    """

    def __init__(self, tokenizer: Any, task: str, with_refs: bool = False) -> None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id  # causal LMs often ship without a pad token
        if pad is None:
            raise UserError("The tokenizer has neither a pad nor an EOS token; cannot pad batches.")
        self.pad_id = int(pad)
        self.task = task
        self.with_refs = with_refs

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        # precomputed reference log-probs (objective.precompute_ref): one (2,) row per example
        ref = [ex["ref_logps"] for ex in examples] if "ref_logps" in examples[0] else None
        if "rejected_input_ids" in examples[0]:  # preference pairs: B chosen rows, then B rejected
            examples = [*examples, *({**ex, "input_ids": ex["rejected_input_ids"],
                                      "labels": ex["rejected_labels"]} for ex in examples)]  # fmt: skip
        batch: dict[str, Any] = {}
        ids = [ex["input_ids"] for ex in examples]
        batch["input_ids"] = _pad(ids, self.pad_id)
        batch["attention_mask"] = _pad([[1] * len(x) for x in ids], 0)
        if "token_type_ids" in examples[0]:
            batch["token_type_ids"] = _pad([ex["token_type_ids"] for ex in examples], 0)
        if "labels" in examples[0]:
            labels = [ex["labels"] for ex in examples]
            if self.task == "classification":
                regression = any(isinstance(x, float) for x in labels)
                batch["labels"] = torch.tensor(labels, dtype=torch.float if regression else torch.long)
            else:
                batch["labels"] = _pad(labels, IGNORE_INDEX)
        if "dropout_id" in examples[0]:  # training rows' indices (lrft.methods.dropout_keys)
            batch["dropout_ids"] = torch.tensor([ex["dropout_id"] for ex in examples], dtype=torch.long)
        if "kl_input_ids" in examples[0]:  # KTO (lrft.objectives.kto)
            kl = [ex["kl_input_ids"] for ex in examples]
            batch["kl_input_ids"] = _pad(kl, self.pad_id)
            batch["kl_attention_mask"] = _pad([[1] * len(x) for x in kl], 0)
            batch["kl_labels"] = _pad([ex["kl_labels"] for ex in examples], IGNORE_INDEX)
            batch["desirable"] = torch.tensor([ex["desirable"] for ex in examples], dtype=torch.long)
        if ref is not None:
            batch["ref_logps"] = torch.tensor(ref, dtype=torch.float32)
        if self.with_refs and "ref" in examples[0]:
            batch["refs"] = [ex["ref"] for ex in examples]
        return batch


def _pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out
