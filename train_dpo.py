"""Direct Preference Optimization (DPO), top to bottom.

Train a policy π_θ on preference pairs (prompt x, chosen y_w, rejected y_l) so that it raises the chosen answer's
log-probability relative to a frozen reference π_ref more than the rejected one's:

    loss = -log σ( β·[log π_θ(y_w|x) − log π_ref(y_w|x)] − β·[log π_θ(y_l|x) − log π_ref(y_l|x)] )

The math of this loss and its variants is in nanodpo/dpo.py; this file is the loop around it. The same loop trains
the rest of the preference family: `--loss_type simpo|cpo|orpo` (no reference model) and `kto` (unpaired rows).

Usage
-----
One process (CPU, or one GPU):
    python train_dpo.py --config configs/dpo_qwen2.5_0.5b_qlora.yaml
    accelerate launch train_dpo.py --config configs/dpo_qwen2.5_0.5b_qlora.yaml --learning_rate 5e-6

Several GPUs (DDP; the global batch is per_device_train_batch_size × gradient_accumulation_steps × processes):
    accelerate launch --multi_gpu --num_processes 4 train_dpo.py --config configs/dpo_qwen2.5_0.5b_qlora.yaml

FSDP / DeepSpeed: pass an accelerate config file:
    accelerate launch --config_file configs/accelerate/<name>.yaml train_dpo.py --config ...

Two CPU processes (gloo), e.g. to try DDP without a GPU:
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 train_dpo.py --config ...

Every option can be given in the YAML file or on the command line (which wins); `python train_dpo.py --help`
lists them. Outputs: OUTPUT_DIR/ holds the final model (or LoRA adapter) with its tokenizer and config.yaml,
metrics.jsonl (with --report_to jsonl) and checkpoint-<step>/ folders (with --save_steps).

Sections: 1. options  2. tokenizer and data  3. policy and reference  4. reference log-probs (precomputed)
          5. optimizer and schedule  6. the loop: train, log, evaluate, save
"""

import sys
import time

import torch
from tqdm.auto import tqdm

from nanodpo.checkpoint import (
    RunState,
    check_output_dir,
    load_checkpoint,
    resolve_resume,
    save_or_stop,
    truncate_metrics,
    update_best,
)
from nanodpo.config import DPOConfig, config_to_dict, parse_config
from nanodpo.dpo import (
    REFERENCE_FREE_LOSS_TYPES,
    check_dpo_options,
    combine_process_metrics,
    dpo_loss,
    eval_metrics,
    eval_stats,
    family_loss_type,
    kto_micro_batch_loss,
    micro_batch_metrics,
    needs_reference,
)
from nanodpo.dpo_data import UnpairedCollator, load_preference_data, load_unpaired_data, with_chosen_prompt_scored
from nanodpo.dpo_packing import batch_padding_fraction, make_preference_collator, make_token_budget_loader
from nanodpo.demo.stages import after_stage, demo_argv
from nanodpo.errors import UserError, exit_on_user_error
from nanodpo.faults import GracefulStop, is_finite
from nanodpo.model import check_model_options, is_peft_model, load_policy, load_reference, load_tokenizer
from nanodpo.reference import compute_reference_logps, eval_mode, forward_token_stats, precompute_reference_logps
from nanodpo.tracking import MetricMeans, make_tracker, read_metrics
from nanodpo.training import (
    gather_metrics,
    epoch_batches,
    count_training_steps,
    make_accelerator,
    make_eval_loader,
    make_optimizer,
    make_scheduler,
    make_train_loader,
    seed_everything,
)


def dpo_forward(policy, ref_model, batch: dict, cfg, accelerator):
    """One micro-batch: policy forward on [chosen; rejected], reference log-probs, loss. Returns (DPOOutput,
    the policy's TokenStats); for kto (KTOOutput, TokenStats)."""
    if family_loss_type(cfg) == "kto":
        return kto_forward(policy, ref_model, batch, cfg, accelerator)
    # orpo's NLL term scores the chosen prompt tokens too (TRL's ORPOTrainer does); every other loss, the completions.
    scored = with_chosen_prompt_scored(batch) if family_loss_type(cfg) == "orpo" else batch
    policy_stats = forward_token_stats(
        policy, scored, with_metrics=True, with_sum_sq=cfg.use_weighting, chunk_size=cfg.logps_chunk_size
    )
    completion_mask = batch["completion_mask"][:, 1:].to(policy_stats.logps.dtype)
    if not needs_reference(cfg):
        ref_chosen_logps = ref_rejected_logps = None
    elif "ref_chosen_logps" in batch:  # --precompute_ref_logps
        ref_chosen_logps, ref_rejected_logps = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    else:
        ref_chosen_logps, ref_rejected_logps = compute_reference_logps(
            policy, ref_model, batch, cfg.ld_alpha, accelerator, chunk_size=cfg.logps_chunk_size
        )
    return dpo_loss(policy_stats, completion_mask, ref_chosen_logps, ref_rejected_logps, cfg), policy_stats


