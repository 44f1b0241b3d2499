"""Supervised fine-tuning (SFT), top to bottom: teach a model to answer, training on the assistant's tokens only.

Data: chat `messages`, ShareGPT `conversations`, `prompt`/`completion`, alpaca `instruction`/`input`/`output`, or
plain `text` (nanodpo/sft_data.py). The loss covers every assistant turn of a conversation, its end-of-turn token
included (or the completion, for prompt/completion data); `--train_on_prompt` trains on every token.

The loss of one optimizer step is the mean NLL over ALL target tokens of that step — across its accumulation
micro-batches and across processes — not a mean of per-micro-batch means:

    loss = Σ_{micro-batches, processes} Σ_{target tokens t} −log p(token_t | tokens_<t)  /  N_targets(step)

so a long answer counts by its tokens whatever batch it lands in, and batch 2 × accumulation 4 trains exactly like
batch 8 × accumulation 1. (TRL/HF Trainer do the same with `num_items_in_batch`.)

Usage
-----
    python train_sft.py --config configs/sft_qwen2.5_0.5b_lora.yaml
    accelerate launch --multi_gpu --num_processes 4 train_sft.py --config ...      # DDP
    accelerate launch --config_file configs/accelerate/<name>.yaml train_sft.py --config ...   # FSDP / DeepSpeed
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 train_sft.py ...  # 2 CPU processes
    python train_sft.py --model ./base --dataset chats.jsonl --packing --max_length 2048    # pack short chats

Sections: 1. options  2. tokenizer and data (packing)  3. model  4. optimizer and schedule  5. the loop
"""

import sys
import time

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
from nanodpo.config import SFTConfig, config_to_dict, parse_config
from nanodpo.demo.stages import after_stage, demo_argv
from nanodpo.errors import exit_on_user_error
from nanodpo.faults import GracefulStop
from nanodpo.model import check_model_options, load_policy, load_tokenizer
from nanodpo.packing import collate_packed, pack_documents, packing_efficiency, padding_fraction
from nanodpo.sft_data import load_sft_data
from nanodpo.tracking import MetricMeans, make_tracker
from nanodpo.training import (
    epoch_batches,
    collate_rows,
    count_training_steps,
    evaluate_lm,
    lm_optimizer_step,
    make_accelerator,
    make_optimizer,
    make_scheduler,
    seed_everything,
    step_loader,
)


