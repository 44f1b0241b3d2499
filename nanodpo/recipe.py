"""What one DPO step runs, chosen once from the options: the data, the batch layout, the log-prob path, the source
of the reference log-probs, the loss and its metrics. train_dpo.py calls `choose_data` and `choose_step` at setup;
the loop then calls `step.forward(policy, batch)` and `step.metrics(out, stats)` and never asks which loss, layout
or path it runs.

    choice                 the demo's (readable) path                     the alternatives
    ---------------------  ---------------------------------------------  ---------------------------------------------
    data                   pairs as DPOTrainer tokenizes (dpo_data.py)    simpo/cpo/orpo: as CPOTrainer; kto: rows
    --batch_layout         padded: dpo.concatenated_inputs                padding_free | prefix_shared: fast/dpo_packing
    --logps                readable: logps.token_logps                    chunked: fast/chunked_head.chunked_token_logps
    reference              a frozen copy, or the LoRA adapter off:        --precompute_ref_logps: read from the batch;
                           reference.reference_from_model                 reference-free losses: none
    --loss_type            sigmoid: dpo.dpo_batch_loss                    losses/: pair.py, family.py, kto.py
    metrics                losses/metrics.py                              kto: losses/kto.py
"""

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from nanodpo.dpo import concatenated_forward, concatenated_inputs, dpo_batch_loss, sequence_logps
from nanodpo.dpo_batch import PreferenceCollator, UnpairedCollator, with_chosen_prompt_scored
from nanodpo.dpo_data import build_cpo_examples, load_preference_data, load_unpaired_data
from nanodpo.errors import say_once
from nanodpo.fast.dpo_packing import make_token_budget_loader, packed_collator, packed_inputs, resolve_layout
from nanodpo.losses.family import reference_free_loss
from nanodpo.losses.kto import (
    combine_kto_metrics,
    kto_forward,
    kto_metrics,
    kto_micro_batch_loss,
    kto_row_stats,
    kto_stats_metrics,
)
from nanodpo.losses.metrics import dpo_metrics, dpo_pair_stats, named_completion_logits, pair_stats_metrics
from nanodpo.losses.modifiers import completion_logps
from nanodpo.losses.options import REFERENCE_FREE_LOSS_TYPES, family_loss_type, needs_reference
from nanodpo.losses.pair import summed_ipo_loss, weighted_pair_loss
from nanodpo.model import unwrap
from nanodpo.online import PromptCollator, load_prompts, make_prompt_loader, online_step
from nanodpo.reference import no_reference, precomputed_reference, reference_from_model
from nanodpo.training import choose_token_logps, make_train_loader


@dataclass
class PreferenceData:
    """Where the examples come from and how a micro-batch of them is collated."""

    load: Callable  # (cfg, tokenizer, split) -> examples, or None when the split has no data
    collator: Callable  # examples -> one batch laid out [chosen; rejected] (kto: [rows; mismatched rows])
    unit: str  # what an example is, for the log: "pairs" or "rows"
    count_tokens: Callable  # batch -> its tokens as TRL counts them (the attention mask's sum; kto: the rows only)
    train_loader: Callable  # (examples, collator, cfg) -> micro-batches of a pair count, or of a token budget


def choose_data(cfg, pad_token_id: int) -> PreferenceData:
    """Pairs (or kto's unpaired rows), tokenized as the loss's TRL trainer does, collated padded or packed
    (`--batch_layout`); --online: prompts, which the step turns into pairs (nanodpo/online.py)."""
    if cfg.online:  # the step samples and judges the pairs, then collates them with `pair_collator`
        return PreferenceData(load_prompts, PromptCollator(pad_token_id), "prompts", count_tokens, make_prompt_loader)
    collator = pair_collator(cfg, pad_token_id)
    # --max_tokens_per_batch: micro-batches filled to a token budget rather than a pair count
    train_loader = make_token_budget_loader if cfg.max_tokens_per_batch else make_train_loader
    loss_type = family_loss_type(cfg)
    if loss_type == "kto":
        return PreferenceData(load_unpaired_data, UnpairedCollator(collator), "rows", count_row_tokens, train_loader)
    load = load_preference_data
    if loss_type in REFERENCE_FREE_LOSS_TYPES:  # TRL's CPOTrainer and ORPOTrainer tokenize their own way
        load = partial(load_preference_data, build=build_cpo_examples)
    return PreferenceData(load, collator, "pairs", count_tokens, train_loader)


def pair_collator(cfg, pad_token_id: int):
    """Pairs -> the step's [chosen; rejected] batch, in --batch_layout."""
    layout = resolve_layout(cfg)
    if layout == "padded":
        return PreferenceCollator(pad_token_id, max_length=cfg.max_length, truncation_mode=cfg.truncation_mode)
    return packed_collator(cfg, pad_token_id, layout)  # chapter two: padding-free / prefix-shared rows (fast/)


def count_tokens(batch: dict):
    return batch["attention_mask"].sum()


def count_row_tokens(batch: dict):
    """kto: the rows, not their mismatched copies (as TRL counts)."""
    return batch["attention_mask"][: len(batch["label"])].sum()


