"""The pieces every training loop shares: accelerator, data order, optimizer, learning-rate schedule, step counting.

The loops themselves live in train_pt.py, train_sft.py and train_dpo.py, top to bottom; what is here is what would
otherwise be pasted three times.
"""

import contextlib
import math
import os
import random

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Sampler

from nanodpo.model import decay_parameter_groups
from nanodpo.tracking import MetricMeans


def make_accelerator(cfg) -> Accelerator:
    """One process, DDP, FSDP or DeepSpeed: whatever `accelerate launch` was configured with.

    The accelerator owns gradient accumulation: inside `accelerator.accumulate(model)`, `accelerator.backward(loss)`
    divides the loss by `gradient_accumulation_steps` and (under DDP) skips the gradient all-reduce on every
    micro-batch but the last, so an optimizer step's gradient is the mean of its micro-batch gradients.
    """
    mixed_precision = "bf16" if cfg.bf16 else "fp16" if cfg.fp16 else "no"
    accelerator = Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation_steps, mixed_precision=mixed_precision)
    deepspeed_plugin = accelerator.state.deepspeed_plugin
    if deepspeed_plugin is not None:
        # DeepSpeed clips inside engine.step (accelerator.clip_grad_norm_ then only reads the norm back). Left "auto",
        # accelerate would fill in 1.0 whatever --max_grad_norm says: use the training config's value (0 = off).
        ds_config = deepspeed_plugin.deepspeed_config
        if ds_config.get("gradient_clipping", "auto") == "auto":
            ds_config["gradient_clipping"] = cfg.max_grad_norm
        for section in ("optimizer", "scheduler"):
            if section in ds_config:
                from nanodpo.errors import UserError

                raise UserError(
                    f"the DeepSpeed config has a '{section}' section: remove it, the optimizer and learning-rate "
                    "schedule come from the training config (--optim, --learning_rate, --lr_scheduler_type)"
                )
    cores = os.cpu_count() or 1
    if accelerator.device.type == "cpu" and accelerator.num_processes == 1 and torch.get_num_threads() == 1 < cores:
        # `accelerate launch` without --cpu sets OMP_NUM_THREADS=1 on a machine with no GPU: a 2-4x slower run.
        accelerator.print(
            f"note: torch computes with 1 thread on a {cores}-core CPU (OMP_NUM_THREADS="
            f"{os.environ.get('OMP_NUM_THREADS', 'unset')}); for all cores: accelerate launch "
            f"--num_cpu_threads_per_process {cores} ..., or python <script> ..."
        )
    return accelerator


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class EpochSampler(Sampler):
    """Row order for one epoch: a seeded permutation (`random`, reshuffled with seed + epoch) or file order.

    The same seed and epoch always give the same order, on every process and after a restart.
    """

    def __init__(self, num_rows: int, shuffle: bool, seed: int):
        self.num_rows = num_rows
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.num_rows))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.num_rows, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_rows


def make_train_loader(examples: list, collate_fn, cfg) -> tuple[DataLoader, EpochSampler]:
    sampler = EpochSampler(len(examples), shuffle=cfg.train_sampling_strategy == "random", seed=cfg.seed)
    loader = DataLoader(examples, batch_size=cfg.per_device_train_batch_size, sampler=sampler, collate_fn=collate_fn)
    return loader, sampler


def make_eval_loader(examples: list, collate_fn, batch_size: int) -> DataLoader:
    return DataLoader(examples, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)


def count_training_steps(cfg, micro_batches_per_epoch: int) -> tuple[int, int]:
    """(total optimizer steps, optimizer steps per epoch). A last partial accumulation group still makes a step."""
    steps_per_epoch = max(1, math.ceil(micro_batches_per_epoch / cfg.gradient_accumulation_steps))
    if cfg.max_steps > 0:
        return cfg.max_steps, steps_per_epoch
    return max(1, math.ceil(cfg.num_train_epochs * steps_per_epoch)), steps_per_epoch


def make_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    groups = decay_parameter_groups(model, cfg.weight_decay)
    if cfg.optim == "sgd":
        return torch.optim.SGD(groups, lr=cfg.learning_rate)
    # The fused AdamW kernel is one launch for all parameters instead of several per tensor (CUDA only).
    fused = torch.cuda.is_available() and all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(
        groups,
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        fused=fused or None,
    )


def warmup_steps(cfg, total_steps: int) -> int:
    return cfg.warmup_steps if cfg.warmup_steps > 0 else math.ceil(cfg.warmup_ratio * total_steps)


def lr_multiplier(step: int, total_steps: int, warmup: int, schedule: str) -> float:
    """Learning rate at optimizer step `step` (0-based) as a fraction of the peak — HF's schedule formulas.

    warmup: linear from 0 to 1 over `warmup` steps; then constant, linear decay to 0, or half a cosine to 0.
    """
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"unknown lr_scheduler_type {schedule!r}")


