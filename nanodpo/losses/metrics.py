"""The logged values of the DPO losses, as TRL 1.16 names and reduces them: one micro-batch's (`dpo_metrics`), and
per-pair stats that reduce to the same metrics over any set of pairs — a whole eval set on every process."""

import torch
import torch.nn.functional as F

from nanodpo.dpo import DPOOutput
from nanodpo.logps import TokenStats


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


def named_completion_logits(*args, metrics, **kwargs) -> dict[str, float]:
    """`metrics(*args, **kwargs)` with `logits/chosen|rejected` renamed `completion_logits/chosen|rejected`: for simpo,
    cpo and orpo, whose TRL trainers log under `logits/*` another quantity, the logits' mean over every position of
    the padded batch, prompt and padding included (CPOTrainer's `concatenated_forward` over all positions,
    ORPOTrainer's without the last one). nanodpo's value is DPOTrainer's: the mean over the completion tokens."""
    return {name.replace("logits/", "completion_logits/"): value for name, value in metrics(*args, **kwargs).items()}
