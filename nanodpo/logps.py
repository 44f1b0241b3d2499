"""Per-token log-probabilities of the scored tokens: the one entry point, `token_logps`, and the readable path.

A causal LM's logits at position t predict token t+1, so everything is shifted by one:

    input_ids      [ p0  p1  p2  c0  c1  c2  PAD ]        prompt p*, completion c*, padding
    loss_mask      [ 0   0   0   1   1   1   0   ]        1 on the tokens we score (completion / assistant tokens)
    logits         [ l0  l1  l2  l3  l4  l5  l6  ]        l_t = model's scores for the token at t+1
    labels         = input_ids[:, 1:]   -> [ p1  p2  c0  c1  c2  PAD ]
    mask           = loss_mask[:, 1:]   -> [ 0   0   1   1   1   0   ]
    logps[t]       = log_softmax(logits[:, :-1])[t, labels[t]]   (0 where mask is 0)

Shapes: N sequences, T tokens, V vocabulary -> logits [N, T, V], everything per-token is [N, T-1] (`TokenStats`).
A sequence's log-prob log π(y|x) is then the masked sum of `logps` over its completion (nanodpo/dpo.py).

Two paths, chosen by `--logps`, give the same TokenStats (tests/test_fastpath.py: within 1e-5 in fp32):
  * readable: `model(...).logits`, the full [N, T, V] tensor, then log_softmax + gather (`token_stats` below). The
    teaching code, and the oracle the other path is tested against.
  * chunked (default): nanodpo/fast/chunked_head.py runs the LM head only at the scored tokens, a chunk at a
    time, so the [N, T, V] logits never exist (with a 150k vocabulary they are gigabytes).

What the model is called with (`ModelInputs`) is built before this file: nanodpo/training.py for PT/SFT rows,
nanodpo/fast/dpo_packing.py for DPO's padded, padding-free or prefix-shared pairs.
"""

from dataclasses import dataclass

import torch

from nanodpo.fast.chunked_head import DEFAULT_CHUNK_SIZE, fast_token_stats
from nanodpo.token_stats import TokenStats

LOGPS_PATHS = ("chunked", "readable")


@dataclass
class ModelInputs:
    """A batch ready for a log-prob path: what the model is called with, and which tokens are scored."""

    model_kwargs: dict  # model(**model_kwargs): input_ids [R, L] and the mask / positions of its layout
    input_ids: torch.Tensor  # [N, T] the sequences, one per row (labels = input_ids[:, 1:])
    loss_mask: torch.Tensor  # [N, T] 1 where a token is scored
    # [N, T-1] flat index into the model's R·L positions of the hidden state that predicts input_ids[n, t+1] (packed
    # rows); None: the model's rows ARE the sequences (model_kwargs["input_ids"] is input_ids)
    hidden_index: torch.Tensor | None = None


def token_logps(
    model,
    inputs: ModelInputs,
    path: str = "chunked",
    with_metrics: bool = True,
    with_sum_sq: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> TokenStats:
    """Run `model` on `inputs` and score its tokens -> TokenStats [N, T-1], by the readable or the chunked path."""
    if path == "chunked":
        return fast_token_stats(
            model, inputs.model_kwargs, inputs.input_ids, inputs.loss_mask, inputs.hidden_index, chunk_size,
            with_metrics, with_sum_sq,
        )  # fmt: skip
    # use_cache=False: a training forward needs no KV cache (and with packed rows the cache breaks isolation).
    logits = model(**{**inputs.model_kwargs, "use_cache": False}).logits
    if inputs.hidden_index is None:
        return token_stats(logits, inputs.input_ids, inputs.loss_mask, with_metrics, with_sum_sq)
    # Packed rows: pick, for every sequence position t, the logits that predict its token t+1 -> [N, T-1, V].
    per_sequence = logits.reshape(-1, logits.shape[-1])[inputs.hidden_index]
    return shifted_token_stats(
        per_sequence, inputs.input_ids[:, 1:], inputs.loss_mask[:, 1:], with_metrics, with_sum_sq
    )


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
    return shifted_token_stats(logits[:, :-1], input_ids[:, 1:], loss_mask[:, 1:], with_metrics, with_sum_sq)


def shifted_token_stats(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, with_metrics: bool, with_sum_sq: bool
) -> TokenStats:
    """`token_stats` after the shift: logits [N, T-1, V] where logits[n, t] predicts labels[n, t]; mask [N, T-1]."""
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