def kto_forward(policy, ref_model, batch: dict, cfg, accelerator):
    """One KTO micro-batch, laid out [rows; mismatched rows] like a [chosen; rejected] batch: policy forward,
    reference log-probs of both halves, loss. Returns (KTOOutput, the policy's TokenStats)."""
    policy_stats = forward_token_stats(policy, batch, with_metrics=True, chunk_size=cfg.logps_chunk_size)
    ref_logps, ref_mismatched_logps = compute_reference_logps(
        policy, ref_model, batch, None, accelerator, chunk_size=cfg.logps_chunk_size
    )
    several = accelerator is not None and accelerator.num_processes > 1
    mean_over_processes = (lambda value: accelerator.reduce(value, "mean")) if several else None
    completion_mask = batch["completion_mask"][:, 1:].to(policy_stats.logps.dtype)
    out = kto_micro_batch_loss(
        policy_stats, completion_mask, ref_logps, ref_mismatched_logps, batch["label"], cfg, mean_over_processes
    )
    return out, policy_stats


def dpo_step(policy, ref_model, batch: dict, cfg, accelerator) -> tuple[torch.Tensor, dict[str, float]]:
    """One micro-batch: the loss (with grad) and this process's metrics of it."""
    out, policy_stats = dpo_forward(policy, ref_model, batch, cfg, accelerator)
    return out.loss, {**micro_batch_metrics(out, policy_stats), "padding_fraction": batch_padding_fraction(batch)}


@torch.no_grad()
def evaluate(policy, ref_model, eval_loader, cfg, accelerator) -> dict[str, float]:
    """Loss and metrics over the whole eval set, named eval_* as TRL does: means over all its pairs (the loss: each
    pair's share of it), token metrics over all its completion tokens — the same for any batch size or process count.

    `eval_loader` is prepared: every process runs the same number of batches (FSDP/ZeRO-3 forwards are collective), the
    last ones padded with copies of the first pairs, which `gather_for_metrics` drops again.
    """
    pair_stats = []
    with eval_mode(policy):
        for batch in eval_loader:
            out, policy_stats = dpo_forward(policy, ref_model, batch, cfg, accelerator)
            pair_stats.append(accelerator.gather_for_metrics(eval_stats(out, policy_stats)))  # kto: per row
    stats = {name: torch.cat([s[name] for s in pair_stats]).cpu() for name in pair_stats[0]}
    return eval_metrics(stats, prefix="eval_")


