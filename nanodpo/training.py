"""The pieces every training loop shares: accelerator, data order, optimizer, learning-rate schedule, the optimizer
step's micro-batches and their gradient sync — and PT/SFT's token-mean pieces (model inputs, token counts, eval).

The loops themselves live in train_pt.py, train_sft.py and train_dpo.py, top to bottom, and call these by name;
what is here is what would otherwise be pasted three times.
"""

import contextlib
import dataclasses
import itertools
import math
import os
import random

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from nanodpo import logps
from nanodpo.data import EpochSampler, to_device
from nanodpo.errors import UserError, say_once
from nanodpo.fast.chunked_head import chunked_token_logps
from nanodpo.logps import ModelInputs
from nanodpo.model import decay_parameter_groups, is_main_process
from nanodpo.packing import collate_packed
from nanodpo.tracking import check_trackers


def choose_token_logps(cfg):
    """--logps: the readable path (nanodpo/logps.py), or chapter two's chunked head (nanodpo/fast/chunked_head.py);
    the same TokenStats either way. Says which, once."""
    if cfg.logps == "chunked":
        say_once("log-probs: chunked LM head, the fast path (--logps readable: log_softmax + gather; the same numbers)")
        return chunked_token_logps
    say_once("log-probs: log_softmax + gather, the readable path (--logps chunked: the fast path, the same numbers)")
    return logps.token_logps


def make_accelerator(cfg) -> Accelerator:
    """One process, DDP, FSDP or DeepSpeed: whatever `accelerate launch` was configured with.

    It knows --gradient_accumulation_steps: `accelerator.backward(loss)` divides the loss by it (DeepSpeed: its engine
    does), so an optimizer step's gradient is the mean of its micro-batch gradients; `gradient_sync` below skips the
    all-reduce on every micro-batch but the last. Its mixed precision is --bf16 / --fp16, or where the training
    config sets neither, accelerate's own (`accelerate launch --mixed_precision`, the accelerate config: see
    nanodpo.model.take_launcher_precision). The trackers of --report_to are checked here too, before anything heavy
    runs.
    """
    mixed_precision = "bf16" if cfg.bf16 else "fp16" if cfg.fp16 else None  # None: accelerate's own setting
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, mixed_precision=mixed_precision
    )
    if accelerator.state.deepspeed_plugin is not None:
        fit_deepspeed_config(accelerator, cfg)
    if accelerator.is_main_process:  # the only process that opens them
        check_trackers(cfg, os.environ)
    cores = os.cpu_count() or 1
    if accelerator.device.type == "cpu" and accelerator.num_processes == 1 and torch.get_num_threads() == 1 < cores:
        # `accelerate launch` without --cpu sets OMP_NUM_THREADS=1 on a machine with no GPU: a 2-4x slower run.
        accelerator.print(
            f"note: torch computes with 1 thread on a {cores}-core CPU (OMP_NUM_THREADS="
            f"{os.environ.get('OMP_NUM_THREADS', 'unset')}); for all cores: accelerate launch "
            f"--num_cpu_threads_per_process {cores} ..., or python <script> ..."
        )
    return accelerator