def main(argv: list[str] | None = None) -> None:
    # ------------------------------------------------------------------------------------------------------------
    # 1. Options.
    demo = argv is None and len(sys.argv) == 1  # no arguments: run this script's stage of the offline demo
    if demo:
        argv = demo_argv("sft")
    cfg = parse_config(SFTConfig, argv, description=__doc__)
    check_model_options(cfg)
    check_output_dir(cfg)
    accelerator = make_accelerator(cfg)
    seed_everything(cfg.seed)

    # ------------------------------------------------------------------------------------------------------------
    # 2. Tokenizer and data: every row normalised, checked and tokenized (with its loss mask) before the model loads.
    #    With --packing the examples are packed into rows of max_length tokens, each still isolated (packing.py).
    tokenizer = load_tokenizer(cfg)
    train_docs = load_sft_data(cfg, tokenizer, split="train")
    eval_docs = load_sft_data(cfg, tokenizer, split="eval")
    if cfg.packing:
        overflow = "truncate"  # an SFT example cut in two would train its second half without its prompt
        train_examples = pack_documents(train_docs, cfg.max_length, cfg.packing_strategy, overflow)
        eval_examples = pack_documents(eval_docs, cfg.max_length, cfg.packing_strategy, overflow) if eval_docs else None
        layout_stats = {"packing_efficiency": packing_efficiency(train_examples, cfg.max_length)}
        accelerator.print(
            f"packed {len(train_docs)} examples into {len(train_examples)} rows of {cfg.max_length} tokens "
            f"({cfg.packing_strategy}), packing efficiency {layout_stats['packing_efficiency']:.1%}"
        )
    else:
        train_examples, eval_examples = train_docs, eval_docs
        lengths = [len(doc.input_ids) for doc in train_docs]
        layout_stats = {"padding_fraction": padding_fraction(lengths, cfg.per_device_train_batch_size)}
        accelerator.print(f"padding fraction {layout_stats['padding_fraction']:.1%}")

    def collate(examples):
        return collate_rows(examples, cfg, tokenizer.pad_token_id)

    # ------------------------------------------------------------------------------------------------------------
    # 3. Model (full, LoRA or QLoRA).
    model = load_policy(cfg, accelerator.device)

    # ------------------------------------------------------------------------------------------------------------
    # 4. Optimizer, data order, schedule. The loader yields one optimizer step's examples per process.
    train_loader, _ = step_loader(train_examples, cfg)
    optimizer = make_optimizer(model, cfg)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    total_steps, steps_per_epoch = count_training_steps(cfg, len(train_loader) * cfg.gradient_accumulation_steps)
    scheduler = make_scheduler(optimizer, cfg, total_steps)
    global_batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes
    accelerator.print(
        f"train rows: {len(train_examples)} | global batch: {global_batch} rows ({cfg.per_device_train_batch_size} per "
        f"device x {cfg.gradient_accumulation_steps} accumulation x {accelerator.num_processes} processes) | "
        f"optimizer steps: {total_steps}"
    )
    state = RunState(world_size=accelerator.num_processes, global_batch=global_batch)
    resume_path = resolve_resume(cfg)
    if resume_path is not None:
        state = load_checkpoint(accelerator, model, optimizer, scheduler, cfg, resume_path, global_batch)
        truncate_metrics(cfg.output_dir, state.step, accelerator.is_main_process)
    tracker = make_tracker(cfg, accelerator.is_main_process, config_to_dict(cfg))

    # ------------------------------------------------------------------------------------------------------------
    # 5. The loop: one step = one batch from the loader, split into micro-batches by `lm_optimizer_step`, which
    #    scales every micro-batch's gradient to the token mean of the whole step.
    model.train()
    train_means = MetricMeans()
    train_means.values.update(state.pending_metrics)
    stop = GracefulStop()
    progress = tqdm(
        total=total_steps, initial=state.step, disable=not accelerator.is_main_process or cfg.disable_tqdm, desc="sft"
    )
    start_time = time.perf_counter()
    while state.step < total_steps:
        # On resume, skip the steps of this epoch that the checkpoint had already trained on.
        for step_examples in epoch_batches(accelerator, train_loader, state.epoch, skip=state.steps_in_epoch):
            loss, grad_norm, real_tokens, update_ok = lm_optimizer_step(
                model, optimizer, step_examples, collate, cfg, accelerator, train_means
            )
            state.num_tokens += real_tokens
            state.finish_step(update_ok, scheduler)
            step = state.step
            last_step = step == total_steps
            train_means.add({"loss": loss})
            progress.update(1)

            if step % cfg.logging_steps == 0 or last_step or not update_ok:
                record = train_means.pop_means()
                record.update(
                    grad_norm=grad_norm,
                    learning_rate=scheduler.get_last_lr()[0],
                    num_tokens=state.num_tokens,
                    epoch=step / steps_per_epoch,
                    **layout_stats,  # how much of each batch is real tokens (packing) or padding (no packing)
                )
                if state.nonfinite_total:
                    record["nonfinite_steps_skipped"] = state.nonfinite_total
                tracker.log(record, step)
                progress.set_postfix(loss=f"{record['loss']:.4f}")
            if eval_examples and ((cfg.eval_steps and step % cfg.eval_steps == 0) or last_step):
                eval_record = evaluate_lm(model, eval_examples, collate, cfg, accelerator)
                tracker.log({**eval_record, "epoch": step / steps_per_epoch}, step)
                update_best(cfg, state, eval_record)
                accelerator.print(f"step {step}: eval_loss {eval_record['eval_loss']:.4f}")
            state.pending_metrics = {name: list(values) for name, values in train_means.values.items()}
            save_or_stop(
                accelerator, model, optimizer, scheduler, tokenizer, cfg, state, stop, tracker, last_step, loss, grad_norm
            )
            if last_step:
                break
        else:
            state.epoch += 1
            state.steps_in_epoch = 0
    stop.restore()
    progress.close()
    tracker.close()
    accelerator.print(f"done: {state.step} steps in {time.perf_counter() - start_time:.1f}s, model saved to {cfg.output_dir}")
    accelerator.end_training()
    if demo and accelerator.is_main_process:
        after_stage("sft", cfg)


if __name__ == "__main__":
    exit_on_user_error(main)