def make_scheduler(optimizer: torch.optim.Optimizer, cfg, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = warmup_steps(cfg, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, total_steps, warmup, cfg.lr_scheduler_type)
    )


# ----------------------------------------------------------------------------------------------------------------
# Token-mean language-model loss (PT and SFT).


def step_loader(examples: list, cfg) -> tuple[DataLoader, EpochSampler]:
    """Batches of one optimizer step per process: per_device_train_batch_size × gradient_accumulation_steps examples,
    as a plain list. The loop splits it into micro-batches itself, because the loss of a step is normalised by the
    token count of the whole step, which must be known before the first micro-batch's backward."""
    sampler = EpochSampler(len(examples), shuffle=cfg.train_sampling_strategy == "random", seed=cfg.seed)
    batch_size = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    return DataLoader(examples, batch_size=batch_size, sampler=sampler, collate_fn=list), sampler


def micro_batches(step_examples: list, micro_batch_size: int) -> list[list]:
    return [step_examples[i : i + micro_batch_size] for i in range(0, len(step_examples), micro_batch_size)]


def count_targets(batch: dict) -> int:
    """Tokens the loss scores in a collated batch: labels other than -100, after the one-token shift."""
    return int((batch["labels"][:, 1:] != -100).sum())


def lm_token_stats(model, batch: dict, with_metrics: bool = True, chunk_size: int | None = None):
    """Forward a collated LM batch (input_ids, labels in HF convention, attention mask or packing keys) and return
    per-token statistics of its target tokens (see nanodpo/logps.py).

    chunk_size 0: the readable path (full [rows, length, vocab] logits). Otherwise (default: the fast path's
    DEFAULT_CHUNK_SIZE) the LM head runs only at target tokens, chunk_size at a time (nanodpo/fastpath.py)."""
    from nanodpo.fastpath import DEFAULT_CHUNK_SIZE, fast_token_stats
    from nanodpo.logps import token_stats

    chunk_size = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    inputs["use_cache"] = False  # never build a KV cache in training (with packed rows it breaks isolation)
    labels = batch["labels"]
    targets = labels != -100
    if chunk_size > 0:
        return fast_token_stats(model, inputs, labels.clamp(min=0), targets.long(), None, chunk_size, with_metrics)
    logits = model(**inputs).logits
    return token_stats(logits, labels.clamp(min=0), targets.long(), with_metrics=with_metrics)


def lm_metrics(stats) -> dict[str, float]:
    """entropy and mean_token_accuracy over the target tokens of one micro-batch (TRL's SFT metric names)."""
    n = stats.mask.sum().clamp(min=1)
    return {
        "entropy": float(stats.entropy.sum() / n),
        "mean_token_accuracy": float(stats.is_top1.sum() / n),
    }


@contextlib.contextmanager
def micro_batch_sync(accelerator, model, is_last: bool):
    """What `accelerator.accumulate` does, for a loop that groups micro-batches itself: all-reduce gradients (DDP)
    and let DeepSpeed step only on the last micro-batch of an optimizer step."""
    accelerator.gradient_state._set_sync_gradients(is_last)
    with contextlib.nullcontext() if is_last else accelerator.no_sync(model):
        yield


def sum_over_processes(accelerator, value: int) -> int:
    return int(accelerator.reduce(torch.tensor(value, device=accelerator.device), reduction="sum").item())


def gather_metrics(accelerator, metrics: dict[str, float]) -> list[dict[str, float]]:
    """Every process's metrics of its current micro-batch (same names on all), one dict per process.

    The loops add them all to the interval's means, so a logged value is the mean over every micro-batch of every
    process — what one process running the same micro-batches with n× the accumulation logs (rewards, accuracies
    and log-probs: the mean over all pairs, as micro-batches are equal-sized; token metrics: the mean of each
    micro-batch's token mean, TRL's reduction in one process).
    """
    if accelerator.num_processes == 1:
        return [metrics]
    names = list(metrics)
    local = torch.tensor([float(metrics[name]) for name in names], dtype=torch.float64, device=accelerator.device)
    rows = accelerator.gather(local).view(accelerator.num_processes, len(names)).tolist()
    return [dict(zip(names, row)) for row in rows]