def fit_deepspeed_config(accelerator: Accelerator, cfg) -> None:
    """The run's DeepSpeed config (accelerate's plugin, from the accelerate config file) made to follow the training
    config, or refused before anything loads where it cannot:

    * clipping, accumulation and batch sizes left "auto" are filled in from --max_grad_norm,
      --gradient_accumulation_steps and --per_device_train_batch_size; a different accumulation is refused;
    * no optimizer or scheduler section (they come from --optim, --learning_rate, --lr_scheduler_type);
    * ZeRO-3 must be able to gather the model to save it; optimizer offload steps with AdamW only;
    * accelerate must count the processes DeepSpeed formed (it does not on a machine without GPUs).
    """
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    group_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if group_size != accelerator.num_processes:
        # accelerate's DeepSpeed state on a machine without GPUs: every process believes it is process 0 of 1, so
        # each would read all the data and write every file.
        raise UserError(
            f"DeepSpeed here formed {group_size} processes but accelerate counts {accelerator.num_processes}: "
            "accelerate runs DeepSpeed on GPUs only; on CPU use DDP (ACCELERATE_USE_CPU=1 accelerate launch "
            "--multi_gpu --num_processes N ...)"
        )
    # DeepSpeed clips inside engine.step (accelerator.clip_grad_norm_ then only reads the norm back). Left "auto",
    # accelerate would fill in 1.0 whatever --max_grad_norm says: use the training config's value (0 = off).
    if ds_config.get("gradient_clipping", "auto") == "auto":
        ds_config["gradient_clipping"] = cfg.max_grad_norm
    # Accumulation and batch sizes, which accelerate would otherwise fill in inside `prepare` (reading the batch
    # size off the data loader): the reference engine is built before that, and a token-budget loader has no
    # fixed batch size. DeepSpeed divides the loss by the accumulation; the batch sizes it only checks and reports.
    wanted = {
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "train_micro_batch_size_per_gpu": cfg.per_device_train_batch_size,
        "train_batch_size": global_batch(cfg, accelerator),
    }
    for key, value in wanted.items():
        if ds_config.get(key, "auto") == "auto":
            ds_config[key] = value
    if ds_config["gradient_accumulation_steps"] != cfg.gradient_accumulation_steps:
        raise UserError(
            f"the DeepSpeed config sets gradient_accumulation_steps {ds_config['gradient_accumulation_steps']} "
            f"but --gradient_accumulation_steps is {cfg.gradient_accumulation_steps}: remove it from the DeepSpeed "
            "config (or set it to \"auto\"), the training config decides"
        )
    zero = ds_config.get("zero_optimization", {})
    if zero.get("stage") == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save", False):
        # Checked now, not at the first save after hours of training: every save gathers the whole model.
        raise UserError(
            "ZeRO-3 without zero3_save_16bit_model: true in the accelerate config cannot save the model: each "
            "save (checkpoints, the final model) gathers the partitioned weights into one state dict; set it to "
            "true (configs/accelerate/zero3.yaml does)"
        )
    offload = zero.get("offload_optimizer", {}).get("device", "none")
    if offload not in ("none", None) and cfg.optim != "adamw_torch":
        # accelerate turns the optimizer of an offloaded run into DeepSpeed's CPU Adam: torch's AdamW into CPU
        # AdamW with the same parameter groups (betas, epsilon, decoupled decay), but SGD silently into Adam too.
        raise UserError(
            f"--optim {cfg.optim} with ZeRO-Offload (offload_optimizer_device: cpu in the accelerate config): "
            "the offloaded step runs on the CPU with DeepSpeed's CPU AdamW only; use --optim adamw_torch, or "
            "an accelerate config without optimizer offload"
        )
    for section in ("optimizer", "scheduler"):
        if section in ds_config:
            raise UserError(
                f"the DeepSpeed config has a '{section}' section: remove it, the optimizer and learning-rate "
                "schedule come from the training config (--optim, --learning_rate, --lr_scheduler_type)"
            )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_train_loader(examples: list, collate_fn, cfg) -> DataLoader:
    """Micro-batches of --per_device_train_batch_size examples, in EpochSampler's order."""
    sampler = EpochSampler(len(examples), shuffle=cfg.train_sampling_strategy == "random", seed=cfg.seed)
    return DataLoader(examples, batch_size=cfg.per_device_train_batch_size, sampler=sampler, collate_fn=collate_fn)


def make_eval_loader(examples: list, collate_fn, batch_size: int) -> DataLoader:
    return DataLoader(examples, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)


def count_training_steps(cfg, micro_batches_per_epoch: int) -> tuple[int, int]:
    """(total optimizer steps, optimizer steps per epoch). A last partial accumulation group still makes a step."""
    steps_per_epoch = max(1, math.ceil(micro_batches_per_epoch / cfg.gradient_accumulation_steps))
    if cfg.max_steps > 0:
        return cfg.max_steps, steps_per_epoch
    return max(1, math.ceil(cfg.num_train_epochs * steps_per_epoch)), steps_per_epoch


