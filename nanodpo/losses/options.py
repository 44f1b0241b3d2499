"""The preference options, checked before anything loads: each invalid or TRL-refused combination is refused with
one sentence naming the flag. And the questions the setup asks of them: which family loss, which terms, whether the
loss reads a reference at all."""

import dataclasses
import warnings

from nanodpo.errors import UserError

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


def family_loss_type(cfg) -> str | None:
    """The family loss (simpo, cpo, orpo, kto) the config selects, or None for the DPO losses."""
    return cfg.loss_type[0] if len(cfg.loss_type) == 1 and cfg.loss_type[0] in FAMILY_LOSS_TYPES else None


def needs_reference(cfg) -> bool:
    """Whether the loss reads log π_ref at all (the reference-free family and --reference_free do not)."""
    return not (cfg.reference_free or family_loss_type(cfg) in REFERENCE_FREE_LOSS_TYPES)


def resolved_losses(cfg) -> list[tuple[str, float]]:
    """The (loss_type, weight) terms summed into the loss: --loss_type with --loss_weights (default 1.0 each), plus
    ("sft", rpo_alpha) when --rpo_alpha is set (RPO = the preference loss + α·NLL of the chosen completion)."""
    weights = cfg.loss_weights if cfg.loss_weights is not None else [1.0] * len(cfg.loss_type)
    terms = [(loss_type, float(weight)) for loss_type, weight in zip(cfg.loss_type, weights, strict=True)]
    if cfg.rpo_alpha is not None:
        terms.append(("sft", float(cfg.rpo_alpha)))
    return terms


def resolved_cpo_alpha(cfg) -> float:
    """--cpo_alpha, or its default for the loss: 1.0 for cpo (TRL's CPOConfig), 0.0 for simpo (the SimPO paper has
    no NLL term)."""
    if cfg.cpo_alpha is not None:
        return float(cfg.cpo_alpha)
    return 1.0 if family_loss_type(cfg) == "cpo" else 0.0


def check_dpo_options(cfg) -> None:
    """Refuse option combinations that are invalid (or that TRL refuses), each with one sentence naming the flag."""
    known = LOSS_TYPES + FAMILY_LOSS_TYPES
    if not cfg.loss_type:
        raise UserError("--loss_type is empty; give at least one of: " + ", ".join(known))
    for loss_type in cfg.loss_type:
        if loss_type not in known:
            raise UserError(f"--loss_type {loss_type!r} is not one of: {', '.join(known)}")
    check_online_options(cfg)
    if set(cfg.loss_type) & set(FAMILY_LOSS_TYPES):
        check_family_options(cfg)
        return
    for name in FAMILY_OPTIONS:
        if getattr(cfg, name) != option_default(cfg, name):
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


# The family's options: any value but their default with a DPO loss type is refused.
FAMILY_OPTIONS = ("simpo_gamma", "cpo_alpha", "desirable_weight", "undesirable_weight", "unpair_preference_data")


def option_default(cfg, name: str):
    """The default of option `name` in cfg's dataclass (nanodpo/config.py), read without importing it."""
    option = type(cfg).__dataclass_fields__[name]
    return option.default_factory() if option.default is dataclasses.MISSING else option.default


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
    if cfg.precompute_ref_logps and loss_type in REFERENCE_FREE_LOSS_TYPES:
        raise UserError(f"--precompute_ref_logps: loss type {loss_type} uses no reference model, so there is nothing "
                        "to precompute")  # fmt: skip
    cuts_prompt = cfg.truncation_mode != "keep_start" or cfg.max_prompt_length is not None
    if loss_type in REFERENCE_FREE_LOSS_TYPES and cuts_prompt:
        flag = "--max_prompt_length" if cfg.max_prompt_length is not None else "--truncation_mode keep_end"
        raise UserError(f"{flag} does not apply to --loss_type {loss_type}: as TRL's CPOTrainer and ORPOTrainer, it "
                        "keeps the prompt whole and cuts the completion to --max_length")  # fmt: skip
    if not 0.0 <= cfg.label_smoothing < 0.5:
        raise UserError(f"--label_smoothing must lie in [0, 0.5) (got {cfg.label_smoothing}).")
    if cfg.label_smoothing > 0 and loss_type not in ("simpo", "cpo"):
        raise UserError(f"--label_smoothing applies to simpo and cpo only, not to --loss_type {loss_type}")
    if loss_type not in ("simpo", "cpo"):
        for name in ("simpo_gamma", "cpo_alpha"):
            if getattr(cfg, name) != option_default(cfg, name):
                raise UserError(f"--{name} applies to simpo and cpo only, not to --loss_type {loss_type}")
    if loss_type == "cpo" and cfg.simpo_gamma != option_default(cfg, "simpo_gamma"):
        raise UserError("--simpo_gamma applies to simpo only, not to --loss_type cpo")
    if loss_type == "kto":  # (the ranges of --simpo_gamma, --cpo_alpha and the kto weights: nanodpo/config.py)
        if cfg.per_device_train_batch_size < 2:
            raise UserError(
                f"--per_device_train_batch_size {cfg.per_device_train_batch_size} is too small for kto: its KL "
                "reference point is estimated on mismatched rows, row i's prompt with row i-1's completion in each "
                "block of that many rows (as TRL's KTOTrainer forms them), so with 1 every row would be its own"
            )
        if cfg.max_tokens_per_batch is not None:
            raise UserError(
                "--max_tokens_per_batch is not supported with kto: a micro-batch filled to a token budget may hold "
                "a single row, too few to estimate the KL reference point; use --per_device_train_batch_size"
            )
    else:
        for name in ("desirable_weight", "undesirable_weight", "unpair_preference_data"):
            if getattr(cfg, name) != option_default(cfg, name):
                raise UserError(f"--{name} applies to kto only, not to --loss_type {loss_type}")


