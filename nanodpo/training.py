"""The pieces every training loop shares: accelerator, data order, optimizer, learning-rate schedule, step counting.

The loops themselves live in train_pt.py, train_sft.py and train_dpo.py, top to bottom; what is here is what would
otherwise be pasted three times.
"""

import math
import random

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Sampler

from nanodpo.model import decay_parameter_groups


def make_accelerator(cfg) -> Accelerator:
    """One process, DDP, FSDP or DeepSpeed: whatever `accelerate launch` was configured with.

    The accelerator owns gradient accumulation: inside `accelerator.accumulate(model)`, `accelerator.backward(loss)`
    divides the loss by `gradient_accumulation_steps` and (under DDP) skips the gradient all-reduce on every
    micro-batch but the last, so an optimizer step's gradient is the mean of its micro-batch gradients.
    """
    mixed_precision = "bf16" if cfg.bf16 else "fp16" if cfg.fp16 else "no"
    return Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation_steps, mixed_precision=mixed_precision)


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
