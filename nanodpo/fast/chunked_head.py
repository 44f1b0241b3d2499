"""The fast path of log-probs: the LM head projects only the scored tokens, a chunk at a time.

The readable path (nanodpo/logps.py) takes `model(...).logits`, [N, T, V]: with Qwen2.5's vocabulary (V = 151,936)
8 sequences of 1,000 tokens are 4.9 GB of fp32 logits, as much again for the log-softmax and in backward. DPO, SFT
and PT need one number per scored token, log p(label). So `fast_token_stats` runs the model once with its LM head's
forward replaced (`scored_label_stats`): the head receives the final hidden states, keeps the M scored ones and
projects them `chunk_size` tokens at a time (`ChunkedLabelLogps`, whose docstring has the math), so no pass holds
more than one chunk's logits; the per-token values go back into the [N, T-1] layout of `TokenStats`, and the losses
downstream are unchanged. Tested equal to the readable path in tests/test_fastpath.py.
"""

import contextlib
import inspect
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from nanodpo.errors import say_once
from nanodpo.logps import ModelInputs, TokenStats
from nanodpo.model import unwrap

# Tokens per LM-head chunk, by device. Besides its matmuls (8·C·V·H FLOPs: forward, backward's recomputation and two
# products) a chunk costs a fixed traffic: the head's weight read three times, its gradient read and written in fp32
# — ~2 GB for Qwen2.5-0.5B's head (151,936 × 896), 0.5 ms at an H200's 4.8 TB/s, against 1.4 ms of matmuls for 1,024
# tokens at ~790 TFLOP/s (at 256 tokens the traffic would outweigh them). So CUDA: 1,024 (a [1024, 151,936] fp32
# buffer is 622 MB, ~2 GB live in the loop; tests/gpu sweeps 256-4,096). CPU: 256, the reused buffers 156 MB.
CHUNK_SIZE = {"cpu": 256, "cuda": 1024}
DEFAULT_CHUNK_SIZE = None  # chunk_size=None: CHUNK_SIZE of the hidden states' device

# Models whose logits are not just lm_head(hidden): a soft cap or a scale after the head. The fast path would give
# other numbers, so these use the readable path.
_LOGIT_POSTPROCESSING = (
    "final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier", "output_multiplier_scale",
    "lm_head_multiplier",
)  # fmt: skip

_UNSUPPORTED: "weakref.WeakKeyDictionary[nn.Module, str | None]" = weakref.WeakKeyDictionary()


def fast_path_unsupported(model: nn.Module) -> str | None:
    """Why the fast path cannot run this model (None = it can): looked at once per model, then remembered."""
    base = unwrap(model)
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    if base not in _UNSUPPORTED:
        _UNSUPPORTED[base] = _unsupported_reason(base)
    return _UNSUPPORTED[base]


def _unsupported_reason(base: nn.Module) -> str | None:
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


UNSHIFTED_LIMIT = 50.0  # every |row max logit| below this: exp(logits) is safe without subtracting the max


def _set_rng_states(states: tuple) -> None:
    torch.set_rng_state(states[0])
    if states[1] is not None:
        torch.cuda.set_rng_state(states[1])


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
    """The head applied to one chunk: logits [C, V] in the head's dtype (`raw`).

    It runs inside the head's forward (`forward_replaced`): any hook on the head has already run, so a plain
    nn.Linear is applied with its (gathered) `params` directly, and any other head (peft LoRA) with its class's
    forward — never as a module call, which would fire the hooks once per chunk. A plain fp32 head without autocast
    writes into one reused buffer (`torch.mm(..., out=)`): no fresh vocab-sized allocation per chunk (a new 0.5 GB
    tensor is page faults before it is anything else). Otherwise the head runs under the forward pass's autocast.
    """

    def __init__(self, head: nn.Module, params, hidden: torch.Tensor, chunk_size: int, autocast):
        self.head, self.autocast, self.device_type = head, autocast, hidden.device.type
        self.plain = _plain_linear(head)
        self.weight, self.bias = (params[0], params[1] if len(params) > 1 else None) if self.plain else (None, None)
        self.buffered = self.plain and not autocast[0] and self.weight.dtype == hidden.dtype == torch.float32
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


