"""The preference-loss family: every DPO loss type of TRL 1.16, and SimPO, CPO, ORPO and KTO beside them.

Each loss's equation and citation appear once, in the tables below, in one notation; the functions say which table
row they compute and the comments only say why.

Notation (all log-probs are of completion tokens only, summed, unless averaged as written)
=======================================================================================
    x, y_w, y_l     prompt, preferred ("chosen") and dispreferred ("rejected") completion; KTO: x, y and a label
    π_θ, π_ref      the policy being trained and the frozen reference (usually the SFT model)
    log π(y|x)      Σ over y's tokens of log π(y_t | x, y_<t)                                            [B]
    |y|             number of scored completion tokens
    ℓ(y)            log π_θ(y|x) / |y|: the average per-token log-prob (length-normalised)
    ρ(y)            log π_θ(y|x) - log π_ref(y|x): how much more likely than before; ρ_w = ρ(y_w), ρ_l = ρ(y_l)
    Δ, h            Δ = ρ_w - ρ_l (f-DPO: each ρ replaced by f'(e^ρ)); h = β·Δ
    r(y)            the reward each loss logs as `rewards/*`: β·ρ(y) (losses with π_ref), β·log π_θ(y|x) (cpo),
                    β·ℓ(y) (simpo, orpo)
    σ               the logistic function; -log σ(z) is the logistic loss of a "margin" z
    ε               --label_smoothing, the probability that a preference label is flipped
    NLL(y_w)        -mean over the tokens of the micro-batch's chosen completions of log π_θ (cpo, simpo, sft);
                    ORPO's (as TRL's) over every token of the chosen sequences, prompt included

Why DPO works (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward
Model"): the optimum of the KL-regularised RLHF objective E[r] - β·KL(π_θ || π_ref) is π*(y|x) ∝ π_ref(y|x)·e^{r/β},
so a policy defines the reward it is optimal for, r(x, y) = β·ρ(y) + β·log Z(x) (their Eq. 5). In the Bradley-Terry
likelihood σ(r_w - r_l) the intractable log Z(x) cancels: the reward model disappears and what is left is the
logistic loss of h (row `sigmoid` below). At step 1 the policy equals the reference, every ρ is 0, the loss is
log 2 ≈ 0.693 and `rewards/accuracies` (r_w > r_l, strictly) is 0.

Losses with a reference π_ref, on pairs (`--loss_type`, several summed with `--loss_weights`)
===========================================================================================
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
aot           (cDPO) sigmoid loss of β·(sort(m_θ) - sort(m_ref)), where     AOT, Melnyk et al. 2024 (§3)
              m = log π(y_w|x) - log π(y_l|x), sorted over the micro-batch
aot_unpaired  (cDPO) sigmoid loss of β·(sort(ρ_w) - sort(ρ_l))              AOT, Melnyk et al. 2024 (§3, unpaired)
apo_zero      (1 - σ(βρ_w)) + σ(βρ_l)                                       APO, D'Oosterlinck et al. 2024, Eq. 7
apo_down      σ(βρ_w) + (1 - σ(β(ρ_w - ρ_l)))                               APO, D'Oosterlinck et al. 2024, Eq. 8
discopop      (1-m)·(-log σ(h)) + m·exp(-h),  m = σ(h/τ)                    DiscoPOP, Lu et al. 2024, Eq. 5
sigmoid_norm  -log σ(β·(ρ_w/|y_w| - ρ_l/|y_l|))                             length-normalised DPO (Tülu 3, Lambert
                                                                            et al. 2024)
sft           NLL(y_w) (no pair loss)                                       the NLL term of RPO / MPO

The rest of the family (`--loss_type` alone; each equals its TRL 1.16 trainer)
============================================================================
loss_type     loss of a micro-batch                                         source / TRL trainer
------------  ------------------------------------------------------------  ------------------------------------------
simpo         mean[-log σ(β·(ℓ(y_w) - ℓ(y_l)) - γ)] + α·NLL(y_w)            SimPO, Meng et al. 2024, Eq. 6;
              (ε > 0: smoothed as cDPO)  no π_ref; γ = --simpo_gamma,       CPOTrainer(loss_type="simpo")
              α = --cpo_alpha (default 0)
cpo           mean[-log σ(β·(log π_θ(y_w|x) - log π_θ(y_l|x)))]             CPO, Xu et al. 2024 (§3: L_prefer +
              + α·NLL(y_w); (ε > 0: smoothed as cDPO)  no π_ref;            L_NLL); CPOTrainer(loss_type="sigmoid")
              α = --cpo_alpha (default 1)
orpo          NLL(y_w) - λ·mean[log σ(log odds(y_w) - log odds(y_l))],      ORPO, Hong et al. 2024, Eq. 4, 6, 7;
              odds(y) = e^ℓ(y) / (1 - e^ℓ(y)); no π_ref; λ = --beta         ORPOTrainer
kto           mean over rows of  λ_D·(1 - σ(β·(ρ(y) - z_ref)))  (y desirable) KTO, Ethayarajh et al. 2024, Eq. 7;
                            or   λ_U·(1 - σ(β·(z_ref - ρ(y))))  (undesirable) KTOTrainer(loss_type="kto")
              z_ref = max(0, mean over the micro-batch (and processes) of ρ(y'_i|x_i)), y'_i = y_{i-1}: the KL
              reference point, estimated on mismatched pairs, without gradient; λ_D, λ_U = --desirable_weight,
              --undesirable_weight

Modifiers (losses with π_ref only)
==================================
  --f_divergence_type  f-DPO (Wang et al. 2023, "Beyond Reverse KL"): replace each log-ratio ρ by f'(e^ρ) for the
                       regulariser's f (reverse KL gives back ρ). Only for the losses built on Δ alone
                       (F_DIVERGENCE_LOSS_TYPES): the leftover β·log Z(x) cancels only in the chosen - rejected
                       difference.
  --ld_alpha           LD-DPO (Liu et al. 2024, "Length Desensitization in DPO"): tokens past the shorter completion's
                       length count with weight α in the summed log-probs (policy and reference alike).
  --use_weighting      WPO (Zhou et al. 2024, Eq. 2): each pair's loss is multiplied by the policy's own
                       (detached) length-normalised probability of both completions.
  --rpo_alpha          RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization"): add α·NLL(y_w);
                       TRL 1.16 spells this `loss_type=[..., "sft"]`, `loss_weights=[..., α]`.
  --reference_free     take log π_ref = 0 (no reference model).

Batch layout: [chosen; rejected]
================================
One forward pass scores both completions: the B chosen sequences and the B rejected ones are stacked into one batch
of N = 2B rows, chosen first. Row i and row B + i are the two completions of pair i, so `tensor.chunk(2)` splits any
per-row tensor back into (chosen, rejected). KTO's batch has the same shape: its B rows (x_i, y_i) first, then the
B mismatched rows (x_i, y_{i-1}) that estimate z_ref (nanodpo/dpo_data.py `UnpairedCollator`).
A worked example with B = 2, β = 0.1 (loss type sigmoid):

    summed log-probs   policy    [-12.0,  -8.0,  -15.0,  -9.0]   -> chosen [-12.0, -8.0], rejected [-15.0, -9.0]
                       reference [-13.0,  -8.5,  -14.0,  -9.5]   -> chosen [-13.0, -8.5], rejected [-14.0, -9.5]
    log-ratios ρ       chosen [1.0, 0.5]      rejected [-1.0, 0.5]
    rewards β·ρ        chosen [0.1, 0.05]     rejected [-0.1, 0.05]     margins h [0.2, 0.0]
    per-pair loss      -log σ([0.2, 0.0]) = [0.5981, 0.6931]            loss = mean = 0.6456
    rewards/accuracies mean([0.1 > -0.1, 0.05 > 0.05]) = 0.5

Per-token inputs come from `nanodpo.logps.token_logps` (a TokenStats): [2B, T-1] log-probs of each label token, 0
off the (shifted) scored mask, so a row's sum over the completion mask is its completion's log-prob.

Differences from TRL 1.16 (everything else is tested equal to `DPOTrainer._compute_loss`, `CPOTrainer`,
`ORPOTrainer` and `KTOTrainer`):
  * `sigmoid` with label_smoothing > 0 is conservative DPO here (as in TRL <= 0.28 and the DPO authors' code);
    TRL 1.16 silently ignores label_smoothing for `sigmoid`.
  * `rpo_alpha` and `reference_free` were removed from TRL at 0.29; nanodpo keeps them (see above).
  * `sft` together with `use_weighting` crashes in TRL 1.16 (an in-place multiply on an expanded tensor); here the
    NLL term is weighted like every other term: NLL × mean over pairs of the WPO weights.
  * `ipo` / `sigmoid_norm` divide by the number of scored completion tokens (the shifted mask, as simpo and orpo
    do in TRL too). TRL's DPOTrainer counts the unshifted completion mask; the two agree unless a completion starts
    at position 0 (empty prompt), where that first token has no prediction and so no log-prob.
  * cpo / simpo log `nll_loss` even with --cpo_alpha 0 (TRL logs 0 there), and every family loss logs `logits/*`
    as DPO does, the mean over completion tokens (TRL's CPO/ORPO trainers average the logits over every position,
    prompt and padding included).
  * kto: the mismatched completions are formed inside each micro-batch when it is collated, so any data order works
    (TRL forms them once in dataset order and so requires sequential sampling; with it the two agree). For
    evaluation they are formed inside each eval batch (TRL: chunks of the TRAIN batch size).
"""

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nanodpo.config import DPOConfig
from nanodpo.errors import UserError
from nanodpo.token_stats import TokenStats

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

