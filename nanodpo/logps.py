"""Per-token log-probabilities of the label tokens, and the token-level statistics logged beside them.

A causal LM's logits at position t predict token t+1, so everything is shifted by one:

    input_ids      [ p0  p1  p2  c0  c1  c2  PAD ]        prompt p*, completion c*, padding
    loss_mask      [ 0   0   0   1   1   1   0   ]        1 on the tokens we score (completion / assistant tokens)
    logits         [ l0  l1  l2  l3  l4  l5  l6  ]        l_t = model's scores for the token at t+1
    labels         = input_ids[:, 1:]   -> [ p1  p2  c0  c1  c2  PAD ]
    mask           = loss_mask[:, 1:]   -> [ 0   0   1   1   1   0   ]
    logps[t]       = log_softmax(logits[:, :-1])[t, labels[t]]   (0 where mask is 0)

Shapes: N sequences, T tokens, V vocabulary -> logits [N, T, V], everything per-token is [N, T-1].
The sequence log-prob log π(y|x) is the masked sum of `logps` over the completion (`sequence_logps`).

This file is the readable path: it takes the full `[N, T, V]` logits (what `model(...).logits` returns). It is the
teaching code and the oracle; training uses the fast path by default (nanodpo/fastpath.py: the LM head only at scored
tokens, a chunk at a time, the same TokenStats within 1e-5; `--logps_chunk_size 0` selects this file instead).
"""

from dataclasses import dataclass

import torch


@dataclass
class TokenStats:
    """Per-token values for the shifted labels, each [N, T-1]; zero (or False) wherever `mask` is 0."""

    logps: torch.Tensor  # log p(label_t | tokens <= t); carries gradient
    mask: torch.Tensor  # 1 where the label is scored
    entropy: torch.Tensor | None = None  # H(p_t) = -Σ_v p_v log p_v, detached
    mean_logits: torch.Tensor | None = None  # mean over the vocabulary of the logits, detached
    is_top1: torch.Tensor | None = None  # the label is the argmax (bool)
    log_sum_sq_probs: torch.Tensor | None = None  # log Σ_v p_v², detached (WPO weights)


def token_stats(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    with_metrics: bool = True,
    with_sum_sq: bool = False,
) -> TokenStats:
    """log_softmax + gather over the shifted labels.

    logits [N, T, V] (any float dtype; computed in fp32), input_ids [N, T], loss_mask [N, T] (1 = score this token).
    """
    logits = logits[:, :-1].float()
    labels = input_ids[:, 1:]
    mask = loss_mask[:, 1:].to(logits.dtype)
    log_probs = torch.log_softmax(logits, dim=-1)  # [N, T-1, V]
    logps = torch.gather(log_probs, dim=-1, index=labels.unsqueeze(-1)).squeeze(-1) * mask
    stats = TokenStats(logps=logps, mask=mask)
    if with_metrics or with_sum_sq:
        with torch.no_grad():
            log_probs = log_probs.detach()
            if with_metrics:
                probs = log_probs.exp()
                stats.entropy = -(probs * log_probs).sum(-1) * mask
                stats.mean_logits = logits.detach().mean(-1) * mask
                stats.is_top1 = (logits.detach().argmax(-1) == labels) & mask.bool()
            if with_sum_sq:
                stats.log_sum_sq_probs = torch.logsumexp(2 * log_probs, dim=-1) * mask
    return stats


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log π(y|x) = Σ_t mask_t · logps_t  -> [N]. (`token_logps` is already 0 off the mask; multiplying is a guard.)"""
    return (token_logps * mask).sum(dim=-1)
