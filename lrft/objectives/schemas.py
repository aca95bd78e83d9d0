"""The ``objective`` group's schemas (torch-free: composing and validating never import torch).

``sft`` is next-token cross-entropy on the completion tokens, the loss every dataset kind but
``preference`` trains with. The others are preference objectives on (prompt, chosen, rejected)
pairs, or KTO's single labelled completions
(:mod:`lrft.objectives.preference`); their formulas and papers are in each module.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ObjectiveConfig:
    name: str = "sft"


@dataclass
class DPOConfig(ObjectiveConfig):
    """DPO (https://arxiv.org/abs/2305.18290); ``beta``: the KL strength."""

    name: str = "dpo"
    beta: float = 0.1
    precompute_ref: bool = False  # reference log-probs once, kept with the run


@dataclass
class IPOConfig(ObjectiveConfig):
    """IPO (https://arxiv.org/abs/2310.12036); ``beta``: the regulariser τ (target margin 1/2τ)."""

    name: str = "ipo"
    beta: float = 0.1
    precompute_ref: bool = False  # reference log-probs once, kept with the run


@dataclass
class ORPOConfig(ObjectiveConfig):
    """ORPO (https://arxiv.org/abs/2403.07691); ``beta``: λ, the weight of the odds-ratio term."""

    name: str = "orpo"
    beta: float = 0.1


@dataclass
class SimPOConfig(ObjectiveConfig):
    """SimPO (https://arxiv.org/abs/2405.14734); ``beta``: reward scale, ``gamma``: target margin;
    ``sft_weight``: CPO's NLL term on the chosen completion (0: the paper's SimPO)."""

    name: str = "simpo"
    beta: float = 2.0
    gamma: float = 0.5
    sft_weight: float = 0.0


@dataclass
class KTOConfig(ObjectiveConfig):
    """KTO (https://arxiv.org/abs/2402.01306) on single completions labelled good or bad;
    ``beta``: the KL strength, ``*_weight``: λ_D, λ_U (balance them when one label is rarer:
    the paper keeps λ_D·n_D / λ_U·n_U within [1, 4/3])."""

    name: str = "kto"
    beta: float = 0.1
    precompute_ref: bool = False  # reference log-probs once, kept with the run
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0


@dataclass(frozen=True)
class ObjectiveSpec:
    config: type
    module: str | None  # where the loss lives (None: sft, the loop's own token loss)
    reference: bool = False  # needs the reference model's log-probs (the adapters switched off)
    paired: bool = True  # trains on dataset=preference pairs


OBJECTIVES: dict[str, ObjectiveSpec] = {
    "sft": ObjectiveSpec(ObjectiveConfig, None, paired=False),
    "dpo": ObjectiveSpec(DPOConfig, "lrft.objectives.dpo", reference=True),
    "ipo": ObjectiveSpec(IPOConfig, "lrft.objectives.dpo", reference=True),
    "orpo": ObjectiveSpec(ORPOConfig, "lrft.objectives.orpo"),
    "simpo": ObjectiveSpec(SimPOConfig, "lrft.objectives.simpo"),
    "kto": ObjectiveSpec(KTOConfig, "lrft.objectives.kto", reference=True),
}
