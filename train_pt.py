"""Pretraining (from scratch or continued), top to bottom: next-token prediction on packed documents.

Every document is tokenized, gets EOS appended, and is packed into rows of --max_length tokens (nanodpo/packing.py):
`bfd` keeps documents isolated (positions restart, block-causal attention), `wrapped` is the classic
concatenate-and-chunk. Every token is a target except the first of each document (nothing before it in the same
document predicts it). Loss = mean NLL over the target tokens of the whole optimizer step (see train_sft.py).

--from_scratch takes the architecture and tokenizer of --model (a hub id, a local folder, a GGUF file's metadata, or
the preset `nanodpo-tiny`: a few-million-parameter Qwen2 with the project's bilingual tokenizer), random weights, and
any of --hidden_size, --num_hidden_layers, --intermediate_size, --num_attention_heads, --num_key_value_heads.

Usage
-----
    python train_pt.py --config configs/pt_tiny.yaml
    python train_pt.py --model Qwen/Qwen2.5-0.5B --from_scratch --hidden_size 1536 --num_hidden_layers 28 ...
    accelerate launch --multi_gpu --num_processes 8 train_pt.py --config ...           # DDP
    python train_pt.py --model ./base --dataset big.jsonl --streaming --max_steps 10000  # corpus bigger than RAM
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 train_pt.py ...

Logged besides the loss: validation loss and perplexity, tokens/s, and MFU when --peak_tflops is given.

Sections: 1. options  2. tokenizer and data  3. model  4. optimizer and schedule  5. the loop
"""

import time
from functools import partial

import torch
from transformers import AutoModelForCausalLM

from nanodpo import training
from nanodpo.config import PTConfig, config_to_dict, parse_config
from nanodpo.demo.stages import main_or_demo
from nanodpo.errors import UserError, exit_on_user_error
from nanodpo.model import DTYPES, check_model_options, is_main_process, load_model_config, load_policy, load_tokenizer
from nanodpo.packing import check_row_length
from nanodpo.pt_data import load_packed_rows, stream_steps
from nanodpo.scale.checkpoint import (
    check_output_dir,
    save_checkpoint,
    save_model,
    start_or_resume,
    update_best,
)
from nanodpo.scale.faults import GracefulStop, stop_early
from nanodpo.tracking import MetricMeans, flops_per_token, make_tracker, train_record

ARCH_OVERRIDES = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "max_position_embeddings",
)


