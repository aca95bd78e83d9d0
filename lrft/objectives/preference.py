"""What every preference objective shares: sequence log-probabilities of the chosen and rejected
completions, the reference model without a copy, and TRL's metric names.

A micro-batch of B pairs is 2B rows (:class:`~lrft.data.collate.Collator`: chosen, then rejected).
One forward gives, for each row, the summed log-probability of its completion tokens

    log π(y|x) = Σ_{t ∈ completion} log softmax(z_t)[y_{t+1}]

and its token count. Objectives that need a reference (DPO, IPO) get log π_ref from a second
forward of the same rows under :func:`~lrft.methods.layers.adapters_off` and ``no_grad``: the
low-rank layers compute their original output, so π_ref is the base model and no copy exists.

Split invariance: an objective returns per-pair SUMS and says what each sum is averaged over
(pairs, or chosen tokens for an NLL term); the step divides by the global counts of the whole
optimizer step (:func:`lrft.train.step.forward_backward`), so the update does not depend on how
the pairs were split over micro-batches and processes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lrft.methods.layers import adapters_off
from lrft.model.loss import (
    DEFAULT_CHUNK,
    IGNORE_INDEX,
    chunk_positions,
    chunkable_head,
    chunked_token_logps,
    final_hidden,
    shifted_labels,
    softcap,
)

# the metrics a step logs (sums over pairs; the logger divides by the pair count), TRL's names
METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


@dataclass
class Logps:
    """Per pair (B,): summed completion log-probs and completion token counts; ``ref_*`` are the
    reference model's (None without a reference)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    n_chosen: torch.Tensor
    n_rejected: torch.Tensor
    chosen_nll: torch.Tensor  # Σ of the chosen tokens' negative log-likelihood (a scalar)
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None

    def average(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token average log-probs (ORPO, SimPO, IPO's margin)."""
        return self.chosen / self.n_chosen.clamp(min=1), self.rejected / self.n_rejected.clamp(min=1)


# what a preference batch holds beside the model's inputs (KTO: its labels and mismatched rows)
NOT_INPUTS = ("labels", "desirable", "kl_input_ids", "kl_attention_mask", "kl_labels", "ref_logps")


def sequence_logps(
    model: nn.Module, batch: dict[str, Any], chunk: int | str = DEFAULT_CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ log-probs of each row's label tokens, their count), float32, both (rows,).

    The logits of a causal LM are never whole where the model allows it: the head projects
    ``chunk`` positions at a time (:func:`~lrft.model.loss.chunked_token_logps`; ``auto`` keeps a
    chunk within 2^26 logits), so a 262k vocabulary costs a chunk, not (2B, T, V) in float32."""
    inputs = {k: v for k, v in batch.items() if k not in NOT_INPUTS}
    labels = shifted_labels(batch["labels"])
    mask = labels != IGNORE_INDEX
    head = chunkable_head(model) if chunk != 0 else None
    logits = None
    if head is not None:
        hidden, logits = final_hidden(model, inputs)
        if logits.shape[1] == 0:  # the head projected nothing: chunk it
            positions = chunk_positions(chunk, head.weight.shape[0])
            token = chunked_token_logps(hidden, labels, head, softcap(model), positions)
            return token.sum(-1), mask.sum(-1)
    if logits is None or logits.shape[1] == 0:
        logits = model(**inputs).logits
    flat = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX,
        reduction="none",
    )  # fmt: skip
    return -(flat.view(labels.shape) * mask).sum(-1), mask.sum(-1)


def check_reference(model: nn.Module) -> None:
    """The reference is the model with its low-rank layers switched off: every trained parameter
    must live in one, or π_ref would include training (full fine-tuning, GaLore, modules_to_save)."""
    from lrft.errors import UserError
    from lrft.methods.layers import LowRankLinear

    inside = {id(p) for m in model.modules() if isinstance(m, LowRankLinear) for p in m.parameters()}
    outside = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in inside]
    if outside:
        shown = ", ".join(outside[:4]) + (f", ... {len(outside) - 4} more" if len(outside) > 4 else "")
        raise UserError(
            f"this objective compares the model with its reference, the same model with its adapters "
            f"switched off, but parameters outside the adapters train too ({shown}), so there is no "
            "reference without a second copy of the model, which lrft does not make. Use a low-rank "
            "method (lora_fa, lora, dora, pissa, lora_ga) without modules_to_save, or an objective "
            "without a reference: objective=orpo or objective=simpo."
        )


def average_metrics(sums: dict[str, float], count: float) -> dict[str, float]:
    """Means of a window's metric sums: ``x/chosen`` over ``count/chosen`` where the objective counts
    its own examples (KTO: desirable and undesirable ones, as TRL averages them), else over
    ``count`` (the pairs or examples). KTO's margin is then the difference of the two means."""
    out = {}
    for key, value in sums.items():
        if key.startswith("count/") or not ("/" in key or key == "kl"):
            continue
        n = sums.get(f"count/{key.rsplit('/', 1)[-1]}", count)
        if n:
            out[key] = value / n
    if "count/chosen" in sums and "rewards/chosen" in out and "rewards/rejected" in out:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out


Reduce = Callable[[torch.Tensor], torch.Tensor]  # a sum over every process (identity on one)
Context = Callable[[dict[str, Any]], AbstractContextManager]  # per micro-batch (dropout keys)


class PreferenceObjective(ABC):
    """What the step and the evaluator call. ``loss_terms`` returns K loss sums per micro-batch,
    each averaged over the global count :meth:`counts` gives (see :meth:`denominators`)."""

    reference = False  # needs log π_ref (the adapters switched off)
    averaged = False  # works on per-token average log-probs (logged as logps/*, as TRL does)
    unpaired = False  # learns from single labelled completions (KTO), not chosen/rejected pairs

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.beta = float(cfg.beta)
        self.chunk: int | str = DEFAULT_CHUNK  # positions of logits at a time (trainer.loss_chunk)

    # what each returned sum is averaged over: "pairs", "chosen_tokens" or "examples"
    def denominators(self) -> tuple[str, ...]:
        return ("pairs",)

    def prepare(
        self, model: nn.Module, window: Sequence[dict[str, Any]], reduce: Reduce, context: Context
    ) -> None:
        """Before the window's forwards: a statistic of the whole step (KTO's KL estimate).
        Pair objectives need none."""
        return None

    def check_examples(self, example: dict[str, Any]) -> None:
        """Refuse data of the other shape (pairs for KTO, single completions for the others)."""
        from lrft.errors import UserError

        if self.unpaired and "kl_input_ids" not in example:
            raise UserError(
                f"objective={self.name} learns from single completions labelled good or bad: rows "
                '{"prompt", "completion", "label": true|false}, and this file holds chosen/rejected '
                "pairs. Each pair gives one good and one bad row (prompt + chosen, label true; prompt "
                "+ rejected, label false), or train the pairs with objective=dpo, ipo, orpo or simpo."
            )
        if not self.unpaired and "rejected_input_ids" not in example:
            raise UserError(
                f"objective={self.name} learns from chosen/rejected pairs, and this file holds single "
                'labelled completions ({"prompt", "completion", "label"}): train it with objective=kto.'
            )

    def calibration_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The rows a data-aware init (LoRA-GA's gradient) learns from: the preferred completions,
        as a token-loss batch. At π = π_ref DPO's gradient is −β/2 (∇log π(y_w) − ∇log π(y_l))
        and the others' differ in weights, so no one token loss is each objective's; the chosen
        completions' is what SFT before alignment would follow."""
        rows = batch["input_ids"].shape[0]
        if self.unpaired:
            keep = batch["desirable"].bool()
            keep = keep if keep.any() else torch.ones_like(keep)  # a batch of bad rows only
        else:
            keep = torch.arange(rows) < rows // 2
        out = {k: v[keep] for k, v in batch.items() if k not in NOT_INPUTS or k == "labels"}
        out.pop("dropout_ids", None)
        return out

    @abstractmethod
    def counts(self, batch: dict[str, Any]) -> torch.Tensor:
        """The number of terms each loss sum of ``batch`` adds up (see :meth:`denominators`)."""

    @abstractmethod
    def loss_terms(
        self, model: nn.Module, batch: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(the loss sums, one per denominator), and the metric sums over this batch."""


class PairObjective(PreferenceObjective):
    """A preference loss on :class:`Logps` of chosen/rejected pairs. Subclasses set ``reference``
    and implement :meth:`pair_terms`; the rest (forwards, counts, metrics) is shared."""

    @abstractmethod
    def pair_terms(self, lp: Logps) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """([summed loss terms, one per denominator], chosen rewards (B,), rejected rewards (B,))."""

    def counts(self, batch: dict[str, Any]) -> torch.Tensor:
        rows = batch["input_ids"].shape[0]
        labels = batch["labels"][: rows // 2, 1:]
        by = {
            # torch.full: no host-to-device copy per micro-batch (torch.tensor(int) would make one)
            "pairs": torch.full((), rows // 2, dtype=torch.long, device=labels.device),
            "chosen_tokens": (labels != IGNORE_INDEX).sum(),
        }
        return torch.stack([by[d] for d in self.denominators()])

    def logps(self, model: nn.Module, batch: dict[str, Any]) -> Logps:
        logps, counts = sequence_logps(model, batch, self.chunk)
        half = logps.shape[0] // 2
        lp = Logps(logps[:half], logps[half:], counts[:half], counts[half:], -logps[:half].sum())
        if self.reference:
            ref = batch.get("ref_logps")  # precomputed (objective.precompute_ref)
            if ref is None:
                ref = self.reference_logps(model, batch)
            lp.ref_chosen, lp.ref_rejected = ref[:, 0], ref[:, 1]
        return lp

    def reference_logps(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """(B, 2): log π_ref of each pair's chosen and rejected completion (adapters off)."""
        with torch.no_grad(), adapters_off(model):
            ref, _ = sequence_logps(model, batch, self.chunk)
        half = ref.shape[0] // 2
        return torch.stack([ref[:half], ref[half:]], dim=1)

    def loss_terms(
        self, model: nn.Module, batch: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        lp = self.logps(model, batch)
        terms, chosen, rejected = self.pair_terms(lp)
        chosen, rejected = chosen.detach(), rejected.detach()
        shown_c, shown_r = lp.average() if self.averaged else (lp.chosen, lp.rejected)
        metrics = {
            "rewards/chosen": chosen.sum(),
            "rewards/rejected": rejected.sum(),
            "rewards/accuracies": (chosen > rejected).float().sum(),
            "rewards/margins": (chosen - rejected).sum(),
            "logps/chosen": shown_c.detach().sum(),
            "logps/rejected": shown_r.detach().sum(),
        }
        return torch.stack([t.float() for t in terms]), metrics
