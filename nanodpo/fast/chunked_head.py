"""The fast path of log-probs: never materialize the [batch, seq, vocab] logits.

The readable path (nanodpo/logps.py) takes `model(...).logits`, a [N, T, V] tensor: with Qwen2.5's vocabulary
(V = 151,936) a batch of 8 sequences of 1,000 tokens is 4.9 GB of fp32 logits, another 4.9 GB of log-softmax, and
the same again in backward. Yet DPO, SFT and PT only need ONE number per scored token: log p(label). So:

  1. Run the model once, with its LM head's forward replaced for that call (`scored_label_stats`): the head
     receives the final hidden states [R, L, H] (H ~ 1,000, not V ~ 150,000) of every position
     (`logits_to_keep=0`) and returns per-token values instead of logits. Doing it inside the head's own call
     matters under sharding: FSDP2 and ZeRO-3 gather the head's weight only around its forward (and again, through
     hooks on its outputs, for its backward).
  2. Gather the hidden states of the M positions whose label is scored (completion / assistant tokens only; prompt
     and padding positions are never projected): [M, H].
  3. Project them through the LM head `chunk_size` tokens at a time (`ChunkedLabelLogps`). Each chunk's logits
     [C, V] live only inside that chunk's computation: forward keeps, per token, log p(label), the log-sum-exp and
     the metrics (entropy, mean logit, top-1, log Σp² for WPO); backward recomputes one chunk's logits at a time and
     turns them into gradients:
            d log p(y) / d logits = onehot(y) - softmax(logits)
            grad_hidden = g · (onehot - p) @ W          grad_W += (g · (onehot - p))ᵀ @ hidden
     so neither pass holds more than one chunk of logits. The head's weights enter as explicit inputs of the
     autograd function and get ONE gradient (summed over chunks) — tied embeddings, DDP's one-hook-per-parameter
     rule and FSDP2's one reduce-scatter per unit all just work. A head that is not a plain `nn.Linear` (peft LoRA
     on lm_head, with its B@A·scale term and dropout) runs its class's forward on each chunk and is differentiated
     with `torch.autograd.grad`.
  4. Scatter the per-token values back into the [N, T-1] per-sequence layout of `TokenStats` (no vocab dimension:
     cheap), so the losses and metrics downstream are unchanged.

`hidden_index` decouples where a scored token's hidden state sits (a flat index into the model's [R, L] rows) from
where its value goes ([N, T-1], sequence by sequence). For an ordinary padded batch it is the identity; for packed
and prefix-shared DPO rows (nanodpo/fast/dpo_packing.py) it points into the packed rows.

Tested equal to the readable path (log-probs, losses, gradients, metrics within 1e-5 in fp32; tied and untied
embeddings; LoRA on the LM head; gradient checkpointing): tests/test_fastpath.py; under FSDP2 on 2 processes equal
to 1 process (full fine-tuning with an online or precomputed reference, LoRA): tests/test_distributed.py.
"""

import contextlib
import inspect

import torch
from torch import nn

from nanodpo.errors import say_once
from nanodpo.logps import ModelInputs, TokenStats
from nanodpo.model import unwrap

DEFAULT_CHUNK_SIZE = 256  # tokens per LM-head chunk: 256 x 151,936 fp32 logits = 156 MB per buffer (two at most)

# Models whose logits are not just lm_head(hidden): a soft cap or a scale after the head. The fast path would give
# other numbers, so these use the readable path.
_LOGIT_POSTPROCESSING = (
    "final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier", "output_multiplier_scale",
    "lm_head_multiplier",
)  # fmt: skip

def fast_path_unsupported(model: nn.Module) -> str | None:
    """Why the fast path cannot run this model (None = it can)."""
    inner = unwrap(model)
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    if not hasattr(base, "get_output_embeddings") or base.get_output_embeddings() is None:
        return f"{type(base).__name__} has no output embeddings (LM head)"
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        return f"{type(base).__name__}.forward has no logits_to_keep argument"
    config = getattr(base, "config", None)
    for name in _LOGIT_POSTPROCESSING:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            return f"the model post-processes its logits ({name}={value})"
    return None


