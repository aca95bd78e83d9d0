"""ORPO (Hong et al., https://arxiv.org/abs/2403.07691, eq. 6-7): SFT and preference in one loss,
with no reference model. On per-token average log-probs p̄ = log π(y|x) / |y|::

    log odds(y|x) = p̄ − log(1 − exp p̄)
    loss = NLL(y_w) − β · log σ(log odds(y_w|x) − log odds(y_l|x))

The NLL is a mean over the chosen completion tokens of the whole step, the odds-ratio term a mean
over its pairs (TRL's ORPOTrainer): two sums with their own counts. Rewards: β · p̄.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lrft.objectives import register_objective
from lrft.objectives.preference import Logps, PairObjective


@register_objective("orpo")
class ORPO(PairObjective):
    averaged = True

    def denominators(self) -> tuple[str, ...]:
        return ("pairs", "chosen_tokens")

    def pair_terms(self, lp: Logps) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        chosen, rejected = lp.average()
        # log(1 − exp p̄), stable for p̄ < 0: log1p(−exp p̄)
        log_odds = (chosen - rejected) - (torch.log1p(-torch.exp(chosen)) - torch.log1p(-torch.exp(rejected)))
        ratio = -self.beta * F.logsigmoid(log_odds)
        return [ratio.sum(), lp.chosen_nll], self.beta * chosen, self.beta * rejected
