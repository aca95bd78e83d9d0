"""MMLU evaluation of a causal LM, as Hendrycks' evaluate.py does it.

Each question is prompted k-shot (``dataset.shots`` solved dev questions after the subject
header) and answered by comparing the model's next-token log-likelihoods of the four answer
letters as the tokenizer writes them after "Answer:" (usually " A" .. " D", one token each). A
prompt longer than the context drops shots, one at a time, as the reference does; one that does
not fit even 0-shot loses its start. Both are counted in the result.

Every question of a subject with the same number of shots starts with the same tokens (header and
shots). With ``reuse_prefix`` those are run once per subject and their key/value cache is reused
for each batch of questions when the shared part is at least as long as the rest, which makes
k-shot prompts cost far less (scripts/bench_mmlu.py, docs/eval.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from lrft.errors import UserError
from lrft.evaluate import mmlu_data
from lrft.evaluate.metrics import subject_accuracy
from lrft.evaluate.mmlu_data import LETTERS, Question
from lrft.evaluate.scoring import (
    OnBatch,
    Request,
    common_prefix,
    continuation_requests,
    make_prefix,
    score_groups,
    shift,
    special_prefix,
    tokens_after,
)

_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
_MIN_SHARED = 32  # tokens: a shorter shared prefix is not worth a cache


@dataclass
class Planned:
    subject: str
    shots: int
    ids: list[int]  # the prompt's tokens
    answer: int


@dataclass
class Letters:
    """How the four answers are read. Usually each letter is the shared tokens ``common`` (none,
    or a lone space for byte-level tokenizers) plus one distinct token: then one forward pass of
    prompt + common gives all four scores at the last position. Otherwise each letter is scored
    as a continuation of its own."""

    tails: list[list[int]]
    common: list[int]
    next_token: bool

    @classmethod
    def of(cls, tokenizer: Any) -> Letters:
        tails = [tokens_after(tokenizer, "Answer:", " " + letter) for letter in LETTERS]
        common = common_prefix(tails)
        one_each = all(len(t) == len(common) + 1 for t in tails) and len({t[-1] for t in tails}) == 4
        return cls(tails, common if one_each else [], one_each)

    @property
    def extra(self) -> int:
        """Input tokens a prompt needs beyond its own, to be scored."""
        return len(self.common) if self.next_token else max(len(t) for t in self.tails) - 1

    def requests(self, ids: list[int]) -> list[Request]:
        if self.next_token:
            seq = ids + self.common
            return [Request(seq, [len(seq) - 1], [[t[-1] for t in self.tails]])]
        return continuation_requests(ids, self.tails)

    def scores(self, values: list[list[float]]) -> np.ndarray:
        return np.array(values[0] if self.next_token else [sum(v) for v in values])


def context_limit(model: nn.Module, max_length: int) -> int:
    """The longest input: dataset.max_length, capped by the model's position count if it has one."""
    limit = int(max_length)
    config = getattr(model, "config", None)
    for key in _POSITION_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return min(limit, value)
    return limit


def plan(
    data: dict[str, tuple[list[Question], list[Question]]], tokenizer: Any, limit: int, extra: int
) -> tuple[list[Planned], dict[str, int]]:
    """Tokenized prompts, dropping shots (then the prompt's start) where one exceeds ``limit``."""
    head = special_prefix(tokenizer)
    budget = limit - extra - len(head)
    if budget < 1:
        raise UserError(f"A context of {limit} tokens leaves no room for an MMLU prompt.")
    items: list[Planned] = []
    stats = {"questions_with_fewer": 0, "dropped": 0, "truncated": 0}
    for subject, (shots, questions) in data.items():
        k0 = len(shots)
        texts = [mmlu_data.build_prompt(subject, shots, q) for q in questions]
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        for q, ids in zip(questions, encoded, strict=True):
            ids, k = list(ids), k0
            while len(ids) > budget and k > 0:
                k -= 1
                text = mmlu_data.build_prompt(subject, shots[:k], q)
                ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
            if k < k0:
                stats["questions_with_fewer"] += 1
                stats["dropped"] += k0 - k
            if len(ids) > budget:
                stats["truncated"] += 1
                ids = ids[len(ids) - budget :]  # keep the question's end and "Answer:"
            items.append(Planned(subject, k, head + ids, q.answer))
    return items, stats


def evaluate_mmlu(
    model: nn.Module,
    tokenizer: Any,
    dcfg: Any,
    split: str | None,
    batch_size: int,
    max_samples: int | None = None,
    reuse_prefix: bool = True,
    on_batch: OnBatch = None,
    data: dict[str, tuple[list[Question], list[Question]]] | None = None,
) -> dict[str, Any]:
    """Accuracy per subject and category, ``accuracy`` (micro) and ``accuracy_macro``, ``n`` and
    the shot bookkeeping. ``data`` (from :func:`mmlu_data.load`) skips loading."""
    if data is None:
        data = mmlu_data.load(dcfg, split, max_samples)
    letters = Letters.of(tokenizer)
    limit = context_limit(model, dcfg.max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad = int(pad) if pad is not None else 0
    counts = {subject: [0, 0] for subject in data}
    stats = dict.fromkeys(("questions_with_fewer", "dropped", "truncated"), 0)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            # one subject at a time: only its tokenized prompts are held, never the whole test set's
            for subject, pair in data.items():
                items, found = plan({subject: pair}, tokenizer, limit, letters.extra)
                stats = {k: stats[k] + found[k] for k in stats}
                for indices, prefix in _batches_by_prefix(model, items, reuse_prefix):
                    offset = len(prefix.ids) if prefix is not None else 0
                    groups = [[shift(r, offset) for r in letters.requests(items[i].ids)] for i in indices]
                    for g, values in score_groups(model, groups, batch_size, pad, prefix, on_batch):
                        correct = np.argmax(letters.scores(values)) == items[indices[g]].answer
                        counts[subject][0] += int(correct)
                        counts[subject][1] += 1
    finally:
        model.train(was_training)
    report = subject_accuracy({s: (c, n) for s, (c, n) in counts.items()}, mmlu_data.CATEGORY)
    report["shots"] = {"requested": int(dcfg.shots), **stats}
    report["scoring"] = "next_token" if letters.next_token else "continuation"
    return report


def _batches_by_prefix(model: nn.Module, items: list[Planned], reuse: bool) -> Any:
    """``(item indices, shared prefix or None)``: each subject's questions with the same shots
    together behind their common tokens, when that is worth a cache; the rest without one."""
    if not reuse:
        yield list(range(len(items))), None
        return
    groups: dict[tuple[str, int], list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault((item.subject, item.shots), []).append(i)
    alone: list[int] = []
    for indices in groups.values():
        shared = common_prefix([items[i].ids for i in indices])
        # every question keeps at least one token of its own to run after the cache
        shared = shared[: min(len(items[i].ids) for i in indices) - 1]
        rest = sum(len(items[i].ids) for i in indices) / len(indices) - len(shared)
        # copying the cache for each batch costs about what a short prefix saves: measured in
        # scripts/bench_mmlu.py, reuse pays from 1 shot on and loses at 0 shots (header only)
        worth = len(indices) > 1 and len(shared) >= max(_MIN_SHARED, rest)
        prefix = make_prefix(model, shared) if worth else None
        if prefix is None:
            alone += indices
        else:
            yield indices, prefix
    if alone:
        yield alone, None
