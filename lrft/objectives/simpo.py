"""SimPO (Meng et al., https://arxiv.org/abs/2405.14734, eq. 6): a length-normalised reward and a
target margin, no reference model. On per-token average log-probs p̄::

    loss = −log σ(β (p̄(y_w|x) − p̄(y_l|x)) − γ)

as TRL's CPOTrainer with ``loss_type="simpo"`` (there ``simpo_gamma`` = γ, applied as γ/β inside
β(·)). ``sft_weight`` > 0 adds CPO's NLL on the chosen tokens (TRL's ``cpo_alpha``), a mean over
the step's chosen tokens. Rewards: β · p̄.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lrft.objectives import register_objective
from lrft.objectives.preference import Logps, PairObjective


@register_objective("simpo")
class SimPO(PairObjective):
    averaged = True

    def denominators(self) -> tuple[str, ...]:
        return ("pairs", "chosen_tokens") if self.cfg.sft_weight else ("pairs",)

    def pair_terms(self, lp: Logps) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        chosen, rejected = lp.average()
        losses = -F.logsigmoid(self.beta * (chosen - rejected) - float(self.cfg.gamma))
        terms = [losses.sum()]
        if self.cfg.sft_weight:
            terms.append(float(self.cfg.sft_weight) * lp.chosen_nll)
        return terms, self.beta * chosen, self.beta * rejected