def build_model(cfg, tokenizer, device):
    """--from_scratch: random init (the model's own initializer) from --model's config with the overrides."""
    if not cfg.from_scratch:
        return load_policy(cfg, device)
    config = load_model_config(cfg, len(tokenizer))
    values = config.to_dict()
    overrides = {name: getattr(cfg, name) for name in ARCH_OVERRIDES if getattr(cfg, name) is not None}
    if "num_hidden_layers" in overrides:
        values.pop("layer_types", None)  # per-layer attention types are re-derived for the new depth
    values.update(overrides, vocab_size=len(tokenizer), use_cache=False)
    values.update(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    config = type(config).from_dict(values)
    # In --dtype: transformers would otherwise build it in the dtype the config names (Qwen2.5's: bfloat16) whatever
    # --dtype says; 'auto' keeps that one.
    dtype = {} if cfg.dtype == "auto" else {"dtype": DTYPES[cfg.dtype]}
    model = AutoModelForCausalLM.from_config(config, attn_implementation=cfg.attn_implementation, **dtype)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if is_main_process():
        print(f"from scratch: {type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} parameters")
    return model


def main(argv: list[str] | None = None) -> None:
    # ------------------------------------------------------------------------------------------------------------
    # 1. Options.
    cfg = parse_config(PTConfig, argv, description=__doc__)
    if cfg.streaming and cfg.max_steps <= 0:
        raise UserError("--streaming reads the corpus lazily, so its length is unknown: give --max_steps")
    check_row_length(cfg.max_length, "pretraining")
    check_model_options(cfg)
    check_output_dir(cfg)
    accelerator = training.make_accelerator(cfg)
    training.seed_everything(cfg.seed)

    # ------------------------------------------------------------------------------------------------------------
    # 2. Tokenizer and data: documents tokenized with EOS and packed (or streamed and packed on the fly).
    tokenizer = load_tokenizer(cfg)
    eval_rows = load_packed_rows(cfg, tokenizer, "eval")
    train_rows = None if cfg.streaming else load_packed_rows(cfg, tokenizer, "train")

    collate = partial(training.collate_packed_rows, pad_token_id=tokenizer.pad_token_id,
                      attn_implementation=cfg.attn_implementation)  # fmt: skip

    # ------------------------------------------------------------------------------------------------------------
    # 3. Model.
    model = build_model(cfg, tokenizer, accelerator.device)
    # --logps: the readable log_softmax + gather, or the chunked LM head (nanodpo/fast/); the same numbers.
    token_logps = training.choose_token_logps(cfg)

    # ------------------------------------------------------------------------------------------------------------
    # 4. Optimizer and schedule; resume.
    optimizer = training.make_optimizer(model, cfg, accelerator.device)
    if cfg.streaming:
        model, optimizer = accelerator.prepare(model, optimizer)
        total_steps, steps_per_epoch = cfg.max_steps, None  # the stream's length is unknown until read once
    else:
        loader = training.make_train_loader(train_rows, collate, cfg)
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        total_steps, steps_per_epoch = training.count_training_steps(cfg, len(loader))
    scheduler = training.make_scheduler(optimizer, cfg, total_steps)  # stepped by hand, once per optimizer step
    accelerator.print(f"{training.describe_step(cfg, accelerator, 'rows')} | optimizer steps: {total_steps}")
    state = start_or_resume(accelerator, model, optimizer, scheduler, cfg)
    if cfg.streaming:  # each step's rows read from the corpus, packed as they come (nanodpo/pt_data.py)
        steps = stream_steps(cfg, tokenizer, accelerator, collate, state)
    else:
        steps = training.optimizer_steps(accelerator, loader, cfg.gradient_accumulation_steps, state)
    tokens_flops = flops_per_token(accelerator.unwrap_model(model), cfg.max_length)
    tracker = make_tracker(cfg, accelerator, config_to_dict(cfg))

    # ------------------------------------------------------------------------------------------------------------
    # 5. The loop. One optimizer step = gradient_accumulation_steps micro-batches of packed rows on each process.
    model.train()
    train_means = MetricMeans(state.pending_metrics)  # the logging interval's values, saved with every checkpoint
    interval_start, interval_tokens = time.perf_counter(), 0
    # The `with` closes the tracker and progress bar and restores the signal handlers, however the loop ends.
    with tracker, GracefulStop() as stop, training.progress_bar(cfg, state, total_steps, "pt") as progress:
        for epoch, batches in steps:
            # Real tokens and rows of the step, on all processes: for tokens/s and how full the packed rows are.
            step_tokens = training.step_tokens(accelerator, batches)
            step_rows = training.sum_over_processes(accelerator, sum(len(b["row_tokens"]) for b in batches))
            # Loss = mean NLL over every target token of the step, all micro-batches and processes (train_sft.py);
            # × processes × accumulation undoes DDP's mean over processes and backward's division.
            num_targets = training.step_targets(accelerator, batches)
            scale = accelerator.num_processes * accelerator.gradient_accumulation_steps / num_targets
            step_nll = torch.zeros((), device=accelerator.device)
            for i, batch in enumerate(batches):
                with training.gradient_sync(accelerator, model, last_micro_batch=i == len(batches) - 1):
                    # The loss needs only the log-probs: no entropy / top-1 metrics (nanoGPT logs none either).
                    stats = token_logps(model, training.lm_model_inputs(batch), with_metrics=False)
                    nll_sum = -stats.logps.sum()
                    accelerator.backward(nll_sum * scale)
                step_nll += nll_sum.detach()
            grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), training.clip_norm(cfg)))
            # A NaN/inf update is skipped: one NaN poisons the weights for good (fp16 overflows: decide_update).
            update = training.decide_update(accelerator, grad_norm, step_nll)
            if update.applied:
                optimizer.step()
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            # ---- one optimizer step is done ----
            state.num_tokens += step_tokens
            interval_tokens += step_tokens
            loss = float(accelerator.reduce(step_nll, "sum")) / num_targets
            state.finish_step(epoch, update)
            step, last_step = state.step, state.step == total_steps
            train_means.add({"loss": loss})
            progress.update(1)
            if step % cfg.logging_steps == 0 or last_step or update.nonfinite:
                tokens_per_s = interval_tokens / max(time.perf_counter() - interval_start, 1e-9)
                record = train_record(
                    train_means, state, grad_norm=grad_norm, learning_rate=scheduler.get_last_lr()[0],
                    tokens_per_s=tokens_per_s, epoch=step / steps_per_epoch if steps_per_epoch else epoch,
                    packing_efficiency=step_tokens / (step_rows * cfg.max_length),
                )  # fmt: skip
                if cfg.peak_tflops:
                    # Model FLOPs utilisation: achieved training FLOPs / the hardware's peak, over all processes.
                    record["mfu"] = tokens_flops * tokens_per_s / (cfg.peak_tflops * 1e12 * accelerator.num_processes)
                tracker.log(record, step)
                progress.set_postfix(loss=f"{record['loss']:.4f}")
                interval_start, interval_tokens = time.perf_counter(), 0
            if eval_rows and ((cfg.eval_steps and step % cfg.eval_steps == 0) or last_step):
                eval_record = training.evaluate_lm(model, eval_rows, collate, cfg, accelerator, token_logps)
                tracker.log(eval_record, step)
                accelerator.print(f"step {step}: eval perplexity {eval_record['eval_perplexity']:.2f}")
                update_best(cfg, state, eval_record)
            if last_step:
                break
            if cfg.save_steps and step % cfg.save_steps == 0:
                save_checkpoint(accelerator, model, optimizer, scheduler, tokenizer, cfg, state)
            stop_early(accelerator, model, optimizer, scheduler, tokenizer, cfg, state, stop, loss, grad_norm)

    save_model(accelerator, model, tokenizer, cfg, cfg.output_dir)  # the final model, into OUTPUT_DIR itself
    accelerator.print(f"done: {state.step} steps, {state.num_tokens:,} tokens, model saved to {cfg.output_dir}")
    accelerator.end_training()


if __name__ == "__main__":
    exit_on_user_error(main_or_demo, main, "pt")  # no arguments at all: this script's stage of the offline demo