@dataclass
class _Values:
    """What the forward's chunk loop computes: fp32 [M] per scored token (metrics not asked for: empty)."""

    logps: torch.Tensor
    lse: torch.Tensor  # log Σ_v exp(logits): backward's P = exp(logits - lse)
    top: torch.Tensor  # the row's max logit
    entropy: torch.Tensor
    mean_logits: torch.Tensor
    is_top1: torch.Tensor
    sum_sq: torch.Tensor
    grad_hidden_part: torch.Tensor | None  # [M, H] W[y] - P @ W, for a frozen plain head (else None)


class ChunkedLabelLogps(torch.autograd.Function):
    """log p(label) for M hidden states through the LM head, `chunk_size` tokens at a time.

    forward(hidden [M, H], labels [M], head, chunk_size, want_metrics, want_sum_sq, *params)
      -> logps [M] (differentiable w.r.t. hidden and params), and detached [M] tensors: entropy, mean_logits,
         is_top1 (0/1), log_sum_sq_probs (empty tensors when not asked for).
    params: the tensors the head's gradient goes to (`head_params`), explicit inputs so they get ONE gradient summed
    over chunks (tied embeddings, DDP's one hook per parameter and FSDP2's one reduce-scatter per unit just work).
    The head runs under the caller's autocast (bf16 logits under bf16 autocast, as in the readable path); everything
    after it is fp32.

    Per chunk, with e = exp(logits - shift) and s = Σ e, so p = e / s and lse = shift + log s:
        log p(y) = logits[y] - lse          entropy = lse - Σ e·logits / s          log Σ p² = log Σ e² - 2 log s
    shift = 0 (saving a pass over [C, V]) when every row's max logit is within ±UNSHIFTED_LIMIT — no overflow (e^50 ·
    151,936 ≪ fp32's 3.4e38, also through backward's e @ W), the largest term of every row far from underflow; else
    the row max. The loop runs unshifted, and is run again shifted only if a row's max was outside: ONE check per
    call, after the loop (a check per chunk would stall a GPU's host once per chunk). In backward, with g the
    incoming gradient of each token's log p(y), d log p(y) / d logits = onehot(y) - P, P = exp(logits - lse):
        grad_hidden = g · (W[y] - P @ W)        grad_W = Σ_tokens g·h at row y  -  Pᵀ @ (g·h)
    recomputing one chunk's logits at a time (the per-token g scales the small [C, H] side, never the [C, V] one);
    grad_W is summed over the chunks in fp32 and cast to the weight's dtype once. A frozen plain head (LoRA
    elsewhere) needs only grad_hidden, whose g-free part W[y] - P @ W is kept from the forward: its backward projects
    nothing. Any other head (peft LoRA on lm_head, with its B@A·scale term and dropout) runs its class's forward on
    each chunk and is differentiated with `torch.autograd.grad`, replaying the forward's dropout masks.
    """

    @staticmethod
    def forward(ctx, hidden, labels, head, chunk_size, want_metrics, want_sum_sq, *params):
        device_type = hidden.device.type
        ctx.autocast = torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
        project = _Projection(head, params, hidden, chunk_size, ctx.autocast)
        if not project.plain:  # a head with dropout recomputes the same masks in backward
            ctx.rng_states = torch.get_rng_state(), torch.cuda.get_rng_state() if hidden.is_cuda else None
        # (forward runs without grad mode; whether a gradient will be asked for is known from the inputs)
        frozen = project.plain and hidden.requires_grad and not any(p.requires_grad for p in params)
        wants = (want_metrics, want_sum_sq, frozen)
        ctx.unshifted = True
        values = _forward_chunks(project, hidden, labels, chunk_size, *wants, unshifted=True)
        if not bool((values.top.abs() < UNSHIFTED_LIMIT).all()):  # the call's one host sync
            ctx.unshifted = False
            if not project.plain:
                _set_rng_states(ctx.rng_states)
            values = _forward_chunks(project, hidden, labels, chunk_size, *wants, unshifted=False)
        ctx.head, ctx.chunk_size, ctx.lse, ctx.grad_hidden_part = head, chunk_size, values.lse, values.grad_hidden_part
        ctx.save_for_backward(hidden, labels, *params)
        ctx.mark_non_differentiable(values.entropy, values.mean_logits, values.is_top1, values.sum_sq)
        return values.logps, values.entropy, values.mean_logits, values.is_top1, values.sum_sq

    @staticmethod
    def backward(ctx, grad_logps, *unused_metric_grads):
        hidden, labels, *params = ctx.saved_tensors
        want_hidden, want_params = ctx.needs_input_grad[0], ctx.needs_input_grad[6:]
        g = grad_logps.float()
        if ctx.grad_hidden_part is not None:  # a frozen plain head: prepared in forward
            grad_hidden, grads = (g.unsqueeze(1) * ctx.grad_hidden_part).to(hidden.dtype), [None] * len(params)
        elif _plain_linear(ctx.head):
            grad_hidden, grads = _plain_head_backward(ctx, hidden, labels, params, g, want_hidden, want_params)
        else:
            grad_hidden, grads = _module_head_backward(ctx, hidden, labels, params, g, want_hidden, want_params)
        return (grad_hidden, None, None, None, None, None, *grads)  # (labels, head, chunk_size, the two wants)


