"""The modifiers of the DPO losses with a reference (nanodpo/losses/__init__.py, "Modifiers"): LD-DPO's down-weighted
length tail, f-DPO's f'(u) in place of the log-ratio, WPO's pair weights."""

import math

import torch
import torch.nn.functional as F

from nanodpo.logps import TokenStats


def completion_logps(token_logps: torch.Tensor, mask: torch.Tensor, ld_alpha: float | None = None) -> torch.Tensor:
    """Summed completion log-probs, [2B, T-1] per-token (0 off `mask`) + shifted completion mask -> [2B].

    With `ld_alpha` (LD-DPO, Liu et al. 2024): a pair's two completions share their first
    L = min(|y_w|, |y_l|) tokens' worth of "length"; the tokens after that are the verbosity that DPO's summed
    log-probs reward or punish in proportion to length. They are down-weighted by α:

        log π̃(y|x) = Σ_{k <= L} log π(y_k | ...)  +  α · Σ_{k > L} log π(y_k | ...)    (k: index in the completion)

    The shorter completion of a pair has no tail, so only the longer one changes; α = 1 is plain DPO.
    """
    mask = mask.to(token_logps.dtype)
    if ld_alpha is None:
        return (token_logps * mask).sum(dim=1)
    # 1, 2, 3, ... along each completion (prompt positions before it are 0, padding after it repeats the count,
    # which is harmless because padding is masked out below).
    position_in_completion = mask.cumsum(dim=1)
    lengths = mask.sum(dim=1)
    chosen_lengths, rejected_lengths = lengths.chunk(2)
    shared_length = torch.minimum(chosen_lengths, rejected_lengths).repeat(2).unsqueeze(1)  # [2B, 1], per pair
    in_shared_part = mask * (position_in_completion <= shared_length)
    in_tail = mask * (position_in_completion > shared_length)
    return (token_logps * in_shared_part).sum(dim=1) + ld_alpha * (token_logps * in_tail).sum(dim=1)


@torch.no_grad()
def reference_logps(
    ref: "TokenStats | torch.Tensor", mask: torch.Tensor, ld_alpha: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ref_chosen_logps [B], ref_rejected_logps [B]) from the reference's per-token log-probs over [chosen; rejected]
    (a TokenStats or the [2B, T-1] tensor), summed like the policy's (LD-weighted with `ld_alpha`)."""
    token_logps = ref.logps if isinstance(ref, TokenStats) else ref
    ref_chosen_logps, ref_rejected_logps = completion_logps(token_logps, mask, ld_alpha).chunk(2)
    return ref_chosen_logps, ref_rejected_logps


def f_divergence_score(
    logratio: torch.Tensor, f_divergence_type: str = "reverse_kl", alpha: float = 0.5
) -> torch.Tensor:
    """f'(u) at u = π_θ/π_ref = exp(logratio): what replaces the log-ratio in f-DPO (Wang et al. 2023).

    Constants that cancel in the chosen - rejected difference are dropped (reverse KL's f'(u) = log u + 1 -> log u).
    """
    if f_divergence_type == "reverse_kl":  # f(u) = u log u
        return logratio
    if f_divergence_type == "forward_kl":  # f(u) = -log u: f'(u) = -1/u, shifted by 1
        return 1 - torch.exp(-logratio)
    if f_divergence_type == "js_divergence":  # f'(u) = log(2u / (1 + u)) = log 2 + log σ(log u)
        return math.log(2) + F.logsigmoid(logratio)
    if f_divergence_type == "alpha_divergence":  # f'(u) = (u^(α-1) - 1) / (α - 1), -> log u as α -> 1
        if abs(alpha - 1.0) < 1e-6:
            return logratio
        exponent = (alpha - 1.0) * logratio
        # exp overflows past ~88 in fp32 (~11 in fp16); clamp in fp32 so the result stays finite in its dtype.
        clamp_max = 11.0 if logratio.dtype == torch.float16 else 80.0
        powered = torch.exp(torch.clamp(exponent.float(), max=clamp_max)) - 1.0
        return powered.to(logratio.dtype) * (1.0 / (alpha - 1.0))
    raise ValueError(f"unknown f_divergence_type {f_divergence_type!r}")


@torch.no_grad()
def wpo_weights(policy: TokenStats, mask: torch.Tensor) -> torch.Tensor:
    """WPO pair weights (Zhou et al. 2024, Eq. 2), [B], no gradient.

    A completion's weight is its length-normalised probability under the current policy, w(y) =
    exp(mean_t log π(y_t)), so pairs the policy would itself generate count more (off-policy data is down-weighted).
    Each token's probability is first divided by Σ_v p_v² (the expected probability of a sampled token), which
    "aligns" it: a flat distribution would otherwise make every weight tiny. Pair weight = w(y_w) · w(y_l).
    """
    if policy.log_sum_sq_probs is None:
        raise ValueError("use_weighting needs TokenStats.log_sum_sq_probs (token_stats(..., with_sum_sq=True))")
    mask = mask.to(policy.logps.dtype)
    lengths = mask.sum(dim=1).clamp_min(1)
    aligned_token_logps = (policy.logps.detach() - policy.log_sum_sq_probs) * mask
    weights = torch.exp(aligned_token_logps.sum(dim=1) / lengths)
    chosen_weights, rejected_weights = weights.chunk(2)
    return chosen_weights * rejected_weights
