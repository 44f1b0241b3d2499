"""The pair losses with a reference (the first table of nanodpo/losses/__init__.py), summed with their weights into
one micro-batch's loss: `weighted_pair_loss`, what train_dpo.py runs for every --loss_type but plain sigmoid DPO
(which runs nanodpo/dpo.py's `dpo_batch_loss`: the same numbers, tests/test_dpo_loss.py)."""

import math

import torch
import torch.nn.functional as F

from nanodpo.dpo import DPOOutput, sequence_logps
from nanodpo.logps import TokenStats
from nanodpo.losses.modifiers import completion_logps, f_divergence_score, wpo_weights
from nanodpo.losses.options import LOSS_TYPES, resolved_losses


def smoothed_logistic_loss(margins: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-(1-ε)·log σ(z) - ε·log σ(-z): the logistic loss of margin z when the label is right with probability 1 - ε."""
    return -F.logsigmoid(margins) * (1 - label_smoothing) - F.logsigmoid(-margins) * label_smoothing


def preference_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    loss_type: str,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    discopop_tau: float = 0.05,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair loss of ONE loss type with a reference (a row of the first table in the module docstring), from
    summed sequence log-probs.

    Args:
        chosen_logps, rejected_logps: log π_θ(y_w|x), log π_θ(y_l|x). Shape: (B,)
        ref_chosen_logps, ref_rejected_logps: log π_ref(y_w|x), log π_ref(y_l|x) (zeros if reference-free). (B,)
        beta: β (IPO's τ). As β -> 0 the reference is ignored.
        loss_type: one of LOSS_TYPES except 'sft' (the NLL term needs per-token log-probs; see `dpo_loss`).
        label_smoothing: ε (LABEL_SMOOTHING_LOSS_TYPES read it; the others ignore it).
        f_divergence_type, f_alpha_divergence_coef: f-DPO (`f_divergence_score`), for F_DIVERGENCE_LOSS_TYPES.
        chosen_lengths, rejected_lengths: |y_w|, |y_l|, for ipo and sigmoid_norm. Shape: (B,)
        discopop_tau: τ of discopop.

    Returns:
        losses: the loss of each pair. Shape: (B,)
        chosen_rewards, rejected_rewards: r = β·ρ (always the plain log-ratio), detached. Shape: (B,)
    """
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    chosen_scores = f_divergence_score(chosen_logratios, f_divergence_type, f_alpha_divergence_coef)
    rejected_scores = f_divergence_score(rejected_logratios, f_divergence_type, f_alpha_divergence_coef)
    margins = beta * (chosen_scores - rejected_scores)  # h
    smoothing = label_smoothing

    def smoothed_sigmoid_loss(logits: torch.Tensor) -> torch.Tensor:
        return smoothed_logistic_loss(logits, smoothing)

    def length_normalised_margins() -> torch.Tensor:
        # Sums over longer completions are larger; dividing by the token count compares per-token log-ratios.
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError(f"loss_type {loss_type!r} needs chosen_lengths and rejected_lengths")
        chosen_per_token = chosen_scores / chosen_lengths.clamp(min=1)
        rejected_per_token = rejected_scores / rejected_lengths.clamp(min=1)
        return chosen_per_token - rejected_per_token

    if loss_type == "sigmoid":
        losses = smoothed_sigmoid_loss(margins)
    elif loss_type == "hinge":
        losses = torch.relu(1 - margins)
    elif loss_type == "ipo":
        losses = (length_normalised_margins() - 1 / (2 * beta)) ** 2
    elif loss_type == "exo_pair":
        q_chosen, log_q_chosen = torch.sigmoid(margins), F.logsigmoid(margins)
        q_rejected, log_q_rejected = torch.sigmoid(-margins), F.logsigmoid(-margins)
        log_p_chosen, log_p_rejected = math.log1p(-smoothing), math.log(smoothing)
        losses = q_chosen * (log_q_chosen - log_p_chosen) + q_rejected * (log_q_rejected - log_p_rejected)
    elif loss_type == "nca_pair":
        chosen_rewards, rejected_rewards = beta * chosen_logratios, beta * rejected_logratios
        losses = (
            -F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards) - 0.5 * F.logsigmoid(-rejected_rewards)
        )
    elif loss_type == "robust":
        # Subtracting the flipped-label loss (instead of adding it, as cDPO does) makes the loss unbiased.
        clean = -(1 - smoothing) * F.logsigmoid(margins)
        flipped = -smoothing * F.logsigmoid(-margins)
        losses = (clean - flipped) / (1 - 2 * smoothing)
    elif loss_type == "bco_pair":
        chosen_rewards, rejected_rewards = beta * chosen_logratios, beta * rejected_logratios
        losses = -F.logsigmoid(chosen_rewards) - F.logsigmoid(-rejected_rewards)
    elif loss_type == "sppo_hard":
        losses = (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    elif loss_type == "aot":
        # Sorting makes the i-th smallest policy margin compete with the i-th smallest reference margin: the loss
        # asks the policy's margin *distribution* to dominate the reference's. The sort runs over this micro-batch
        # only, so its size matters (bigger is closer to the paper).
        policy_margins_sorted, _ = torch.sort(chosen_logps - rejected_logps, dim=0)
        ref_margins_sorted, _ = torch.sort(ref_chosen_logps - ref_rejected_logps, dim=0)
        losses = smoothed_sigmoid_loss(beta * (policy_margins_sorted - ref_margins_sorted))
    elif loss_type == "aot_unpaired":
        chosen_sorted, _ = torch.sort(chosen_logratios, dim=0)
        rejected_sorted, _ = torch.sort(rejected_logratios, dim=0)
        losses = smoothed_sigmoid_loss(beta * (chosen_sorted - rejected_sorted))
    elif loss_type == "apo_zero":
        losses = (1 - torch.sigmoid(beta * chosen_logratios)) + torch.sigmoid(beta * rejected_logratios)
    elif loss_type == "apo_down":
        chosen_up = torch.sigmoid(beta * chosen_logratios)
        losses = chosen_up + (1 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios)))
    elif loss_type == "discopop":
        mix = torch.sigmoid(margins / discopop_tau)  # ~0 for a negative margin, ~1 for a positive one
        losses = -F.logsigmoid(margins) * (1 - mix) + torch.exp(-margins) * mix
    elif loss_type == "sigmoid_norm":
        losses = -F.logsigmoid(beta * length_normalised_margins())
    elif loss_type == "sft":
        raise ValueError("'sft' is not a pair loss: it needs per-token log-probs (use dpo_loss)")
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")

    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


