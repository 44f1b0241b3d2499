"""Pretraining (from scratch or continued), top to bottom: next-token prediction on packed documents.

Every document is tokenized, gets EOS appended, and is packed into rows of --max_length tokens (nanodpo/packing.py):
`bfd` keeps documents isolated (positions restart, block-causal attention), `wrapped` is the classic
concatenate-and-chunk. Every token is a target except the first of each document (nothing before it in the same
document predicts it). Loss = mean NLL over the target tokens of the whole optimizer step (see train_sft.py).

From scratch: --from_scratch takes the architecture and tokenizer of --model (a hub id, a local folder, or the preset
`nanodpo-tiny`, a few-million-parameter Qwen2 with the project's own bilingual tokenizer) with optional overrides,
e.g. scaling Qwen2.5-0.5B's config up to ~1B:
    python train_pt.py --model Qwen/Qwen2.5-0.5B --from_scratch --hidden_size 1536 --num_hidden_layers 28 \
        --intermediate_size 8960 --num_attention_heads 12 --num_key_value_heads 2 --dataset corpus/*.jsonl

Usage
-----
    python train_pt.py --config configs/pt_tiny.yaml
    accelerate launch --multi_gpu --num_processes 8 train_pt.py --config ...           # DDP
    python train_pt.py --model ./base --dataset big.jsonl --streaming --max_steps 10000  # corpus bigger than RAM
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 train_pt.py ...

Logged besides the loss: validation loss and perplexity, tokens/s, and MFU when --peak_tflops is given.

Sections: 1. options  2. tokenizer and data  3. model  4. optimizer and schedule  5. the loop
"""

import itertools
import sys
import time

from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from nanodpo.checkpoint import (
    RunState,
    check_output_dir,
    load_checkpoint,
    resolve_resume,
    save_or_stop,
    truncate_metrics,
    update_best,
)
from nanodpo.config import PTConfig, config_to_dict, parse_config
from nanodpo.data import iter_rows, load_split_rows
from nanodpo.demo.stages import after_stage, demo_argv
from nanodpo.errors import UserError, exit_on_user_error
from nanodpo.faults import GracefulStop
from nanodpo.model import check_model_options, is_main_process, load_policy, load_tokenizer
from nanodpo.packing import Document, pack_documents, packing_efficiency
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

PRESETS = ("nanodpo-tiny",)
ARCH_OVERRIDES = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "max_position_embeddings",
)


def tokenize_document(row, cfg, tokenizer) -> Document:
    text = row.data.get(cfg.text_column)
    if cfg.text_column not in row.data:
        found = ", ".join(sorted(row.data)) or "none"
        raise UserError(f"{row.where()}: no column '{cfg.text_column}' (found: {found}); set --text_column")
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"{row.where(cfg.text_column)}: expected non-empty text, got {text!r:.60}")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if cfg.add_eos:
        ids = ids + [tokenizer.eos_token_id]
    return Document(ids)


def load_documents(cfg, tokenizer, split: str) -> list[Document] | None:
    rows = load_split_rows(cfg, split)
    if rows is None:
        return None
    docs = [tokenize_document(row, cfg, tokenizer) for row in rows]
    if not docs:
        raise UserError(f"{split} data: no documents")
    return docs


def stream_step_batches(cfg, tokenizer, accelerator, start_epoch: int = 0, skip_steps: int = 0):
    """--streaming: read rows lazily in file order, pack every --stream_buffer_docs documents, deal the packed rows
    round-robin to the processes, and yield one optimizer step's rows at a time; restarts at the end (next epoch).

    Resuming replays the stream: the first `skip_steps` steps of `start_epoch` are re-read and dropped, which is
    deterministic (same files, same order, same packing) and needs no index into the files."""
    per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    for epoch in itertools.count(start_epoch):
        to_skip = skip_steps if epoch == start_epoch else 0
        rows = iter_rows(cfg.dataset, cfg.dataset_split, config_name=cfg.dataset_config)
        mine, index = [], 0
        while True:
            docs = [tokenize_document(row, cfg, tokenizer) for row in itertools.islice(rows, cfg.stream_buffer_docs)]
            if not docs:
                break
            for packed in pack_documents(docs, cfg.max_length, cfg.packing_strategy, cfg.packing_overflow):
                if index % accelerator.num_processes == accelerator.process_index:
                    mine.append(packed)
                index += 1
                if len(mine) == per_step:
                    if to_skip:
                        to_skip -= 1
                    else:
                        yield epoch, mine
                    mine = []
        if mine and not to_skip:
            yield epoch, mine


