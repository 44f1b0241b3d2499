"""`TokenStats`: what a log-prob path returns, per scored token — the readable path (nanodpo/logps.py) and the
chunked one (nanodpo/fast/chunked_head.py) fill the same fields, so the losses downstream never know which one ran."""

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
