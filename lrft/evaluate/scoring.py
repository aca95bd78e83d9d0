"""Log-likelihood scoring for causal LMs: the log-probabilities of chosen tokens at chosen positions.

GLUE on a causal LM (the label words after a prompt) and MMLU (the answer letters after "Answer:")
both reduce to this. Batches are padded on the right here, whatever the tokenizer's
``padding_side``: real tokens then sit at positions 0..n-1 and, attention being causal, never see
the pads, so neither position ids, read positions nor an attention mask depend on padding. Only
the logits at the positions read are computed (``logits_to_keep``) where the model supports it,
and only the gathered floats outlive a batch.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

OnBatch = Callable[[int], None] | None


@dataclass
class Request:
    """One sequence to score: ``ids`` are the tokens the model reads; for each position in
    ``reads`` the log-probabilities of the tokens in the matching ``targets`` entry are wanted."""

    ids: list[int]
    reads: list[int]
    targets: list[list[int]]


@dataclass
class Prefix:
    """A prompt start shared by many requests, run once; its key/value cache serves them all."""

    ids: list[int]
    cache: Any

    def expand(self, batch: int) -> Any:
        # a forward pass appends to the cache it is given, so every batch gets its own copy
        cache = copy.deepcopy(self.cache)
        if batch > 1:
            cache.batch_repeat_interleave(batch)
        return cache


def special_prefix(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer puts before a text (LLaMA's BOS; none for GPT-2).

    Trailing ones (an EOS some templates append) are left out: a prompt must end where the answer
    starts.
    """
    full = list(tokenizer("a")["input_ids"])
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start]
    return []


def tokens_after(tokenizer: Any, context: str, continuation: str) -> list[int]:
    """``continuation``'s tokens as the tokenizer writes them right after ``context``.

    Tokenizing the two together and cutting at the context's length gives the tokens a model sees
    in running text (" A" after "Answer:" is usually one token; alone it may not be).
    """
    head = list(tokenizer(context, add_special_tokens=False)["input_ids"])
    whole = list(tokenizer(context + continuation, add_special_tokens=False)["input_ids"])
    same = 0
    while same < min(len(head), len(whole)) and head[same] == whole[same]:
        same += 1
    return whole[same:]


def common_prefix(seqs: Sequence[Sequence[int]]) -> list[int]:
    out: list[int] = []
    for column in zip(*seqs, strict=False):
        if any(t != column[0] for t in column):
            break
        out.append(column[0])
    return out


def input_device(model: nn.Module) -> torch.device:
    """Where input ids must go: the embedding's device (the first shard under a device map)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


def _params(model: nn.Module) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def _cache_kwarg(model: nn.Module) -> str:
    # transformers 5 renamed past_key_values to cache; older versions only know the first
    return "cache" if "cache" in _params(model) else "past_key_values"


def make_prefix(model: nn.Module, ids: list[int]) -> Prefix | None:
    """Run ``ids`` once and keep the cache, or None when the model returns none."""
    kwargs: dict[str, Any] = {"logits_to_keep": 1} if "logits_to_keep" in _params(model) else {}
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids], device=input_device(model)), use_cache=True, **kwargs)
    cache = out.get("cache")
    if cache is None:
        cache = out.get("past_key_values")
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        return None
    return Prefix(list(ids), cache)


def score(
    model: nn.Module,
    requests: Sequence[Request],
    batch_size: int,
    pad_id: int,
    prefix: Prefix | None = None,
    on_batch: OnBatch = None,
) -> Iterator[tuple[int, list[float]]]:
    """Yield ``(index, log-probs)`` for every request, batch by batch: the log-probs flattened in
    ``reads``/``targets`` order. With ``prefix``, each request's ids continue it.

    Requests go longest first: batches then pad little, and a batch too big for memory fails at
    once instead of at the end.
    """
    size = max(1, int(batch_size))
    order = sorted(range(len(requests)), key=lambda i: len(requests[i].ids), reverse=True)
    device = input_device(model)
    keep_ok = "logits_to_keep" in _params(model)
    for start in range(0, len(order), size):
        chunk = order[start : start + size]
        width = len(requests[chunk[0]].ids)
        ids = torch.full((len(chunk), width), int(pad_id), dtype=torch.long)
        for row, i in enumerate(chunk):
            ids[row, : len(requests[i].ids)] = torch.as_tensor(requests[i].ids, dtype=torch.long)
        # No attention mask, on purpose: padding is on the right and attention is causal, so no
        # real token ever attends to a pad, and positions are 0..n-1 either way. A padding mask
        # would only force the slow masked attention kernel (~1.5x slower batches on CPU).
        kwargs: dict[str, Any] = {"use_cache": prefix is not None}
        if prefix is not None:
            kwargs[_cache_kwarg(model)] = prefix.expand(len(chunk))
        positions = sorted({p for i in chunk for p in requests[i].reads})
        if keep_ok:
            kwargs["logits_to_keep"] = torch.tensor(positions, device=device)
            column = {p: j for j, p in enumerate(positions)}
        else:
            column = {p: p for p in positions}
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), **kwargs).logits
            done = [(i, _gather(logits[row], requests[i], column)) for row, i in enumerate(chunk)]
        del logits, kwargs  # free the batch before the caller runs
        if on_batch is not None:
            on_batch(len(chunk))
        yield from done  # outside no_grad: a paused generator must not leak its grad mode


def _gather(logits: torch.Tensor, request: Request, column: dict[int, int]) -> list[float]:
    # one row at a time: a float32 copy of a whole batch of large-vocabulary logits costs more
    # memory than the forward pass itself
    rows = logits[[column[p] for p in request.reads]].float().log_softmax(dim=-1)
    which = [j for j, ts in enumerate(request.targets) for _ in ts]
    tokens = [t for ts in request.targets for t in ts]
    return rows[which, tokens].tolist()


def continuation_requests(context: list[int], continuations: Sequence[list[int]]) -> list[Request]:
    """One request per continuation: the model reads context + continuation[:-1] and every
    continuation token is read at the position before it (their sum is the log-likelihood)."""
    out = []
    for cont in continuations:
        ids = context + cont[:-1]
        reads = list(range(len(context) - 1, len(ids)))
        out.append(Request(ids, reads, [[t] for t in cont]))
    return out


def score_groups(
    model: nn.Module,
    groups: Sequence[Sequence[Request]],
    batch_size: int,
    pad_id: int,
    prefix: Prefix | None = None,
    on_group: OnBatch = None,
) -> Iterator[tuple[int, list[list[float]]]]:
    """:func:`score` for requests that belong together (an example's answer choices): yield
    ``(group index, the log-probs of each of its requests)`` once a group's last request is done.

    Only the groups in flight are held (sorting by length may split a group across batches).
    """
    flat: list[Request] = []
    owner: list[tuple[int, int]] = []
    for g, requests in enumerate(groups):
        for j, request in enumerate(requests):
            flat.append(request)
            owner.append((g, j))
    pending: dict[int, dict[int, list[float]]] = {}
    for index, values in score(model, flat, batch_size, pad_id, prefix):
        g, j = owner[index]
        slot = pending.setdefault(g, {})
        slot[j] = values
        if len(slot) == len(groups[g]):
            del pending[g]
            if on_group is not None:
                on_group(1)
            yield g, [slot[k] for k in range(len(groups[g]))]


def shift(request: Request, offset: int) -> Request:
    """The same request with its first ``offset`` ids moved into a prefix cache."""
    return Request(request.ids[offset:], [p - offset for p in request.reads], request.targets)
