"""The fast path of log-probs: never materialize the [batch, seq, vocab] logits.

The readable path (nanodpo/logps.py) takes `model(...).logits`, a [N, T, V] tensor: with Qwen2.5's vocabulary
(V = 151,936) a batch of 8 sequences of 1,000 tokens is 4.9 GB of fp32 logits, another 4.9 GB of log-softmax, and
the same again in backward. Yet DPO, SFT and PT only need ONE number per scored token: log p(label). So:

  1. Run the model body once and keep its final hidden states [R, L, H] (H ~ 1,000, not V ~ 150,000). The LM head
     is skipped by passing `logits_to_keep=<empty index>`: HF projects zero positions.
  2. Gather the hidden states of the M positions whose label is scored (completion / assistant tokens only; prompt
     and padding positions are never projected): [M, H].
  3. Project them through the LM head `chunk_size` tokens at a time (`ChunkedLabelLogps`). Each chunk's logits
     [C, V] live only inside that chunk's computation: forward keeps, per token, log p(label), the log-sum-exp and
     the metrics (entropy, mean logit, top-1, log Σp² for WPO); backward recomputes one chunk's logits at a time and
     turns them into gradients:
            d log p(y) / d logits = onehot(y) - softmax(logits)
            grad_hidden = g · (onehot - p) @ W          grad_W += (g · (onehot - p))ᵀ @ hidden
     so neither pass holds more than one chunk of logits. The head's weights enter as explicit inputs of the
     autograd function and get ONE gradient (summed over chunks) — tied embeddings and DDP's one-hook-per-parameter
     rule both just work. A head that is not a plain `nn.Linear` (peft LoRA on lm_head, with its B@A·scale term and
     dropout) is called as a module on each chunk and differentiated with `torch.autograd.grad`.
  4. Scatter the per-token values back into the [N, T-1] per-sequence layout of `TokenStats` (no vocab dimension:
     cheap), so the losses and metrics downstream are unchanged.

`hidden_index` decouples where a scored token's hidden state sits (a flat index into the model's [R, L] rows) from
where its value goes ([N, T-1], sequence by sequence). For an ordinary padded batch it is the identity; for packed
and prefix-shared DPO rows (nanodpo/dpo_packing.py) it points into the packed rows.

Tested equal to the readable path (log-probs, losses, gradients, metrics within 1e-5 in fp32; tied and untied
embeddings; LoRA on the LM head): tests/test_fastpath.py.
"""

import inspect

import torch
from torch import nn

from nanodpo.logps import TokenStats

DEFAULT_CHUNK_SIZE = 1024  # tokens per LM-head chunk: 1024 x 151,936 fp32 logits = 0.6 GB, the most ever held

# Models whose logits are not just lm_head(hidden): a soft cap or a scale after the head. The fast path would give
# other numbers, so these use the readable path.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")

_said_once: set[str] = set()


def say_once(message: str) -> None:
    if message not in _said_once:
        _said_once.add(message)
        print(f"[nanodpo] {message}")


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / accelerate wrappers (peft stays: its modules are the ones that run)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)  # torch.compile


def fast_path_unsupported(model: nn.Module) -> str | None:
    """Why the fast path cannot run this model (None = it can)."""
    inner = unwrap(model)
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    if not hasattr(base, "get_decoder") or not hasattr(base, "get_output_embeddings"):
        return f"{type(base).__name__} has no get_decoder/get_output_embeddings"
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        return f"{type(base).__name__}.forward has no logits_to_keep argument"
    for param in base.parameters():
        # FSDP2 (DTensor) and ZeRO-3 (ds_id) shard the LM head; the fast path reads its weight outside the head's
        # own forward, which their gather hooks do not see.
        if type(param).__name__ == "DTensor" or hasattr(param, "ds_id"):
            return "the weights are sharded (FSDP2 / ZeRO-3)"
        break
    config = getattr(base, "config", None)
    for name in _LOGIT_POSTPROCESSING:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            return f"the model post-processes its logits ({name}={value})"
    return None


# ----------------------------------------------------------------------------------------------------------------
# 1. Final hidden states without the LM head.


def final_hidden_states(model: nn.Module, inputs: dict) -> tuple[torch.Tensor, nn.Module]:
    """Run `model(**inputs)` (through its DDP / peft wrappers, so gradient sync and adapters apply) projecting no
    position through the LM head; return (final hidden states [R, L, H] — after the last norm — and the LM head)."""
    inner = unwrap(model)
    decoder = inner.get_decoder()
    head = inner.get_output_embeddings()
    captured = []

    def keep_output(module, args, output):
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = decoder.register_forward_hook(keep_output)
    try:
        device = inputs["input_ids"].device
        nothing = torch.empty(0, dtype=torch.long, device=device)  # HF slices hidden[:, nothing] -> [R, 0, V] logits
        model(**{**inputs, "use_cache": False, "logits_to_keep": nothing})
    finally:
        handle.remove()
    (hidden,) = captured
    return hidden, head


# ----------------------------------------------------------------------------------------------------------------
# 2. The chunked projection.


def _plain_linear(head: nn.Module) -> bool:
    return type(head) is nn.Linear