def build_model(cfg, tokenizer, device):
    """--from_scratch: random init (the model's own initializer) from --model's config with the overrides."""
    if not cfg.from_scratch:
        return load_policy(cfg, device)
    if cfg.model == "nanodpo-tiny":
        from nanodpo.demo import tiny_model_config

        config = tiny_model_config(len(tokenizer))
    else:
        try:
            config = AutoConfig.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError) as err:
            raise UserError(f"cannot load a model config from --model '{cfg.model}': {err}") from None
    values = config.to_dict()
    overrides = {name: getattr(cfg, name) for name in ARCH_OVERRIDES if getattr(cfg, name) is not None}
    if "num_hidden_layers" in overrides:
        values.pop("layer_types", None)  # per-layer attention types are re-derived for the new depth
    values.update(overrides, vocab_size=len(tokenizer), use_cache=False)
    values.update(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    config = type(config).from_dict(values)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=cfg.attn_implementation)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if is_main_process():
        print(f"from scratch: {type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} parameters")
    return model


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token: 6·N (forward + backward of every weight, LM head included) + 12·L·d·T (attention
    scores and values), the PaLM appendix estimate."""
    config = model.config
    params = sum(p.numel() for p in model.parameters())
    return 6 * params + 12 * config.num_hidden_layers * config.hidden_size * seq_len


def main(argv: list[str] | None = None) -> None:
    # ------------------------------------------------------------------------------------------------------------
    # 1. Options.
    demo = argv is None and len(sys.argv) == 1  # no arguments: run this script's stage of the offline demo
    if demo:
        argv = demo_argv("pt")
    cfg = parse_config(PTConfig, argv, description=__doc__)
    if cfg.model in PRESETS and not cfg.from_scratch:
        raise UserError(f"--model {cfg.model} is a preset architecture: add --from_scratch")
    if cfg.streaming and cfg.max_steps <= 0:
        raise UserError("--streaming reads the corpus lazily, so its length is unknown: give --max_steps")
    if cfg.max_length is None:
        raise UserError("--max_length is required for pretraining (the packed row length)")
    check_model_options(cfg)
    check_output_dir(cfg)
    accelerator = make_accelerator(cfg)
    seed_everything(cfg.seed)

    # ------------------------------------------------------------------------------------------------------------
    # 2. Tokenizer and data: documents tokenized with EOS and packed (or streamed and packed on the fly).
    if cfg.model == "nanodpo-tiny":
        from nanodpo.demo import TOKENIZER_DIR

        tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    else:
        tokenizer = load_tokenizer(cfg)
    eval_docs = load_documents(cfg, tokenizer, "eval")
    eval_rows = pack_documents(eval_docs, cfg.max_length, cfg.packing_strategy, cfg.packing_overflow) if eval_docs else None
    if cfg.streaming:
        steps_per_epoch = None  # unknown until the stream has been read once
    else:
        docs = load_documents(cfg, tokenizer, "train")
        train_rows = pack_documents(docs, cfg.max_length, cfg.packing_strategy, cfg.packing_overflow)
        efficiency = packing_efficiency(train_rows, cfg.max_length)
        accelerator.print(
            f"{len(docs)} documents, {sum(len(d.input_ids) for d in docs):,} tokens -> {len(train_rows)} rows of "
            f"{cfg.max_length} ({cfg.packing_strategy}), packing efficiency {efficiency:.1%}"
        )

    def collate(rows):
        return collate_rows(rows, cfg, tokenizer.pad_token_id)

    # ------------------------------------------------------------------------------------------------------------
    # 3. Model.
    model = build_model(cfg, tokenizer, accelerator.device)

    # ------------------------------------------------------------------------------------------------------------
    # 4. Optimizer and schedule; resume.
    optimizer = make_optimizer(model, cfg)
    if cfg.streaming:
        model, optimizer = accelerator.prepare(model, optimizer)
        total_steps = cfg.max_steps
    else:
        loader, _ = step_loader(train_rows, cfg)
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        total_steps, steps_per_epoch = count_training_steps(cfg, len(loader) * cfg.gradient_accumulation_steps)
    scheduler = make_scheduler(optimizer, cfg, total_steps)
    global_batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes
    accelerator.print(
        f"global batch: {global_batch} rows ({cfg.per_device_train_batch_size} per device x "
        f"{cfg.gradient_accumulation_steps} accumulation x {accelerator.num_processes} processes) | "
        f"optimizer steps: {total_steps}"
    )
    state = RunState(world_size=accelerator.num_processes, global_batch=global_batch)
    resume_path = resolve_resume(cfg)
    if resume_path is not None:
        state = load_checkpoint(accelerator, model, optimizer, scheduler, cfg, resume_path, global_batch)
        truncate_metrics(cfg.output_dir, state.step, accelerator.is_main_process)

    def step_batches():
        """(epoch, one optimizer step's rows) from the data position in `state` on, epoch after epoch."""
        if cfg.streaming:
            yield from stream_step_batches(cfg, tokenizer, accelerator, state.epoch, state.steps_in_epoch)
            return
        for epoch in itertools.count(state.epoch):
            skipped = state.steps_in_epoch if epoch == state.epoch else 0
            for step_rows in epoch_batches(accelerator, loader, epoch, skip=skipped):
                yield epoch, step_rows

    tokens_flops = flops_per_token(accelerator.unwrap_model(model), cfg.max_length)
    tracker = make_tracker(cfg, accelerator.is_main_process, config_to_dict(cfg))

    # ------------------------------------------------------------------------------------------------------------
    # 5. The loop.
    model.train()
    train_means = MetricMeans()
    train_means.values.update(state.pending_metrics)
    stop = GracefulStop()
    progress = tqdm(
        total=total_steps, initial=state.step, disable=not accelerator.is_main_process or cfg.disable_tqdm, desc="pt"
    )
    interval_start, interval_tokens = time.perf_counter(), 0
    for epoch, step_rows in step_batches():
        if epoch != state.epoch:
            state.epoch, state.steps_in_epoch = epoch, 0
        loss, grad_norm, real_tokens, update_ok = lm_optimizer_step(
            model, optimizer, step_rows, collate, cfg, accelerator, train_means
        )
        state.finish_step(update_ok, scheduler)
        step = state.step
        last_step = step == total_steps
        state.num_tokens += real_tokens
        interval_tokens += real_tokens
        train_means.add({"loss": loss})
        progress.update(1)

        if step % cfg.logging_steps == 0 or last_step or not update_ok:
            elapsed = time.perf_counter() - interval_start
            tokens_per_s = interval_tokens / max(elapsed, 1e-9)
            record = train_means.pop_means()
            record.update(
                grad_norm=grad_norm,
                learning_rate=scheduler.get_last_lr()[0],
                num_tokens=state.num_tokens,
                tokens_per_s=tokens_per_s,
                epoch=step / steps_per_epoch if steps_per_epoch else epoch,
                packing_efficiency=sum(len(r.input_ids) for r in step_rows) / (len(step_rows) * cfg.max_length),
            )
            if cfg.peak_tflops:
                # Model FLOPs utilisation: achieved training FLOPs / the hardware's peak, over all processes.
                record["mfu"] = tokens_flops * tokens_per_s / (cfg.peak_tflops * 1e12 * accelerator.num_processes)
            if state.nonfinite_total:
                record["nonfinite_steps_skipped"] = state.nonfinite_total
            tracker.log(record, step)
            progress.set_postfix(loss=f"{record['loss']:.4f}")
            interval_start, interval_tokens = time.perf_counter(), 0
        if eval_rows and ((cfg.eval_steps and step % cfg.eval_steps == 0) or last_step):
            eval_record = evaluate_lm(model, eval_rows, collate, cfg, accelerator)
            tracker.log(eval_record, step)
            update_best(cfg, state, eval_record)
            accelerator.print(
                f"step {step}: eval_loss {eval_record['eval_loss']:.4f} perplexity {eval_record['eval_perplexity']:.2f}"
            )
        state.pending_metrics = {name: list(values) for name, values in train_means.values.items()}
        save_or_stop(
            accelerator, model, optimizer, scheduler, tokenizer, cfg, state, stop, tracker, last_step, loss, grad_norm
        )
        if last_step:
            break
    stop.restore()
    progress.close()
    tracker.close()
    accelerator.print(f"done: {state.step} steps, {state.num_tokens:,} tokens, model saved to {cfg.output_dir}")
    accelerator.end_training()
    if demo and accelerator.is_main_process:
        after_stage("pt", cfg)


if __name__ == "__main__":
    exit_on_user_error(main)
