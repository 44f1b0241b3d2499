"""Packing: bfd rows are valid and equal TRL's; a packed row's logits equal each document run alone."""

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from tiny import make_model, make_tokenizer
from trl.data_utils import pack_dataset
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from nanodpo.errors import UserError
from nanodpo.packing import (
    IGNORE_INDEX,
    Document,
    PackedRow,
    bfd_bins,
    block_causal_mask,
    collate_packed,
    pack_documents,
    packing_efficiency,
    padding_fraction,
)

TOL = 1e-5  # fp32


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def random_documents(lengths, vocab=500, seed=0, masked=False):
    g = torch.Generator().manual_seed(seed)
    docs = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        mask = torch.randint(0, 2, (n,), generator=g).tolist() if masked else None
        docs.append(Document(ids, mask))
    return docs


def random_lengths(n, high, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, high, (n,), generator=g).tolist()


def documents_of(row: PackedRow):
    """(input_ids, labels, position_ids) of each document in a row, cut at seq_lens."""
    start = 0
    for n in row.seq_lens:
        yield row.input_ids[start : start + n], row.labels[start : start + n], row.position_ids[start : start + n]
        start += n


# ---------------------------------------------------------------- packing itself (no model)


def test_row_layout_labels_and_positions():
    docs = [Document([10, 11, 12]), Document([20, 21], loss_mask=[1, 0]), Document([30, 31, 32], [0, 1, 1])]
    rows = pack_documents(docs, max_length=8)
    assert len(rows) == 1
    row = rows[0]
    assert row.input_ids == [10, 11, 12, 30, 31, 32, 20, 21]  # longest first (stable on ties), then best fit
    assert row.seq_lens == [3, 3, 2]
    assert row.position_ids == [0, 1, 2, 0, 1, 2, 0, 1]
    # -100 on each document's first token (nothing in the document predicts it) and on loss_mask 0
    assert row.labels == [-100, 11, 12, -100, 31, 32, -100, -100]
    for pos, lab in zip(row.position_ids, row.labels):
        assert pos != 0 or lab == IGNORE_INDEX


@pytest.mark.parametrize("overflow", ["truncate", "split"])
def test_bfd_matches_trl(overflow):
    lengths = random_lengths(300, 50, seed=1)  # max_length 32: some documents overflow
    docs = random_documents(lengths, seed=2, masked=True)
    rows = pack_documents(docs, max_length=32, overflow=overflow)

    labels = [doc.labels() for doc in docs]
    dataset = Dataset.from_dict({"input_ids": [d.input_ids for d in docs], "labels": labels})
    trl_rows = pack_dataset(dataset, 32, strategy="bfd" if overflow == "truncate" else "bfd_split")
    assert len(rows) == len(trl_rows)
    for row, trl_row in zip(rows, trl_rows):
        assert row.input_ids == trl_row["input_ids"]
        assert row.seq_lens == trl_row["seq_lengths"]
        # TRL sets the first label of each document to -100 later, in its padding-free collator
        trl_labels = [IGNORE_INDEX if pos == 0 else lab for pos, lab in zip(row.position_ids, trl_row["labels"])]
        assert row.labels == trl_labels


def test_bfd_matches_trl_group_size():
    """TRL packs each `datasets.map` batch (1000 rows) on its own; group_size=1000 reproduces that."""
    docs = random_documents(random_lengths(2500, 40, seed=3), seed=4)
    rows = pack_documents(docs, max_length=64, group_size=1000)
    trl_rows = pack_dataset(Dataset.from_dict({"input_ids": [d.input_ids for d in docs]}), 64, strategy="bfd")
    assert [r.input_ids for r in rows] == trl_rows["input_ids"]
    assert len(pack_documents(docs, max_length=64)) <= len(rows)  # whole-set packing is at least as tight


def test_bfd_split_keeps_every_token_once():
    lengths = random_lengths(200, 90, seed=5)
    docs, next_id = [], 0
    for n in lengths:  # globally unique token ids, so every token can be traced
        docs.append(Document(list(range(next_id, next_id + n))))
        next_id += n
    rows = pack_documents(docs, max_length=32, overflow="split")
    assert all(len(row) <= 32 for row in rows)
    assert all(sum(row.seq_lens) == len(row) for row in rows)
    all_ids = [t for row in rows for t in row.input_ids]
    assert sorted(all_ids) == list(range(next_id))  # each token exactly once
    for row in rows:  # every piece is a run of consecutive tokens of one document, positions from 0
        for ids, _, pos in documents_of(row):
            assert ids == list(range(ids[0], ids[0] + len(ids)))
            assert pos == list(range(len(ids)))
    # bins are never overfull and best-fit leaves no row that could absorb a later one... at least: few rows
    assert len(rows) == pytest.approx(next_id / 32, rel=0.05, abs=1)


