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

from nanodpo.model import is_main_process
from nanodpo.token_stats import TokenStats

DEFAULT_CHUNK_SIZE = 256  # tokens per LM-head chunk: 256 x 151,936 fp32 logits = 156 MB per buffer (two at most)

# Models whose logits are not just lm_head(hidden): a soft cap or a scale after the head. The fast path would give
# other numbers, so these use the readable path.
_LOGIT_POSTPROCESSING = (
    "final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier", "output_multiplier_scale",
    "lm_head_multiplier",
)  # fmt: skip

_said_once: set[str] = set()


def say_once(message: str) -> None:
    """Print a notice once per run, on the main process only (RANK is set by torchrun / accelerate launch)."""
    if message not in _said_once:
        _said_once.add(message)
        if is_main_process():
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


UNSHIFTED_LIMIT = 50.0  # |row max logit| below this: exp(logits) is safe without subtracting the max


def _unshifted(top: torch.Tensor) -> bool:
    """exp(logits) directly (no max-subtraction pass) when every row's max logit is within ±UNSHIFTED_LIMIT: no
    overflow (e^50 · 151,936 ≪ fp32's 3.4e38, also through the backward's e @ W) and the largest term of every
    row far from underflow. Real LM logits sit well inside; anything else takes the shifted path."""
    return top.numel() == 0 or bool(top.abs().max() < UNSHIFTED_LIMIT)