def _forward_chunks(project, hidden, labels, chunk_size, want_metrics, want_sum_sq, frozen, unshifted) -> _Values:
    """ChunkedLabelLogps' forward loop: the vocab-sized tensors live only in the loop body, one chunk at a time."""
    m = hidden.shape[0]
    new = lambda wanted: hidden.new_zeros(m if wanted else 0, dtype=torch.float32)  # noqa: E731
    v = _Values(new(True), new(True), new(True), new(want_metrics), new(want_metrics), new(want_metrics),
                new(want_sum_sq), torch.zeros_like(hidden, dtype=torch.float32) if frozen else None)  # fmt: skip
    if project.buffered and want_metrics:  # mean over the vocabulary: h · mean_v(W_v) (+ mean bias), no [C, V] pass
        weight_mean = project.weight.mean(0)
        bias_mean = project.bias.mean() if project.bias is not None else 0.0
    work = scratch("work", min(chunk_size, m), project.weight.shape[0], hidden) if project.plain else None
    weight = project.weight.float() if frozen else None
    with torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, m, chunk_size):
            rows = slice(start, start + chunk_size)
            h, y = hidden[rows], labels[rows]
            logits = project.raw(h).float()  # [C, V]
            top = v.top[rows] = logits.amax(dim=-1)
            target = logits.gather(1, y.unsqueeze(1)).squeeze(1)
            out = work[: h.shape[0]] if work is not None else None
            e = torch.exp(logits, out=out) if unshifted else torch.sub(logits, top.unsqueeze(1), out=out).exp_()
            total = e.sum(-1)
            lse = v.lse[rows] = total.log() if unshifted else total.log() + top
            v.logps[rows] = target - lse
            if want_metrics:
                v.mean_logits[rows] = h.float() @ weight_mean + bias_mean if project.buffered else logits.mean(-1)
                v.is_top1[rows] = (target >= top).float()
                v.entropy[rows] = lse - _rowwise_dot(e, logits) / total
            if want_sum_sq:
                v.sum_sq[rows] = _rowwise_dot(e, e).log() - 2 * total.log()
            if frozen:
                v.grad_hidden_part[rows] = weight[y] - (e @ weight) / total.unsqueeze(1)
    return v


def _fp32_grads(params, want_params) -> list[torch.Tensor | None]:
    """Gradient accumulators, summed over the chunks in fp32 whatever the parameters' dtype."""
    return [torch.zeros_like(p, dtype=torch.float32) if want else None for p, want in zip(params, want_params)]


def _cast_grads(grads, params) -> list[torch.Tensor | None]:
    return [None if grad is None else grad.to(p.dtype) for grad, p in zip(grads, params)]


