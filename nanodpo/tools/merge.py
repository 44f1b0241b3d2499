"""Merge a LoRA adapter into its base model and save a plain Hugging Face model (no peft needed to load it).

Usage
-----
    python -m nanodpo.tools.merge --adapter out/dpo_lora --out out/dpo_merged
    python -m nanodpo.tools.merge --adapter out/dpo_lora --out out/dpo_merged --base Qwen/Qwen2.5-1.5B-Instruct
    python -m nanodpo.tools.merge --adapter out/dpo_lora --out out/dpo_merged --dtype bfloat16

The result loads with `AutoModelForCausalLM.from_pretrained("out/dpo_merged")` (safetensors + config + tokenizer),
and chats with `python -m nanodpo.tools.chat --model out/dpo_merged`.

What merging does: a LoRA layer computes W·x + (α/r)·B·A·x; merging adds the product once into the weight,
W' = W + (α/r)·B·A, so the model has its original shape and speed and gives the same outputs.

--base: the base model, by default the one named in the adapter's adapter_config.json (pass it when the adapter was
trained on another machine or the base moved). --dtype: the dtype of the saved weights, by default the one the base
was saved in. The merge itself runs in float32, so a bf16 base does not lose the small LoRA update to rounding
(this needs 4 bytes per parameter of memory: about 6 GB for a 1.5B model). A QLoRA adapter is merged into the
full-precision base, not into 4-bit weights.

The tokenizer is saved too: the adapter folder's (the one training used, with its chat template) or else the base's.
"""

import argparse
import json
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from nanodpo.errors import UserError, exit_on_user_error
from nanodpo.tools.chat import _quiet, adapter_base

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _saved_dtype(base: str) -> torch.dtype:
    """The dtype the base checkpoint was saved in (config.json's dtype), float32 if it does not say."""
    config = AutoConfig.from_pretrained(base)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype)
    return dtype if dtype in DTYPES.values() else torch.float32


def merge_adapter(adapter: str | Path, out: str | Path, base: str | None = None, dtype: str = "auto") -> Path:
    """Merge the LoRA adapter folder `adapter` into its base; save the merged model + tokenizer into `out`."""
    adapter, out = Path(adapter), Path(out)
    if not adapter.is_dir():
        raise UserError(f"--adapter {adapter}: no such folder")
    base_name = adapter_base(adapter, base)  # checks adapter_config.json is there
    if dtype != "auto" and dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: choose one of auto, {', '.join(DTYPES)}")
    if out.resolve() == adapter.resolve():
        raise UserError(f"--out {out} is the adapter folder: write the merged model somewhere else")
    if (out / "adapter_config.json").exists():
        # transformers would load that folder as an adapter, not as the merged model.
        raise UserError(f"--out {out} holds a LoRA adapter (adapter_config.json): choose an empty folder")

    try:
        model = AutoModelForCausalLM.from_pretrained(base_name, dtype=torch.float32)
        save_dtype = DTYPES[dtype] if dtype != "auto" else _saved_dtype(base_name)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load the base model '{base_name}': {err} (pass --base PATH)") from None
    model = PeftModel.from_pretrained(model, adapter)
    # W' = W + (α/r)·B·A in every adapted layer, then the peft wrappers are removed: a plain transformers model.
    merged = model.merge_and_unload()
    merged.to(save_dtype)
    if (adapter / "generation_config.json").is_file():  # saved with the adapter: the EOS SFT trained (end of turn)
        merged.generation_config = GenerationConfig.from_pretrained(adapter)
        merged.config.get_text_config().eos_token_id = merged.generation_config.eos_token_id[0]
    has_tokenizer = any((adapter / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = AutoTokenizer.from_pretrained(adapter if has_tokenizer else base_name)

    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    source = {"adapter": str(adapter), "base": str(base_name), "dtype": str(save_dtype).replace("torch.", "")}
    (out / "merged_from.json").write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m nanodpo.tools.merge", description="Merge a LoRA adapter into its base.")
    p.add_argument("--adapter", required=True, help="the LoRA adapter folder (with adapter_config.json)")
    p.add_argument("--out", required=True, help="where to save the merged model")
    p.add_argument("--base", default=None, help="the base model (default: the one named in adapter_config.json)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="saved dtype (auto: the base's)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    _quiet()
    out = merge_adapter(args.adapter, args.out, base=args.base, dtype=args.dtype)
    print(f"merged {args.adapter} into its base: {out} (load with AutoModelForCausalLM.from_pretrained)")


if __name__ == "__main__":
    exit_on_user_error(main)