# Options of online DPO (nanodpo/online.py): any value but their default without --online is refused.
ONLINE_OPTIONS = ("reward_model", "judge", "reward_weights", "max_new_tokens", "temperature", "top_p",
                  "missing_eos_penalty", "log_samples")  # fmt: skip
# What IPO is online: TRL's OnlineDPOTrainer squares the summed log-ratios, (ρ_w − ρ_l − 1/2β)², where its DPOTrainer
# (and nanodpo's offline ipo) divides each ρ by its token count; so online ipo takes none of the per-pair modifiers.
ONLINE_IPO_EXCLUDES = ("loss_weights", "rpo_alpha", "ld_alpha", "use_weighting", "f_divergence_type")


def check_online_options(cfg) -> None:
    """--online: a judge, a loss that compares two answers against a reference, room for an answer; and no option of
    online DPO without --online."""
    if not getattr(cfg, "online", False):
        for name in ONLINE_OPTIONS:
            if getattr(cfg, name) != option_default(cfg, name):
                raise UserError(f"--{name} applies to online DPO: add --online (prompts only; answers are sampled)")
        return
    judges = len(cfg.reward_model) + len(cfg.judge)
    if judges == 0:
        raise UserError(
            "--online needs a judge to rank the sampled answers: --reward_model PATH (a sequence-classification "
            "model) and/or --judge module:function (e.g. nanodpo.demo.judge:politeness)"
        )
    if cfg.reward_weights is not None and len(cfg.reward_weights) != judges:
        raise UserError(
            f"--reward_weights has {len(cfg.reward_weights)} value(s) but there are {judges} judge(s) "
            "(--reward_model ones first, then --judge); give one weight per judge"
        )
    for spec in cfg.judge:
        module, _, function = spec.rpartition(":")
        if not module or not function.isidentifier():
            raise UserError(f"--judge {spec!r}: expected module:function (e.g. nanodpo.demo.judge:politeness)")
    if family_loss_type(cfg) is not None:
        raise UserError(
            f"--online trains with the DPO losses on sampled pairs; --loss_type {cfg.loss_type[0]} is not one "
            "(online DPO: sigmoid, ipo, or another pair loss with a reference)"
        )
    refused = {
        "precompute_ref_logps": "the pairs are new every step, so there is nothing to precompute",
        "reference_free": "online DPO's loss and its objective/kl need the reference",
        "max_tokens_per_batch": "the answers' lengths are known only once sampled; use --per_device_train_batch_size",
    }
    for name, why in refused.items():
        if getattr(cfg, name):
            raise UserError(f"--{name} with --online: {why}")
    if "ipo" in cfg.loss_type:
        modifiers = [name for name in ONLINE_IPO_EXCLUDES if getattr(cfg, name) != option_default(cfg, name)]
        if len(cfg.loss_type) > 1 or modifiers:
            raise UserError(
                f"--online --loss_type ipo is TRL OnlineDPOTrainer's IPO (summed log-ratios), alone and plain; drop "
                f"{', '.join(modifiers) or 'the other loss types'}"
            )
    if cfg.max_length is not None and cfg.max_length - cfg.max_new_tokens < 1:
        raise UserError(
            f"--max_length {cfg.max_length} leaves no room for a prompt before --max_new_tokens {cfg.max_new_tokens} "
            "sampled tokens: raise --max_length or lower --max_new_tokens"
        )