def make_optimizer(model: torch.nn.Module, cfg, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer, built before `accelerator.prepare` moves the model to `device`, where its parameters will be."""
    groups = decay_parameter_groups(model, cfg.weight_decay)
    if cfg.optim == "sgd":
        return torch.optim.SGD(groups, lr=cfg.learning_rate)
    # On CUDA, the fused AdamW kernel: one launch for all parameters instead of several per tensor (TRL's default too).
    # It checks its parameters' device at the first step, after the move.
    return torch.optim.AdamW(
        groups,
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        fused=True if torch.device(device).type == "cuda" else None,
    )


def global_batch(cfg, accelerator) -> int:
    """Examples (rows, pairs) per optimizer step over all processes."""
    return cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes


def describe_step(cfg, accelerator, unit: str) -> str:
    """What one optimizer step is made of, e.g. 'global batch: 32 pairs (4 per device x 4 accumulation x 2
    processes)'; with --max_tokens_per_batch the pair count of a micro-batch varies, so its token budget is said."""
    accumulation = f"{cfg.gradient_accumulation_steps} accumulation x {accelerator.num_processes} processes"
    if getattr(cfg, "max_tokens_per_batch", None):
        micro = cfg.gradient_accumulation_steps * accelerator.num_processes
        return (
            f"global batch: {micro} micro-batch{'es' if micro > 1 else ''} of up to {cfg.max_tokens_per_batch} "
            f"tokens ({accumulation})"
        )
    per_device = cfg.per_device_train_batch_size
    return f"global batch: {global_batch(cfg, accelerator)} {unit} ({per_device} per device x {accumulation})"


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
# The loop's steps: one optimizer step's micro-batches, their gradient sync, and what is checked after them.


@dataclasses.dataclass
class RunState:
    """Where a run is. Saved in trainer_state.json with every checkpoint."""

    step: int = 0  # optimizer steps done (including skipped ones)
    epoch: int = 0
    steps_in_epoch: int = 0  # optimizer steps done in the current epoch (the data position; independent of the
    # process count: with the same global batch, step k covers the same examples on 1 or n processes)
    num_tokens: int = 0
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0
    overflow_total: int = 0  # fp16 overflows the loss scaler skipped (not counted as non-finite)
    loss_scale: float | None = None  # fp16: the loss scale of the last step (the scaler itself is in scaler.pt)
    pending_metrics: dict = dataclasses.field(default_factory=dict)  # the unfinished logging interval's values
    ref_cache_key: str | None = None
    world_size: int = 1
    global_batch: int = 0
    sharding: str | None = None  # "fsdp2" / "deepspeed": how the optimizer state below was written (None: whole)
    best_metric: float | None = None
    best_checkpoint: str | None = None

    def finish_step(self, epoch: int, update) -> None:
        """Count an optimizer step of `epoch` (the data position) and what became of its update (`decide_update`)."""
        if epoch != self.epoch:
            self.epoch, self.steps_in_epoch = epoch, 0
        if update.applied:
            self.nonfinite_in_a_row = 0
        elif update.nonfinite:
            self.nonfinite_in_a_row += 1
            self.nonfinite_total += 1
        else:
            self.overflow_total += 1
        self.loss_scale = update.loss_scale
        self.step += 1
        self.steps_in_epoch += 1


def optimizer_steps(accelerator, loader, micro_batches_per_step: int, state):
    """(epoch, one optimizer step's micro-batches on this process), epoch after epoch, for as long as the loop asks,
    from the data position in `state` on (a resumed run skips the steps its checkpoint had trained on).

    A step is `micro_batches_per_step` consecutive batches of the prepared `loader`; the last step of an epoch may
    have fewer (it still makes a step, as count_training_steps counts it).
    """
    start_epoch, skip_steps = state.epoch, state.steps_in_epoch  # read now: the loop moves `state` on
    return _steps(accelerator, loader, micro_batches_per_step, start_epoch, skip_steps)


def _steps(accelerator, loader, micro_batches_per_step: int, start_epoch: int, skip_steps: int):
    for epoch in itertools.count(start_epoch):
        skip = skip_steps * micro_batches_per_step if epoch == start_epoch else 0
        batches = iter(epoch_batches(accelerator, loader, epoch, skip=skip))
        while step_batches := list(itertools.islice(batches, micro_batches_per_step)):
            yield epoch, step_batches