def _rowwise_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_v a[i, v]·b[i, v] for every row i, as a batched matmul (no [C, V] product tensor)."""
    return (a.unsqueeze(1) @ b.unsqueeze(2)).view(-1)


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def _grad_logits(logits: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """g · d log p(y) / d logits = g · (onehot(y) - softmax(logits)), fp32 [C, V]; softmax = exp(logits - lse)."""
    grad = torch.exp(logits.detach().float() - lse.unsqueeze(1)).mul_(-g.unsqueeze(1))
    return grad.scatter_add_(1, labels.unsqueeze(1), g.unsqueeze(1))


class ChunkedLabelLogps(torch.autograd.Function):
    """log p(label) for M hidden states through the LM head, `chunk_size` tokens at a time (see module docstring).

    forward(hidden [M, H], labels [M], head, chunk_size, want_metrics, want_sum_sq, *params)
      -> logps [M] (differentiable w.r.t. hidden and params), and detached [M] tensors: entropy, mean_logits,
         is_top1 (0/1), log_sum_sq_probs (empty tensors when not asked for).
    params: the tensors the head's gradient goes to (`head_params`). The head runs under the caller's autocast
    state (bf16 logits under bf16 autocast, as in the readable path); everything after it is fp32.
    """

    @staticmethod
    def forward(ctx, hidden, labels, head, chunk_size, want_metrics, want_sum_sq, *params):
        device_type = hidden.device.type
        ctx.autocast = _autocast_state(device_type)
        ctx.rng_state = torch.get_rng_state()  # a head with dropout recomputes the same masks in backward
        ctx.cuda_rng_state = torch.cuda.get_rng_state() if hidden.is_cuda else None
        m = hidden.shape[0]
        new = lambda wanted: hidden.new_zeros(m if wanted else 0, dtype=torch.float32)  # noqa: E731
        logps, lse = new(True), new(True)
        entropy, mean_logits, is_top1, sum_sq = new(want_metrics), new(want_metrics), new(want_metrics), new(want_sum_sq)
        for start in range(0, m, chunk_size):
            rows = slice(start, start + chunk_size)
            logits = head(hidden[rows])  # [C, V]: the only vocab-sized tensors live inside this loop body
            with torch.autocast(device_type, enabled=False):
                logits = logits.float()
                lse[rows] = torch.logsumexp(logits, dim=-1)
                logps[rows] = logits.gather(1, labels[rows].unsqueeze(1)).squeeze(1) - lse[rows]
                if want_metrics:
                    mean_logits[rows] = logits.mean(-1)
                    is_top1[rows] = (logits.argmax(-1) == labels[rows]).float()
                if want_metrics or want_sum_sq:
                    probs = torch.exp(logits - lse[rows].unsqueeze(1))
                    if want_metrics:  # H = -Σ p·log p = lse - Σ p·logits
                        entropy[rows] = lse[rows] - _rowwise_dot(probs, logits)
                    if want_sum_sq:
                        sum_sq[rows] = torch.log(_rowwise_dot(probs, probs))
        ctx.head, ctx.chunk_size = head, chunk_size
        ctx.lse = lse  # [M] fp32: backward's softmax is exp(logits - lse), no second reduction
        ctx.save_for_backward(hidden, labels, *params)
        ctx.mark_non_differentiable(entropy, mean_logits, is_top1, sum_sq)
        return logps, entropy, mean_logits, is_top1, sum_sq

    @staticmethod
    def backward(ctx, grad_logps, *unused_metric_grads):
        hidden, labels, *params = ctx.saved_tensors
        head, chunk_size, lse = ctx.head, ctx.chunk_size, ctx.lse
        want_hidden, want_params = ctx.needs_input_grad[0], list(ctx.needs_input_grad[6:])
        grad_hidden = torch.zeros_like(hidden) if want_hidden else None
        grad_params = [torch.zeros_like(p) if want else None for p, want in zip(params, want_params)]
        no_grads = (None,) * 5  # labels, head, chunk_size, want_metrics, want_sum_sq
        if grad_logps is None or not (want_hidden or any(want_params)):
            return (grad_hidden, *no_grads, *grad_params)
        device_type = hidden.device.type
        enabled, dtype = ctx.autocast
        plain = _plain_linear(head)
        weight = None  # a plain head's weight in its logits' dtype (cast once, not per chunk)
        with torch.random.fork_rng(devices=[hidden.device] if hidden.is_cuda else []):
            torch.set_rng_state(ctx.rng_state)
            if ctx.cuda_rng_state is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng_state)
            for start in range(0, hidden.shape[0], chunk_size):
                rows = slice(start, start + chunk_size)
                g = grad_logps[rows].float()
                h = hidden[rows]
                if plain:  # the matmuls written out: no autograd graph, gradients accumulated in place
                    with torch.autocast(device_type, dtype=dtype, enabled=enabled):
                        logits = head(h)
                    grad_logits = _grad_logits(logits, lse[rows], labels[rows], g).to(logits.dtype)
                    if weight is None:
                        weight = params[0].to(logits.dtype)
                    if want_hidden:
                        grad_hidden[rows] = (grad_logits @ weight).to(hidden.dtype)
                    if want_params[0]:
                        grad_params[0].add_((grad_logits.t() @ h.to(logits.dtype)).to(params[0].dtype))
                    if len(params) > 1 and want_params[1]:
                        grad_params[1].add_(grad_logits.sum(0).to(params[1].dtype))
                    continue
                # any other head (LoRA: base + B@A·scale, dropout): autograd through one chunk's module call
                with torch.enable_grad():
                    h_leaf = h.detach().requires_grad_(want_hidden)
                    with torch.autocast(device_type, dtype=dtype, enabled=enabled):
                        logits = head(h_leaf)
                    grad_logits = _grad_logits(logits, lse[rows], labels[rows], g).to(logits.dtype)
                    wanted = [p for p, want in zip(params, want_params) if want]
                    grads = torch.autograd.grad(
                        logits, ([h_leaf] if want_hidden else []) + wanted, grad_logits, allow_unused=True
                    )
                grads = list(grads)
                if want_hidden:
                    grad_hidden[rows] = grads.pop(0)
                for i in (i for i, want in enumerate(want_params) if want):
                    grad = grads.pop(0)
                    if grad is not None:
                        grad_params[i].add_(grad)
        return (grad_hidden, *no_grads, *grad_params)


def head_params(head: nn.Module) -> list[torch.Tensor]:
    """The tensors the head's gradient flows into: (weight[, bias]) of a plain Linear (even frozen: an explicit
    input, so backward can use it); a wrapped head's trainable parameters otherwise."""
    if _plain_linear(head):
        return [head.weight] + ([head.bias] if head.bias is not None else [])
    return [p for p in head.parameters() if p.requires_grad]