def _exp_shifted(logits: torch.Tensor, top: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """e = exp(logits) (or exp(logits - top) when `_unshifted` says no) into `out`; p = e / Σ e either way."""
    if _unshifted(top):
        return torch.exp(logits, out=out) if out is not None else torch.exp(logits)
    shifted = torch.sub(logits, top.unsqueeze(1), out=out) if out is not None else logits - top.unsqueeze(1)
    return shifted.exp_()


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


_SCRATCH: dict[tuple, torch.Tensor] = {}


def scratch(name: str, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    """A [rows, cols] fp32 buffer kept between calls (one per name and device): the vocab-sized buffers of the chunk
    loop are allocated once per process instead of on every call (on CPU a fresh 150 MB tensor is first of all tens
    of thousands of page faults). Its contents are garbage; callers overwrite them."""
    key = (name, like.device)
    buffer = _SCRATCH.get(key)
    if buffer is None or buffer.shape[1] != cols or buffer.shape[0] < rows:
        _SCRATCH.pop(key, None)  # (free the old one before allocating its replacement)
        buffer = _SCRATCH[key] = torch.empty(rows, cols, dtype=torch.float32, device=like.device)
    return buffer[:rows]


class _Projection:
    """The head applied to one chunk, giving fp32 logits [C, V].

    A plain fp32 nn.Linear without autocast writes into one reused buffer (`torch.mm(..., out=)`): no fresh
    vocab-sized allocation per chunk (a new 0.5 GB tensor is page faults before it is anything else). Any other head
    (or a Linear with hooks) is called as a module, under the autocast state of the forward pass.
    """

    def __init__(self, head: nn.Module, hidden: torch.Tensor, chunk_size: int, autocast: tuple[bool, torch.dtype]):
        self.head, self.autocast, self.device_type = head, autocast, hidden.device.type
        weight = getattr(head, "weight", None)
        hooked = head._forward_hooks or head._forward_pre_hooks or hasattr(head, "_hf_hook")  # (offloading etc.)
        self.buffered = (
            _plain_linear(head) and not hooked and not autocast[0] and weight.dtype == hidden.dtype == torch.float32
        )
        rows = min(chunk_size, hidden.shape[0])
        self.buffer = scratch("logits", rows, weight.shape[0], hidden) if self.buffered else None

    def raw(self, h: torch.Tensor) -> torch.Tensor:
        """The head's output in its own dtype (bf16 under bf16 autocast)."""
        if self.buffered:
            out = torch.mm(h, self.head.weight.t(), out=self.buffer[: h.shape[0]])
            return out if self.head.bias is None else out.add_(self.head.bias)
        with torch.autocast(self.device_type, dtype=self.autocast[1], enabled=self.autocast[0]):
            return self.head(h)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return self.raw(h).float()


class ChunkedLabelLogps(torch.autograd.Function):
    """log p(label) for M hidden states through the LM head, `chunk_size` tokens at a time (see module docstring).

    forward(hidden [M, H], labels [M], head, chunk_size, want_metrics, want_sum_sq, *params)
      -> logps [M] (differentiable w.r.t. hidden and params), and detached [M] tensors: entropy, mean_logits,
         is_top1 (0/1), log_sum_sq_probs (empty tensors when not asked for).
    params: the tensors the head's gradient goes to (`head_params`). The head runs under the caller's autocast
    state (bf16 logits under bf16 autocast, as in the readable path); everything after it is fp32.

    Per chunk, with e = exp(logits - shift) and s = Σ e, so p = e / s and lse = shift + log s (shift: the row max,
    or 0 when every logit is moderate — `_unshifted` — which saves a pass over [C, V]):
        log p(y) = logits[y] - lse          entropy = lse - Σ e·logits / s          log Σ p² = log Σ e² - 2 log s
    and in backward, with g the incoming gradient of each token's log p(y) and P = exp(logits - lse):
        grad_hidden = g · (W[y] - P @ W)        grad_W = Σ_tokens g·h at row y  -  Pᵀ @ (g·h)
    (the per-token g scales the small [C, H] side, never the [C, V] one). A frozen plain head (LoRA elsewhere)
    needs only grad_hidden, whose g-free part W[y] - P @ W is kept from the forward: its backward projects nothing.
    """

    @staticmethod
    def forward(ctx, hidden, labels, head, chunk_size, want_metrics, want_sum_sq, *params):
        ctx.autocast = _autocast_state(hidden.device.type)
        ctx.rng_state = torch.get_rng_state()  # a head with dropout recomputes the same masks in backward
        ctx.cuda_rng_state = torch.cuda.get_rng_state() if hidden.is_cuda else None
        plain = _plain_linear(head)
        # (forward runs without grad mode; whether a gradient will be asked for is known from the inputs)
        keep_grad_hidden = plain and hidden.requires_grad and not any(p.requires_grad for p in params)
        m = hidden.shape[0]
        new = lambda wanted: hidden.new_zeros(m if wanted else 0, dtype=torch.float32)  # noqa: E731
        logps, lse, top = new(True), new(True), new(True)
        entropy, mean_logits, is_top1 = new(want_metrics), new(want_metrics), new(want_metrics)
        sum_sq = new(want_sum_sq)
        grad_hidden_part = torch.zeros_like(hidden, dtype=torch.float32) if keep_grad_hidden else None
        project = _Projection(head, hidden, chunk_size, ctx.autocast)
        if project.buffered and want_metrics:
            weight_mean = head.weight.mean(0)
            bias_mean = head.bias.mean() if head.bias is not None else 0.0
        work = scratch("work", min(chunk_size, m), head.weight.shape[0], hidden) if plain else None
        weight = head.weight.float() if keep_grad_hidden else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, m, chunk_size):
                rows = slice(start, start + chunk_size)
                h, y = hidden[rows], labels[rows]
                logits = project(h)  # [C, V]: the vocab-sized tensors live only in this loop body
                top[rows] = logits.amax(dim=-1)
                target = logits.gather(1, y.unsqueeze(1)).squeeze(1)
                e = _exp_shifted(logits, top[rows], out=work[: h.shape[0]] if work is not None else None)
                total = e.sum(-1)
                lse[rows] = total.log() + (0.0 if _unshifted(top[rows]) else top[rows])
                logps[rows] = target - lse[rows]
                if want_metrics:
                    # mean over the vocabulary: h · mean_v(W_v) (+ mean bias) — no pass over [C, V] for it
                    mean_logits[rows] = h.float() @ weight_mean + bias_mean if project.buffered else logits.mean(-1)
                    is_top1[rows] = (target >= top[rows]).float()
                    entropy[rows] = lse[rows] - _rowwise_dot(e, logits) / total
                if want_sum_sq:
                    sum_sq[rows] = _rowwise_dot(e, e).log() - 2 * total.log()
                if keep_grad_hidden:
                    grad_hidden_part[rows] = weight[y] - (e @ weight) / total.unsqueeze(1)
        ctx.head, ctx.chunk_size, ctx.lse, ctx.top = head, chunk_size, lse, top  # [M] fp32 each: P = exp(logits - lse)
        ctx.grad_hidden_part = grad_hidden_part
        ctx.save_for_backward(hidden, labels, *params)
        ctx.mark_non_differentiable(entropy, mean_logits, is_top1, sum_sq)
        return logps, entropy, mean_logits, is_top1, sum_sq

    @staticmethod
    def backward(ctx, grad_logps, *unused_metric_grads):
        hidden, labels, *params = ctx.saved_tensors
        head, chunk_size, lse, top = ctx.head, ctx.chunk_size, ctx.lse, ctx.top
        want_hidden, want_params = ctx.needs_input_grad[0], list(ctx.needs_input_grad[6:])
        no_grads = (None,) * 5  # labels, head, chunk_size, want_metrics, want_sum_sq
        g_all = grad_logps.float() if grad_logps is not None else None
        if ctx.grad_hidden_part is not None:  # frozen plain head: everything was prepared in forward
            grad_hidden = (g_all.unsqueeze(1) * ctx.grad_hidden_part).to(hidden.dtype) if want_hidden else None
            return (grad_hidden, *no_grads, *[None] * len(params))
        grad_hidden = torch.zeros_like(hidden) if want_hidden else None
        grad_params = [torch.zeros_like(p) if want else None for p, want in zip(params, want_params)]
        if g_all is None or not (want_hidden or any(want_params)):
            return (grad_hidden, *no_grads, *grad_params)
        plain = _plain_linear(head)
        project = _Projection(head, hidden, chunk_size, ctx.autocast)
        weight = None  # a plain head's weight in the dtype of its logits (cast once, not per chunk)
        with torch.random.fork_rng(devices=[hidden.device] if hidden.is_cuda else []):
            torch.set_rng_state(ctx.rng_state)
            if ctx.cuda_rng_state is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng_state)
            for start in range(0, hidden.shape[0], chunk_size):
                rows = slice(start, start + chunk_size)
                h, y, g = hidden[rows], labels[rows], g_all[rows]
                if plain:  # the matmuls written out: no autograd graph, gradients accumulated in place
                    logits = project.raw(h)  # a fresh tensor (or the reused buffer): ours to overwrite
                    dtype = logits.dtype
                    # P = e · scale: e = exp(logits) (scale = exp(-lse), folded into the small [C, H] side) or,
                    # for logits too large for that, e = exp(logits - lse) (scale = 1)
                    logits = logits.float()
                    if _unshifted(top[rows]):
                        e, scale = logits.exp_(), torch.exp(-lse[rows])
                    else:
                        e, scale = logits.sub_(lse[rows].unsqueeze(1)).exp_(), torch.ones_like(g)
                    e = e.to(dtype)
                    if weight is None:
                        weight = params[0].to(dtype)
                    if want_hidden:
                        grad_h = weight[y].float() - (e @ weight).float() * scale.unsqueeze(1)
                        grad_hidden[rows] = (g.unsqueeze(1) * grad_h).to(hidden.dtype)
                    g_h = g.unsqueeze(1) * h.float()  # the onehot part: + g·h at row y
                    if want_params[0]:
                        grad_w = grad_params[0]
                        scaled = ((g * scale).unsqueeze(1) * h.float()).to(dtype)
                        if dtype == grad_w.dtype:
                            grad_w.addmm_(e.t(), scaled, alpha=-1)  # in place: no [V, H] temporary per chunk
                        else:
                            grad_w.sub_((e.t() @ scaled).to(grad_w.dtype))
                        grad_w.index_add_(0, y, g_h.to(grad_w.dtype))
                    if len(params) > 1 and want_params[1]:
                        grad_params[1].index_add_(0, y, g.to(params[1].dtype))
                        grad_params[1].sub_(((g * scale).to(dtype) @ e).to(params[1].dtype))
                    continue
                # any other head (LoRA: base + B@A·scale, dropout): autograd through one chunk's module call
                with torch.enable_grad():
                    h_leaf = h.detach().requires_grad_(want_hidden)
                    with torch.autocast(h.device.type, dtype=ctx.autocast[1], enabled=ctx.autocast[0]):
                        logits = head(h_leaf)
                    # g · (onehot(y) - P)
                    grad_logits = torch.exp(logits.detach().float() - lse[rows].unsqueeze(1)).mul_(-g.unsqueeze(1))
                    grad_logits.scatter_add_(1, y.unsqueeze(1), g.unsqueeze(1))
                    wanted = [p for p, want in zip(params, want_params) if want]
                    grads = torch.autograd.grad(
                        logits, ([h_leaf] if want_hidden else []) + wanted, grad_logits.to(logits.dtype),
                        allow_unused=True,
                    )  # fmt: skip
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
