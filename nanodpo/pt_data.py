"""Pretraining data: documents (one text column per row) tokenized with EOS, packed in memory or streamed.

train_pt.py packs the documents of `load_documents` into rows (nanodpo/packing.py) and feeds them through the
usual loader; with --streaming, `stream_steps` reads a corpus bigger than memory lazily and packs it on the fly.
"""

import itertools

from nanodpo.data import iter_rows, load_split_rows, micro_batches, to_device
from nanodpo.errors import UserError
from nanodpo.packing import Document, PackedRow, pack_documents, packing_efficiency


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


def load_packed_rows(cfg, tokenizer, split: str) -> list[PackedRow] | None:
    """The split's documents packed into rows of --max_length tokens (None: no data for the split)."""
    docs = load_documents(cfg, tokenizer, split)
    if docs is None:
        return None
    rows = pack_documents(docs, cfg.max_length, cfg.packing_strategy, cfg.packing_overflow)
    print(
        f"pt data ({split}): {len(docs)} documents, {sum(len(d.input_ids) for d in docs):,} tokens -> {len(rows)} "
        f"rows of {cfg.max_length} ({cfg.packing_strategy}), packing efficiency "
        f"{packing_efficiency(rows, cfg.max_length):.1%}"
    )
    return rows


def stream_steps(cfg, tokenizer, accelerator, collate, state):
    """--streaming: read rows lazily in file order, pack every --stream_buffer_docs documents, deal the packed rows
    round-robin to the processes, and yield (epoch, one optimizer step's micro-batches) at a time, like
    training.optimizer_steps; restarts at the end (next epoch).

    Resuming replays the stream: the steps of `state`'s epoch that its checkpoint had trained on are re-read and
    dropped, which is deterministic (same files, same order, same packing) and needs no index into the files."""
    start_epoch, skip_steps = state.epoch, state.steps_in_epoch  # read now: the loop moves `state` on
    return _stream_steps(cfg, tokenizer, accelerator, collate, start_epoch, skip_steps)


def _stream_steps(cfg, tokenizer, accelerator, collate, start_epoch: int, skip_steps: int):
    per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps

    def step_batches(rows):
        return [to_device(collate(m), accelerator.device) for m in micro_batches(rows, cfg.per_device_train_batch_size)]

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
                        yield epoch, step_batches(mine)
                    mine = []
        if mine and not to_skip:
            yield epoch, step_batches(mine)