def _plain_head_backward(ctx, hidden, labels, params, g_all, want_hidden, want_params):
    """A plain nn.Linear head's backward, its matmuls written out: no autograd graph, gradients summed in place."""
    project = _Projection(ctx.head, params, hidden, ctx.chunk_size, ctx.autocast)
    grad_hidden = torch.zeros_like(hidden) if want_hidden else None
    grads = _fp32_grads(params, want_params)
    weight = None  # the weight in the dtype of the logits (cast once, not per chunk)
    for start in range(0, hidden.shape[0], ctx.chunk_size):
        rows = slice(start, start + ctx.chunk_size)
        h, y, g, lse = hidden[rows], labels[rows], g_all[rows], ctx.lse[rows]
        logits = project.raw(h)  # a fresh tensor (or the reused buffer): ours to overwrite
        dtype = logits.dtype
        # P = e · scale: e = exp(logits) and scale = exp(-lse), folded into the small [C, H] side; or, for logits too
        # large for that, e = exp(logits - lse) and scale = 1
        logits = logits.float()
        if ctx.unshifted:
            e, scale = logits.exp_(), torch.exp(-lse)
        else:
            e, scale = logits.sub_(lse.unsqueeze(1)).exp_(), torch.ones_like(g)
        e = e.to(dtype)
        weight = params[0].to(dtype) if weight is None else weight
        if want_hidden:
            grad_h = weight[y].float() - (e @ weight).float() * scale.unsqueeze(1)
            grad_hidden[rows] = (g.unsqueeze(1) * grad_h).to(hidden.dtype)
        if grads[0] is not None:
            scaled = ((g * scale).unsqueeze(1) * h.float()).to(dtype)
            if dtype == torch.float32:
                grads[0].addmm_(e.t(), scaled, alpha=-1)  # in place: no [V, H] temporary per chunk
            else:
                grads[0].sub_(e.t() @ scaled)  # the chunk's bf16 product, added to the fp32 sum
            grads[0].index_add_(0, y, g.unsqueeze(1) * h.float())  # the onehot part: + g·h at row y
        if len(grads) > 1 and grads[1] is not None:
            grads[1].index_add_(0, y, g)
            grads[1].sub_((g * scale).to(dtype) @ e)
    return grad_hidden, _cast_grads(grads, params)


def _module_head_backward(ctx, hidden, labels, params, g_all, want_hidden, want_params):
    """Any other head (LoRA: base + B@A·scale, dropout): autograd through one chunk of its forward at a time, from
    the forward's random state (the same dropout masks)."""
    project = _Projection(ctx.head, params, hidden, ctx.chunk_size, ctx.autocast)
    grad_hidden = torch.zeros_like(hidden) if want_hidden else None
    grads = _fp32_grads(params, want_params)
    wanted = [p for p, want in zip(params, want_params) if want]
    with torch.random.fork_rng(devices=[hidden.device] if hidden.is_cuda else []):
        _set_rng_states(ctx.rng_states)
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            h, y, g = hidden[rows], labels[rows], g_all[rows]
            with torch.enable_grad():
                h_leaf = h.detach().requires_grad_(want_hidden)
                logits = project.raw(h_leaf)
                # g · (onehot(y) - P)
                grad_logits = torch.exp(logits.detach().float() - ctx.lse[rows].unsqueeze(1)).mul_(-g.unsqueeze(1))
                grad_logits.scatter_add_(1, y.unsqueeze(1), g.unsqueeze(1))
                inputs = ([h_leaf] if want_hidden else []) + wanted
                chunk_grads = list(torch.autograd.grad(logits, inputs, grad_logits.to(logits.dtype), allow_unused=True))
            if want_hidden:
                grad_hidden[rows] = chunk_grads.pop(0)
            for grad, chunk_grad in zip([grad for grad in grads if grad is not None], chunk_grads):
                if chunk_grad is not None:
                    grad.add_(chunk_grad)
    return grad_hidden, _cast_grads(grads, params)


def head_params(head: nn.Module) -> list[torch.Tensor]:
    """The tensors the head's gradient flows into: (weight[, bias]) of a plain Linear (even frozen: an explicit
    input, so backward can use it); a wrapped head's trainable parameters otherwise."""
    if _plain_linear(head):
        return [head.weight] + ([head.bias] if head.bias is not None else [])
    return [p for p in head.parameters() if p.requires_grad]