# ----------------------------------------------------------------------------------------------------------------
# 1. The chunked projection.


def _plain_linear(head: nn.Module) -> bool:
    """An nn.Linear computing x @ W.T + b: also under FSDP2, which swaps the class for an `FSDPLinear` subclass with
    the same forward; not bitsandbytes' Linear4bit (an nn.Linear with its own forward) nor peft's LoRA layer."""
    return isinstance(head, nn.Linear) and type(head).forward is nn.Linear.forward


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

    It runs inside the head's forward (`call_as_forward`): any hook on the head has already run, so a plain
    nn.Linear is applied with its (gathered) `params` directly, and any other head (peft LoRA) with its class's
    forward — never as a module call, which would fire the hooks once per chunk. A plain fp32 head without autocast
    writes into one reused buffer (`torch.mm(..., out=)`): no fresh vocab-sized allocation per chunk (a new 0.5 GB
    tensor is page faults before it is anything else). Otherwise the head runs under the forward pass's autocast.
    """

    def __init__(self, head: nn.Module, params, hidden: torch.Tensor, chunk_size: int, autocast):
        self.head, self.autocast, self.device_type = head, autocast, hidden.device.type
        self.plain = _plain_linear(head)
        self.weight, self.bias = (params[0], params[1] if len(params) > 1 else None) if self.plain else (None, None)
        self.buffered = (
            self.plain and not autocast[0] and self.weight.dtype == hidden.dtype == torch.float32
        )
        rows = min(chunk_size, hidden.shape[0])
        self.buffer = scratch("logits", rows, self.weight.shape[0], hidden) if self.buffered else None

    def raw(self, h: torch.Tensor) -> torch.Tensor:
        """The head's output in its own dtype (bf16 under bf16 autocast)."""
        if self.buffered:
            out = torch.mm(h, self.weight.t(), out=self.buffer[: h.shape[0]])
            return out if self.bias is None else out.add_(self.bias)
        with torch.autocast(self.device_type, dtype=self.autocast[1], enabled=self.autocast[0]):
            if self.plain:
                return nn.functional.linear(h, self.weight, self.bias)
            return type(self.head).forward(self.head, h)

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
        project = _Projection(head, params, hidden, chunk_size, ctx.autocast)
        if project.buffered and want_metrics:
            weight_mean = project.weight.mean(0)
            bias_mean = project.bias.mean() if project.bias is not None else 0.0
        work = scratch("work", min(chunk_size, m), project.weight.shape[0], hidden) if plain else None
        weight = project.weight.float() if keep_grad_hidden else None
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
        project = _Projection(head, params, hidden, chunk_size, ctx.autocast)
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
                # any other head (LoRA: base + B@A·scale, dropout): autograd through one chunk of its forward
                with torch.enable_grad():
                    h_leaf = h.detach().requires_grad_(want_hidden)
                    logits = project.raw(h_leaf)
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
) -> tuple[torch.Tensor, ...]:
    """Per-token (logps, entropy, mean_logits, is_top1, log_sum_sq_probs) for M scored tokens: hidden [M, H] (the
    hidden state that predicts each label), labels [M]. Metrics not asked for are empty tensors."""
    chunk_size = chunk_size if chunk_size > 0 else max(1, hidden.shape[0])
    return ChunkedLabelLogps.apply(hidden, labels, head, chunk_size, with_metrics, with_sum_sq, *head_params(head))


# ----------------------------------------------------------------------------------------------------------------
# 2. The whole fast path: one forward whose LM-head call gathers, projects chunk by chunk; then scatter back.


def identity_index(batch_size: int, length: int, device=None) -> torch.Tensor:
    """hidden_index of an ordinary [N, T] batch: the label at (n, t+1) is predicted by hidden state n·T + t."""
    return torch.arange(batch_size * length, device=device).view(batch_size, length)[:, :-1]


