"""Padding-free and prefix-shared DPO batches, and the map that brings their log-probs back to [chosen; rejected].

The padded layout (`PreferenceCollator`) puts the 2B sequences of B pairs in 2B rows padded to the longest, and
every pair's prompt is computed twice (once before chosen, once before rejected). With multi-turn prompts of
hundreds of tokens and completions of tens, most of the batch is padding or repeated prompt. Two fixes, combined:

Prefix sharing: one "unit" per pair holds the prompt once, then chosen, then rejected.

    unit           [ p0 p1 p2 | c0 c1 | r0 r1 r2 ]
    position_ids   [ 0  1  2  | 3  4  | 3  4  5  ]       rejected's positions continue from the prompt's end
    attention (query rows, key columns; 1 = may attend):
                     p0 p1 p2 c0 c1 r0 r1 r2
                p0 [ 1  .  .  .  .  .  .  . ]
                p1 [ 1  1  .  .  .  .  .  . ]
                p2 [ 1  1  1  .  .  .  .  . ]
                c0 [ 1  1  1  1  .  .  .  . ]          chosen sees the prompt and itself
                c1 [ 1  1  1  1  1  .  .  . ]
                r0 [ 1  1  1  .  .  1  .  . ]          rejected sees the prompt and itself, never chosen
                r1 [ 1  1  1  .  .  1  1  . ]
                r2 [ 1  1  1  .  .  1  1  1 ]

    A causal model's hidden state at a token depends only on the tokens before it and their positions, so every
    hidden state here equals the one of the sequence run alone: p2's predicts c0 for chosen AND r0 for rejected.
    The shared part is the longest common prefix of the two (truncated) sequences — the prompt, plus any first
    completion tokens the two happen to share.

Padding-free: several units (or, without prefix sharing, several single sequences) are packed into each row by
best-fit decreasing (nanodpo/packing.py; rows of 1-2x the longest unit, whichever wastes the fewest token slots),
each unit isolated from the others
(block-diagonal mask; a row's padding tail is one more dummy document). With flash-attention (GPU) all sequences
are laid end to end in ONE row with `cu_seq_lens` and no padding at all; flash's varlen kernel cannot express the
prefix-shared mask, so there prefix sharing falls back to padding-free (said once).

The loss never sees any of this. `hidden_index[s, t]` says where, in the packed rows, the hidden state sits that
predicts token t+1 of sequence s (s in the [chosen; rejected] order of `PreferenceCollator`); the log-prob paths
(nanodpo/logps.py) score only those positions and return the log-probs in the [2B, T-1] layout, so nanodpo/dpo.py
receives exactly what the padded layout gives (tests/test_dpo_packing.py: equal within 1e-5).

A batch from `PackedPreferenceCollator` holds PreferenceCollator's tensors (input_ids, attention_mask,
completion_mask [2B, T], the per-sequence view, which also counts tokens as TRL does) plus:
    packed_input_ids, packed_position_ids   [R, L]
    packed_attention_mask                   [R, 1, L, L] bool (sdpa, eager); or, for flash-attention,
    packed_cu_seq_lens, packed_max_length   (int32 [documents + 1], scalar)
    hidden_index                            [2B, T-1] flat index into the R·L positions
    padding_fraction                        scalar: padding slots / all slots of the packed rows
"""

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Sampler

from nanodpo.data import EpochSampler
from nanodpo.dpo_batch import PreferenceCollator, common_prefix_length
from nanodpo.errors import UserError, say_once
from nanodpo.logps import ModelInputs
from nanodpo.model import unwrap
from nanodpo.packing import MASKED_ATTENTION, PADDING_FREE_ATTENTION, bfd_bins


