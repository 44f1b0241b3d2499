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

import time
from functools import partial

import torch

from nanodpo import training
from nanodpo.config import SFTConfig, config_to_dict, parse_config
from nanodpo.demo.stages import main_or_demo
from nanodpo.errors import exit_on_user_error
from nanodpo.model import check_model_options, load_policy, load_tokenizer, set_eos_token_id
from nanodpo.packing import check_row_length, pack_documents, packing_efficiency, padding_fraction
from nanodpo.scale.checkpoint import (
    check_output_dir,
    save_checkpoint,
    save_model,
    start_or_resume,
    update_best,
)
from nanodpo.scale.faults import GracefulStop, stop_early
from nanodpo.sft_data import load_sft_data, use_end_of_turn_as_eos
from nanodpo.tracking import MetricMeans, make_tracker, train_record


def main(argv: list[str] | None = None) -> None:
    # ------------------------------------------------------------------------------------------------------------
    # 1. Options.
    cfg = parse_config(SFTConfig, argv, description=__doc__)
    if cfg.packing:
        check_row_length(cfg.max_length, "--packing")
    check_model_options(cfg)
    check_output_dir(cfg)
    accelerator = training.make_accelerator(cfg)
    training.seed_everything(cfg.seed)

    # ------------------------------------------------------------------------------------------------------------
    # 2. Tokenizer and data: every row normalised, checked and tokenized (with its loss mask) before the model loads.
    #    With --packing the examples are packed into rows of max_length tokens, each still isolated (packing.py).
    #    The model is saved with the EOS it learned to end its turns with (sft_data.py: "End of turn and EOS").
    tokenizer = load_tokenizer(cfg)  # with --eos_token, if given
    train_docs = load_sft_data(cfg, tokenizer, split="train")
    eval_docs = load_sft_data(cfg, tokenizer, split="eval")
    new_eos = bool(cfg.eos_token) or use_end_of_turn_as_eos(tokenizer, train_docs)
    if cfg.packing:
        overflow = "truncate"  # an SFT example cut in two would train its second half without its prompt
        train_examples = pack_documents(train_docs, cfg.max_length, cfg.packing_strategy, overflow)
        eval_examples = pack_documents(eval_docs, cfg.max_length, cfg.packing_strategy, overflow) if eval_docs else None
        layout_stats = {"packing_efficiency": packing_efficiency(train_examples, cfg.max_length)}
        accelerator.print(
            f"packed {len(train_docs)} examples into {len(train_examples)} rows of {cfg.max_length} tokens "
            f"({cfg.packing_strategy}), packing efficiency {layout_stats['packing_efficiency']:.1%}"
        )
        collate = partial(training.collate_packed_rows, pad_token_id=tokenizer.pad_token_id,
                          attn_implementation=cfg.attn_implementation)  # fmt: skip
    else:
        train_examples, eval_examples = train_docs, eval_docs
        lengths = [len(doc.input_ids) for doc in train_docs]
        layout_stats = {"padding_fraction": padding_fraction(lengths, cfg.per_device_train_batch_size)}
        accelerator.print(f"padding fraction {layout_stats['padding_fraction']:.1%}")
        collate = partial(training.collate_documents, pad_token_id=tokenizer.pad_token_id)

    # ------------------------------------------------------------------------------------------------------------
    # 3. Model (full, LoRA or QLoRA).
    model = load_policy(cfg, accelerator.device)
    if new_eos:
        set_eos_token_id(model, tokenizer.eos_token_id)
    # --logps: the readable log_softmax + gather, or the chunked LM head (nanodpo/fast/); the same numbers.
    token_logps = training.choose_token_logps(cfg)

    # ------------------------------------------------------------------------------------------------------------
    # 4. Optimizer, data order, schedule; resume.
    train_loader = training.make_train_loader(train_examples, collate, cfg)
    optimizer = training.make_optimizer(model, cfg, accelerator.device)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    total_steps, steps_per_epoch = training.count_training_steps(cfg, len(train_loader))
    scheduler = training.make_scheduler(optimizer, cfg, total_steps)  # stepped by hand, once per optimizer step
    step_text = training.describe_step(cfg, accelerator, "rows")
    accelerator.print(f"train rows: {len(train_examples)} | {step_text} | optimizer steps: {total_steps}")
    state = start_or_resume(accelerator, model, optimizer, scheduler, cfg)
    steps = training.optimizer_steps(accelerator, train_loader, cfg.gradient_accumulation_steps, state)
    tracker = make_tracker(cfg, accelerator, config_to_dict(cfg))

    # ------------------------------------------------------------------------------------------------------------
    # 5. The loop. One optimizer step = gradient_accumulation_steps micro-batches on each process.
    model.train()
    train_means = MetricMeans(state.pending_metrics)  # the logging interval's values, saved with every checkpoint
    start_time = time.perf_counter()
    # The `with` closes the tracker and progress bar and restores the signal handlers, however the loop ends.
    with tracker, GracefulStop() as stop, training.progress_bar(cfg, state, total_steps, "sft") as progress:
        for epoch, batches in steps:
            # The step's loss is the mean NLL over ALL its target tokens (module docstring), so they are counted
            # first; × processes × accumulation undoes DDP's mean over processes and backward's division.
            num_targets = training.step_targets(accelerator, batches)
            scale = accelerator.num_processes * accelerator.gradient_accumulation_steps / num_targets
            step_nll = torch.zeros((), device=accelerator.device)
            for i, batch in enumerate(batches):
                with training.gradient_sync(accelerator, model, last_micro_batch=i == len(batches) - 1):
                    stats = token_logps(model, training.lm_model_inputs(batch))
                    nll_sum = -stats.logps.sum()
                    accelerator.backward(nll_sum * scale)
                step_nll += nll_sum.detach()
                train_means.add(*training.gather_metrics(accelerator, training.lm_metrics(stats)))  # all processes'
            grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), training.clip_norm(cfg)))
            # A NaN/inf update is skipped: one NaN poisons the weights for good (fp16 overflows: decide_update).
            update = training.decide_update(accelerator, grad_norm, step_nll)
            if update.applied:
                optimizer.step()
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            # ---- one optimizer step is done ----
            loss = float(accelerator.reduce(step_nll, "sum")) / num_targets
            state.num_tokens += training.step_tokens(accelerator, batches)
            state.finish_step(epoch, update)
            step, last_step = state.step, state.step == total_steps
            train_means.add({"loss": loss})
            progress.update(1)
            if step % cfg.logging_steps == 0 or last_step or update.nonfinite:
                # layout_stats: how much of each batch is real tokens (packing) or padding (no packing)
                learning_rate = scheduler.get_last_lr()[0]
                record = train_record(train_means, state, grad_norm=grad_norm, learning_rate=learning_rate,
                                      epoch=step / steps_per_epoch, **layout_stats)  # fmt: skip
                tracker.log(record, step)
                progress.set_postfix(loss=f"{record['loss']:.4f}")
            if eval_examples and ((cfg.eval_steps and step % cfg.eval_steps == 0) or last_step):
                eval_record = training.evaluate_lm(model, eval_examples, collate, cfg, accelerator, token_logps)
                tracker.log({**eval_record, "epoch": step / steps_per_epoch}, step)
                update_best(cfg, state, eval_record)
                accelerator.print(f"step {step}: eval_loss {eval_record['eval_loss']:.4f}")
            if last_step:
                break
            if cfg.save_steps and step % cfg.save_steps == 0:
                save_checkpoint(accelerator, model, optimizer, scheduler, tokenizer, cfg, state)
            stop_early(accelerator, model, optimizer, scheduler, tokenizer, cfg, state, stop, loss, grad_norm)

    accelerator.print(f"done: {state.step} steps in {time.perf_counter() - start_time:.1f}s")
    save_model(accelerator, model, tokenizer, cfg, cfg.output_dir)  # the final model, into OUTPUT_DIR
    accelerator.print(f"model saved to {cfg.output_dir}")
    accelerator.end_training()


if __name__ == "__main__":
    exit_on_user_error(main_or_demo, main, "sft")  # no arguments at all: this script's stage of the offline demo
