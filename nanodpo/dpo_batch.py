"""A micro-batch of preference examples as one batch of 2B sequences: [chosen; rejected].

    examples  [{"prompt_ids", "chosen_ids", "rejected_ids"}, ...]   (nanodpo/dpo_data.py, B of them)
    batch     input_ids, attention_mask, completion_mask [2B, T]    rows 0..B-1 prompt+chosen, B..2B-1 prompt+rejected

so that one forward pass scores both completions, and `tensor.chunk(2)` splits any per-row tensor back into (chosen,
rejected) (nanodpo/dpo.py). KTO's unpaired rows come in the same shape (`UnpairedCollator`); the packed layouts of
the fast path build on this batch (nanodpo/fast/dpo_packing.py).
"""

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class PreferenceCollator:
    """Pads a list of examples into one batch of 2B sequences: the B prompt+chosen rows, then the B prompt+rejected.

    Same tensors as TRL 1.16's `DataCollatorForPreference`. Each sequence is truncated to `max_length` first —
    `keep_start` keeps its first tokens, `keep_end` its last — then right-padded to the longest (rounded up to
    `pad_to_multiple_of`). `completion_mask` is 1 on completion tokens. `ref_chosen_logps`/`ref_rejected_logps` [B]
    are passed through when the examples carry them (precomputed reference log-probs). An example may carry its own
    `rejected_prompt_ids` (CPOTrainer's tokenization, nanodpo/dpo_data.py `cpo_tokenize_pair`).

    Worked example, pad_token_id=0, max_length=4, keep_start:

        examples = [{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
                    {"prompt_ids": [7, 8],    "chosen_ids": [9],    "rejected_ids": [10, 11]}]

        input_ids        attention_mask   completion_mask
        [[ 1,  2,  3,  4],  [[1, 1, 1, 1],   [[0, 0, 0, 1],     prompt 0 + chosen 0 (token 5 cut by max_length)
         [ 7,  8,  9,  0],   [1, 1, 1, 0],    [0, 0, 1, 0],     prompt 1 + chosen 1, padded
         [ 1,  2,  3,  6],   [1, 1, 1, 1],    [0, 0, 0, 1],     prompt 0 + rejected 0
         [ 7,  8, 10, 11]]   [1, 1, 1, 1]]    [0, 0, 1, 1]]     prompt 1 + rejected 1

    With keep_end instead, row 0 would be [2, 3, 4, 5] (the prompt's start is cut) with completion_mask [0, 0, 1, 1].
    """

    pad_token_id: int
    max_length: int | None = None
    truncation_mode: str = "keep_start"
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        sequences, masks = [], []
        for side in ("chosen", "rejected"):
            for ex in examples:
                prompt = ex.get(f"{side}_prompt_ids", ex["prompt_ids"])  # simpo/cpo/orpo: a side's own prompt
                sequences.append(prompt + ex[f"{side}_ids"])
                masks.append([0] * len(prompt) + [1] * len(ex[f"{side}_ids"]))

        if self.max_length is not None:
            if self.truncation_mode == "keep_start":
                cut = slice(None, self.max_length)
            elif self.truncation_mode == "keep_end":
                cut = slice(-self.max_length, None)
            else:
                raise ValueError(f"truncation_mode must be 'keep_start' or 'keep_end', got {self.truncation_mode!r}")
            sequences = [seq[cut] for seq in sequences]
            masks = [mask[cut] for mask in masks]

        length = max(len(seq) for seq in sequences)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of  # round up
        batch = {
            "input_ids": _pad(sequences, length, self.pad_token_id),
            "attention_mask": _pad([[1] * len(seq) for seq in sequences], length, 0),
            "completion_mask": _pad(masks, length, 0),
        }
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in examples[0]:
                batch[key] = torch.tensor([ex[key] for ex in examples])
        return batch


def with_chosen_prompt_scored(batch: dict) -> dict:
    """The batch with `completion_mask` also 1 on the chosen sequences' prompt tokens (every real token of the first
    half): ORPO's NLL term covers the whole chosen sequence, as TRL's ORPOTrainer computes it. The rejected rows keep
    their completion mask. Works with every layout: the packed ones map every token of every sequence."""
    chosen_attention, _ = batch["attention_mask"].chunk(2)
    _, rejected_completion = batch["completion_mask"].chunk(2)
    return {**batch, "completion_mask": torch.cat([chosen_attention, rejected_completion]).to(batch["completion_mask"])}


def _pad(rows: list[list[int]], length: int, value: int) -> torch.Tensor:
    """Right-pad each row to `length` with `value`; int64 [len(rows), length]."""
    return torch.tensor([row + [value] * (length - len(row)) for row in rows], dtype=torch.long)


@dataclass
class UnpairedCollator:
    """A KTO micro-batch in the [chosen; rejected] shape of the pair collators, so every layout (padded,
    padding-free, prefix-shared) and log-prob path serves it unchanged:

        rows 0 .. B-1     (x_i, y_i)        the micro-batch's rows, scored by the loss
        rows B .. 2B-1    (x_i, y'_i)       mismatched: row i's prompt with the completion it was given when the data
                                            was read (`kl_completion_ids`, nanodpo/dpo_data.py `add_kl_completions`),
                                            for the KL reference point z_ref

    plus `label` [B] (bool), and precomputed reference log-probs when the examples carry them (`ref_chosen_logps`:
    the rows', `ref_rejected_logps`: the mismatched rows'). `pairs` is the pair collator (PreferenceCollator or
    PackedPreferenceCollator); with prefix sharing, each row and its mismatched row share the prompt, computed once.
    """

    pairs: Any

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.pairs([
            {**ex, "chosen_ids": ex["completion_ids"], "rejected_ids": ex["kl_completion_ids"]} for ex in examples
        ])  # fmt: skip
        batch["label"] = torch.tensor([bool(ex["label"]) for ex in examples])
        return batch


def common_prefix_length(ids: list[int], other_ids: list[int]) -> int:
    """Number of leading tokens the two lists share."""
    length = 0
    for token, other in zip(ids, other_ids):
        if token != other:
            break
        length += 1
    return length