def main(argv: list[str] | None = None) -> None:
    # ------------------------------------------------------------------------------------------------------------
    # 1. Options. Everything that can be checked without loading anything is checked here.
    demo = argv is None and len(sys.argv) == 1  # no arguments: run this script's stage of the offline demo
    if demo:
        argv = demo_argv("dpo")
    cfg = parse_config(DPOConfig, argv, description=__doc__)
    check_model_options(cfg)
    check_dpo_options(cfg)
    check_output_dir(cfg)
    accelerator = make_accelerator(cfg)
    seed_everything(cfg.seed)

    # ------------------------------------------------------------------------------------------------------------
    # 2. Tokenizer and data: read, validate and tokenize every row before any model is loaded, so bad data fails
    #    in seconds, with the file, row and field named.
    tokenizer = load_tokenizer(cfg)
    # kto trains on unpaired rows, collated in the pairs' [chosen; rejected] shape (nanodpo/dpo_data.py).
    load_data = load_unpaired_data if family_loss_type(cfg) == "kto" else load_preference_data
    train_examples = load_data(cfg, tokenizer, split="train")
    eval_examples = load_data(cfg, tokenizer, split="eval")
    # Padding-free, prefix-shared rows by default (nanodpo/dpo_packing.py); the padded [chosen; rejected] batch
    # with --logps_chunk_size 0 or --padding_free false --prefix_sharing false. The numbers are the same.
    collator = make_preference_collator(cfg, tokenizer.pad_token_id)
    if family_loss_type(cfg) == "kto":
        collator = UnpairedCollator(collator)

    # ------------------------------------------------------------------------------------------------------------
    # 3. The policy and the reference policy.
    #    LoRA: the reference is the policy with its adapter disabled (no second copy). Full fine-tuning: a frozen
    #    copy — unless --precompute_ref_logps (step 4 scores the data with the untrained policy, whose weights are
    #    the reference) or --reference_free.
    policy = load_policy(cfg, accelerator.device)
    needs_ref_model = needs_reference(cfg) and not (cfg.precompute_ref_logps or is_peft_model(policy))
    if family_loss_type(cfg) in REFERENCE_FREE_LOSS_TYPES:
        accelerator.print(f"loss type {cfg.loss_type[0]} is reference-free: no reference model is loaded")
    ref_model = load_reference(cfg, accelerator.device) if needs_ref_model else None
    if ref_model is not None:
        # evaluation_mode: placed on the device, never wrapped for gradient sync.
        ref_model = accelerator.prepare_model(ref_model, evaluation_mode=True)

    # ------------------------------------------------------------------------------------------------------------
    # 4. Precomputed reference log-probs: one no_grad pass before the first update (or the disk cache); training then
    #    reads them from the batch and no reference model is ever held in memory.
    ref_cache_key = None
    eval_batch_size = cfg.per_device_eval_batch_size
    if cfg.precompute_ref_logps:
        policy = policy.to(accelerator.device) if not cfg.load_in_4bit else policy
        batch_size = cfg.precompute_ref_batch_size or eval_batch_size
        for name in ("train", "eval"):
            examples = train_examples if name == "train" else eval_examples
            if examples is None:
                continue
            loader = accelerator.prepare_data_loader(make_eval_loader(examples, collator, batch_size))
            examples, ref_cache_key = precompute_reference_logps(
                examples, policy, ref_model, loader, cfg, accelerator, name
            )
            if name == "train":
                train_examples = examples
            else:
                eval_examples = examples

    # ------------------------------------------------------------------------------------------------------------
    # 5. Optimizer, data order and learning-rate schedule.
    if cfg.max_tokens_per_batch:  # micro-batches filled to a token budget rather than a pair count
        train_loader, _ = make_token_budget_loader(train_examples, collator, cfg)
    else:
        train_loader, _ = make_train_loader(train_examples, collator, cfg)
    eval_loader = make_eval_loader(eval_examples, collator, eval_batch_size) if eval_examples else None
    optimizer = make_optimizer(policy, cfg)
    policy, optimizer, train_loader = accelerator.prepare(policy, optimizer, train_loader)
    if eval_loader is not None:
        eval_loader = accelerator.prepare_data_loader(eval_loader)
    total_steps, steps_per_epoch = count_training_steps(cfg, len(train_loader))
    # Stepped by hand once per optimizer step (not prepared: accelerate would step it once per process).
    scheduler = make_scheduler(optimizer, cfg, total_steps)
    global_batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes
    unit = "rows" if family_loss_type(cfg) == "kto" else "pairs"
    if cfg.max_tokens_per_batch:  # the pair count of a micro-batch varies: say what a step is made of
        micro = cfg.gradient_accumulation_steps * accelerator.num_processes
        batch_text = (
            f"{micro} micro-batch{'es' if micro > 1 else ''} of up to "
            f"{cfg.max_tokens_per_batch} tokens ({cfg.gradient_accumulation_steps} accumulation x "
            f"{accelerator.num_processes} processes)"
        )
    else:
        batch_text = (
            f"{global_batch} {unit} ({cfg.per_device_train_batch_size} per device x "
            f"{cfg.gradient_accumulation_steps} accumulation x {accelerator.num_processes} processes)"
        )
    accelerator.print(
        f"train {unit}: {len(train_examples)} | eval {unit}: {len(eval_examples) if eval_examples else 0} | "
        f"global batch: {batch_text} | optimizer steps: {total_steps}"
    )

    # Resume: weights, optimizer, schedule, random states and the data position of a checkpoint.
    state = RunState(ref_cache_key=ref_cache_key, world_size=accelerator.num_processes, global_batch=global_batch)
    resume_path = resolve_resume(cfg)
    if resume_path is not None:
        state = load_checkpoint(accelerator, policy, optimizer, scheduler, cfg, resume_path, global_batch)
        if ref_cache_key is not None and state.ref_cache_key not in (None, ref_cache_key):
            raise UserError(f"{resume_path} was trained against other reference log-probs (data or model changed)")
        truncate_metrics(cfg.output_dir, state.step, accelerator.is_main_process)

    # Nothing is written to output_dir before this point: a refused run leaves no trace.
    run_config = {**config_to_dict(cfg), "ref_cache_key": ref_cache_key}
    tracker = make_tracker(cfg, accelerator.is_main_process, run_config)

    # ------------------------------------------------------------------------------------------------------------
    # 6. The loop. One optimizer step = gradient_accumulation_steps micro-batches; `accelerator.sync_gradients`
    #    is True on the last one. Logging, evaluation and saving happen inside the loop, the final ones on the
    #    last step, so nothing is duplicated after it.
    policy.train()
    train_means = MetricMeans()
    train_means.values.update(state.pending_metrics)
    stop = GracefulStop()
    progress = tqdm(
        total=total_steps, initial=state.step, disable=not accelerator.is_main_process or cfg.disable_tqdm, desc="dpo"
    )
    start_time = time.perf_counter()
    step_losses = []
    while state.step < total_steps:
        # On resume, skip the micro-batches of this epoch that the checkpoint had already trained on.
        # (the loader yields micro-batches: gradient_accumulation_steps of them per optimizer step)
        skip = state.steps_in_epoch * cfg.gradient_accumulation_steps
        for batch in epoch_batches(accelerator, train_loader, state.epoch, skip=skip):
            with accelerator.accumulate(policy):
                loss, metrics = dpo_step(policy, ref_model, batch, cfg, accelerator)
                # Divides by gradient_accumulation_steps: the step's objective is the mean of its micro-batch losses.
                accelerator.backward(loss)
                step_losses.append(loss.item())
                if accelerator.sync_gradients:
                    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
                    grad_norm = float(accelerator.clip_grad_norm_(policy.parameters(), max_norm))
                    # A NaN/inf anywhere poisons the weights for good: skip this update rather than apply it.
                    # (accelerate's reduce knows sum/mean/max only — "min" sums: skip if ANY process saw a non-finite)
                    update_ok = accelerator.reduce(
                        torch.tensor(float(not is_finite(grad_norm, *step_losses)), device=accelerator.device), "max"
                    ).item() == 0.0
                    if update_ok:
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            attention_mask = batch["attention_mask"]
            if "label" in batch:  # kto: the rows, not their mismatched copies (as TRL counts)
                attention_mask = attention_mask[: len(batch["label"])]
            state.num_tokens += int(accelerator.gather(attention_mask.sum()).sum().item())
            # Every process's micro-batch enters the logged means (the same log as one process with n× accumulation).
            per_process = gather_metrics(accelerator, {"loss": loss.item(), **metrics})
            for process_metrics in combine_process_metrics(cfg, per_process):
                train_means.add(process_metrics)
            if not accelerator.sync_gradients:
                continue

            # ---- one optimizer step is done ----
            step_losses = []
            state.finish_step(update_ok, scheduler)
            step = state.step
            last_step = step == total_steps
            progress.update(1)
            if step % cfg.logging_steps == 0 or last_step or not update_ok:
                record = train_means.pop_means()
                record.update(
                    grad_norm=grad_norm,
                    learning_rate=scheduler.get_last_lr()[0],
                    num_tokens=state.num_tokens,
                    epoch=step / steps_per_epoch,
                )
                if state.nonfinite_total:
                    record["nonfinite_steps_skipped"] = state.nonfinite_total
                tracker.log(record, step)
                progress.set_postfix(loss=f"{record['loss']:.4f}", margin=f"{record.get('rewards/margins', 0.0):.3f}")
            if eval_loader is not None and ((cfg.eval_steps and step % cfg.eval_steps == 0) or last_step):
                eval_record = evaluate(policy, ref_model, eval_loader, cfg, accelerator)
                tracker.log({**eval_record, "epoch": step / steps_per_epoch}, step)
                update_best(cfg, state, eval_record)
                shown = [n for n in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_kl")
                         if n in eval_record]  # fmt: skip
                accelerator.print(f"step {step}: " + " ".join(f"{n} {eval_record[n]:.4f}" for n in shown))
            state.pending_metrics = {name: list(values) for name, values in train_means.values.items()}
            save_or_stop(
                accelerator, policy, optimizer, scheduler, tokenizer, cfg, state, stop, tracker, last_step,
                loss.item(), grad_norm,
            )
            if last_step:
                break
        else:
            state.epoch += 1
            state.steps_in_epoch = 0
    stop.restore()
    progress.close()
    tracker.close()
    accelerator.print(
        f"done: {state.step} steps in {time.perf_counter() - start_time:.1f}s, model saved to {cfg.output_dir}"
    )
    if accelerator.is_main_process and "jsonl" in cfg.report_to:
        # What the curves say, in plain words (python -m nanodpo.plot OUTPUT_DIR --diagnose draws them too).
        from nanodpo.plot import diagnose, format_report

        print(format_report(diagnose(read_metrics(f"{cfg.output_dir}/metrics.jsonl"))))
    accelerator.end_training()
    if demo and accelerator.is_main_process:
        after_stage("dpo", cfg)


if __name__ == "__main__":
    exit_on_user_error(main)
