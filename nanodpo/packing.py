"""Packing: put many short documents into few rows of `max_length` tokens, each document still seeing only itself.

A packed row (max_length 8) holding three documents A = a0..a2, B = b0 b1, C = c0..c2:

    input_ids      [ a0   a1   a2 | b0   b1 | c0   c1   c2 ]
    position_ids   [ 0    1    2  | 0    1  | 0    1    2  ]     restart at 0: every document sits at its own start
    seq_lens       [ 3, 2, 3 ]                                    document lengths, in order (sum = row length)
    labels         [ -    a1   a2 | -    b1 | -    c1   c2 ]     - is -100; masked tokens (loss_mask 0) are -100 too

Labels follow Hugging Face's convention: they are aligned with input_ids and the loss shifts inside (the logits at
position t are scored against labels[t+1]). So labels[t] = -100 means "token t is not a target". The FIRST token of
every document gets -100: the only logits that could predict b0 sit on a2, the last token of *another* document, and
the row's very first token (a0) has nothing before it at all. This is TRL's padding-free convention
(`labels[position_ids == 0] = -100` in `DataCollatorForLanguageModeling`), so `labels[t] == -100` wherever
`position_ids[t] == 0`.

Block-causal attention (query rows, key columns; 1 = may attend). Causal inside each document, nothing across:

             a0 a1 a2 b0 b1 c0 c1 c2
        a0 [ 1  .  .  .  .  .  .  . ]
        a1 [ 1  1  .  .  .  .  .  . ]
        a2 [ 1  1  1  .  .  .  .  . ]
        b0 [ .  .  .  1  .  .  .  . ]
        b1 [ .  .  .  1  1  .  .  . ]
        c0 [ .  .  .  .  .  1  .  . ]
        c1 [ .  .  .  .  .  1  1  . ]
        c2 [ .  .  .  .  .  1  1  1 ]

With this mask and these position ids, every document's logits equal those of the document run alone
(tests/test_packing.py checks it to 1e-5 in fp32, for Qwen2 and Llama, sdpa and eager).

`collate_packed` gives the model these rows with this mask (sdpa, eager), or flattened into one row for
flash-attention's varlen kernel (`collate_varlen`); `pack_documents` decides which documents share a row.

Everything is deterministic: no shuffling here (shuffle documents before packing if wanted).
"""

import bisect
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from nanodpo.errors import UserError

IGNORE_INDEX = -100  # label of tokens that are not targets (PyTorch's cross_entropy default ignore_index)

PADDING_FREE_ATTENTION = ("flash_attention_2", "flash_attention_3")  # varlen kernels: position_ids / cu_seq_lens
MASKED_ATTENTION = ("sdpa", "eager")  # need an explicit 4D block-causal mask


@dataclass
class Document:
    """One tokenized document (a text, a conversation). `loss_mask[t] = 1` makes token t a target; None = all."""

    input_ids: list[int]
    loss_mask: list[int] | None = None

    def __post_init__(self):
        if self.loss_mask is not None and len(self.loss_mask) != len(self.input_ids):
            raise ValueError(f"loss_mask has {len(self.loss_mask)} entries for {len(self.input_ids)} tokens")

    def labels(self) -> list[int]:
        """input_ids where the loss mask is 1, -100 elsewhere (the document's first token is handled by packing)."""
        if self.loss_mask is None:
            return list(self.input_ids)
        return [tok if keep else IGNORE_INDEX for tok, keep in zip(self.input_ids, self.loss_mask, strict=True)]


@dataclass
class PackedRow:
    """One row of at most max_length tokens: see the drawing at the top of this file."""

    input_ids: list[int]
    labels: list[int]  # -100 on masked tokens and on the first token of every document
    position_ids: list[int]  # 0, 1, 2, ... restarting at every document
    seq_lens: list[int]  # document lengths in order; sum(seq_lens) == len(input_ids)

    def __len__(self) -> int:
        return len(self.input_ids)


def _as_document(doc: "Document | Sequence[int]") -> Document:
    return doc if isinstance(doc, Document) else Document(list(doc))


