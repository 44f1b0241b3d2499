"""The DPO loss and its variants: every loss type of TRL 1.16, written out one formula at a time.

Direct Preference Optimization
==============================
Data: a prompt x with two completions, the preferred one y_w ("chosen") and the dispreferred one y_l ("rejected").
RLHF would fit a reward model r(x, y) to such pairs and then maximise E[r] - β·KL(π_θ || π_ref) with RL. DPO
(Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward Model") notes that
the optimum of that KL-regularised problem is π*(y|x) ∝ π_ref(y|x)·exp(r(x, y)/β), so any policy defines the reward
it is optimal for (their Eq. 5):

    r(x, y) = β · log π(y|x)/π_ref(y|x)  +  β · log Z(x)

Put this into the Bradley-Terry likelihood p(y_w ≻ y_l) = σ(r(x, y_w) - r(x, y_l)): the intractable log Z(x) cancels
and the reward model disappears. What is left is a logistic loss on the policy itself (Eq. 7):

    L_DPO = -E_(x, y_w, y_l) [ log σ( β·log π_θ(y_w|x)/π_ref(y_w|x)  -  β·log π_θ(y_l|x)/π_ref(y_l|x) ) ]

Names used below:
    chosen_logps           log π_θ(y_w|x), summed over the completion tokens (never averaged)      [B]
    ref_chosen_logps       log π_ref(y_w|x), the frozen reference (usually the SFT model)           [B]
    chosen_logratio        chosen_logps - ref_chosen_logps ("how much more likely than before")     [B]
    chosen_reward          β · chosen_logratio: the *implicit reward* (Eq. 5 without log Z)         [B]
    (the same for rejected), and margin = chosen_reward - rejected_reward, so L_DPO = -log σ(margin).

The implicit rewards are what the logs show (`rewards/chosen`, `rewards/margins`, ...). At step 1 the policy equals
the reference, every reward is 0, the loss is log 2 ≈ 0.693 and `rewards/accuracies` (chosen_reward > rejected_reward,
strictly) is 0.

Batch layout: [chosen; rejected]
================================
One forward pass scores both completions: the B chosen sequences and the B rejected ones are stacked into one batch
of N = 2B rows, chosen first. Row i and row B + i are the two completions of pair i, so `tensor.chunk(2)` splits any
per-row tensor back into (chosen, rejected). A worked example with B = 2, β = 0.1:

    summed log-probs   policy    [-12.0,  -8.0,  -15.0,  -9.0]   -> chosen [-12.0, -8.0], rejected [-15.0, -9.0]
                       reference [-13.0,  -8.5,  -14.0,  -9.5]   -> chosen [-13.0, -8.5], rejected [-14.0, -9.5]
    log-ratios         chosen [1.0, 0.5]      rejected [-1.0, 0.5]
    implicit rewards   chosen [0.1, 0.05]     rejected [-0.1, 0.05]     margins [0.2, 0.0]
    per-pair loss      -log σ([0.2, 0.0]) = [0.5981, 0.6931]            loss = mean = 0.6456
    rewards/accuracies mean([0.1 > -0.1, 0.05 > 0.05]) = 0.5

Per-token inputs come from `nanodpo.logps.token_stats`: [2B, T-1] log-probs of each label token, 0 off the (shifted)
completion mask, so a row's sum is its completion's log-prob.

Loss types (`--loss_type`, several are summed with `--loss_weights`)
====================================================================
Notation: ρ_w, ρ_l = chosen / rejected log-ratio; Δ = ρ_w - ρ_l (or its f-divergence version, below); h = β·Δ;
|y| = number of completion tokens; ε = `--label_smoothing`.

loss_type     per-pair loss                                                 source
------------  ------------------------------------------------------------  ------------------------------------------
sigmoid       -log σ(h)                                                     DPO, Rafailov et al. 2023, Eq. 7
  ... ε > 0   -(1-ε)·log σ(h) - ε·log σ(-h)   (conservative DPO, cDPO)      Mitchell 2023, "A note on DPO with noisy
                                                                            preferences"; TRL <= 0.28
hinge         max(0, 1 - h)                                                 SLiC-HF, Zhao et al. 2023 (§2); RSO,
                                                                            Liu et al. 2024 (hinge-norm)
ipo           (ρ_w/|y_w| - ρ_l/|y_l| - 1/(2β))²                             IPO, Azar et al. 2023, Eq. 17 (τ = β)
exo_pair      KL(q || p) over {y_w, y_l}, q = (σ(h), σ(-h)), p = (1-ε, ε)   EXO, Ji et al. 2024, Eq. 16
nca_pair      -log σ(βρ_w) - ½·log σ(-βρ_w) - ½·log σ(-βρ_l)                NCA, Chen et al. 2024 (pairwise, K = 2)
robust        [-(1-ε)·log σ(h) + ε·log σ(-h)] / (1 - 2ε)                    rDPO, Chowdhury et al. 2024 (§3)
bco_pair      -log σ(βρ_w) - log σ(-βρ_l)                                   BCO, Jung et al. 2024 (no reward shift δ)
sppo_hard     (ρ_w - 1/(2β))² + (ρ_l + 1/(2β))²                             SPPO, Wu et al. 2024, Eq. 4.7, P ∈ {1, 0}
aot           (cDPO) sigmoid loss of β·(sort(m_θ) - sort(m_ref)), where        AOT, Melnyk et al. 2024 (§3)
              m = log π(y_w|x) - log π(y_l|x), sorted over the micro-batch
aot_unpaired  (cDPO) sigmoid loss of β·(sort(ρ_w) - sort(ρ_l))              AOT, Melnyk et al. 2024 (§3, unpaired)
apo_zero      (1 - σ(βρ_w)) + σ(βρ_l)                                       APO, D'Oosterlinck et al. 2024, Eq. 7
apo_down      σ(βρ_w) + (1 - σ(β(ρ_w - ρ_l)))                               APO, D'Oosterlinck et al. 2024, Eq. 8
discopop      (1-m)·(-log σ(h)) + m·exp(-h),  m = σ(h/τ)                    DiscoPOP, Lu et al. 2024, Eq. 5
sigmoid_norm  -log σ(β·(ρ_w/|y_w| - ρ_l/|y_l|))                             length-normalised DPO (Tülu 3, Lambert
                                                                            et al. 2024)
sft           -mean over the chosen completion tokens of log π_θ(token)     the NLL term of RPO / MPO (no pair loss)

Modifiers:
  --f_divergence_type  f-DPO (Wang et al. 2023, "Beyond Reverse KL"): replace each log-ratio ρ by f'(e^ρ) for the
                       regulariser's f (reverse KL gives back ρ). Only for the losses built on Δ alone
                       (F_DIVERGENCE_LOSS_TYPES): the leftover β·log Z(x) cancels only in the chosen - rejected
                       difference.
  --ld_alpha           LD-DPO (Liu et al. 2024, "Length Desensitization in DPO"): tokens past the shorter completion's
                       length count with weight α in the summed log-probs (policy and reference alike).
  --use_weighting      WPO (Zhou et al. 2024, Eq. 2): each pair's loss is multiplied by the policy's own
                       (detached) length-normalised probability of both completions.
  --rpo_alpha          RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization"): add α × the sft term;
                       TRL 1.16 spells this `loss_type=[..., "sft"]`, `loss_weights=[..., α]`.
  --reference_free     take log π_ref = 0 (no reference model).

Differences from TRL 1.16 (everything else is tested equal to `DPOTrainer._compute_loss`):
  * `sigmoid` with label_smoothing > 0 is conservative DPO here (as in TRL <= 0.28 and the DPO authors' code);
    TRL 1.16 silently ignores label_smoothing for `sigmoid`.
  * `rpo_alpha` and `reference_free` were removed from TRL at 0.29; nanodpo keeps them (see above).
  * `sft` together with `use_weighting` crashes in TRL 1.16 (an in-place multiply on an expanded tensor); here the
    NLL term is weighted like every other term: NLL × mean over pairs of the WPO weights.
  * `ipo` / `sigmoid_norm` divide by the number of scored completion tokens (the shifted mask). TRL counts the
    unshifted completion mask; the two agree unless a completion starts at position 0 (empty prompt), where that
    first token has no prediction and so no log-prob - it is not part of the sum being normalised.
"""

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nanodpo.errors import UserError
from nanodpo.logps import TokenStats

