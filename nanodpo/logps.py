"""Per-token log-probabilities of the scored tokens: `token_logps`, the readable path (log_softmax + gather).

A causal LM's logits at position t predict token t+1, so everything is shifted by one:

    input_ids      [ p0  p1  p2  c0  c1  c2  PAD ]        prompt p*, completion c*, padding
    loss_mask      [ 0   0   0   1   1   1   0   ]        1 on the tokens we score (completion / assistant tokens)
    logits         [ l0  l1  l2  l3  l4  l5  l6  ]        l_t = model's scores for the token at t+1
    labels         = input_ids[:, 1:]   -> [ p1  p2  c0  c1  c2  PAD ]
    mask           = loss_mask[:, 1:]   -> [ 0   0   1   1   1   0   ]
    logps[t]       = log_softmax(logits[:, :-1])[t, labels[t]]   (0 where mask is 0)

Shapes: N sequences, T tokens, V vocabulary -> logits [N, T, V], everything per-token is [N, T-1] (`TokenStats`).
A sequence's log-prob log π(y|x) is then the masked sum of `logps` over its completion (nanodpo/dpo.py).

`--logps chunked` swaps this file's `token_logps` for nanodpo/fast/chunked_head.py's `chunked_token_logps` (one line
at setup): the same TokenStats (within 1e-5 in fp32, tests/test_fastpath.py) without the [N, T, V] logits.
"""

from dataclasses import dataclass

import torch


@dataclass
class ModelInputs:
    """A batch ready for a log-prob path: what the model is called with, and which tokens are scored."""

    model_kwargs: dict  # model(**model_kwargs): input_ids [R, L] and the mask / positions of its layout
    labels: torch.Tensor  # [N, T] the sequences' tokens, one sequence per row, aligned with their positions: token t
    # is predicted by position t-1 (Hugging Face's convention; t = 0 is never scored)
    loss_mask: torch.Tensor  # [N, T] 1 where a token is scored
    # [N, T-1] flat index into the model's R·L positions of the hidden state that predicts input_ids[n, t+1] (packed
    # rows, nanodpo/fast/dpo_packing.py); None: the model's rows ARE the sequences
    hidden_index: torch.Tensor | None = None


@dataclass
class TokenStats:
    """Per-token values for the shifted labels, each [N, T-1]; zero (or False) wherever `mask` is 0. Both log-prob
    paths fill the same fields, so the losses downstream never know which one ran."""

    logps: torch.Tensor  # log p(label_t | tokens <= t); carries gradient
    mask: torch.Tensor  # 1 where the label is scored
    entropy: torch.Tensor | None = None  # H(p_t) = -Σ_v p_v log p_v, detached
    mean_logits: torch.Tensor | None = None  # mean over the vocabulary of the logits, detached
    is_top1: torch.Tensor | None = None  # the label is the argmax (bool)
    log_sum_sq_probs: torch.Tensor | None = None  # log Σ_v p_v², detached (WPO weights)


def token_logps(model, inputs: ModelInputs, with_metrics: bool = True, with_sum_sq: bool = False) -> TokenStats:
    """Run `model` on `inputs`, then log_softmax + gather over the shifted labels -> TokenStats [N, T-1]."""
    # use_cache=False: a training forward needs no KV cache (and with packed rows the cache breaks isolation).
    logits = model(**{**inputs.model_kwargs, "use_cache": False}).logits  # [R, L, V]
    if inputs.hidden_index is None:
        logits = logits[:, :-1]  # position t predicts token t+1
    else:  # packed rows: pick, for every sequence position t, the logits that predict its token t+1
        logits = logits.reshape(-1, logits.shape[-1])[inputs.hidden_index]
    return shifted_token_stats(logits, inputs.labels[:, 1:], inputs.loss_mask[:, 1:], with_metrics, with_sum_sq)


def shifted_token_stats(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, with_metrics: bool, with_sum_sq: bool
) -> TokenStats:
    """logits [N, T-1, V], where logits[n, t] predicts labels[n, t] (any float dtype; computed in fp32); labels and
    mask [N, T-1]."""
    logits = logits.float()
    mask = mask.to(logits.dtype)
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


def token_stats(
    logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor, with_metrics=True, with_sum_sq=False
) -> TokenStats:
    """`shifted_token_stats` of logits [N, T, V] already computed, for input_ids and loss_mask [N, T]."""
    return shifted_token_stats(logits[:, :-1], input_ids[:, 1:], loss_mask[:, 1:], with_metrics, with_sum_sq)