# The rest of the family: each is a whole loss of its own (`--loss_type` alone, no --loss_weights), equal to its TRL
# trainer. simpo, cpo and orpo need no reference model; kto trains on unpaired rows.
FAMILY_LOSS_TYPES: tuple[str, ...] = ("simpo", "cpo", "orpo", "kto")
REFERENCE_FREE_LOSS_TYPES = frozenset({"simpo", "cpo", "orpo"})
# Their length normalisation: simpo and orpo score a completion by its average token log-prob ℓ(y).
AVERAGED_LOGPS_LOSS_TYPES = frozenset({"simpo", "orpo"})

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
    known = LOSS_TYPES + FAMILY_LOSS_TYPES
    if not cfg.loss_type:
        raise UserError("--loss_type is empty; give at least one of: " + ", ".join(known))
    for loss_type in cfg.loss_type:
        if loss_type not in known:
            raise UserError(f"--loss_type {loss_type!r} is not one of: {', '.join(known)}")
    if set(cfg.loss_type) & set(FAMILY_LOSS_TYPES):
        check_family_options(cfg)
        return
    for name, default in DPO_FAMILY_DEFAULTS.items():
        if getattr(cfg, name, default) != default:
            raise UserError(f"--{name} applies to the family losses (simpo, cpo, orpo, kto), not to --loss_type "
                            f"{' '.join(cfg.loss_type)}")
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


