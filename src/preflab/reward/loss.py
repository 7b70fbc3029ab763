"""The Bradley-Terry loss and the pairwise statistics logged beside it.

Bradley & Terry (1952) model the chance that response w beats response l as sigma(r_w - r_l); a reward model
is fitted by maximising the log-likelihood of the observed comparisons (Stiennon et al. 2020 eq. 1;
InstructGPT, Ouyang et al. 2022 eq. 1):

    loss(r) = -E[ log sigma(r(x, y_w) - r(x, y_l)) ]

Extensions, each a departure from the plain equation and each opt-in:
  * margin m (Llama 2, Touvron et al. 2023 eq. 2): `-log sigma(r_w - r_l - m)` asks for a gap of at least m
    where annotators said "much better"; not applied to ties.
  * label smoothing eps (conservative BT, as cDPO does for DPO): the target P(w beats l) is 1 - eps instead of 1,
    `-(1 - eps) log sigma(z) - eps log sigma(-z)`: robust to a share eps of flipped labels.
  * ties: the target is 0.5, `-0.5 log sigma(z) - 0.5 log sigma(-z)`, minimised at r_w = r_l (Chatbot Arena
    counts a tie as half a win).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    tie: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean Bradley-Terry loss over a batch of pairs (see the module docstring). All tensors are [B]."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    z = chosen_rewards - rejected_rewards
    tie = torch.zeros_like(z, dtype=torch.bool) if tie is None else tie.to(z.device).bool()
    if margin is not None:
        z = z - torch.where(tie, torch.zeros_like(z), margin.to(z))  # Llama 2 eq. 2: sigma(r_w - r_l - m)
    target = torch.where(tie, torch.full_like(z, 0.5), torch.full_like(z, 1.0 - label_smoothing))
    # InstructGPT eq. 1 at target 1: -log sigma(r_w - r_l); a soft target t gives the binary cross-entropy
    losses = -target * F.logsigmoid(z) - (1.0 - target) * F.logsigmoid(-z)
    return losses.mean()


@torch.no_grad()
def pair_statistics(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, tie: torch.Tensor | None = None
) -> dict:
    """Sums (not means) over a batch, so intervals can be averaged exactly: accuracy counts strict r_w > r_l
    over non-tie pairs; margin is r_w - r_l."""
    tie = torch.zeros_like(chosen_rewards, dtype=torch.bool) if tie is None else tie.bool()
    strict = ~tie
    return {
        "n": float(chosen_rewards.numel()),
        "n_strict": float(strict.sum()),
        "correct": float(((chosen_rewards > rejected_rewards) & strict).sum()),
        "margin": float((chosen_rewards - rejected_rewards).sum()),
        "chosen": float(chosen_rewards.sum()),
        "rejected": float(rejected_rewards.sum()),
    }


def summarise(sums: dict, loss_sum: float, prefix: str) -> dict:
    """Metric means from accumulated `pair_statistics` sums and a sum of per-pair losses."""
    n = max(sums.get("n", 0.0), 1.0)
    return {
        f"{prefix}/loss": loss_sum / n,
        f"{prefix}/accuracy": sums.get("correct", 0.0) / max(sums.get("n_strict", 0.0), 1.0),
        f"{prefix}/margin": sums.get("margin", 0.0) / n,
        f"{prefix}/chosen": sums.get("chosen", 0.0) / n,
        f"{prefix}/rejected": sums.get("rejected", 0.0) / n,
    }
