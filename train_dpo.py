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
metrics.jsonl (always) and checkpoint-<step>/ folders (with --save_steps).

Sections: 1. options  2. tokenizer and data  3. policy and reference  4. optimizer  5. the step's callables, chosen
          once  6. reference log-probs (precomputed)  7. data order, schedule, resume  8. the loop: train, log,
          evaluate, save
"""

import time
from functools import partial

import torch

from nanodpo import training
from nanodpo.config import DPOConfig, config_to_dict, parse_config
from nanodpo.demo.stages import main_or_demo
from nanodpo.errors import exit_on_user_error
from nanodpo.losses.options import REFERENCE_FREE_LOSS_TYPES, check_dpo_options, family_loss_type, needs_reference
from nanodpo.model import (
    check_model_options,
    is_peft_model,
    load_policy,
    load_reference,
    load_tokenizer,
    prepare_reference,
)
from nanodpo.recipe import choose_data, choose_step
from nanodpo.reference import precompute_reference_logps
from nanodpo.scale.checkpoint import (
    check_output_dir,
    save_checkpoint,
    save_model,
    start_or_resume,
    update_best,
)
from nanodpo.scale.faults import GracefulStop, stop_early
from nanodpo.tools.plot import diagnose, format_report
from nanodpo.tracking import MetricMeans, make_tracker, read_metrics, train_record


@torch.no_grad()
def evaluate(policy, eval_loader, step, accelerator) -> dict[str, float]:
    """Loss and metrics over the whole eval set, named eval_* as TRL does: means over all its pairs (the loss: each
    pair's share of it), token metrics over all its completion tokens — the same for any batch size or process count.

    `eval_loader` is prepared: every process runs the same number of batches (FSDP/ZeRO-3 forwards are collective), the
    last ones padded with copies of the first pairs, which `gather_for_metrics` drops again.
    """
    pair_stats = []
    with training.eval_mode(policy):
        for batch in eval_loader:
            out, policy_stats = step.forward(policy, batch)
            pair_stats.append(accelerator.gather_for_metrics(step.eval_stats(out, policy_stats)))  # kto: per row
    stats = {name: torch.cat([s[name] for s in pair_stats]).cpu() for name in pair_stats[0]}
    return step.eval_metrics(stats, prefix="eval_")


def main(argv: list[str] | None = None) -> None:
    # ------------------------------------------------------------------------------------------------------------
    # 1. Options. Everything that can be checked without loading anything is checked here.
    cfg = parse_config(DPOConfig, argv, description=__doc__)
    check_model_options(cfg)
    check_dpo_options(cfg)
    check_output_dir(cfg)
    accelerator = training.make_accelerator(cfg)
    training.seed_everything(cfg.seed)

    # ------------------------------------------------------------------------------------------------------------
    # 2. Tokenizer and data: read, validate and tokenize every row before any model is loaded, so bad data fails
    #    in seconds, with the file, row and field named. Pairs, collated [chosen; rejected] (kto: unpaired rows).
    tokenizer = load_tokenizer(cfg)
    data = choose_data(cfg, tokenizer.pad_token_id)
    train_examples = data.load(cfg, tokenizer, split="train")
    eval_examples = data.load(cfg, tokenizer, split="eval")

    # ------------------------------------------------------------------------------------------------------------
    # 3. The policy and the reference policy.
    #    LoRA: the reference is the policy with its adapter disabled (no second copy). Full fine-tuning: a frozen
    #    copy — unless --precompute_ref_logps (step 6 scores the data with the untrained policy, whose weights are
    #    the reference) or the loss needs no reference.
    policy = load_policy(cfg, accelerator.device)
    if family_loss_type(cfg) in REFERENCE_FREE_LOSS_TYPES:
        accelerator.print(f"loss type {cfg.loss_type[0]} is reference-free: no reference model is loaded")
    ref_model = None
    if needs_reference(cfg) and not (cfg.precompute_ref_logps or is_peft_model(policy)):
        ref_model = prepare_reference(accelerator, load_reference(cfg, accelerator.device))  # frozen; sharded too

    # ------------------------------------------------------------------------------------------------------------
    # 4. The optimizer, and the policy placed for training: wrapped for DDP, sharded under FSDP2, a DeepSpeed engine.
    optimizer = training.make_optimizer(policy, cfg, accelerator.device)
    policy, optimizer = accelerator.prepare(policy, optimizer)

    # ------------------------------------------------------------------------------------------------------------
    # 5. The step, chosen once: batch layout, log-prob path, reference source, loss, metrics (nanodpo/recipe.py).
    #    The loop below never asks which.
    step = choose_step(cfg, ref_model, accelerator, tokenizer)

    # ------------------------------------------------------------------------------------------------------------
    # 6. Precomputed reference log-probs: one no_grad pass before the first update (or the disk cache); training then
    #    reads them from the batch and no reference model is ever held in memory. It runs on the prepared policy, so
    #    a sharded model is scored sharded (under ZeRO-3 the weights were partitioned from the moment they loaded).
    ref_cache_key = None
    if cfg.precompute_ref_logps:
        precompute = partial(
            precompute_reference_logps, policy=policy, ref_model=ref_model, cfg=cfg, accelerator=accelerator,
            collator=data.collator, model_inputs=step.model_inputs, score=step.score_reference,
        )  # fmt: skip
        train_examples, ref_cache_key = precompute(train_examples, "train")
        if eval_examples is not None:
            eval_examples, _ = precompute(eval_examples, "eval")

    # ------------------------------------------------------------------------------------------------------------
    # 7. Data order and learning-rate schedule; resume.
    train_loader = accelerator.prepare_data_loader(data.train_loader(train_examples, data.collator, cfg))
    eval_loader = None
    if eval_examples:
        eval_loader = training.make_eval_loader(eval_examples, data.collator, cfg.per_device_eval_batch_size)
        eval_loader = accelerator.prepare_data_loader(eval_loader)
    total_steps, steps_per_epoch = training.count_training_steps(cfg, len(train_loader))
    # Stepped by hand once per optimizer step (not prepared: accelerate would step it once per process).
    scheduler = training.make_scheduler(optimizer, cfg, total_steps)
    accelerator.print(
        f"train {data.unit}: {len(train_examples)} | eval {data.unit}: {len(eval_examples) if eval_examples else 0} | "
        f"{training.describe_step(cfg, accelerator, data.unit)} | optimizer steps: {total_steps}"
    )
    state = start_or_resume(accelerator, policy, optimizer, scheduler, cfg, ref_cache_key)
    steps = training.optimizer_steps(accelerator, train_loader, cfg.gradient_accumulation_steps, state)
    # Nothing is written to output_dir before this point: a refused run leaves no trace.
    tracker = make_tracker(cfg, accelerator, config_to_dict(cfg, ref_cache_key=ref_cache_key), step.samples)

    # ------------------------------------------------------------------------------------------------------------
    # 8. The loop. One optimizer step = gradient_accumulation_steps micro-batches of pairs on each process.
    policy.train()
    train_means = MetricMeans(state.pending_metrics)  # the logging interval's values, saved with every checkpoint
    start_time = time.perf_counter()
    # The `with` closes the tracker and progress bar and restores the signal handlers, however the loop ends.
    with tracker, GracefulStop() as stop, training.progress_bar(cfg, state, total_steps, "dpo") as progress:
        for epoch, batches in steps:
            step_losses = []
            for i, batch in enumerate(batches):
                with training.gradient_sync(accelerator, policy, last_micro_batch=i == len(batches) - 1):
                    out, policy_stats = step.forward(policy, batch)
                    # backward divides by gradient_accumulation_steps: the step's objective is the mean of its
                    # micro-batch losses (each the mean over its pairs), as TRL's.
                    accelerator.backward(out.loss)
                step_losses.append(out.loss.item())
                state.num_tokens += int(accelerator.gather(data.count_tokens(batch)).sum().item())
                metrics = {"loss": step_losses[-1], **step.metrics(out, policy_stats)}
                metrics["padding_fraction"] = step.padding_fraction(batch)
                # Every process's micro-batch enters the logged means (as one process with n× accumulation would).
                train_means.add(*step.combine(training.gather_metrics(accelerator, metrics)))
            grad_norm = float(accelerator.clip_grad_norm_(policy.parameters(), training.clip_norm(cfg)))
            # A NaN/inf update is skipped: one NaN poisons the weights for good (fp16 overflows: decide_update).
            update = training.decide_update(accelerator, grad_norm, *step_losses)
            if update.applied:
                optimizer.step()
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            # ---- one optimizer step is done ----
            state.finish_step(epoch, update)
            step_number, last_step = state.step, state.step == total_steps
            progress.update(1)
            if step_number % cfg.logging_steps == 0 or last_step or update.nonfinite:
                learning_rate = scheduler.get_last_lr()[0]
                record = train_record(train_means, state, grad_norm=grad_norm, learning_rate=learning_rate,
                                      epoch=step_number / steps_per_epoch)  # fmt: skip
                tracker.log(record, step_number)
                progress.set_postfix(loss=f"{record['loss']:.4f}", margin=f"{record.get('rewards/margins', 0.0):.3f}")
            if eval_loader is not None and ((cfg.eval_steps and step_number % cfg.eval_steps == 0) or last_step):
                eval_record = evaluate(policy, eval_loader, step, accelerator)
                tracker.log({**eval_record, "epoch": step_number / steps_per_epoch}, step_number)
                update_best(cfg, state, eval_record)
                shown = [n for n in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_kl")
                         if n in eval_record]  # fmt: skip
                accelerator.print(f"step {step_number}: " + " ".join(f"{n} {eval_record[n]:.4f}" for n in shown))
            if last_step:
                break
            if cfg.save_steps and step_number % cfg.save_steps == 0:
                save_checkpoint(accelerator, policy, optimizer, scheduler, tokenizer, cfg, state)
            loss = step_losses[-1]
            stop_early(accelerator, policy, optimizer, scheduler, tokenizer, cfg, state, stop, loss, grad_norm)

    accelerator.print(f"done: {state.step} steps in {time.perf_counter() - start_time:.1f}s")
    save_model(accelerator, policy, tokenizer, cfg, cfg.output_dir)  # the final model (or adapter), into OUTPUT_DIR
    accelerator.print(f"model saved to {cfg.output_dir}")
    if accelerator.is_main_process and "jsonl" in cfg.report_to:
        # What the curves say, in plain words (python -m nanodpo.tools.plot OUTPUT_DIR --diagnose draws them too).
        print(format_report(diagnose(read_metrics(f"{cfg.output_dir}/metrics.jsonl"))))
    accelerator.end_training()


if __name__ == "__main__":
    exit_on_user_error(main_or_demo, main, "dpo")  # no arguments at all: this script's stage of the offline demo