# The family's options and their defaults (nanodpo/config.py): any other value with a DPO loss type is refused.
DPO_FAMILY_DEFAULTS = {
    name: DPOConfig.__dataclass_fields__[name].default
    for name in ("simpo_gamma", "cpo_alpha", "desirable_weight", "undesirable_weight", "unpair_preference_data")
}


def check_family_options(cfg) -> None:
    """simpo, cpo, orpo and kto are whole losses: alone in --loss_type, without the DPO-only modifiers."""
    loss_type = cfg.loss_type[0]
    if len(cfg.loss_type) > 1:
        raise UserError(
            f"--loss_type {' '.join(cfg.loss_type)}: {', '.join(t for t in cfg.loss_type if t in FAMILY_LOSS_TYPES)} "
            "is a whole loss of its own and cannot be summed with other loss types; give it alone"
        )
    if not cfg.beta > 0:
        raise UserError(f"--beta must be > 0 (got {cfg.beta}).")
    dpo_only = {
        "loss_weights": cfg.loss_weights is not None,
        "rpo_alpha": cfg.rpo_alpha is not None,
        "reference_free": cfg.reference_free,
        "f_divergence_type": cfg.f_divergence_type != "reverse_kl",
        "ld_alpha": cfg.ld_alpha is not None,
        "use_weighting": cfg.use_weighting,
    }
    hints = {"rpo_alpha": " (cpo and simpo add the NLL term with --cpo_alpha; orpo always has it)",
             "reference_free": " (simpo, cpo and orpo use no reference anyway; kto needs one)"}  # fmt: skip
    for flag, is_set in dpo_only.items():
        if is_set:
            hint = hints.get(flag, "")
            raise UserError(f"--{flag} applies to the DPO loss types, not to --loss_type {loss_type}{hint}")
    if cfg.precompute_ref_logps:
        why = (
            "uses no reference model, so there is nothing to precompute"
            if loss_type in REFERENCE_FREE_LOSS_TYPES
            else "compares each row with its micro-batch's mismatched rows, which change with the batch; the "
            "reference log-probs are computed on the fly (a LoRA adapter disabled, or a frozen copy)"
        )
        raise UserError(f"--precompute_ref_logps: loss type {loss_type} {why}")
    if not 0.0 <= cfg.label_smoothing < 0.5:
        raise UserError(f"--label_smoothing must lie in [0, 0.5) (got {cfg.label_smoothing}).")
    if cfg.label_smoothing > 0 and loss_type not in ("simpo", "cpo"):
        raise UserError(f"--label_smoothing applies to simpo and cpo only, not to --loss_type {loss_type}")
    if loss_type not in ("simpo", "cpo"):
        for name in ("simpo_gamma", "cpo_alpha"):
            if getattr(cfg, name) != DPO_FAMILY_DEFAULTS[name]:
                raise UserError(f"--{name} applies to simpo and cpo only, not to --loss_type {loss_type}")
    if loss_type == "cpo" and cfg.simpo_gamma != DPO_FAMILY_DEFAULTS["simpo_gamma"]:
        raise UserError("--simpo_gamma applies to simpo only, not to --loss_type cpo")
    if loss_type == "kto":  # (the ranges of --simpo_gamma, --cpo_alpha and the kto weights: nanodpo/config.py)
        for flag in ("per_device_train_batch_size", "per_device_eval_batch_size"):
            if getattr(cfg, flag) < 2:
                raise UserError(
                    f"--{flag} {getattr(cfg, flag)} is too small for kto: its KL reference point is estimated from "
                    "the other rows of each micro-batch (row i's prompt with row i-1's completion), so a micro-batch "
                    "needs at least 2 rows"
                )
        if cfg.max_tokens_per_batch is not None:
            raise UserError(
                "--max_tokens_per_batch is not supported with kto: a micro-batch filled to a token budget may hold "
                "a single row, too few to estimate the KL reference point; use --per_device_train_batch_size"
            )
    else:
        for name in ("desirable_weight", "undesirable_weight", "unpair_preference_data"):
            if getattr(cfg, name) != DPO_FAMILY_DEFAULTS[name]:
                raise UserError(f"--{name} applies to kto only, not to --loss_type {loss_type}")


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