def collate_rows(examples: list, cfg, pad_token_id: int) -> dict:
    """Model inputs for LM training: packed rows (nanodpo.packing) or single documents padded on the right."""
    from nanodpo.packing import PackedRow, collate_packed

    if isinstance(examples[0], PackedRow):
        return collate_packed(examples, cfg.attn_implementation, pad_token_id)
    length = max(len(doc.input_ids) for doc in examples)
    pads = [length - len(doc.input_ids) for doc in examples]
    return {
        "input_ids": torch.tensor([doc.input_ids + [pad_token_id] * n for doc, n in zip(examples, pads)]),
        "attention_mask": torch.tensor([[1] * len(doc.input_ids) + [0] * n for doc, n in zip(examples, pads)]),
        "labels": torch.tensor([doc.labels() + [-100] * n for doc, n in zip(examples, pads)]),
    }


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate_lm(model, eval_examples: list, collate_fn, cfg, accelerator) -> dict[str, float]:
    """Token means over the whole eval set, named eval_*: NLL (eval_loss), its perplexity, entropy and
    mean_token_accuracy — every target token of every row counted once, whatever the batch size and process count.

    Process i scores rows i, i+n, i+2n, ... and the sums are added over processes. Every process runs the same
    number of forwards (under FSDP/ZeRO-3 a forward is collective): one whose shard runs out scores a stand-in row
    and leaves it out of the sums.
    """
    shard = eval_examples[accelerator.process_index :: accelerator.num_processes]
    rows_per_process = math.ceil(len(eval_examples) / accelerator.num_processes)
    batch_size = cfg.per_device_eval_batch_size
    sums = torch.zeros(4, dtype=torch.float64)  # nll, target tokens, entropy, top-1 hits
    was_training = model.training
    model.eval()
    for start in range(0, rows_per_process, batch_size):
        rows = shard[start : start + batch_size]
        batch = to_device(collate_fn(rows or eval_examples[:1]), accelerator.device)
        stats = lm_token_stats(model, batch, chunk_size=getattr(cfg, "logps_chunk_size", None))
        if rows:
            sums += torch.tensor(
                [float(-stats.logps.sum()), float(stats.mask.sum()), float(stats.entropy.sum()), float(stats.is_top1.sum())],
                dtype=torch.float64,
            )
    model.train(was_training)
    nll, targets, entropy, hits = accelerator.reduce(sums.to(accelerator.device), reduction="sum").tolist()
    targets = max(targets, 1.0)
    loss = nll / targets
    return {
        "eval_loss": loss,
        "eval_perplexity": math.exp(min(loss, 50.0)),
        "eval_entropy": entropy / targets,
        "eval_mean_token_accuracy": hits / targets,
    }


def lm_optimizer_step(model, optimizer, step_examples: list, collate_fn, cfg, accelerator, means):
    """One optimizer step of token-mean language-model loss (PT and SFT).

    Returns (loss, grad_norm, real tokens, update_ok); update_ok is False when the loss or gradient norm was
    non-finite and the update was skipped (the same on every process: both values are global).

    The step's examples are split into micro-batches; the number of target tokens of the WHOLE step (summed over
    processes) is counted first, so every micro-batch's backward already carries the step's token-mean scaling:

        loss = Σ_{micro-batches, processes} Σ_{targets} −log p  /  N_targets(step)

    Batch 2 × accumulation 4 then gives the same loss and gradient as batch 8 × accumulation 1.
    """
    batches = [
        to_device(collate_fn(examples), accelerator.device)
        for examples in micro_batches(step_examples, cfg.per_device_train_batch_size)
    ]
    step_targets = max(1, sum_over_processes(accelerator, sum(count_targets(b) for b in batches)))
    real_tokens = sum_over_processes(accelerator, sum(len(ex.input_ids) for ex in step_examples))
    step_nll = torch.zeros((), device=accelerator.device)
    for i, batch in enumerate(batches):
        with micro_batch_sync(accelerator, model, is_last=i == len(batches) - 1):
            stats = lm_token_stats(model, batch, chunk_size=getattr(cfg, "logps_chunk_size", None))
            nll_sum = -stats.logps.sum()
            # DDP averages gradients over processes and accelerator.backward divides by gradient_accumulation_steps:
            # both are multiplied back so the step's gradient is d/dθ [Σ nll / N_targets].
            # (the accelerator's own count, which is what backward divides by)
            scale = accelerator.num_processes * accelerator.gradient_accumulation_steps / step_targets
            accelerator.backward(nll_sum * scale)
        step_nll += nll_sum.detach()
        for process_metrics in gather_metrics(accelerator, lm_metrics(stats)):  # every process's micro-batch
            means.add(process_metrics)
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
    grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), max_norm))
    loss = float(accelerator.reduce(step_nll, "sum")) / step_targets
    # A NaN/inf anywhere poisons the weights for good: skip this update rather than apply it (the caller counts it).
    update_ok = math.isfinite(loss) and math.isfinite(grad_norm)
    if update_ok:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm, real_tokens, update_ok


def epoch_batches(accelerator, loader, epoch: int, skip: int = 0):
    """The prepared loader's batches for `epoch`, without the first `skip` (already trained before a resume).

    accelerate's DataLoaderShard reseeds its sampler from its own epoch counter each time it is iterated, so the
    epoch is set on the loader itself (a fresh skip-loader would otherwise start counting at 0 and reshuffle wrong).
    """
    if skip:
        loader = accelerator.skip_first_batches(loader, skip)
    loader.set_epoch(epoch)
    return loader
