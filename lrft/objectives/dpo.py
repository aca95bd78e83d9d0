"""DPO and IPO: the policy's log-ratio against the reference, chosen vs rejected.

DPO (Rafailov et al., https://arxiv.org/abs/2305.18290, eq. 7), per pair::

    h = (log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))
    loss = −log σ(β h)

IPO (Azar et al., https://arxiv.org/abs/2310.12036, eq. 17) on per-token averaged log-ratios, as
TRL computes it (its note: the normalisation the IPO authors used)::

    h̄ = (log π(y_w|x) − log π_ref(y_w|x)) / |y_w| − (log π(y_l|x) − log π_ref(y_l|x)) / |y_l|
    loss = (h̄ − 1/(2β))²

Both log the implicit rewards β(log π − log π_ref) of each completion.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lrft.objectives import register_objective
from lrft.objectives.preference import Logps, PairObjective


@register_objective("dpo")
class DPO(PairObjective):
    reference = True

    def pair_terms(self, lp: Logps) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        chosen = lp.chosen - lp.ref_chosen
        rejected = lp.rejected - lp.ref_rejected
        losses = -F.logsigmoid(self.beta * (chosen - rejected))
        return [losses.sum()], self.beta * chosen, self.beta * rejected


@register_objective("ipo")
class IPO(PairObjective):
    reference = True

    def pair_terms(self, lp: Logps) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        chosen = lp.chosen - lp.ref_chosen
        rejected = lp.rejected - lp.ref_rejected
        margin = chosen / lp.n_chosen.clamp(min=1) - rejected / lp.n_rejected.clamp(min=1)
        losses = (margin - 1 / (2 * self.beta)) ** 2
        return [losses.sum()], self.beta * chosen, self.beta * rejected
