"""SimPO, CPO and ORPO: whole losses without a reference model (the second table of nanodpo/losses/__init__.py),
each equal to its TRL 1.16 trainer (CPOTrainer, ORPOTrainer)."""

import math

import torch
import torch.nn.functional as F

from nanodpo.dpo import DPOOutput
from nanodpo.logps import TokenStats
from nanodpo.losses.modifiers import completion_logps
from nanodpo.losses.options import AVERAGED_LOGPS_LOSS_TYPES, family_loss_type, resolved_cpo_alpha
from nanodpo.losses.pair import chosen_nll, smoothed_logistic_loss


def simpo_loss(
    chosen_avg_logps: torch.Tensor,
    rejected_avg_logps: torch.Tensor,
    *,
    beta: float,
    simpo_gamma: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row `simpo`, without its NLL term. chosen_avg_logps, rejected_avg_logps: ℓ(y_w), ℓ(y_l), shape (B,).
    Returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,)), rewards r = β·ℓ, detached."""
    # γ/β inside the bracket, in TRL's order of operations (the same number, rounded the same way).
    margins = beta * ((chosen_avg_logps - rejected_avg_logps) - simpo_gamma / beta)
    losses = smoothed_logistic_loss(margins, label_smoothing)
    return losses, beta * chosen_avg_logps.detach(), beta * rejected_avg_logps.detach()


def cpo_loss(
    chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, *, beta: float, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row `cpo`, without its NLL term. chosen_logps, rejected_logps: summed log π_θ(y_w|x), log π_θ(y_l|x), (B,).
    Returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,)), rewards r = β·log π_θ(y|x), detached."""
    losses = smoothed_logistic_loss(beta * (chosen_logps - rejected_logps), label_smoothing)
    return losses, beta * chosen_logps.detach(), beta * rejected_logps.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, without cancellation: log1p(-e^x) far from 0, log(-expm1(x)) near it (branch at -ln 2,
    Mächler 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_log_odds(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor) -> torch.Tensor:
    """log odds(y_w) - log odds(y_l), shape (B,), from ℓ(y_w), ℓ(y_l) (row `orpo`); logged as `log_odds_chosen`."""
    chosen_avg_logps, rejected_avg_logps = chosen_avg_logps.float(), rejected_avg_logps.float()
    return (chosen_avg_logps - rejected_avg_logps) - (log1mexp(chosen_avg_logps) - log1mexp(rejected_avg_logps))


def orpo_loss(
    chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, *, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row `orpo`, without its NLL term (β is the row's λ). Inputs: ℓ(y_w), ℓ(y_l), shape (B,).
    Returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,)), rewards r = β·ℓ, detached."""
    losses = -beta * F.logsigmoid(orpo_log_odds(chosen_avg_logps, rejected_avg_logps))
    return losses, beta * chosen_avg_logps.detach(), beta * rejected_avg_logps.detach()


def reference_free_loss(
    policy: TokenStats, completion_mask_shifted: torch.Tensor, ref_chosen_logps=None, ref_rejected_logps=None, *, cfg
) -> DPOOutput:
    """simpo, cpo or orpo on one micro-batch laid out [chosen; rejected] (no reference log-probs).

    policy.mask is the completion mask, except for orpo, whose NLL(y_w) also scores the chosen prompt tokens (TRL's
    ORPOTrainer does): there policy.mask is 1 on every token of the chosen sequences (nanodpo/dpo_data.py
    `with_chosen_prompt_scored`). completion_mask_shifted: [2B, T-1], 1 on scored completion tokens. The
    reference log-probs (None) are not read: the argument list is that of every loss the setup chooses.
    """
    loss_type = family_loss_type(cfg)
    mask = completion_mask_shifted
    logps = completion_logps(policy.logps, mask)
    if loss_type in AVERAGED_LOGPS_LOSS_TYPES:
        logps = logps / mask.sum(dim=1).clamp(min=1)  # ℓ(y)
    chosen_logps, rejected_logps = logps.chunk(2)
    log_odds = None
    if loss_type == "simpo":
        losses, chosen_rewards, rejected_rewards = simpo_loss(
            chosen_logps, rejected_logps, beta=cfg.beta, simpo_gamma=cfg.simpo_gamma,
            label_smoothing=cfg.label_smoothing,
        )  # fmt: skip
    elif loss_type == "cpo":
        losses, chosen_rewards, rejected_rewards = cpo_loss(
            chosen_logps, rejected_logps, beta=cfg.beta, label_smoothing=cfg.label_smoothing
        )
    elif loss_type == "orpo":
        losses, chosen_rewards, rejected_rewards = orpo_loss(chosen_logps, rejected_logps, beta=cfg.beta)
        log_odds = orpo_log_odds(chosen_logps, rejected_logps).detach()
    else:
        raise ValueError(f"{loss_type!r} is not a reference-free pair loss")

    nll_mask = policy.mask if loss_type == "orpo" else mask
    nll_loss = chosen_nll(policy.logps, nll_mask)
    nll_weight = 1.0 if loss_type == "orpo" else resolved_cpo_alpha(cfg)
    loss = losses.mean() + nll_weight * nll_loss if nll_weight else losses.mean()
    return DPOOutput(
        loss=loss,
        chosen_logps=chosen_logps.detach(),
        rejected_logps=rejected_logps.detach(),
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        mask=mask,
        nll_loss=nll_loss.detach(),
        nll_mask=nll_mask.chunk(2)[0],
        log_odds=log_odds,
        pair_losses=(losses + nll_weight * nll_loss).detach(),
    )