# ----------------------------------------------------------------------------------------------------------------
# The rest of the family (the second table): SimPO, CPO, ORPO without a reference, KTO on unpaired rows


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


def kto_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    kl: torch.Tensor,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row `kto`. chosen_*: log π_θ, log π_ref of the desirable rows' completions, (B_w,); rejected_*: of the
    undesirable rows, (B_l,) (either may be empty); kl: z_ref, a scalar without gradient (`kto_reference_point`).
    Returns (losses (B_w + B_l,), desirable rows first, each times its λ; chosen_rewards (B_w,); rejected_rewards
    (B_l,)), rewards r = β·ρ, detached."""
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    chosen_losses = 1 - torch.sigmoid(beta * (chosen_logratios - kl))
    rejected_losses = 1 - torch.sigmoid(beta * (kl - rejected_logratios))
    losses = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses), 0)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


@torch.no_grad()
def kto_reference_point(mismatched_logps: torch.Tensor, ref_mismatched_logps: torch.Tensor, mean_over_processes=None):
    """z_ref of row `kto`: the mean log-ratio of the micro-batch's mismatched rows (x_i, y_{i-1}) — an estimate of
    KL(π_θ || π_ref) that the loss does not differentiate — averaged over all processes, then floored at 0 (a KL
    divergence is never negative; a noisy estimate can be). `mean_over_processes`: a callable on a 0-d tensor."""
    kl = (mismatched_logps - ref_mismatched_logps).mean()
    if mean_over_processes is not None:
        kl = mean_over_processes(kl)
    return kl.clamp(min=0)


# ----------------------------------------------------------------------------------------------------------------
# The full loss of one micro-batch


@dataclass
class DPOOutput:
    loss: torch.Tensor  # scalar, with grad: Σ_k weight_k · mean over pairs of loss_k (+ the NLL term of the family)
    chosen_logps: torch.Tensor  # [B] policy log-probs (summed, LD-weighted; simpo/orpo: averaged ℓ), detached
    rejected_logps: torch.Tensor  # [B]
    chosen_rewards: torch.Tensor  # [B] r(y_w) (see the notation), detached
    rejected_rewards: torch.Tensor  # [B]
    mask: torch.Tensor | None = None  # [2B, T-1] the shifted completion mask the metrics average over
    nll_loss: torch.Tensor | None = None  # NLL(y_w), detached, when the loss has an NLL term (sft, cpo, simpo, orpo)
    nll_mask: torch.Tensor | None = None  # [B, T-1] the chosen tokens NLL(y_w) averages over
    log_odds: torch.Tensor | None = None  # [B] orpo: log odds(y_w) - log odds(y_l), detached
    # [B] each pair's share of the loss, detached: Σ_k weight_k · loss_k(pair); loss == pair_losses.mean() (up to
    # rounding). What evaluation averages over the pairs of all processes (nanodpo/dpo.py `dpo_pair_stats`).
    pair_losses: torch.Tensor | None = None


def chosen_nll(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """NLL(y_w): -log π_θ averaged over every chosen token of the micro-batch where `mask` is 1 (not per sequence)."""
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


def family_loss_type(cfg) -> str | None:
    """The family loss (simpo, cpo, orpo, kto) the config selects, or None for the DPO losses."""
    return cfg.loss_type[0] if len(cfg.loss_type) == 1 and cfg.loss_type[0] in FAMILY_LOSS_TYPES else None


def needs_reference(cfg) -> bool:
    """Whether the loss reads log π_ref at all (the reference-free family and --reference_free do not)."""
    return not (cfg.reference_free or family_loss_type(cfg) in REFERENCE_FREE_LOSS_TYPES)


def resolved_cpo_alpha(cfg) -> float:
    """--cpo_alpha, or its default for the loss: 1.0 for cpo (TRL's CPOConfig), 0.0 for simpo (the SimPO paper has
    no NLL term)."""
    if cfg.cpo_alpha is not None:
        return float(cfg.cpo_alpha)
    return 1.0 if family_loss_type(cfg) == "cpo" else 0.0


def reference_free_loss(policy: TokenStats, completion_mask_shifted: torch.Tensor, cfg) -> DPOOutput:
    """simpo, cpo or orpo on one micro-batch laid out [chosen; rejected] (no reference log-probs).

    policy.mask is the completion mask, except for orpo, whose NLL(y_w) also scores the chosen prompt tokens (TRL's
    ORPOTrainer does): there policy.mask is 1 on every token of the chosen sequences (nanodpo/dpo_data.py
    `with_chosen_prompt_scored`). completion_mask_shifted: [2B, T-1], 1 on scored completion tokens.
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