def summed_ipo_loss(
    policy: TokenStats, mask: torch.Tensor, ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta
) -> DPOOutput:
    """IPO as TRL's OnlineDPOTrainer computes it (and the IPO paper writes it): (h − 1/(2β))² on the summed
    log-ratios, h = ρ_w − ρ_l. (DPOTrainer — and the offline --loss_type ipo — divides each ρ by its token count.)
    The arguments are `dpo_batch_loss`'s."""
    chosen_logps, rejected_logps = sequence_logps(policy.logps, mask).chunk(2)
    chosen_logratios, rejected_logratios = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
    losses = (chosen_logratios - rejected_logratios - 1 / (2 * beta)) ** 2
    return DPOOutput(
        loss=losses.mean(), chosen_logps=chosen_logps.detach(), rejected_logps=rejected_logps.detach(),
        chosen_rewards=beta * chosen_logratios.detach(), rejected_rewards=beta * rejected_logratios.detach(),
        mask=mask, pair_losses=losses.detach(),
    )  # fmt: skip


def chosen_nll(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """NLL(y_w): -log π_θ averaged over every chosen token of the micro-batch where `mask` is 1 (not per sequence)."""
    chosen_token_logps, _ = token_logps.chunk(2)
    chosen_mask, _ = mask.chunk(2)
    return -chosen_token_logps[chosen_mask.bool()].mean()


def weighted_pair_loss(
    policy: TokenStats,
    completion_mask_shifted: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    cfg,
) -> DPOOutput:
    """The loss of one micro-batch laid out [chosen; rejected].

    policy: TokenStats over the 2B rows (per-token log-probs [2B, T-1] with grad; .mask is the shifted scored mask).
    completion_mask_shifted: [2B, T-1], 1 on scored completion tokens (= policy.mask, except for orpo).
    ref_chosen_logps, ref_rejected_logps: [B] summed reference log-probs (LD-weighted already if cfg.ld_alpha),
        or None when `needs_reference(cfg)` is False.
    cfg: a DPOConfig (beta, loss_type, loss_weights, label_smoothing, f_divergence_type, f_alpha_divergence_coef,
        ld_alpha, use_weighting, discopop_tau, rpo_alpha, reference_free, simpo_gamma, cpo_alpha).

    loss = Σ_k weight_k · mean_over_pairs(loss_k · wpo_weight), the mean over this micro-batch's pairs.
    """
    mask = completion_mask_shifted
    chosen_logps, rejected_logps = completion_logps(policy.logps, mask, cfg.ld_alpha).chunk(2)
    if cfg.reference_free:
        ref_chosen_logps = torch.zeros_like(chosen_logps)
        ref_rejected_logps = torch.zeros_like(rejected_logps)
    elif ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError("reference log-probs are required unless cfg.reference_free")
    # precomputed values may come from a cache in another dtype / on the CPU
    ref_chosen_logps = ref_chosen_logps.to(chosen_logps)
    ref_rejected_logps = ref_rejected_logps.to(rejected_logps)
    chosen_lengths, rejected_lengths = mask.sum(dim=1).chunk(2)
    pair_weights = wpo_weights(policy, mask) if cfg.use_weighting else None

    loss = 0.0
    pair_losses = torch.zeros_like(chosen_logps)
    nll_loss = None
    # The rewards β·ρ, the same for every pair loss (and logged with `sft` alone too): computed once, here.
    chosen_rewards = cfg.beta * (chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = cfg.beta * (rejected_logps - ref_rejected_logps).detach()
    for loss_type, weight in resolved_losses(cfg):
        if loss_type == "sft":
            nll_loss = chosen_nll(policy.logps, mask)
            per_pair = nll_loss.expand(chosen_logps.shape[0])  # the same value for every pair
        else:
            per_pair, _, _ = preference_loss(
                chosen_logps,
                rejected_logps,
                ref_chosen_logps,
                ref_rejected_logps,
                beta=cfg.beta,
                loss_type=loss_type,
                label_smoothing=cfg.label_smoothing,
                f_divergence_type=cfg.f_divergence_type,
                f_alpha_divergence_coef=cfg.f_alpha_divergence_coef,
                chosen_lengths=chosen_lengths,
                rejected_lengths=rejected_lengths,
                discopop_tau=cfg.discopop_tau,
            )
        if pair_weights is not None:
            per_pair = per_pair * pair_weights
        loss = loss + per_pair.mean() * weight
        pair_losses = pair_losses + per_pair.detach() * weight

    return DPOOutput(
        loss=loss,
        chosen_logps=chosen_logps.detach(),
        rejected_logps=rejected_logps.detach(),
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        mask=mask,
        nll_loss=None if nll_loss is None else nll_loss.detach(),
        nll_mask=None if nll_loss is None else mask.chunk(2)[0],
        pair_losses=pair_losses.detach(),
    )