@contextlib.contextmanager
def forward_replaced(module: nn.Module, function):
    """Within the block, calling `module` runs `function` instead of its forward — with every hook the module
    carries (an instance attribute `forward` shadows the class's one; `nn.Module.__call__` runs the hooks around it)."""
    own = module.__dict__.get("forward")  # an instance-level forward already there (rare) is put back afterwards
    module.forward = function
    try:
        yield
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own


def scored_label_stats(
    model: nn.Module,
    inputs: dict,
    scored_index: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int,
    with_metrics: bool,
    with_sum_sq: bool,
) -> tuple[torch.Tensor, ...]:
    """One forward of `model(**inputs)` (through its DDP / FSDP / peft wrappers) in which the LM head's own call IS
    the chunked projection: the head receives the final hidden states of every position [R, L, H]
    (`logits_to_keep=0`), keeps the M scored ones (`scored_index`, flat into R·L) and returns `label_stats` of them
    in place of logits.

    Why inside the head's call: a sharded head has its full weight only there. FSDP2's hooks all-gather the head's
    unit before its forward and register, on the forward's outputs, the pre-backward hook that gathers it again for
    backward, and the gradient reaching the gathered weight is reduce-scattered back to the shards once; DeepSpeed
    ZeRO-3's hooks fetch and release the partitioned weight the same way, and accelerate's offloading hooks move it
    to the device. So the projection runs exactly where those hooks expect the weight to be used — TRL 1.16's
    `add_fused_lm_head` does the same by replacing the model's forward. The values are read from the model's output
    (hooks may replace the head's output tensors with their own, e.g. ZeRO-3's backward hooks).
    """
    head = unwrap(model).get_output_embeddings()

    def chunked_head_forward(hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
        kept = hidden.reshape(-1, hidden.shape[-1]).index_select(0, scored_index)  # [M, H]
        return label_stats(kept, labels, head, chunk_size, with_metrics, with_sum_sq)

    with forward_replaced(head, chunked_head_forward):
        output = model(**{**inputs, "use_cache": False, "logits_to_keep": 0})
    return tuple(output.logits)


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
    n, t = input_ids.shape
    mask = loss_mask[:, 1:].bool()
    if hidden_index is None:
        hidden_index = identity_index(n, t, device=input_ids.device)
    scored_index, labels = hidden_index[mask], input_ids[:, 1:][mask]
    reason = fast_path_unsupported(model)
    if reason is None:
        values = scored_label_stats(model, inputs, scored_index, labels, chunk_size, with_metrics, with_sum_sq)
    else:  # the model's own full logits, then the same gather and math (exact, but no memory saving)
        say_once(f"fast log-prob path unavailable ({reason}): projecting every position with the model's own head")
        logits = model(**{**inputs, "use_cache": False}).logits
        kept_logits = logits.reshape(-1, logits.shape[-1]).index_select(0, scored_index)
        values = label_stats(kept_logits, labels, nn.Identity(), chunk_size, with_metrics, with_sum_sq)
    logps, entropy, mean_logits, is_top1, sum_sq = values

    def per_sequence(v: torch.Tensor) -> torch.Tensor:
        return torch.zeros(n, t - 1, dtype=v.dtype, device=v.device).masked_scatter(mask, v)

    return TokenStats(
        logps=per_sequence(logps),
        mask=mask.float(),
        entropy=per_sequence(entropy) if with_metrics else None,
        mean_logits=per_sequence(mean_logits) if with_metrics else None,
        is_top1=per_sequence(is_top1).bool() if with_metrics else None,
        log_sum_sq_probs=per_sequence(sum_sq) if with_sum_sq else None,
    )


def chunked_token_logps(
    model: nn.Module,
    inputs: ModelInputs,
    with_metrics: bool = True,
    with_sum_sq: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> TokenStats:
    """`nanodpo.logps.token_logps`, by the chunked head: what `--logps chunked` runs in its place."""
    return fast_token_stats(
        model, inputs.model_kwargs, inputs.labels, inputs.loss_mask, inputs.hidden_index, chunk_size,
        with_metrics, with_sum_sq,
    )  # fmt: skip