def dpo_loss(
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

    loss = Σ_k weight_k · mean_over_pairs(loss_k · wpo_weight), the mean over this micro-batch's pairs; simpo, cpo
    and orpo: see `reference_free_loss`.
    """
    if family_loss_type(cfg) in REFERENCE_FREE_LOSS_TYPES:
        return reference_free_loss(policy, completion_mask_shifted, cfg)
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
    # The rewards β·ρ are the same for every pair loss; with `sft` alone, there is none to return them.
    chosen_rewards = cfg.beta * (chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = cfg.beta * (rejected_logps - ref_rejected_logps).detach()
    for loss_type, weight in resolved_losses(cfg):
        if loss_type == "sft":
            nll_loss = chosen_nll(policy.logps, mask)
            per_pair = nll_loss.expand(chosen_logps.shape[0])  # the same value for every pair
        else:
            per_pair, chosen_rewards, rejected_rewards = preference_loss(
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


@dataclass
class KTOOutput:
    loss: torch.Tensor  # scalar, with grad: the mean over the micro-batch's rows of their (λ-weighted) losses
    row_losses: torch.Tensor  # [B] each row's weighted loss, detached, in row order
    logps: torch.Tensor  # [B] summed policy log-probs of each row's completion, detached
    rewards: torch.Tensor  # [B] r(y) = β·ρ(y), detached
    labels: torch.Tensor  # [B] bool: True = desirable
    kl: torch.Tensor  # scalar z_ref (no gradient)
    mask: torch.Tensor  # [B, T-1] the rows' shifted completion masks


def kto_micro_batch_loss(
    policy: TokenStats,
    completion_mask_shifted: torch.Tensor,
    ref_logps: torch.Tensor,
    ref_mismatched_logps: torch.Tensor,
    labels: torch.Tensor,
    cfg,
    mean_over_processes=None,
) -> KTOOutput:
    """kto on one micro-batch laid out [rows; mismatched rows] (nanodpo/dpo_data.py `UnpairedCollator`).

    policy: TokenStats over the 2B rows; completion_mask_shifted: [2B, T-1]; ref_logps, ref_mismatched_logps: [B]
    summed reference log-probs of the two halves; labels: [B] bool; cfg: beta, desirable_weight, undesirable_weight.
    mean_over_processes: averages z_ref over the processes (TRL gathers it), None in one process.
    """
    mask = completion_mask_shifted
    logps, mismatched_logps = completion_logps(policy.logps, mask).chunk(2)
    ref_logps, ref_mismatched_logps = ref_logps.to(logps), ref_mismatched_logps.to(logps)
    kl = kto_reference_point(mismatched_logps, ref_mismatched_logps, mean_over_processes)
    desirable = labels.bool().to(logps.device)
    losses, chosen_rewards, rejected_rewards = kto_loss(
        logps[desirable], logps[~desirable], ref_logps[desirable], ref_logps[~desirable], kl,
        beta=cfg.beta, desirable_weight=cfg.desirable_weight, undesirable_weight=cfg.undesirable_weight,
    )  # fmt: skip
    num_desirable = int(desirable.sum())
    row_losses = torch.empty_like(logps)
    row_losses[desirable], row_losses[~desirable] = losses[:num_desirable].detach(), losses[num_desirable:].detach()
    rewards = torch.empty_like(logps)
    rewards[desirable], rewards[~desirable] = chosen_rewards, rejected_rewards
    return KTOOutput(
        loss=losses.mean(), row_losses=row_losses, logps=logps.detach(), rewards=rewards, labels=desirable, kl=kl,
        mask=mask.chunk(2)[0],
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Metrics


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of `values` over the tokens where mask is 1 (0.0 when there are none, as TRL logs)."""
    count = mask.sum().item()
    return values[mask.bool()].sum().item() / count if count > 0 else 0.0


@torch.no_grad()
def dpo_metrics(out: DPOOutput, policy: TokenStats, prefix: str = "") -> dict[str, float]:
    """TRL 1.16's logged values for one micro-batch (the logger then averages them over the logging interval)."""
    mask = out.mask if out.mask is not None else policy.mask
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
    if out.log_odds is not None:  # TRL's ORPO names: the mean of log σ(log odds ratio), and of the log odds ratio
        metrics["log_odds_ratio"] = F.logsigmoid(out.log_odds).mean().item()
        metrics["log_odds_chosen"] = out.log_odds.mean().item()
    return {prefix + name: value for name, value in metrics.items()}


# Over a set of pairs (a micro-batch, or all eval pairs of all processes): means over pairs, and token means whose
# numerator and denominator are both summed over the set (a pair with more tokens counts more).
PAIR_MEAN_METRICS = (
    "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
    "logps/rejected", "log_odds_ratio", "log_odds_chosen",
)  # fmt: skip
TOKEN_MEAN_METRICS = {  # metric -> which tokens it is averaged over
    "logits/chosen": ("tokens/chosen",),
    "logits/rejected": ("tokens/rejected",),
    "entropy": ("tokens/chosen", "tokens/rejected"),
    "mean_token_accuracy": ("tokens/chosen",),
    "nll_loss": ("tokens/nll",),
}


@torch.no_grad()
def dpo_pair_stats(out: DPOOutput, policy: TokenStats) -> dict[str, torch.Tensor]:
    """Per-pair values, each [B], from which `pair_stats_metrics` computes `dpo_metrics`' metrics for any set of pairs.

    Pair metrics carry the pair's value; token metrics carry the pair's token SUM (and `tokens/*` the counts), so that
    concatenating the stats of several batches — e.g. `accelerator.gather_for_metrics` over all processes and eval
    batches, which also drops the copies padding the last batch — and reducing once gives the mean over all pairs and
    all tokens, whatever the batch size and the number of processes.
    """
    mask = out.mask if out.mask is not None else policy.mask
    chosen_mask, rejected_mask = mask.chunk(2)
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
    # Sums over the completion tokens (orpo's policy stats also cover the chosen prompt, hence the mask).
    if policy.mean_logits is not None:
        chosen_mean_logits, rejected_mean_logits = (policy.mean_logits * mask).chunk(2)
        stats["logits/chosen"] = chosen_mean_logits.sum(-1)
        stats["logits/rejected"] = rejected_mean_logits.sum(-1)
    if policy.entropy is not None:
        stats["entropy"] = (policy.entropy * mask).sum(-1).view(2, -1).sum(0)
    if policy.is_top1 is not None:
        stats["mean_token_accuracy"] = (policy.is_top1 * mask).chunk(2)[0].float().sum(-1)
    if out.nll_loss is not None:
        stats["nll_loss"] = -(policy.logps.detach().chunk(2)[0] * out.nll_mask).sum(-1)
        stats["tokens/nll"] = out.nll_mask.sum(-1)
    if out.log_odds is not None:
        stats["log_odds_ratio"] = F.logsigmoid(out.log_odds)
        stats["log_odds_chosen"] = out.log_odds
    return {name: value.detach().float() for name, value in stats.items()}


def pair_stats_metrics(stats: dict[str, torch.Tensor], prefix: str = "") -> dict[str, float]:
    """Reduce (concatenated) `dpo_pair_stats` to metrics: means over pairs, token sums over token counts."""
    stats = {name: value.double() for name, value in stats.items()}
    num_pairs = stats["loss"].numel()
    metrics = {name: float(stats[name].sum() / max(num_pairs, 1)) for name in PAIR_MEAN_METRICS if name in stats}
    for name, count_names in TOKEN_MEAN_METRICS.items():
        if name in stats:
            count = sum(float(stats[c].sum()) for c in count_names)
            metrics[name] = float(stats[name].sum()) / count if count > 0 else 0.0
    return {prefix + name: value for name, value in metrics.items()}


# ----------------------------------------------------------------------------------------------------------------
# KTO metrics: TRL's KTOTrainer divides sums over the rows present (desirable or undesirable, on all processes) by
# their count, and logs a value only when there is such a row.


@torch.no_grad()
def kto_row_stats(out: KTOOutput, policy: TokenStats) -> dict[str, torch.Tensor]:
    """Per-row values, each [B]: the row's loss, z_ref, label, reward, log-prob, and its completion tokens' sums of
    the vocabulary-mean logit and entropy with their count. Concatenated over micro-batches and processes, they
    reduce (`kto_stats_metrics`) to TRL's metrics over every row present."""
    mask = out.mask
    stats = {
        "loss": out.row_losses, "kl": out.kl.expand_as(out.logps), "label": out.labels.float(),
        "rewards": out.rewards, "logps": out.logps, "tokens": mask.sum(-1),
    }  # fmt: skip
    if policy.mean_logits is not None:
        stats["logits"] = (policy.mean_logits.chunk(2)[0] * mask).sum(-1)
    if policy.entropy is not None:
        stats["entropy"] = (policy.entropy.chunk(2)[0] * mask).sum(-1)
    return {name: value.detach().float() for name, value in stats.items()}


def kto_stats_metrics(stats: dict[str, torch.Tensor], prefix: str = "") -> dict[str, float]:
    """Reduce (concatenated) `kto_row_stats`: loss and kl are means over rows; rewards/logps/logits of the
    desirable ("chosen") and undesirable ("rejected") rows over those rows (absent when there are none)."""
    stats = {name: value.double() for name, value in stats.items()}
    metrics = {"loss": float(stats["loss"].mean()), "kl": float(stats["kl"].mean())}
    desirable = stats["label"].bool()
    for side, rows in (("chosen", desirable), ("rejected", ~desirable)):
        if rows.any():
            metrics[f"rewards/{side}"] = float(stats["rewards"][rows].mean())
            metrics[f"logps/{side}"] = float(stats["logps"][rows].mean())
            tokens = float(stats["tokens"][rows].sum())
            if "logits" in stats and tokens > 0:
                metrics[f"logits/{side}"] = float(stats["logits"][rows].sum()) / tokens
    if "rewards/chosen" in metrics and "rewards/rejected" in metrics:
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    if "entropy" in stats:
        tokens = float(stats["tokens"].sum())
        metrics["entropy"] = float(stats["entropy"].sum()) / tokens if tokens > 0 else 0.0
    return {prefix + name: value for name, value in metrics.items()}


@torch.no_grad()
def kto_metrics(out: KTOOutput, policy: TokenStats) -> dict[str, float]:
    """One micro-batch's KTO values as sums and counts (`kto_row_stats` summed over the rows, per label), so that
    `combine_process_metrics` can reduce the micro-batches of all processes as TRL does."""
    stats = kto_row_stats(out, policy)
    desirable = out.labels
    sums = {"kl": float(out.kl), "rows/chosen": float(desirable.sum()), "rows/rejected": float((~desirable).sum())}
    for name in ("rewards", "logps", "logits", "tokens"):
        if name in stats:
            sums[f"sum/{name}/chosen"] = float(stats[name][desirable].sum())
            sums[f"sum/{name}/rejected"] = float(stats[name][~desirable].sum())
    if "entropy" in stats:
        sums["sum/entropy"] = float(stats["entropy"].sum())
    return sums


def combine_process_metrics(cfg, per_process: list[dict[str, float]]) -> list[dict[str, float]]:
    """The metric records one micro-batch step adds to the logged means, from every process's metrics of it.

    DPO and the reference-free losses: one record per process (each a mean over its own pairs, all equal-sized).
    kto: ONE record, as TRL logs it: sums over the rows of all processes divided by their counts (a value only when
    such a row is present), z_ref (the same on every process), the mean of the processes' losses.
    """
    if family_loss_type(cfg) != "kto":
        return per_process
    total = {name: sum(p[name] for p in per_process) for name in per_process[0]}
    record = {"loss": total["loss"] / len(per_process), "kl": per_process[0]["kl"]}
    for side in ("chosen", "rejected"):
        rows = total[f"rows/{side}"]
        if rows > 0:
            record[f"rewards/{side}"] = total[f"sum/rewards/{side}"] / rows
            record[f"logps/{side}"] = total[f"sum/logps/{side}"] / rows
            if total.get(f"sum/tokens/{side}", 0) > 0 and f"sum/logits/{side}" in total:
                record[f"logits/{side}"] = total[f"sum/logits/{side}"] / total[f"sum/tokens/{side}"]
    if "rewards/chosen" in record and "rewards/rejected" in record:
        record["rewards/margins"] = record["rewards/chosen"] - record["rewards/rejected"]
    if "sum/entropy" in total:
        tokens = total["sum/tokens/chosen"] + total["sum/tokens/rejected"]
        record["entropy"] = total["sum/entropy"] / tokens if tokens > 0 else 0.0
    for name in total:  # anything else (padding_fraction): the mean over processes
        if name not in record and not name.startswith(("sum/", "rows/")):
            record[name] = total[name] / len(per_process)
    return [record]


# ----------------------------------------------------------------------------------------------------------------
# What the loop calls, whatever the loss


def micro_batch_metrics(out: "DPOOutput | KTOOutput", policy: TokenStats) -> dict[str, float]:
    """This process's logged values of one micro-batch: `dpo_metrics`, or kto's sums and counts (`kto_metrics`,
    reduced over the processes by `combine_process_metrics`)."""
    return kto_metrics(out, policy) if isinstance(out, KTOOutput) else dpo_metrics(out, policy)


def eval_stats(out: "DPOOutput | KTOOutput", policy: TokenStats) -> dict[str, torch.Tensor]:
    """Per-pair (`dpo_pair_stats`) or, for kto, per-row (`kto_row_stats`) values to gather over an eval set."""
    return kto_row_stats(out, policy) if isinstance(out, KTOOutput) else dpo_pair_stats(out, policy)


def eval_metrics(stats: dict[str, torch.Tensor], prefix: str = "eval_") -> dict[str, float]:
    """The gathered `eval_stats` of a whole eval set reduced to its metrics."""
    return kto_stats_metrics(stats, prefix) if "label" in stats else pair_stats_metrics(stats, prefix)