def progress_bar(cfg, state, total_steps: int, desc: str) -> tqdm:
    """The run's progress in optimizer steps (on the main process only), from where a resumed run starts."""
    disable = not is_main_process() or cfg.disable_tqdm
    return tqdm(total=total_steps, initial=state.step, disable=disable, desc=desc)


def epoch_batches(accelerator, loader, epoch: int, skip: int = 0):
    """The prepared loader's batches for `epoch`, without the first `skip` (already trained before a resume).

    accelerate's DataLoaderShard reseeds its sampler from its own epoch counter each time it is iterated, so the
    epoch is set on the loader itself (a fresh skip-loader would otherwise start counting at 0 and reshuffle wrong).
    """
    if skip:
        loader = accelerator.skip_first_batches(loader, skip)
    loader.set_epoch(epoch)
    return loader


@contextlib.contextmanager
def gradient_sync(accelerator, model, last_micro_batch: bool):
    """Gradients are all-reduced (DDP, FSDP) only on the last micro-batch of an optimizer step.

    `accelerator.sync_gradients` is also what DeepSpeed's engine reads in `accelerator.backward`: it steps its
    optimizer (and clips) only when it is True, so it must be False on every other micro-batch.
    (`accelerator.accumulate` decides this by counting batches and watching the end of the dataloader; the loops
    here know their step's micro-batches themselves, so they say which one is the last.)
    """
    accelerator.sync_gradients = last_micro_batch
    with contextlib.nullcontext() if last_micro_batch else accelerator.no_sync(model):
        yield


# An overflow at a loss scale below this is not one loss scaling can cure: the gradients overflow fp16 even scaled down.
MIN_LOSS_SCALE = 1.0


@dataclasses.dataclass(frozen=True)
class Update:
    """What becomes of one optimizer step's gradients (`decide_update`): applied, or skipped — as an fp16 overflow
    (the loss scaler's business, not counted) or as a non-finite step (counted against --max_nonfinite_steps)."""

    applied: bool
    nonfinite: bool
    loss_scale: float | None = None  # fp16 loss scaling: the scale this step's backward used (None: no scaler)

    @property
    def overflow(self) -> bool:
        return not self.applied and not self.nonfinite


def decide_update(accelerator, grad_norm: float, *losses: float) -> Update:
    """Whether this step's update is applied, the same answer on every process (one process's NaN/inf is enough):
    a NaN/inf loss or gradient norm would poison the weights for good, so such an update is skipped and counted
    (against --max_nonfinite_steps). Called after clipping, before `optimizer.step()`. Under --fp16 an inf gradient
    norm is first the loss scaler's business: `fp16_update`."""
    local = [not all(math.isfinite(float(v)) for v in losses), not math.isfinite(float(grad_norm))]
    local = torch.tensor(local, dtype=torch.float32, device=accelerator.device)
    loss_nonfinite, norm_nonfinite = (flag > 0 for flag in accelerator.reduce(local, reduction="max").tolist())
    if accelerator.scaler is not None:
        return fp16_update(accelerator.scaler, loss_nonfinite, norm_nonfinite)
    finite = not (loss_nonfinite or norm_nonfinite)
    return Update(applied=finite, nonfinite=not finite)


def fp16_update(scaler, loss_nonfinite: bool, norm_nonfinite: bool) -> Update:
    """`decide_update` under fp16 loss scaling (clipping has unscaled the gradients):

    * loss and gradient norm finite: applied (`optimizer.step()` is then GradScaler's step and update);
    * a finite loss but an inf/NaN gradient norm: the scaled gradients overflowed fp16. Normal early in a run (the
      scale starts at 2^16 and halves until the gradients fit) and now and then after the scaler grows its scale.
      Skipped as GradScaler skips it: its `update()` halves the scale. Not counted as non-finite — unless the scale
      had already fallen below MIN_LOSS_SCALE;
    * a NaN/inf loss: skipped and counted. The scaler is updated all the same: it has unscaled these gradients, and
      the next step's unscaling needs it to have moved on.
    """
    loss_scale = scaler.get_scale()
    if not (loss_nonfinite or norm_nonfinite):
        return Update(applied=True, nonfinite=False, loss_scale=loss_scale)
    scaler.update()  # no step; the scale halves if unscaling found an inf, and the next step can unscale
    overflow = not loss_nonfinite and loss_scale >= MIN_LOSS_SCALE
    return Update(applied=False, nonfinite=not overflow, loss_scale=loss_scale)