def test_bfd_truncate_keeps_each_document_start():
    docs = [Document(list(range(i * 100, i * 100 + n))) for i, n in enumerate([5, 40, 17, 33, 8])]
    rows = pack_documents(docs, max_length=16, overflow="truncate")
    assert all(len(row) <= 16 for row in rows)
    packed = sorted(ids for row in rows for ids, _, _ in documents_of(row))
    assert packed == sorted(d.input_ids[:16] for d in docs)


def test_bfd_bins_is_best_fit_decreasing():
    # capacity 10: 7 -> bin0 (3 left); 6 -> bin1 (4 left); 4 -> tightest fit is bin1 (4), not bin0 (3 too small)
    # 3 -> bin0 (exact); 2 -> new bin2
    assert bfd_bins([3, 6, 2, 7, 4], 10) == [[3, 0], [1, 4], [2]]
    with pytest.raises(ValueError):
        bfd_bins([11], 10)


def test_empty_documents_dropped():
    rows = pack_documents([[], [1, 2], []], max_length=4)
    assert [r.input_ids for r in rows] == [[1, 2]]


def test_wrapped_is_concatenate_and_chunk():
    docs = [Document([1, 2, 3], [0, 1, 1]), Document([4, 5, 6, 7, 8]), Document([9, 10])]
    rows = pack_documents(docs, max_length=4, strategy="wrapped")
    assert [r.input_ids for r in rows] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]
    assert [r.seq_lens for r in rows] == [[4], [4], [2]]  # a row is one "document": attention crosses borders
    assert [r.position_ids for r in rows] == [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1]]
    # concatenated labels; only the row's first token is not a target (4 IS predicted by 3, across the border)
    assert [r.labels for r in rows] == [[-100, 2, 3, 4], [-100, 6, 7, 8], [-100, 10]]


def test_efficiency_and_padding_fraction():
    rows = pack_documents([[1] * 5, [2] * 3, [3] * 6, [4] * 2], max_length=8)  # 16 tokens -> 2 full rows
    assert [len(r) for r in rows] == [8, 8]
    assert packing_efficiency(rows, 8) == 1.0
    rows = pack_documents([[1] * 5, [2] * 5], max_length=8)  # 10 tokens in 16 slots
    assert packing_efficiency(rows, 8) == pytest.approx(10 / 16)
    # unpacked: batches [5, 3] -> 10 slots, [6] -> 6 slots; real 14 of 16
    assert padding_fraction([5, 3, 6], batch_size=2) == pytest.approx(2 / 16)
    assert padding_fraction([4, 4], batch_size=2) == 0.0


def test_bad_options_are_user_errors():
    with pytest.raises(UserError, match="packing_strategy"):
        pack_documents([[1]], 4, strategy="greedy")
    with pytest.raises(UserError, match="packing_overflow"):
        pack_documents([[1]], 4, overflow="drop")
    rows = pack_documents([[1, 2]], 4)
    with pytest.raises(UserError, match="attn_implementation"):
        collate_packed(rows, "flex_attention", pad_token_id=0)


def test_block_causal_mask_drawing():
    mask = block_causal_mask([[3, 2, 3]], 8)[0, 0].int()
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0, 0],
            [0, 0, 0, 1, 0, 0, 0, 0],
            [0, 0, 0, 1, 1, 0, 0, 0],
            [0, 0, 0, 0, 0, 1, 0, 0],
            [0, 0, 0, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0, 1, 1, 1],
        ]
    )
    assert torch.equal(mask, expected)
    padded = block_causal_mask([[2]], 4)[0, 0]  # padding: one more document, attends to itself only
    assert padded[2:, :2].sum() == 0 and padded[:2, 2:].sum() == 0 and padded[3, 2] and padded[3, 3]