def label_stats(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module, chunk_size: int | None,
                with_metrics: bool, with_sum_sq: bool) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """Per-token (logps, entropy, mean_logits, is_top1, log_sum_sq_probs) for M scored tokens: hidden [M, H] (the
    hidden state that predicts each label), labels [M]. Metrics not asked for are empty tensors. chunk_size: None =
    CHUNK_SIZE of the device, 0 = all M at once."""
    size = CHUNK_SIZE.get(hidden.device.type, CHUNK_SIZE["cpu"]) if chunk_size is None else chunk_size
    chunk_size = size if size > 0 else max(1, hidden.shape[0])
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
        del module.forward
        if own is not None:
            module.forward = own


def scored_label_stats(model: nn.Module, inputs: dict, scored_index: torch.Tensor, labels: torch.Tensor,
                       chunk_size: int | None, with_metrics: bool, with_sum_sq: bool) -> tuple:  # fmt: skip
    """One forward of `model(**inputs)` (through its DDP / FSDP / peft wrappers) in which the LM head's own call IS
    the chunked projection: the head receives every position's final hidden state [R, L, H] (`logits_to_keep=0`),
    keeps the M scored ones (`scored_index`, flat into R·L) and returns `label_stats` of them in place of logits —
    where FSDP2's and ZeRO-3's hooks gather a sharded head's weight, for forward and backward (as TRL 1.16's
    `add_fused_lm_head`). The values are read from the model's output: hooks may replace the head's outputs."""
    head = unwrap(model).get_output_embeddings()

    def chunked_head_forward(hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
        kept = hidden.reshape(-1, hidden.shape[-1]).index_select(0, scored_index)  # [M, H]
        return label_stats(kept, labels, head, chunk_size, with_metrics, with_sum_sq)

    with forward_replaced(head, chunked_head_forward):
        output = model(**{**inputs, "use_cache": False, "logits_to_keep": 0})
    return tuple(output.logits)


def fast_token_stats(model: nn.Module, inputs: dict, input_ids: torch.Tensor, loss_mask: torch.Tensor,
                     hidden_index: torch.Tensor | None = None, chunk_size: int | None = DEFAULT_CHUNK_SIZE,
                     with_metrics: bool = True, with_sum_sq: bool = False) -> TokenStats:  # fmt: skip
    """The fast equivalent of `token_stats(model(**inputs).logits, input_ids, loss_mask, ...)`: inputs, input_ids,
    loss_mask and hidden_index as `nanodpo.logps.ModelInputs`' model_kwargs, labels, loss_mask and hidden_index
    (None = the identity: the model's rows are the sequences)."""
    n, t = input_ids.shape
    mask = loss_mask[:, 1:].bool()
    if hidden_index is None:
        hidden_index = identity_index(n, t, device=input_ids.device)
    scored_index, labels = hidden_index[mask], input_ids[:, 1:][mask]
    stats = scored_label_stats if fast_path_unsupported(model) is None else own_logits_label_stats
    logps, entropy, mean_logits, is_top1, sum_sq = stats(
        model, inputs, scored_index, labels, chunk_size, with_metrics, with_sum_sq
    )

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


def chunked_token_logps(model: nn.Module, inputs: ModelInputs, with_metrics: bool = True, with_sum_sq: bool = False,
                        chunk_size: int | None = DEFAULT_CHUNK_SIZE) -> TokenStats:  # fmt: skip
    """`nanodpo.logps.token_logps`, by the chunked head: what `--logps chunked` runs in its place."""
    return fast_token_stats(model, inputs.model_kwargs, inputs.labels, inputs.loss_mask, inputs.hidden_index,
                            chunk_size, with_metrics, with_sum_sq)  # fmt: skip


def own_logits_label_stats(model, inputs, scored_index, labels, chunk_size, with_metrics, with_sum_sq):
    """`scored_label_stats` for a model the fast path cannot run: its own full logits, then the same gather and math
    (exact, but no memory saving)."""
    reason = fast_path_unsupported(model)
    say_once(f"fast log-prob path unavailable ({reason}): projecting every position with the model's own head")
    logits = model(**{**inputs, "use_cache": False}).logits
    kept_logits = logits.reshape(-1, logits.shape[-1]).index_select(0, scored_index)
    return label_stats(kept_logits, labels, nn.Identity(), chunk_size, with_metrics, with_sum_sq)
