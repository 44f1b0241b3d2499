"""KTO (Ethayarajh et al. 2024): unpaired rows, each desirable or not, against a KL reference point (the last row
of nanodpo/losses/__init__.py's second table); equal to TRL 1.16's KTOTrainer. Its micro-batch is laid out
[rows; mismatched rows] (nanodpo/dpo_batch.py `UnpairedCollator`), so every layout and log-prob path serves it."""

from dataclasses import dataclass

import torch

from nanodpo.logps import TokenStats
from nanodpo.losses.modifiers import completion_logps


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
    """z_ref of row `kto`: the mean log-ratio of the micro-batch's mismatched rows (x_i, y'_i) — an estimate of
    KL(π_θ || π_ref) that the loss does not differentiate — averaged over all processes, then floored at 0 (a KL
    divergence is never negative; a noisy estimate can be). `mean_over_processes`: a callable on a 0-d tensor."""
    kl = (mismatched_logps - ref_mismatched_logps).mean()
    if mean_over_processes is not None:
        kl = mean_over_processes(kl)
    return kl.clamp(min=0)


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
    """kto on one micro-batch laid out [rows; mismatched rows] (nanodpo/dpo_batch.py `UnpairedCollator`).

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
    `combine_kto_metrics` can reduce the micro-batches of all processes as TRL does."""
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


def combine_kto_metrics(per_process: list[dict[str, float]]) -> list[dict[str, float]]:
    """The metric record one micro-batch adds to the logged means, from every process's `kto_metrics` of it: ONE
    record, as TRL logs it: sums over the rows of all processes divided by their counts (a value only when
    such a row is present), z_ref (the same on every process), the mean of the processes' losses.
    """
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


def kto_forward(policy, batch: dict, *, model_inputs, token_logps, reference, loss):
    """One KTO micro-batch, laid out [rows; mismatched rows] like a [chosen; rejected] batch: the policy's
    log-probs, the reference's of both halves, the loss (`kto_micro_batch_loss`, options bound at setup).
    Returns (KTOOutput, the policy's TokenStats)."""
    inputs = model_inputs(policy, batch)
    policy_stats = token_logps(policy, inputs)
    completion_mask = batch["completion_mask"][:, 1:].to(policy_stats.logps.dtype)
    ref_logps, ref_mismatched_logps = reference(policy, batch, inputs)
    return loss(policy_stats, completion_mask, ref_logps, ref_mismatched_logps, batch["label"]), policy_stats