def test_padding_free_collator_matches_trl():
    docs = random_documents(random_lengths(12, 20, seed=6), seed=7, masked=True)
    rows = pack_documents(docs, max_length=24)
    ours = collate_packed(rows, "flash_attention_2", pad_token_id=0)
    # TRL's collator gets TRL's packed columns (labels without the document-start -100s)
    examples = [{"input_ids": r.input_ids, "labels": r.labels, "seq_lengths": r.seq_lens} for r in rows]
    theirs = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)
    for key in ("input_ids", "labels", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k"):
        assert torch.equal(ours[key], theirs[key]), key
    assert ours["max_length_q"] == theirs["max_length_q"] and ours["max_length_k"] == theirs["max_length_k"]
    assert ours["use_cache"] is False and "attention_mask" not in ours


# ---------------------------------------------------------------- packed forward == documents alone


def maxdiff(a, b) -> float:
    return (a - b).abs().max().item() if a.numel() else 0.0


def alone(model, ids, labels):
    """Logits [n, V] and per-token losses [n-1] of one document run by itself (no mask, positions 0..n-1)."""
    logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
    targets = torch.tensor(labels[1:], dtype=torch.long)
    losses = F.cross_entropy(logits[:-1], targets, reduction="none", ignore_index=IGNORE_INDEX)
    return logits, losses


def packed_token_losses(logits, labels):
    """Per-token losses of a [B, L] batch with the shift inside: position t scored against labels[t+1]."""
    return F.cross_entropy(
        logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none", ignore_index=IGNORE_INDEX
    )  # [B, L-1]


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_documents_alone(tokenizer, arch, attn):
    model = make_model(tokenizer, arch=arch)
    model.set_attn_implementation(attn)
    model.eval()
    docs = random_documents([7, 12, 3, 20, 9, 5, 15, 1, 30], vocab=len(tokenizer), seed=8, masked=True)
    rows = pack_documents(docs, max_length=32)
    assert len(rows) > 1 and any(len(r) < 32 for r in rows)  # several rows, some padded
    batch = collate_packed(rows, attn, pad_token_id=tokenizer.pad_token_id, pad_to=32)
    assert batch["attention_mask"].dtype == (torch.bool if attn == "sdpa" else torch.float32)
    with torch.no_grad():
        out = model(**batch)
        token_losses = packed_token_losses(out.logits, batch["labels"])
        total, count, worst_logit, worst_loss = 0.0, 0, 0.0, 0.0
        for r, row in enumerate(rows):
            start = 0
            for ids, labels, _ in documents_of(row):
                logits, losses = alone(model, ids, labels)
                n = len(ids)
                worst_logit = max(worst_logit, maxdiff(out.logits[r, start : start + n], logits))
                # the packed loss at position t scores labels[t+1]; inside the document that is its own loss
                worst_loss = max(worst_loss, maxdiff(token_losses[r, start : start + n - 1], losses))
                # ... and its last token, whose next label is another document's first (or padding), scores nothing
                assert start + n - 1 >= token_losses.shape[1] or token_losses[r, start + n - 1] == 0
                total += losses.sum().item()
                count += sum(lab != IGNORE_INDEX for lab in labels[1:])
                start += n
    assert worst_logit < TOL and worst_loss < TOL
    # the model's own loss (labels shifted inside, mean over targets) is the mean over all documents' targets
    assert out.loss.item() == pytest.approx(total / count, abs=TOL)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_perturbing_one_document_leaves_the_others(tokenizer, arch, attn):
    model = make_model(tokenizer, arch=arch)
    model.set_attn_implementation(attn)
    model.eval()
    a, b = random_documents([10, 14], vocab=len(tokenizer), seed=9)
    rows = pack_documents([a, b], max_length=32)
    assert rows[0].seq_lens == [14, 10]  # b first (longer), a second
    a2 = Document([(t + 1) % len(tokenizer) for t in a.input_ids])
    rows2 = pack_documents([a2, b], max_length=32)
    with torch.no_grad():
        out = model(**collate_packed(rows, attn, tokenizer.pad_token_id)).logits[0]
        out2 = model(**collate_packed(rows2, attn, tokenizer.pad_token_id)).logits[0]
    assert (out[:14] - out2[:14]).abs().max() < TOL  # b unchanged
    assert (out[14:] - out2[14:]).abs().max() > 1e-2  # a did change
    # ... and without the block mask (plain causal attention over the row) b would see a: place a first to show it
    rows3 = [PackedRow(a.input_ids + b.input_ids, [0] * 24, list(range(24)), [24])]
    rows4 = [PackedRow(a2.input_ids + b.input_ids, [0] * 24, list(range(24)), [24])]
    with torch.no_grad():
        out3 = model(**collate_packed(rows3, attn, tokenizer.pad_token_id)).logits[0]
        out4 = model(**collate_packed(rows4, attn, tokenizer.pad_token_id)).logits[0]
    assert (out3[10:] - out4[10:]).abs().max() > 1e-2


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_padding_free_position_ids_isolate_only_without_cache(tokenizer, arch):
    """What flash-attn varlen gets on GPU, run here with sdpa: one flattened row, position_ids, NO attention mask.

    transformers 5.23 rebuilds the block mask from position resets only when there is no KV cache. With the default
    use_cache (True in the config), the documents silently attend to each other: the trap `use_cache=False` avoids.
    """
    model = make_model(tokenizer, arch=arch)
    model.eval()
    assert model.config._attn_implementation == "sdpa" and model.config.use_cache
    docs = random_documents([9, 4, 13, 6, 11], vocab=len(tokenizer), seed=10)
    rows = pack_documents(docs, max_length=24)
    batch = collate_packed(rows, "flash_attention_2", tokenizer.pad_token_id)
    with torch.no_grad():
        expected = torch.cat([alone(model, ids, labels)[0] for r in rows for ids, labels, _ in documents_of(r)])
        padding_free = model(**batch).logits[0]  # cu_seq_lens_* are ignored by sdpa; use_cache=False from the batch
        with_cache = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
    assert (padding_free - expected).abs().max() < TOL
    assert (with_cache - expected).abs().max() > 1e-2  # the trap: cross-document attention