LOSS_TYPES: tuple[str, ...] = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)

F_DIVERGENCES: tuple[str, ...] = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")

# f-DPO's reparameterisation leaves a β·log Z(x) term in each reward that cancels only in the chosen - rejected
# difference, so only the losses that see nothing but that difference (and sft, which sees no reward) generalise.
F_DIVERGENCE_LOSS_TYPES = frozenset(
    {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
)

# Loss types that read --label_smoothing (all others ignore it).
LABEL_SMOOTHING_LOSS_TYPES = frozenset({"sigmoid", "robust", "exo_pair", "aot", "aot_unpaired"})


# ----------------------------------------------------------------------------------------------------------------
# Options


def resolved_losses(cfg) -> list[tuple[str, float]]:
    """The (loss_type, weight) terms summed into the loss: --loss_type with --loss_weights (default 1.0 each), plus
    ("sft", rpo_alpha) when --rpo_alpha is set (RPO = the preference loss + α·NLL of the chosen completion)."""
    weights = cfg.loss_weights if cfg.loss_weights is not None else [1.0] * len(cfg.loss_type)
    terms = [(loss_type, float(weight)) for loss_type, weight in zip(cfg.loss_type, weights, strict=True)]
    if cfg.rpo_alpha is not None:
        terms.append(("sft", float(cfg.rpo_alpha)))
    return terms


def check_dpo_options(cfg) -> None:
    """Refuse option combinations that are invalid (or that TRL refuses), each with one sentence naming the flag."""
    if not cfg.loss_type:
        raise UserError("--loss_type is empty; give at least one of: " + ", ".join(LOSS_TYPES))
    for loss_type in cfg.loss_type:
        if loss_type not in LOSS_TYPES:
            raise UserError(f"--loss_type {loss_type!r} is not one of: {', '.join(LOSS_TYPES)}")
    if cfg.loss_weights is not None and len(cfg.loss_weights) != len(cfg.loss_type):
        raise UserError(
            f"--loss_weights has {len(cfg.loss_weights)} value(s) but --loss_type has {len(cfg.loss_type)}; "
            "give one weight per loss type."
        )
    if cfg.rpo_alpha is not None and "sft" in cfg.loss_type:
        raise UserError(
            "--rpo_alpha adds an 'sft' term, but --loss_type already contains 'sft'; use one or the other "
            "(rpo_alpha=α is loss_type [..., sft] with loss_weights [..., α])."
        )
    if cfg.reference_free and cfg.precompute_ref_logps:
        raise UserError("--reference_free uses no reference model, so --precompute_ref_logps has nothing to compute.")
    if not cfg.beta > 0:
        raise UserError(f"--beta must be > 0 (got {cfg.beta}).")

    loss_types = {loss_type for loss_type, _ in resolved_losses(cfg)}
    if cfg.f_divergence_type not in F_DIVERGENCES:
        raise UserError(f"--f_divergence_type {cfg.f_divergence_type!r} is not one of: {', '.join(F_DIVERGENCES)}")
    # Like TRL, any value but reverse_kl is refused here (alpha_divergence with coef 1.0 included, although it
    # reduces to reverse_kl), because the other losses have no f-divergence generalisation.
    if cfg.f_divergence_type != "reverse_kl" and not loss_types <= F_DIVERGENCE_LOSS_TYPES:
        unsupported = sorted(loss_types - F_DIVERGENCE_LOSS_TYPES)
        raise UserError(
            f"--f_divergence_type {cfg.f_divergence_type} does not apply to loss type(s) {', '.join(unsupported)}; "
            f"it works only with {', '.join(sorted(F_DIVERGENCE_LOSS_TYPES))} (use reverse_kl with the others)."
        )

    smoothing = cfg.label_smoothing
    if not 0.0 <= smoothing <= 1.0:
        raise UserError(f"--label_smoothing is a probability and must lie in [0, 1] (got {smoothing}).")
    if "exo_pair" in loss_types and not 0.0 < smoothing < 1.0:
        raise UserError(
            f"--label_smoothing must be in (0, 1) for loss type exo_pair (got {smoothing}); the EXO paper uses 1e-3."
        )
    if "robust" in loss_types and not 0.0 <= smoothing < 0.5:
        raise UserError(
            f"--label_smoothing must be in [0, 0.5) for loss type robust (got {smoothing}): it is the probability "
            "that a label is flipped, and robust DPO divides by 1 - 2·label_smoothing."
        )
    if "sigmoid" in loss_types and smoothing > 0:
        warnings.warn(
            f"--label_smoothing {smoothing} with loss type sigmoid gives conservative DPO (as TRL <= 0.28); "
            "TRL 1.16 ignores label_smoothing for sigmoid, so its numbers will differ.",
            stacklevel=2,
        )

    if cfg.use_weighting and loss_types & {"aot", "aot_unpaired"}:
        raise UserError(
            "--use_weighting cannot be combined with loss type aot or aot_unpaired: those losses sort the pairs, "
            "so a per-pair weight would no longer belong to its pair."
        )
    if cfg.ld_alpha is not None and not 0.0 <= cfg.ld_alpha <= 1.0:
        raise UserError(f"--ld_alpha must lie in [0, 1] (got {cfg.ld_alpha}); 1.0 means no length desensitisation.")
    if "discopop" in loss_types and not cfg.discopop_tau > 0:
        raise UserError(f"--discopop_tau must be > 0 for loss type discopop (got {cfg.discopop_tau}).")


# ----------------------------------------------------------------------------------------------------------------
# Summed log-probs


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


# ----------------------------------------------------------------------------------------------------------------
# The pair losses


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
    """Per-pair loss of ONE loss type, from summed sequence log-probs.

    Args:
        chosen_logps: log π_θ(y_w|x), policy log-probs of the chosen completions. Shape: (B,)
        rejected_logps: log π_θ(y_l|x), policy log-probs of the rejected completions. Shape: (B,)
        ref_chosen_logps: log π_ref(y_w|x), reference log-probs of the chosen completions (zeros if reference-free).
            Shape: (B,)
        ref_rejected_logps: log π_ref(y_l|x), reference log-probs of the rejected completions. Shape: (B,)
        beta: β, the temperature of the implicit reward / strength of the pull toward the reference (IPO's τ).
            As β -> 0 the reference is ignored.
        loss_type: one of LOSS_TYPES except 'sft' (the NLL term needs per-token log-probs; see `dpo_loss`):
            sigmoid       DPO (Rafailov et al. 2023, Eq. 7): -log σ(βΔ), Δ = ρ_w - ρ_l, ρ = log π_θ/π_ref.
                          With label_smoothing ε > 0, conservative DPO (Mitchell 2023): the label is taken to be
                          flipped with probability ε, -(1-ε)·log σ(βΔ) - ε·log σ(-βΔ). (TRL 1.16 ignores ε here.)
            hinge         SLiC-HF (Zhao et al. 2023, §2) / RSO's hinge-norm: max(0, 1 - βΔ); 1/β is the margin.
            ipo           IPO (Azar et al. 2023, Eq. 17): (Δ̄ - 1/(2β))², Δ̄ = ρ_w/|y_w| - ρ_l/|y_l|, a squared loss
                          toward a finite margin (so it cannot overfit deterministic preferences); per-token
                          log-ratios as the IPO authors confirmed to TRL.
            exo_pair      EXO (Ji et al. 2024, Eq. 16): KL from the model's preference q = (σ(βΔ), σ(-βΔ)) to the
                          smoothed label (1-ε, ε). Needs 0 < ε < 1.
            nca_pair      NCA (Chen et al. 2024), pairwise case: -log σ(βρ_w) - ½ log σ(-βρ_w) - ½ log σ(-βρ_l);
                          it moves absolute likelihoods, not only their difference.
            robust        rDPO (Chowdhury et al. 2024, §3): unbiased under labels flipped with probability ε,
                          [(1-ε)·ℓ(βΔ) - ε·ℓ(-βΔ)] / (1 - 2ε), ℓ(z) = -log σ(z). Needs 0 <= ε < 0.5.
            bco_pair      BCO (Jung et al. 2024): binary classification, chosen -> 1 and rejected -> 0:
                          -log σ(βρ_w) - log σ(-βρ_l).
            sppo_hard     SPPO (Wu et al. 2024, Eq. 4.7) with hard win probabilities P = 1 / 0:
                          (ρ_w - 1/(2β))² + (ρ_l + 1/(2β))².
            aot           AOT (Melnyk et al. 2024, §3): distributional alignment by stochastic dominance; sort the
                          batch's policy margins log π_θ(y_w) - log π_θ(y_l) and, separately, the reference's, and
                          apply the (ε-smoothed) sigmoid loss to sorted_policy - sorted_ref, quantile by quantile.
            aot_unpaired  AOT for unpaired data: the same on sorted(ρ_w) - sorted(ρ_l).
            apo_zero      APO (D'Oosterlinck et al. 2024, Eq. 7): (1 - σ(βρ_w)) + σ(βρ_l); raise chosen, lower
                          rejected (the chosen answers are better than the model).
            apo_down      APO (Eq. 8): σ(βρ_w) + (1 - σ(β(ρ_w - ρ_l))); lower both, the rejected more (the model
                          is already better than the chosen answers).
            discopop      DiscoPOP (Lu et al. 2024, Eq. 5): (1 - m)·(-log σ(βΔ)) + m·exp(-βΔ), m = σ(βΔ/τ), a
                          blend of the logistic and exponential losses gated by the margin.
            sigmoid_norm  Length-normalised DPO (as in Tülu 3, Lambert et al. 2024): -log σ(βΔ̄), Δ̄ as for ipo.
        label_smoothing: ε, used by sigmoid (cDPO), robust, exo_pair, aot and aot_unpaired; ignored by the others.
        f_divergence_type, f_alpha_divergence_coef: f-DPO; ρ is replaced by f'(exp ρ) (`f_divergence_score`) in the
            losses that depend only on Δ (sigmoid, hinge, ipo, exo_pair, robust, discopop, sigmoid_norm).
        chosen_lengths, rejected_lengths: number of completion tokens, for ipo and sigmoid_norm. Shape: (B,)
        discopop_tau: τ of discopop.

    Returns:
        losses: the loss of each pair. Shape: (B,)
        chosen_rewards: β·ρ_w, the implicit reward, detached (always from the plain log-ratio). Shape: (B,)
        rejected_rewards: β·ρ_l, detached. Shape: (B,)
    """
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    chosen_scores = f_divergence_score(chosen_logratios, f_divergence_type, f_alpha_divergence_coef)
    rejected_scores = f_divergence_score(rejected_logratios, f_divergence_type, f_alpha_divergence_coef)
    margins = beta * (chosen_scores - rejected_scores)  # h = β·Δ
    smoothing = label_smoothing

    def smoothed_sigmoid_loss(logits: torch.Tensor) -> torch.Tensor:
        # -(1-ε)·log σ(z) - ε·log σ(-z): the logistic loss when the label is right with probability 1 - ε.
        return -F.logsigmoid(logits) * (1 - smoothing) - F.logsigmoid(-logits) * smoothing

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
        # KL(q || p) = q_w·(log q_w - log p_w) + q_l·(log q_l - log p_l), p = (1 - ε, ε).
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
        # Push the winner's log-ratio to +1/(2β) and the loser's to -1/(2β) (SPPO's η(P - 1/2), η = 1/β).
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


# ----------------------------------------------------------------------------------------------------------------
# The full loss of one micro-batch


@dataclass
class DPOOutput:
    loss: torch.Tensor  # scalar, with grad: Σ_k weight_k · mean over pairs of loss_k
    chosen_logps: torch.Tensor  # [B] summed (LD-weighted) policy log-probs, detached
    rejected_logps: torch.Tensor  # [B]
    chosen_rewards: torch.Tensor  # [B] β·(chosen_logps - ref_chosen_logps), detached
    rejected_rewards: torch.Tensor  # [B]
    nll_loss: torch.Tensor | None = None  # mean NLL of the chosen completion tokens (detached), when sft is in use
    # [B] each pair's share of the loss, detached: Σ_k weight_k · loss_k(pair); loss == pair_losses.mean() (up to
    # rounding). What evaluation averages over the pairs of all processes (nanodpo/dpo.py `dpo_pair_stats`).
    pair_losses: torch.Tensor | None = None


def chosen_nll(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The SFT term: -log π_θ averaged over every chosen completion token of the micro-batch (not per sequence)."""
    chosen_token_logps, _ = token_logps.chunk(2)
    chosen_mask, _ = mask.chunk(2)
    return -chosen_token_logps[chosen_mask.bool()].mean()


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


def dpo_loss(
    policy: TokenStats,
    completion_mask_shifted: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    cfg,
) -> DPOOutput:
    """The loss of one micro-batch laid out [chosen; rejected].

    policy: TokenStats over the 2B rows (per-token log-probs [2B, T-1] with grad; .mask is the shifted mask).
    completion_mask_shifted: [2B, T-1], 1 on scored completion tokens (= policy.mask).
    ref_chosen_logps, ref_rejected_logps: [B] summed reference log-probs (LD-weighted already if cfg.ld_alpha),
        or None with cfg.reference_free.
    cfg: a DPOConfig (beta, loss_type, loss_weights, label_smoothing, f_divergence_type, f_alpha_divergence_coef,
        ld_alpha, use_weighting, discopop_tau, rpo_alpha, reference_free).

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
        chosen_rewards=cfg.beta * (chosen_logps - ref_chosen_logps).detach(),
        rejected_rewards=cfg.beta * (rejected_logps - ref_rejected_logps).detach(),
        nll_loss=None if nll_loss is None else nll_loss.detach(),
        pair_losses=pair_losses.detach(),
    )


# ----------------------------------------------------------------------------------------------------------------
# Metrics


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of `values` over the tokens where mask is 1 (0.0 when there are none, as TRL logs)."""
    count = mask.sum().item()
    return values[mask.bool()].sum().item() / count if count > 0 else 0.0


@torch.no_grad()
def dpo_metrics(out: DPOOutput, policy: TokenStats, prefix: str = "") -> dict[str, float]:
    """TRL 1.16's logged values for one micro-batch (the logger then averages them over the logging interval)."""
    mask = policy.mask
    chosen_mask, rejected_mask = mask.chunk(2)
    metrics = {
        "rewards/chosen": out.chosen_rewards.mean().item(),
        "rewards/rejected": out.rejected_rewards.mean().item(),
        # strict >: a tie (e.g. step 1, policy == reference) is not counted as correct
        "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float().mean().item(),
        "rewards/margins": (out.chosen_rewards - out.rejected_rewards).mean().item(),
        "logps/chosen": out.chosen_logps.mean().item(),
        "logps/rejected": out.rejected_logps.mean().item(),
    }
    if policy.mean_logits is not None:
        chosen_mean_logits, rejected_mean_logits = policy.mean_logits.chunk(2)
        metrics["logits/chosen"] = _masked_mean(chosen_mean_logits, chosen_mask)
        metrics["logits/rejected"] = _masked_mean(rejected_mean_logits, rejected_mask)
    if policy.entropy is not None:
        metrics["entropy"] = _masked_mean(policy.entropy, mask)  # chosen and rejected tokens together
    if policy.is_top1 is not None:
        chosen_is_top1, _ = policy.is_top1.chunk(2)
        metrics["mean_token_accuracy"] = _masked_mean(chosen_is_top1.float(), chosen_mask)  # chosen tokens only
    if out.nll_loss is not None:
        metrics["nll_loss"] = out.nll_loss.item()
    return {prefix + name: value for name, value in metrics.items()}


# Over a set of pairs (a micro-batch, or all eval pairs of all processes): means over pairs, and token means whose
# numerator and denominator are both summed over the set (a pair with more tokens counts more).
PAIR_MEAN_METRICS = (
    "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
    "logps/rejected",
)  # fmt: skip
TOKEN_MEAN_METRICS = {  # metric -> which completion tokens it is averaged over
    "logits/chosen": ("tokens/chosen",),
    "logits/rejected": ("tokens/rejected",),
    "entropy": ("tokens/chosen", "tokens/rejected"),
    "mean_token_accuracy": ("tokens/chosen",),
    "nll_loss": ("tokens/chosen",),
}


@torch.no_grad()
def dpo_pair_stats(out: DPOOutput, policy: TokenStats) -> dict[str, torch.Tensor]:
    """Per-pair values, each [B], from which `pair_stats_metrics` computes `dpo_metrics`' metrics for any set of pairs.

    Pair metrics carry the pair's value; token metrics carry the pair's token SUM (and `tokens/*` the counts), so that
    concatenating the stats of several batches — e.g. `accelerator.gather_for_metrics` over all processes and eval
    batches, which also drops the copies padding the last batch — and reducing once gives the mean over all pairs and
    all tokens, whatever the batch size and the number of processes.
    """
    chosen_mask, rejected_mask = policy.mask.chunk(2)
    stats = {
        "loss": out.pair_losses,
        "rewards/chosen": out.chosen_rewards,
        "rewards/rejected": out.rejected_rewards,
        "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float(),
        "rewards/margins": out.chosen_rewards - out.rejected_rewards,
        "logps/chosen": out.chosen_logps,
        "logps/rejected": out.rejected_logps,
        "tokens/chosen": chosen_mask.sum(-1),
        "tokens/rejected": rejected_mask.sum(-1),
    }
    # token_stats zeroes every per-token value off the mask, so row sums are sums over the completion tokens.
    if policy.mean_logits is not None:
        chosen_mean_logits, rejected_mean_logits = policy.mean_logits.chunk(2)
        stats["logits/chosen"] = chosen_mean_logits.sum(-1)
        stats["logits/rejected"] = rejected_mean_logits.sum(-1)
    if policy.entropy is not None:
        chosen_entropy, rejected_entropy = policy.entropy.chunk(2)
        stats["entropy"] = chosen_entropy.sum(-1) + rejected_entropy.sum(-1)
    if policy.is_top1 is not None:
        stats["mean_token_accuracy"] = policy.is_top1.chunk(2)[0].float().sum(-1)
    if out.nll_loss is not None:
        stats["nll_loss"] = -(policy.logps.detach().chunk(2)[0] * chosen_mask).sum(-1)
    return {name: value.detach().float() for name, value in stats.items()}


def pair_stats_metrics(stats: dict[str, torch.Tensor], prefix: str = "") -> dict[str, float]:
    """Reduce (concatenated) `dpo_pair_stats` to metrics: means over pairs, token sums over token counts."""
    stats = {name: value.double() for name, value in stats.items()}
    num_pairs = stats["loss"].numel()
    metrics = {name: float(stats[name].sum() / max(num_pairs, 1)) for name in PAIR_MEAN_METRICS}
    for name, count_names in TOKEN_MEAN_METRICS.items():
        if name in stats:
            count = sum(float(stats[c].sum()) for c in count_names)
            metrics[name] = float(stats[name].sum()) / count if count > 0 else 0.0
    return {prefix + name: value for name, value in metrics.items()}