def label_stats(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    head: nn.Module,
    chunk_size: int,
    with_metrics: bool,
    with_sum_sq: bool,
) -> dict[str, torch.Tensor | None]:
    """Per-token values for M scored tokens: hidden [M, H] (the hidden state that predicts each label), labels [M]."""
    chunk_size = chunk_size if chunk_size > 0 else max(1, hidden.shape[0])
    logps, entropy, mean_logits, is_top1, sum_sq = ChunkedLabelLogps.apply(
        hidden, labels, head, chunk_size, with_metrics, with_sum_sq, *head_params(head)
    )
    return {
        "logps": logps,
        "entropy": entropy if with_metrics else None,
        "mean_logits": mean_logits if with_metrics else None,
        "is_top1": is_top1 if with_metrics else None,
        "log_sum_sq_probs": sum_sq if with_sum_sq else None,
    }


# ----------------------------------------------------------------------------------------------------------------
# 3. The whole fast path: forward, gather, project, scatter back.


def identity_index(batch_size: int, length: int, device=None) -> torch.Tensor:
    """hidden_index of an ordinary [N, T] batch: the label at (n, t+1) is predicted by hidden state n·T + t."""
    return torch.arange(batch_size * length, device=device).view(batch_size, length)[:, :-1]


def fast_token_stats(
    model: nn.Module,
    inputs: dict,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    hidden_index: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    with_metrics: bool = True,
    with_sum_sq: bool = False,
) -> TokenStats:
    """The fast equivalent of `token_stats(model(**inputs).logits, input_ids, loss_mask, ...)`.

    inputs: what the model is called with (its rows [R, L] may be a packed layout of the sequences).
    input_ids, loss_mask: [N, T], the sequences one per row (labels are input_ids[:, 1:], scored where
        loss_mask[:, 1:] is 1) — the layout of the returned TokenStats ([N, T-1]).
    hidden_index: [N, T-1], flat index into the model's [R·L] positions of the hidden state that predicts
        input_ids[n, t+1]; None = the identity (inputs["input_ids"] is input_ids itself).
    """
    reason = fast_path_unsupported(model)
    if reason is None:
        hidden, head = final_hidden_states(model, inputs)
    else:  # the model's own full logits, then the same gather and math (exact, but no memory saving)
        say_once(f"fast log-prob path unavailable ({reason}): projecting every position with the model's own head")
        hidden, head = model(**{**inputs, "use_cache": False}).logits, nn.Identity()
    n, t = input_ids.shape
    mask = loss_mask[:, 1:].bool()
    if hidden_index is None:
        hidden_index = identity_index(n, t, device=input_ids.device)
    kept_hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, hidden_index[mask])  # [M, H]
    values = label_stats(kept_hidden, input_ids[:, 1:][mask], head, chunk_size, with_metrics, with_sum_sq)

    def per_sequence(v: torch.Tensor | None) -> torch.Tensor | None:
        if v is None:
            return None
        return torch.zeros(n, t - 1, dtype=v.dtype, device=v.device).masked_scatter(mask, v)

    return TokenStats(
        logps=per_sequence(values["logps"]),
        mask=mask.float(),
        entropy=per_sequence(values["entropy"]),
        mean_logits=per_sequence(values["mean_logits"]),
        is_top1=None if values["is_top1"] is None else per_sequence(values["is_top1"]).bool(),
        log_sum_sq_probs=per_sequence(values["log_sum_sq_probs"]),
    )