@dataclass
class DPOStep:
    """The callables one micro-batch goes through; see the module docstring for who picks which."""

    forward: Callable  # (policy, batch) -> (out, the policy's TokenStats)
    metrics: Callable  # (out, TokenStats) -> this process's logged values of one micro-batch
    combine: Callable  # every process's `metrics` of one micro-batch -> the records the logged means take
    eval_stats: Callable  # (out, TokenStats) -> per-pair (kto: per-row) tensors, gathered over an eval set
    eval_metrics: Callable  # (gathered eval_stats, prefix) -> the eval metrics
    model_inputs: Callable  # (model, batch) -> ModelInputs
    score_reference: Callable  # (policy, batch, inputs) -> the reference's summed log-probs, from a model
    padding_fraction: Callable  # batch -> padding slots / all slots of what the model ran on
    samples: Callable | None = None  # --online: () -> the sampled pairs to log since the last call (the tracker's)


def choose_step(cfg, ref_model, accelerator, tokenizer=None) -> DPOStep:
    """The step's callables for these options. `ref_model`: the frozen copy, or None (LoRA: adapter off; or no
    reference at all). `accelerator` may be None (one process, in tests). `tokenizer`: --online's answers."""
    loss_type = family_loss_type(cfg)
    layout = resolve_layout(cfg)
    model_inputs = concatenated_inputs if layout == "padded" else packed_inputs
    if loss_type == "orpo":  # ORPO's NLL term scores the chosen prompt tokens too (TRL's ORPOTrainer does)
        model_inputs = partial(scoring_chosen_prompt, model_inputs=model_inputs)
    token_logps = choose_token_logps(cfg)
    say_once(describe_layout(layout))

    sum_logps = sequence_logps if cfg.ld_alpha is None else partial(completion_logps, ld_alpha=cfg.ld_alpha)
    unwrap_model = accelerator.unwrap_model if accelerator is not None else unwrap
    score_reference = partial(
        reference_from_model, ref_model=ref_model, token_logps=partial(token_logps, with_metrics=False),
        sum_logps=sum_logps, unwrap_model=unwrap_model,
    )  # fmt: skip
    if not needs_reference(cfg):
        reference = no_reference
    elif cfg.precompute_ref_logps:
        reference = precomputed_reference
    else:
        reference = score_reference

    forward, metrics, combine = concatenated_forward, dpo_metrics, every_process
    eval_stats, eval_metrics = dpo_pair_stats, pair_stats_metrics
    if loss_type == "kto":
        forward, metrics, combine = kto_forward, kto_metrics, combine_kto_metrics
        eval_stats, eval_metrics = kto_row_stats, kto_stats_metrics
    if loss_type in REFERENCE_FREE_LOSS_TYPES:  # TRL's CPO/ORPO trainers mean another thing by `logits/*`
        metrics = partial(named_completion_logits, metrics=metrics)
        eval_metrics = partial(named_completion_logits, metrics=eval_metrics)
    policy_logps = partial(token_logps, with_sum_sq=cfg.use_weighting)
    loss = choose_loss(cfg, accelerator)
    forward = partial(forward, model_inputs=model_inputs, token_logps=policy_logps, reference=reference, loss=loss)
    padding_fraction = padded_padding_fraction if layout == "padded" else packed_padding_fraction
    step = DPOStep(forward, metrics, combine, eval_stats, eval_metrics, model_inputs, score_reference, padding_fraction)
    if cfg.online:  # the pairs sampled and judged inside the step, then this same step on them (nanodpo/online.py)
        step = online_step(step, cfg, tokenizer, accelerator, pair_collator(cfg, tokenizer.pad_token_id))
    return step


def choose_loss(cfg, accelerator=None) -> Callable:
    """The micro-batch loss: (policy's TokenStats, completion mask, ref_chosen_logps, ref_rejected_logps[, labels])
    -> DPOOutput (kto: KTOOutput), its options bound."""
    loss_type = family_loss_type(cfg)
    if loss_type == "kto":
        several = accelerator is not None and accelerator.num_processes > 1
        mean_over_processes = partial(accelerator.reduce, reduction="mean") if several else None
        return partial(kto_micro_batch_loss, cfg=cfg, mean_over_processes=mean_over_processes)
    if loss_type in REFERENCE_FREE_LOSS_TYPES:
        return partial(reference_free_loss, cfg=cfg)
    if cfg.online and cfg.loss_type == ["ipo"]:  # TRL OnlineDPOTrainer's IPO, on summed log-ratios
        return partial(summed_ipo_loss, beta=cfg.beta)
    if is_plain_dpo(cfg):
        return partial(dpo_batch_loss, beta=cfg.beta)
    return partial(weighted_pair_loss, cfg=cfg)


def is_plain_dpo(cfg) -> bool:
    """The paper's loss alone: --loss_type sigmoid, no weights, smoothing, NLL term or modifier."""
    return (
        list(cfg.loss_type) == ["sigmoid"] and cfg.loss_weights in (None, [1.0]) and cfg.label_smoothing == 0
        and cfg.rpo_alpha is None and cfg.f_divergence_type == "reverse_kl" and cfg.ld_alpha is None
        and not cfg.use_weighting and not cfg.reference_free
    )  # fmt: skip


def describe_layout(layout: str) -> str:
    if layout == "padded":
        return "batch layout: padded [chosen; rejected] rows, the readable path (--batch_layout prefix_shared: fast)"
    return f"batch layout: {layout} rows, the fast path (--batch_layout padded: the readable path, the same numbers)"


def scoring_chosen_prompt(model, batch: dict, *, model_inputs):
    return model_inputs(model, with_chosen_prompt_scored(batch))


def every_process(per_process: list[dict]) -> list[dict]:
    """DPO's records: one per process (each a mean over its own pairs, all equal-sized)."""
    return per_process


def padded_padding_fraction(batch: dict) -> float:
    return 1.0 - float(batch["attention_mask"].float().mean())


def packed_padding_fraction(batch: dict) -> float:
    return float(batch["padding_fraction"])