@dataclass
class Unit:
    """What one pair (prefix sharing) or one sequence (no sharing) occupies in a packed row."""

    input_ids: list[int]
    position_ids: list[int]
    prefix_len: int  # tokens every branch attends to (the whole unit for a lone sequence)
    branches: list[tuple[int, int]] = field(default_factory=list)  # (start, end) in the unit, after the prefix
    # (sequence index s, branch index or -1 for a lone sequence): where sequence s's tokens are
    members: list[tuple[int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)

    def position_of(self, branch: int, t: int) -> int:
        """Offset in the unit of token t of the member sequence on `branch`."""
        if branch < 0 or t < self.prefix_len:
            return t
        return self.branches[branch][0] + t - self.prefix_len

    def mask(self) -> torch.Tensor:
        """[U, U] bool: causal in the prefix; each branch sees the prefix and itself (causally)."""
        n = len(self)
        mask = torch.zeros(n, n, dtype=torch.bool)
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        p = self.prefix_len
        mask[:p, :p] = causal[:p, :p]
        for start, end in self.branches:
            mask[start:end, :p] = True
            mask[start:end, start:end] = causal[: end - start, : end - start]
        return mask


def lone_unit(seq: list[int], s: int) -> Unit:
    return Unit(list(seq), list(range(len(seq))), len(seq), [], [(s, -1)])


def shared_unit(chosen: list[int], rejected: list[int], s_chosen: int, s_rejected: int) -> Unit:
    """prompt + chosen + rejected in one unit (the shared part is their longest common prefix)."""
    p = common_prefix_length(chosen, rejected)
    a, b = chosen[p:], rejected[p:]
    ids = chosen[:p] + a + b
    positions = list(range(p)) + list(range(p, p + len(a))) + list(range(p, p + len(b)))
    branches = [(p, p + len(a)), (p + len(a), p + len(a) + len(b))]
    return Unit(ids, positions, p, branches, [(s_chosen, 0), (s_rejected, 1)])


def sequences_of(batch: dict) -> list[list[int]]:
    """The 2B (truncated) sequences of a PreferenceCollator batch, without padding."""
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    return [row[:n] for row, n in zip(batch["input_ids"].tolist(), lengths)]


@dataclass
class PackedPreferenceCollator:
    """PreferenceCollator's batch, plus the same sequences packed (see the module docstring).

    pack: several units per row (padding-free); False keeps one unit per row (prefix sharing alone).
    prefix_sharing: prompt + chosen + rejected in one unit (sdpa / eager only).
    """

    pad_token_id: int
    max_length: int | None = None
    truncation_mode: str = "keep_start"
    attn_implementation: str = "sdpa"
    prefix_sharing: bool = True
    pack: bool = True

    def __post_init__(self):
        if self.attn_implementation not in MASKED_ATTENTION + PADDING_FREE_ATTENTION:
            raise UserError(f"padding-free DPO does not support --attn_implementation {self.attn_implementation!r}")
        if self.prefix_sharing and self.attn_implementation not in MASKED_ATTENTION:
            raise ValueError("prefix sharing needs a 4D attention mask (sdpa or eager)")
        self.padded = PreferenceCollator(self.pad_token_id, self.max_length, self.truncation_mode)

    def units(self, sequences: list[list[int]]) -> list[Unit]:
        b = len(sequences) // 2
        if self.prefix_sharing:
            return [shared_unit(sequences[i], sequences[b + i], i, b + i) for i in range(b)]
        return [lone_unit(seq, s) for s, seq in enumerate(sequences)]

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.padded(examples)
        sequences = sequences_of(batch)
        units = self.units(sequences)
        if self.attn_implementation in PADDING_FREE_ATTENTION:
            rows = [list(range(len(units)))]  # one row, end to end; cu_seq_lens isolates the documents
        elif self.pack:
            rows = pack_rows([len(u) for u in units])
        else:
            rows = [[i] for i in range(len(units))]
        length = max(sum(len(units[i]) for i in row) for row in rows)

        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros((len(rows), length), dtype=torch.long)
        t_max = batch["input_ids"].shape[1]
        hidden_index = torch.zeros((len(sequences), t_max - 1), dtype=torch.long)
        masked = self.attn_implementation in MASKED_ATTENTION  # (flash-attention reads cu_seq_lens, never a mask)
        mask = torch.zeros(len(rows), 1, length, length, dtype=torch.bool) if masked else None
        doc_lens = []
        for r, row in enumerate(rows):
            offset = 0
            for i in row:
                unit = units[i]
                n = len(unit)
                input_ids[r, offset : offset + n] = torch.tensor(unit.input_ids)
                position_ids[r, offset : offset + n] = torch.tensor(unit.position_ids)
                if masked:
                    mask[r, 0, offset : offset + n, offset : offset + n] = unit.mask()
                for s, branch in unit.members:
                    where = [unit.position_of(branch, t) for t in range(len(sequences[s]) - 1)]
                    hidden_index[s, : len(where)] = r * length + offset + torch.tensor(where, dtype=torch.long)
                doc_lens.append(n)
                offset += n
            tail = length - offset  # padding: one dummy causal document (no softmax row is empty)
            position_ids[r, offset:] = torch.arange(tail)
            if masked:
                mask[r, 0, offset:, offset:] = torch.ones(tail, tail, dtype=torch.bool).tril()

        real = sum(doc_lens)
        batch.update(
            packed_input_ids=input_ids,
            packed_position_ids=position_ids,
            hidden_index=hidden_index,
            padding_fraction=torch.tensor(1.0 - real / (len(rows) * length)),
        )
        if self.attn_implementation in PADDING_FREE_ATTENTION:
            batch["packed_cu_seq_lens"] = torch.tensor([0] + doc_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
            batch["packed_max_length"] = torch.tensor(max(doc_lens))
        else:
            batch["packed_attention_mask"] = mask
        return batch


def pack_rows(lengths: list[int], widths: tuple[float, ...] = (1.0, 1.25, 1.5, 2.0)) -> list[list[int]]:
    """Units (by index) per row: best-fit decreasing into rows of `width` × the longest unit. The narrowest width
    whose token slots (rows × row length) are within 10% of the fewest wins: a row's attention is dense (its mask
    only hides the other units), so its cost grows with the square of its length."""
    options = []
    for width in widths:
        bins = bfd_bins(lengths, int(max(lengths) * width))
        options.append((len(bins) * max(sum(lengths[i] for i in b) for b in bins), bins))
    fewest = min(slots for slots, _ in options)
    return next(bins for slots, bins in options if slots <= 1.1 * fewest)


def packed_inputs(model, batch: dict) -> ModelInputs:
    """What the model is called with for a packed DPO batch (padding-free or prefix-shared rows), and which tokens are
    scored: the [chosen; rejected] sequences' completion tokens, mapped through `hidden_index` (nanodpo/logps.py)."""
    inputs = {"input_ids": batch["packed_input_ids"], "position_ids": batch["packed_position_ids"]}
    if "packed_attention_mask" in batch:
        mask = batch["packed_attention_mask"]
        if getattr(unwrap(model).config, "_attn_implementation", "sdpa") == "eager":  # eager ADDS the mask to scores
            dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
        inputs["attention_mask"] = mask
    else:  # flash-attention varlen
        max_len = int(batch["packed_max_length"])
        inputs.update(
            cu_seq_lens_q=batch["packed_cu_seq_lens"],
            cu_seq_lens_k=batch["packed_cu_seq_lens"],
            max_length_q=max_len,
            max_length_k=max_len,
        )
    return ModelInputs(inputs, batch["input_ids"], batch["completion_mask"], hidden_index=batch["hidden_index"])


# ----------------------------------------------------------------------------------------------------------------
# Options: which layout, and batches assembled to a token budget.


def resolve_layout(cfg) -> str:
    """--batch_layout, except that prefix sharing falls back to padding-free (said once) where the attention kernel
    cannot express its mask."""
    if cfg.batch_layout == "prefix_shared" and cfg.attn_implementation not in MASKED_ATTENTION:
        say_once(
            f"prefix sharing needs a 4D attention mask, which --attn_implementation {cfg.attn_implementation} "
            "cannot take: falling back to padding-free DPO (chosen and rejected as separate sequences)"
        )
        return "padding_free"
    return cfg.batch_layout


def packed_collator(cfg, pad_token_id: int, layout: str) -> PackedPreferenceCollator:
    """The collator of --batch_layout padding_free or prefix_shared (`resolve_layout`)."""
    return PackedPreferenceCollator(
        pad_token_id=pad_token_id,
        max_length=cfg.max_length,
        truncation_mode=cfg.truncation_mode,
        attn_implementation=cfg.attn_implementation,
        prefix_sharing=layout == "prefix_shared",
        pack=True,
    )


def pair_tokens(example: dict, max_length: int | None, truncation_mode: str, prefix_sharing: bool) -> int:
    """Tokens a pair occupies in the packed layout (both truncated sequences, the shared prefix once)."""
    chosen = example["prompt_ids"] + example["chosen_ids"]
    rejected = example.get("rejected_prompt_ids", example["prompt_ids"]) + example["rejected_ids"]
    if max_length is not None:
        cut = slice(None, max_length) if truncation_mode == "keep_start" else slice(-max_length, None)
        chosen, rejected = chosen[cut], rejected[cut]
    shared = common_prefix_length(chosen, rejected) if prefix_sharing else 0
    return len(chosen) + len(rejected) - shared


class TokenBudgetBatchSampler(Sampler):
    """Micro-batches of consecutive pairs (in `sampler`'s order) holding at most `max_tokens` tokens each; a pair
    over the budget on its own is a batch by itself. The order, and so the batches, follow `sampler.set_epoch`.

    Each micro-batch's loss is the mean over ITS pairs (as with a fixed pair count), so micro-batches with fewer,
    longer pairs weigh each of those pairs more; with a fixed --per_device_train_batch_size (no budget) the
    batches, and the numbers, are exactly TRL's.
    """

    def __init__(self, sampler: Sampler, costs: list[int], max_tokens: int):
        self.sampler = sampler
        self.costs = costs
        self.max_tokens = max_tokens

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        batch, tokens = [], 0
        for i in self.sampler:
            if batch and tokens + self.costs[i] > self.max_tokens:
                yield batch
                batch, tokens = [], 0
            batch.append(i)
            tokens += self.costs[i]
        if batch:
            yield batch

    def __len__(self) -> int:
        return sum(1 for _ in self)


def make_token_budget_loader(examples: list[dict], collate_fn, cfg) -> DataLoader:
    """Like training.make_train_loader, with micro-batches filled to --max_tokens_per_batch tokens."""
    prefix_sharing = resolve_layout(cfg) == "prefix_shared"
    costs = [pair_tokens(ex, cfg.max_length, cfg.truncation_mode, prefix_sharing) for ex in examples]
    sampler = EpochSampler(len(examples), shuffle=cfg.train_sampling_strategy == "random", seed=cfg.seed)
    batch_sampler = TokenBudgetBatchSampler(sampler, costs, cfg.max_tokens_per_batch)
    return DataLoader(examples, batch_sampler=batch_sampler, collate_fn=collate_fn)
