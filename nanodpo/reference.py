"""The reference policy π_ref of DPO: where its log-probs come from, and the on-disk cache of precomputed ones.

Four sources; nanodpo/recipe.py picks one at setup and the step calls it as `reference(policy, batch, inputs)`:
  * LoRA / QLoRA: the policy itself with its adapter disabled — the base weights *are* the starting point, so no
    second copy of the model is needed (`peft`'s `disable_adapter()` context): `reference_from_model`.
  * Full fine-tuning: a frozen copy of the starting weights (`nanodpo.model.load_reference`): `reference_from_model`.
  * `--precompute_ref_logps`: one pass over the data before training with the untrained policy (whose weights are
    the reference), cached on disk; no reference model is ever loaded: `precomputed_reference`.
  * none: the reference-free losses (simpo, cpo, orpo) and `--reference_free` (log π_ref = 0): `no_reference`.

The cache key hashes the tokenized data, a fingerprint of the reference weights and every setting that changes a
log-prob (max_length, truncation, LD-DPO's α, dtype, attention kernel), so a rerun with the same inputs reuses it
and any change recomputes it.
"""

import contextlib
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from nanodpo.logps import ModelInputs
from nanodpo.model import gathered_state_dict, is_peft_model


@torch.no_grad()
def reference_from_model(
    policy, batch: dict, inputs: ModelInputs, *, ref_model, token_logps, sum_logps, unwrap_model
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ref_chosen_logps [B], ref_rejected_logps [B]) of one [chosen; rejected] batch, under no_grad, in the batch's
    own layout (`inputs`), summed by `sum_logps` as the policy's are.

    ref_model given: a frozen copy. Otherwise a LoRA policy with its adapter disabled — or, for the one pass of
    --precompute_ref_logps before the first update, the untrained policy itself (its weights *are* the reference).
    """
    if ref_model is not None:
        stats = token_logps(ref_model, inputs)
    else:
        unwrapped = unwrap_model(policy)
        # Dropout is off (DPO disables it) and no_grad is on, so this is exactly the starting model's forward.
        adapter_off = unwrapped.disable_adapter() if is_peft_model(unwrapped) else contextlib.nullcontext()
        with adapter_off:
            stats = token_logps(unwrapped, inputs)
    ref_chosen_logps, ref_rejected_logps = sum_logps(stats.logps, stats.mask).chunk(2)
    return ref_chosen_logps, ref_rejected_logps


def precomputed_reference(policy, batch: dict, inputs: ModelInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference log-probs `precompute_reference_logps` attached to every example, collated into the batch."""
    return batch["ref_chosen_logps"], batch["ref_rejected_logps"]


def no_reference(policy, batch: dict, inputs: ModelInputs) -> tuple[None, None]:
    """No reference log-probs: the loss reads none (simpo, cpo, orpo), or takes them as 0 (--reference_free)."""
    return None, None


def data_fingerprint(examples: list[dict]) -> str:
    """Every token id list of every example (pairs: prompt, chosen, rejected; kto rows: prompt, completion and the
    mismatched completion)."""
    h = hashlib.sha256()
    for ex in examples:
        for key in sorted(key for key in ex if key.endswith("_ids")):
            h.update(key.encode() + json.dumps(ex[key]).encode())
        h.update(b"|")
    return h.hexdigest()


def model_fingerprint(model) -> str:
    """A cheap fingerprint of the weights: names, shapes, dtypes and a strided sample of every tensor's values."""
    h = hashlib.sha256()
    h.update(str(getattr(model.config, "_name_or_path", "")).encode())
    for name, tensor in gathered_state_dict(model):  # the same under FSDP2 / ZeRO-3 as on one process
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        h.update(flat[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()


def cache_key(examples: list[dict], model, cfg) -> str:
    settings = {
        "max_length": cfg.max_length,
        "truncation_mode": cfg.truncation_mode,
        "ld_alpha": cfg.ld_alpha,
        "dtype": cfg.dtype,
        "bf16": cfg.bf16,
        "fp16": cfg.fp16,
        "attn": cfg.attn_implementation,
        "load_in_4bit": cfg.load_in_4bit,
    }
    h = hashlib.sha256()
    h.update(data_fingerprint(examples).encode())
    h.update(model_fingerprint(model).encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:32]


def cache_dir() -> Path:
    return Path(os.environ.get("NANODPO_CACHE", "~/.cache/nanodpo")).expanduser() / "ref_logps"


def precompute_reference_logps(
    examples: list[dict], name: str, *, policy, ref_model, cfg, accelerator, collator, model_inputs, score
) -> tuple[list[dict], str]:
    """Attach `ref_chosen_logps`/`ref_rejected_logps` to every example, from the disk cache or one no_grad pass: the
    reference log-probs of the two halves of its [chosen; rejected] batch (kto: the row's and its mismatched row's).

    The pass reads `examples` in order, in batches of --precompute_ref_batch_size (default: the eval batch size)
    spread over the processes, and gathers the results from all of them. `collator`, `model_inputs` and `score`
    (`reference_from_model` with its options bound) are the step's own. Returns (examples with the two fields, cache
    key).
    """
    key_model = ref_model if ref_model is not None else accelerator.unwrap_model(policy)
    key = cache_key(examples, key_model, cfg)
    path = cache_dir() / f"{key}.safetensors"
    if path.exists():
        tensors = load_file(path)
        accelerator.print(f"[{name}] reference log-probs loaded from cache {path}")
    else:
        chosen, rejected = [], []
        was_training = policy.training
        policy.eval()
        batch_size = cfg.precompute_ref_batch_size or cfg.per_device_eval_batch_size
        loader = accelerator.prepare_data_loader(DataLoader(examples, batch_size, shuffle=False, collate_fn=collator))
        for batch in loader:
            ref_chosen, ref_rejected = score(policy, batch, model_inputs(policy, batch))
            ref_chosen, ref_rejected = accelerator.gather_for_metrics((ref_chosen, ref_rejected))
            chosen.append(ref_chosen.float().cpu())
            rejected.append(ref_rejected.float().cpu())
        policy.train(was_training)
        tensors = {"ref_chosen_logps": torch.cat(chosen), "ref_rejected_logps": torch.cat(rejected)}
        if accelerator.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            save_file(tensors, tmp)
            os.replace(tmp, path)  # atomic: a rerun never sees a half-written cache
        accelerator.wait_for_everyone()
        accelerator.print(f"[{name}] reference log-probs computed for {len(examples)} examples, cached at {path}")
    assert tensors["ref_chosen_logps"].numel() == len(examples), "reference cache does not match the data"
    with_ref = [
        {**ex, "ref_chosen_logps": float(c), "ref_rejected_logps": float(r)}
        for ex, c, r in zip(examples, tensors["ref_chosen_logps"].tolist(), tensors["ref_rejected_logps"].tolist())
    ]
    return with_ref, key
