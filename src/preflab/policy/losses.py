"""The pure maths of online policy optimisation: KL estimators, whitening, GAE, clipped losses, baselines.

Every function here takes tensors and returns tensors; the training loops (`ppo.py`, `rloo.py`) call them in
order and the tests call them directly against hand-computed values. Shapes: `[B, C]` is a batch of B
completions right-padded to C tokens with `mask` (1 on real completion tokens, EOS included, 0 on pads).

Departures from the papers, and why:
  * `masked_whiten` uses the population variance (divide by n, not n-1) over the real tokens only; TRL uses
    Bessel's correction. With hundreds of tokens the two agree to < 1%; the plain form is easier to check.
  * The clipped losses return per-token values; the loop sums them over real tokens and divides by the
    token count of the whole minibatch, so gradient accumulation over micro-batches equals one large batch
    exactly (a per-micro-batch mean would weight short micro-batches more).
"""

from __future__ import annotations

import torch

from preflab.logps import masked_mean

KL_ESTIMATORS = ("k1", "k3")


# ---- KL to the reference ----------------------------------------------------------------------------


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = log pi(a) - log pi_ref(a): unbiased for KL(pi || pi_ref) on samples of pi, can be negative per token."""
    return logp - ref_logp


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = (r - 1) - log r with r = pi_ref/pi (Schulman, "Approximating KL divergence", 2020): unbiased, >= 0,
    lower variance. With x = log pi - log pi_ref this is exp(-x) - 1 + x (GRPO, Shao et al. 2024, eq. 4)."""
    x = logp - ref_logp
    return torch.expm1(-x) + x


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL estimate by name (`k1` or `k3`)."""
    if estimator == "k1":
        return kl_k1(logp, ref_logp)
    if estimator == "k3":
        return kl_k3(logp, ref_logp)
    raise ValueError(f"kl estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


# ---- whitening ---------------------------------------------------------------------------------------


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Population variance over the positions where mask is 1."""
    mean = masked_mean(values, mask)
    return masked_mean((values - mean) ** 2, mask)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over real positions only; masked positions come out 0.

    `shift_mean=False` keeps the mean (x - mean) / std + mean: rewards are whitened this way (RLHF detail #14,
    the scale changes, the sign of the average reward does not); advantages with `shift_mean=True`.
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(values.dtype)


# ---- per-token RLHF reward ---------------------------------------------------------------------------


def last_real_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each right-padded completion (0 for an empty row)."""
    return (mask.long().sum(-1) - 1).clamp(min=0)


def rlhf_rewards(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards [B, C], kl [B, C]): r_t = -beta * KL_t, plus the score at the last real response token.

    Ziegler et al. 2019 eq. 2 / Stiennon et al. 2020 eq. 1 spread over tokens (RLHF details #5, #11). The score
    lands on the last token whose mask is 1 (EOS when the row finished), never on a pad.
    """
    mask = mask.to(logp.dtype)
    kl = kl_estimate(logp, ref_logp, estimator) * mask
    rewards = -beta * kl
    last = last_real_index(mask)
    rewards = rewards.scatter_add(1, last[:, None], scores.to(rewards.dtype)[:, None])
    return rewards, kl


# ---- advantages --------------------------------------------------------------------------------------


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) by generalised advantage estimation (Schulman et al. 2016, eq. 11-16).

    delta_t = r_t + gamma V(s_{t+1}) - V(s_t)         (eq. 11; V after the last real token is 0: the episode ends)
    A_t     = delta_t + gamma lam A_{t+1}             (eq. 16, computed backwards)
    R_t     = A_t + V(s_t)                            (the value target, TD(lambda) return)
    """
    mask = mask.to(rewards.dtype)
    values = values * mask
    B, C = rewards.shape
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_adv = torch.zeros_like(next_value)
    for t in reversed(range(C)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # eq. 11
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]  # eq. 16
        advantages[:, t] = next_adv
        next_value = values[:, t]
    returns = (advantages + values) * mask
    return advantages, returns


def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """r_i - mean of the other k-1 rewards of the same prompt (Ahmadian et al. 2024, eq. 6; Kool et al. 2019).

    `rewards` is prompt-major: rows i*k .. i*k+k-1 are the k samples of prompt i.
    """
    if k < 2:
        raise ValueError(f"RLOO needs k >= 2 samples per prompt, got {k}")
    grouped = rewards.view(-1, k)
    baseline = (grouped.sum(-1, keepdim=True) - grouped) / (k - 1)
    return (grouped - baseline).reshape(-1)


def grpo_advantages(rewards: torch.Tensor, k: int, eps: float = 1e-4) -> torch.Tensor:
    """(r_i - mean(r)) / (std(r) + eps) within each group of k (Shao et al. 2024, section 4.1.2, outcome supervision).

    std is the sample standard deviation (n - 1), as in TRL; a group whose rewards are all equal gets 0.
    """
    if k < 2:
        raise ValueError(f"GRPO needs k >= 2 samples per prompt, got {k}")
    grouped = rewards.view(-1, k)
    mean, std = grouped.mean(-1, keepdim=True), grouped.std(-1, keepdim=True)
    return ((grouped - mean) / (std + eps)).reshape(-1)


# ---- clipped losses ----------------------------------------------------------------------------------


def clipped_policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, cliprange: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-token loss, ratio, clipped?) of PPO's clipped surrogate (Schulman et al. 2017, eq. 7), negated.

    loss_t = max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps)),  rho_t = exp(log pi(a_t) - log pi_old(a_t)).
    """
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    return torch.maximum(unclipped, clipped), ratio, (clipped > unclipped)


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, cliprange_value: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token loss, clipped?): 0.5 max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2) (RLHF detail #15)."""
    v_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (v_clipped - returns) ** 2
    return 0.5 * torch.maximum(loss_unclipped, loss_clipped), (loss_clipped > loss_unclipped)


def approx_kl(logp: torch.Tensor, old_logp: torch.Tensor) -> torch.Tensor:
    """Per-token 0.5 (log pi - log pi_old)^2: the KL between PPO epochs (not the KL to the reference)."""
    return 0.5 * (logp - old_logp) ** 2


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[R - V] / Var[R] over real tokens: 1 is a perfect critic, 0 a constant one, < 0 worse than constant."""
    var_returns = masked_var(returns, mask)
    return 1.0 - masked_var(returns - values, mask) / var_returns.clamp(min=1e-8)


def best_of_n_indices(rewards: torch.Tensor, n: int) -> torch.Tensor:
    """Row index of the highest reward in each group of n (prompt-major; ties go to the first)."""
    grouped = rewards.view(-1, n)
    return grouped.argmax(-1) + torch.arange(grouped.shape[0], device=rewards.device) * n