def clip_norm(cfg) -> float:
    """--max_grad_norm, where 0 (no clipping) becomes infinity: the norm is still computed and logged."""
    return cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")


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


def sum_over_processes(accelerator, value: int) -> int:
    return int(accelerator.reduce(torch.tensor(value, device=accelerator.device), reduction="sum").item())


# ----------------------------------------------------------------------------------------------------------------
# Token-mean language-model loss (PT and SFT).


def collate_packed_rows(rows: list, pad_token_id: int, attn_implementation: str) -> dict:
    """Model inputs for LM training from packed rows (nanodpo/packing.py): `labels` (HF convention: -100 = not
    scored) and `row_tokens`, the real (non-padding) tokens of each row."""
    batch = collate_packed(rows, attn_implementation, pad_token_id)
    batch["row_tokens"] = torch.tensor([len(row.input_ids) for row in rows])
    return batch


def collate_documents(docs: list, pad_token_id: int) -> dict:
    """Model inputs for LM training from single documents, padded on the right: input_ids, attention_mask,
    `labels` (HF convention: -100 = not scored) and `row_tokens`, the real (non-padding) tokens of each row."""
    length = max(len(doc.input_ids) for doc in docs)
    pads = [length - len(doc.input_ids) for doc in docs]
    return {
        "input_ids": torch.tensor([doc.input_ids + [pad_token_id] * n for doc, n in zip(docs, pads)]),
        "attention_mask": torch.tensor([[1] * len(doc.input_ids) + [0] * n for doc, n in zip(docs, pads)]),
        "labels": torch.tensor([doc.labels() + [-100] * n for doc, n in zip(docs, pads)]),
        "row_tokens": torch.tensor([len(doc.input_ids) for doc in docs]),
    }


def step_targets(accelerator, batches: list[dict]) -> int:
    """Target tokens of a whole optimizer step — every micro-batch, every process (at least 1): what the step's
    summed NLL is divided by. Labels other than -100, after the one-token shift."""
    local = sum(int((batch["labels"][:, 1:] != -100).sum()) for batch in batches)
    return max(1, sum_over_processes(accelerator, local))


def step_tokens(accelerator, batches: list[dict]) -> int:
    """Real (non-padding) tokens of a whole optimizer step, summed over processes."""
    return sum_over_processes(accelerator, sum(int(batch["row_tokens"].sum()) for batch in batches))


def lm_model_inputs(batch: dict) -> ModelInputs:
    """A collated LM batch as log-prob inputs: the model sees everything but `labels` (and the token count); the
    scored tokens are the labels (HF convention: aligned with input_ids, -100 = not scored, shifted in logps.py)."""
    model_kwargs = {k: v for k, v in batch.items() if k not in ("labels", "row_tokens")}
    labels = batch["labels"]
    return ModelInputs(model_kwargs, labels=labels.clamp(min=0), loss_mask=(labels != -100).long())


def lm_metrics(stats) -> dict[str, float]:
    """entropy and mean_token_accuracy over the target tokens of one micro-batch (TRL's SFT metric names)."""
    n = stats.mask.sum().clamp(min=1)
    return {
        "entropy": float(stats.entropy.sum() / n),
        "mean_token_accuracy": float(stats.is_top1.sum() / n),
    }


@torch.no_grad()
def evaluate_lm(model, eval_examples: list, collate_fn, cfg, accelerator, token_logps) -> dict[str, float]:
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
        stats = token_logps(model, lm_model_inputs(batch))
        if rows:
            sums += torch.tensor(
                [float(-stats.logps.sum()), float(stats.mask.sum()), float(stats.entropy.sum()),
                 float(stats.is_top1.sum())],
                dtype=torch.float64,
            )  # fmt: skip
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


@contextlib.contextmanager
def eval_mode(model):
    """The model in eval mode (dropout off) inside the block, and back in the mode it was in after it."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