def bfd_bins(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Best-fit decreasing: assign items (by index) to bins of capacity max_length. Every length must be 1..max_length.

    Longest first (ties: lower index first); each item goes to the bin with the LEAST free space that still fits it
    (ties: the bin that reached that free space first); a new bin when none fits. Bins are returned in creation
    order, items in insertion order. This is TRL's `_pack_bfd` (which uses a segment tree for the same search).
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: equal lengths keep their order
    bins: list[list[int]] = []
    bins_with_space: dict[int, deque[int]] = {}  # free space -> bins (by index) with exactly that much room, FIFO
    spaces: list[int] = []  # sorted free-space values that some bin has, for the best-fit search
    for i in order:
        length = lengths[i]
        if not 0 < length <= max_length:
            raise ValueError(f"item {i} has length {length}, outside 1..{max_length}")
        k = bisect.bisect_left(spaces, length)  # smallest free space >= length
        if k < len(spaces):
            space = spaces[k]
            b = bins_with_space[space].popleft()
            if not bins_with_space[space]:
                del bins_with_space[space]
                spaces.pop(k)
        else:
            space, b = max_length, len(bins)
            bins.append([])
        bins[b].append(i)
        left = space - length
        if left > 0:
            if left not in bins_with_space:
                bins_with_space[left] = deque()
                bisect.insort(spaces, left)
            bins_with_space[left].append(b)
    return bins


def _make_row(pieces: list[tuple[list[int], list[int]]]) -> PackedRow:
    """Concatenate (input_ids, labels) pieces into a row; each piece is a document."""
    row = PackedRow(input_ids=[], labels=[], position_ids=[], seq_lens=[])
    for ids, labels in pieces:
        row.input_ids += ids
        row.labels += [IGNORE_INDEX] + labels[1:]  # nothing in this document predicts its first token
        row.position_ids += range(len(ids))
        row.seq_lens.append(len(ids))
    return row


def check_row_length(max_length: int | None, packed_by: str) -> None:
    """Packing fills rows of --max_length tokens: refuse, before anything loads, a run that packs without one."""
    if max_length is None:
        raise UserError(f"{packed_by} packs documents into rows of --max_length tokens: give --max_length")


def pack_documents(
    documents: Sequence["Document | Sequence[int]"],
    max_length: int,
    strategy: str = "bfd",
    overflow: str = "truncate",
    group_size: int | None = None,
) -> list[PackedRow]:
    """Pack documents into rows of at most max_length tokens (see the module docstring). Empty documents are dropped.

    Strategies (`pack_documents`):

    - `bfd` (best-fit decreasing, the default): documents sorted longest first, each placed in the row whose free space
      fits it most tightly, a new row when none fits. Same algorithm, tie-breaking and row order as TRL's `_pack_bfd`.
      A document longer than max_length is handled by `overflow`:
        * "truncate" (the default, TRL's "bfd"): keep its first max_length tokens, drop the rest. Right for SFT, where
          the start of a conversation gives the rest its meaning.
        * "split" (TRL's "bfd_split"): cut it into max_length pieces, each packed as its own document (positions
          restart and its first token is not a target; a piece cannot see the pieces before it). No token is lost:
          the choice for pretraining on long documents.
    - `wrapped` (teaching only, never the default): concatenate everything and cut every max_length tokens. Attention
      crosses document borders (one row is one "document"), so a document is conditioned on whatever came before it.

    strategy: "bfd" | "wrapped". overflow (bfd only): "truncate" | "split".
    group_size: pack each run of `group_size` consecutive documents on its own (None = all at once). TRL packs inside
    each `datasets.map` batch, i.e. group_size=1000; whole-set packing wastes less.
    """
    if strategy not in ("bfd", "wrapped"):
        raise UserError(f"--packing_strategy {strategy!r} is not one of: bfd, wrapped")
    if overflow not in ("truncate", "split"):
        raise UserError(f"--packing_overflow {overflow!r} is not one of: truncate, split")
    docs = [d for d in map(_as_document, documents) if d.input_ids]
    if group_size is not None:
        return [
            row
            for start in range(0, len(docs), group_size)
            for row in pack_documents(docs[start : start + group_size], max_length, strategy, overflow)
        ]

    if strategy == "wrapped":  # concatenate and chunk: a row is one "document" whose attention crosses borders
        ids = [tok for d in docs for tok in d.input_ids]
        labels = [lab for d in docs for lab in d.labels()]
        chunks = range(0, len(ids), max_length)
        return [_make_row([(ids[i : i + max_length], labels[i : i + max_length])]) for i in chunks]

    pieces: list[tuple[list[int], list[int]]] = []  # (input_ids, labels) of every document, or document piece
    for doc in docs:
        ids, labels = doc.input_ids, doc.labels()
        if overflow == "truncate":
            pieces.append((ids[:max_length], labels[:max_length]))
        else:
            pieces += [(ids[i : i + max_length], labels[i : i + max_length]) for i in range(0, len(ids), max_length)]
    bins = bfd_bins([len(ids) for ids, _ in pieces], max_length)
    return [_make_row([pieces[i] for i in b]) for b in bins]


def packing_efficiency(rows: Sequence[PackedRow], max_length: int) -> float:
    """Real tokens / token slots, each row occupying max_length slots. 1.0 = no padding at all."""
    slots = len(rows) * max_length
    return sum(len(row) for row in rows) / slots if slots else 1.0


def padding_fraction(lengths: Sequence[int], batch_size: int) -> float:
    """For UNPACKED training: the fraction of token slots that are padding when the sequences, in this order, are cut
    into batches of `batch_size` and each batch is padded to its longest sequence."""
    slots = real = 0
    for start in range(0, len(lengths), batch_size):
        batch = lengths[start : start + batch_size]
        slots += len(batch) * max(batch)
        real += sum(batch)
    return 1.0 - real / slots if slots else 0.0


def block_causal_mask(seq_lens: Sequence[Sequence[int]], length: int) -> torch.Tensor:
    """Boolean [B, 1, length, length], True = may attend: causal inside each document, nothing across documents.

    seq_lens[b] are row b's document lengths; positions past their sum (padding) form one more document.
    """
    mask = torch.zeros(len(seq_lens), 1, length, length, dtype=torch.bool)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    for b, lens in enumerate(seq_lens):
        start = 0
        for n in [*lens, length - sum(lens)]:
            mask[b, 0, start : start + n, start : start + n] = causal[:n, :n]
            start += n
    return mask


def collate_packed(
    rows: Sequence[PackedRow],
    attn_implementation: str,
    pad_token_id: int,
    pad_to: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Batch tensors for `model(**batch)`: input_ids, labels, position_ids [B, L] (padded to the longest row, or to
    `pad_to`), attention_mask [B, 1, L, L] (the module docstring's block-causal mask: bool for sdpa, additive float of
    `dtype` for eager), use_cache=False (with a KV cache, transformers lets packed documents see each other).
    Padding is one more (dummy) document attending only to itself: no softmax row is empty. flash: `collate_varlen`.
    """
    if attn_implementation in PADDING_FREE_ATTENTION:
        return collate_varlen(rows)
    if attn_implementation not in MASKED_ATTENTION:
        choices = ", ".join(PADDING_FREE_ATTENTION + MASKED_ATTENTION)
        raise UserError(f"packing supports --attn_implementation {choices}; got {attn_implementation!r}")
    length = max(len(row) for row in rows)
    if pad_to is not None:
        if pad_to < length:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest row ({length})")
        length = pad_to
    pads = [length - len(row) for row in rows]
    mask = block_causal_mask([row.seq_lens for row in rows], length)
    if attn_implementation == "eager":  # eager adds the mask to the attention scores
        mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
    return {
        "input_ids": torch.tensor([row.input_ids + [pad_token_id] * n for row, n in zip(rows, pads)]),
        "labels": torch.tensor([row.labels + [IGNORE_INDEX] * n for row, n in zip(rows, pads)]),
        "position_ids": torch.tensor([row.position_ids + list(range(n)) for row, n in zip(rows, pads)]),
        "attention_mask": mask,
        "use_cache": False,
    }


def collate_varlen(rows: Sequence[PackedRow]) -> dict[str, Any]:
    """flash_attention_2/3 (padding-free): all rows flattened into ONE sequence [1, N] with no padding and no mask;
    `position_ids` plus `cu_seq_lens_q/k` (cumulative document lengths, [0, 3, 5, 8] in the module docstring's row,
    int32 [documents + 1]) and max_length_q/k tell the varlen kernel where documents start. use_cache=False."""
    seq_lens = [n for row in rows for n in row.seq_lens]
    cu_seq_lens = torch.tensor([0] + seq_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return {
        "input_ids": torch.tensor([[t for row in rows for t in row.input_ids]]),
        "labels": torch.tensor([[t for row in rows for t in row.labels]]),
        "position_ids": torch.tensor([[p for row in rows for p in row.position_ids]]),
        "cu_seq_lens_q": cu_seq_lens,
        "cu_seq_lens_k": cu_seq_lens,
        "max_length_q": max(seq_lens),
        "max_length_k": max(seq_lens),
        "use_cache": False,
    }
