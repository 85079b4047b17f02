"""Preference losses (TRL's names and formulas) and the reward model's Bradley-Terry loss.

h = [log pi(y_w|x) - log ref(y_w|x)] - [log pi(y_l|x) - log ref(y_l|x)], sequence log-probs summed
over the answer tokens.

    sigmoid  -(1-e) log s(b h) - e log s(-b h)      DPO; e > 0 is conservative DPO (cDPO)
    robust   [-(1-e) log s(b h) + e log s(-b h)] / (1 - 2e)
    ipo      (h_avg - 1/(2b))^2                      with per-token averaged log-ratios
    hinge    max(0, 1 - b h)                         SLiC
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class DPOOutput:
    loss: torch.Tensor  # scalar, to backpropagate
    losses: torch.Tensor  # per pair
    chosen_rewards: torch.Tensor  # beta * (log pi - log ref) of the chosen answers (detached)
    rejected_rewards: torch.Tensor

    def metrics(self) -> dict[str, float]:
        margin = self.chosen_rewards - self.rejected_rewards
        return {
            "loss": self.loss.item(),
            "rewards/chosen": self.chosen_rewards.mean().item(),
            "rewards/rejected": self.rejected_rewards.mean().item(),
            "rewards/margin": margin.mean().item(),
            "rewards/accuracy": (margin > 0).float().mean().item(),
        }


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, loss_type: str = "sigmoid", beta: float = 0.1, label_smoothing: float = 0.0,
             chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None,
             nll_coef: float = 0.0) -> DPOOutput:
    """Per-pair sequence log-probs in, the preference loss out.  Token counts are needed by IPO
    (per-token averages) and by the NLL term (per-token NLL of the chosen answers)."""
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the ipo loss needs chosen_tokens and rejected_tokens (per-token averages)")
        h_avg = chosen_ratio / chosen_tokens - rejected_ratio / rejected_tokens
        losses = (h_avg - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"unknown loss {loss_type!r}; use sigmoid, robust, ipo or hinge")
    loss = losses.mean()
    if nll_coef > 0:
        if chosen_tokens is None:
            raise ValueError("the NLL term needs chosen_tokens")
        loss = loss + nll_coef * (-(policy_chosen / chosen_tokens)).mean()
    return DPOOutput(loss, losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


@dataclass
class RMOutput:
    loss: torch.Tensor  # scalar, to backpropagate
    losses: torch.Tensor  # per pair (weighted), before the centring term
    chosen: torch.Tensor  # rewards (detached)
    rejected: torch.Tensor

    def metrics(self) -> dict[str, float]:
        margin = self.chosen - self.rejected
        return {
            "loss": self.loss.item(),
            "rewards/chosen": self.chosen.mean().item(),
            "rewards/rejected": self.rejected.mean().item(),
            "rewards/margin": margin.mean().item(),
            "rewards/accuracy": (margin > 0).float().mean().item(),
        }


def rm_loss(chosen: torch.Tensor, rejected: torch.Tensor, center_coef: float = 1e-3,
            weights: torch.Tensor | None = None) -> RMOutput:
    """Bradley-Terry reward-model loss on per-pair scalar rewards (VLM-RLAIF's recipe):

        mean_i w_i * -log s(r_c,i - r_r,i)  +  center_coef * |mean_i (r_c,i + r_r,i)|

    The first term is BCE-with-logits on r_c - r_r with label 1; the second keeps the rewards
    centred on 0 (a BT model only fixes differences).  `weights`: per-pair weights (e.g. the
    judge's score gap, normalised to mean 1), none = 1."""
    losses = -F.logsigmoid(chosen - rejected)
    if weights is not None:
        losses = losses * weights
    loss = losses.mean() + center_coef * (chosen + rejected).mean().abs()
    return RMOutput(loss, losses.detach(), chosen.detach(), rejected.detach())
