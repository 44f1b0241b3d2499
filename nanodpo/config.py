"""Options of the three scripts: plain dataclasses, filled from a YAML file (`--config`) and then the command line.

Every field has a `help` string; `python train_dpo.py --help` prints them all. Names follow HF `TrainingArguments`
and TRL's `DPOConfig`/`SFTConfig` wherever those have one, so flags from a TRL command line carry over.

Precedence: dataclass default < YAML file < command line. Unknown options (flags or YAML keys), values of the wrong
type, unknown choices and numbers out of range (`RANGES`) are refused with a `UserError` naming the key, before
anything runs; an unknown option with the name most likely meant (nanodpo's for a TRL name, `TRL_NAMES`).

    cfg = parse_config(DPOConfig, ["--config", "configs/dpo.yaml", "--beta", "0.2"])
"""

import argparse
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nanodpo.errors import UserError


def opt(default: Any, help: str, choices: tuple | None = None):
    """A config field: its default, the help line `--help` shows, and (optionally) the allowed values."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, "choices": choices})
    return field(default=default, metadata={"help": help, "choices": choices})


DATASET_INFO_HELP = (
    "A LLaMA-Factory dataset_info.json: --dataset and --eval_dataset are then names of its entries (comma-separated "
    "or several), read as LLaMA-Factory reads them: the file (file_name, next to the json) or hf_hub_url, split, "
    "subset, formatting (alpaca/sharegpt), ranking, columns and tags."
)


@dataclass
class TrainConfig:
    """Options shared by train_pt.py, train_sft.py and train_dpo.py."""

    # --- run ---
    output_dir: str = opt("out/run", "Where checkpoints, the final model, config.yaml and metrics.jsonl go.")
    seed: int = opt(42, "Seed for model init (from scratch), data order and dropout.")
    # --- model ---
    model: str = opt("", "Hub id (e.g. Qwen/Qwen2.5-0.5B-Instruct) or local path of the model and tokenizer.")
    tokenizer: str | None = opt(None, "Tokenizer hub id or path, if it differs from --model.")
    chat_template: str | None = opt(
        None, "Chat template when the tokenizer has none (or to replace it): 'chatml', or a Jinja file path."
    )
    dtype: str = opt(
        "float32",
        "Dtype the weights are loaded in; 'auto' takes the checkpoint's. Full fine-tuning on one process or DDP "
        "needs float32 (the optimizer steps these weights; --bf16 computes in bf16); bfloat16 suits a LoRA base, "
        "and FSDP2 / DeepSpeed with --bf16 (they keep fp32 master weights).",
        ("auto", "float32", "bfloat16", "float16"),
    )
    attn_implementation: str = opt(
        "sdpa", "Attention kernel: sdpa, eager or flash_attention_2 (GPU).", ("sdpa", "eager", "flash_attention_2")
    )
    trust_remote_code: bool = opt(False, "Allow model code from the hub repo to run. Off unless you trust it.")
    load_in_4bit: bool = opt(False, "Load the base weights in 4-bit with bitsandbytes (QLoRA; needs --use_lora).")
    bnb_4bit_quant_type: str = opt("nf4", "4-bit data type.", ("nf4", "fp4"))
    bnb_4bit_use_double_quant: bool = opt(True, "Also quantize the quantization constants (saves ~0.4 bit/param).")
    bnb_4bit_compute_dtype: str = opt(
        "float32", "Dtype the 4-bit matmuls compute in (bfloat16 on GPU).", ("float32", "bfloat16", "float16")
    )
    bnb_4bit_quant_storage: str = opt(
        "uint8",
        "Storage dtype of packed 4-bit weights; set it to the compute dtype for FSDP/ZeRO-3 sharding.",
        ("uint8", "float32", "bfloat16", "float16"),
    )
    use_lora: bool = opt(False, "Train a LoRA adapter instead of all weights (peft).")
    lora_r: int = opt(16, "LoRA rank.")
    lora_alpha: int = opt(32, "LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = opt(0.0, "Dropout on the LoRA input.")
    lora_target_modules: list[str] = opt(["all-linear"], "Module names to adapt, or 'all-linear'.")
    print_trainable_parameters: bool = opt(True, "Print trainable / total parameter counts at start.")
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward to save memory.")
    disable_dropout: bool = opt(True, "Set every dropout probability in the model to 0 (as TRL does by default).")
    logps: str = opt(
        "chunked",
        "How token log-probs are computed, the same numbers either way: readable (the demo's, what a learner reads: "
        "nanodpo/logps.py) takes the model's full logits, then log_softmax + gather; chunked (the fast path, the "
        "default, nanodpo/fast/chunked_head.py) applies the LM head only at scored tokens, a chunk at a time, so the "
        "[batch, seq, vocab] logits never exist.",
        ("chunked", "readable"),
    )
    # --- data ---
    dataset: list[str] = opt([], "Training data: hub ids or local files/folders (json, jsonl, jsonl.gz, parquet, csv).")
    dataset_config: str | None = opt(None, "Hub dataset configuration name (the `name` of load_dataset).")
    dataset_split: str = opt("train", "Split(s) of --dataset to train on, e.g. 'train' or 'train_prefs+train_extra'.")
    eval_dataset: list[str] = opt([], "Evaluation data (same forms as --dataset); default: --eval_split of --dataset.")
    eval_split: str | None = opt(None, "Split of --dataset (or --eval_dataset) to evaluate on, e.g. 'test'.")
    max_samples: int | None = opt(None, "Use only the first N training rows (quick runs).")
    max_eval_samples: int | None = opt(None, "Use only the first N evaluation rows.")
    max_length: int | None = opt(1024, "Maximum tokens of a sequence (prompt + completion); longer ones are truncated.")
    # --- optimisation ---
    per_device_train_batch_size: int = opt(4, "Sequences (DPO: pairs) per micro-batch on each process.")
    per_device_eval_batch_size: int = opt(8, "Micro-batch size for evaluation.")
    gradient_accumulation_steps: int = opt(1, "Micro-batches accumulated into one optimizer step.")
    num_train_epochs: float = opt(1.0, "Epochs over the training data (ignored if --max_steps > 0).")
    max_steps: int = opt(-1, "Total optimizer steps; overrides --num_train_epochs when > 0.")
    learning_rate: float = opt(5e-6, "Peak learning rate.")
    lr_scheduler_type: str = opt("linear", "Learning-rate schedule after warmup.", ("constant", "linear", "cosine"))
    warmup_steps: int = opt(0, "Linear warmup steps (takes precedence over --warmup_ratio).")
    warmup_ratio: float = opt(0.0, "Warmup as a fraction of the total steps.")
    optim: str = opt(
        "adamw_torch",
        "Optimizer: AdamW (fused kernel on GPU when available) or plain SGD (used in parity tests).",
        ("adamw_torch", "sgd"),
    )
    weight_decay: float = opt(0.0, "AdamW weight decay (never applied to biases and norm weights).")
    adam_beta1: float = opt(0.9, "AdamW beta1.")
    adam_beta2: float = opt(0.999, "AdamW beta2.")
    adam_epsilon: float = opt(1e-8, "AdamW epsilon.")
    max_grad_norm: float = opt(1.0, "Clip the global gradient norm to this (0 disables clipping; the norm is logged).")
    bf16: bool = opt(
        False,
        "bfloat16 mixed precision: the forward autocast to bf16 (DeepSpeed: its bf16 engine); Ampere or later GPUs, "
        "or CPU. Neither --bf16 nor --fp16: accelerate's own mixed_precision (accelerate launch --mixed_precision, "
        "accelerate config), if set.",
    )
    fp16: bool = opt(False, "float16 mixed precision with loss scaling (GPU; for T4/V100, which lack bf16).")
    train_sampling_strategy: str = opt(
        "random", "Order of training rows: shuffled each epoch (seeded), or in file order.", ("random", "sequential")
    )
    # --- logging, eval, checkpoints ---
    logging_steps: int = opt(10, "Log the mean of the metrics every N optimizer steps.")
    eval_steps: int | None = opt(
        None, "Evaluate every N optimizer steps (and always at the end, if there is eval data)."
    )
    save_steps: int | None = opt(None, "Save a checkpoint every N optimizer steps (the final model is always saved).")
    save_total_limit: int | None = opt(None, "Keep only the newest N checkpoints (plus the best, see below).")
    metric_for_best_model: str | None = opt(
        None, "With --save_total_limit, also keep the checkpoint with the best value of this eval metric (eval_loss)."
    )
    greater_is_better: bool = opt(False, "Whether a larger --metric_for_best_model is better.")
    resume_from_checkpoint: str | None = opt(
        None, "Continue a run: 'latest' (the newest OUTPUT_DIR/checkpoint-*) or a checkpoint folder."
    )
    overwrite_output_dir: bool = opt(False, "Start a new run in an OUTPUT_DIR that holds another run (deletes it).")
    max_nonfinite_steps: int = opt(
        3,
        "Skip updates whose loss or grad norm is NaN/inf; after this many in a row, save and stop. (--fp16: an "
        "overflow the loss scaler skips, halving its scale, does not count.)",
    )
    report_to: list[str] = opt(
        ["jsonl"],
        "Trackers besides OUTPUT_DIR/metrics.jsonl, which is always written (python -m nanodpo.tools.plot and the "
        "end-of-run curve diagnosis read it): wandb (needs `wandb login`, or WANDB_MODE=offline; checked at start), "
        "tensorboard (OUTPUT_DIR/runs/), all (both); jsonl or none: the file alone.",
        ("none", "jsonl", "wandb", "tensorboard", "all"),
    )
    wandb_project: str = opt("nanodpo", "wandb project (WANDB_MODE=offline works without a network).")
    run_name: str | None = opt(None, "Run name for wandb/tensorboard; default: the output_dir's name.")
    disable_tqdm: bool = opt(False, "Hide the progress bar.")


@dataclass
class DPOConfig(TrainConfig):
    """Options of train_dpo.py. Loss options mirror TRL 1.16's DPOConfig (see nanodpo/dpo.py for the math)."""

    output_dir: str = opt("out/dpo", "Where checkpoints, the final model, config.yaml and metrics.jsonl go.")
    learning_rate: float = opt(1e-6, "Peak learning rate (TRL's DPO default).")
    dataset_info: str | None = opt(None, DATASET_INFO_HELP)
    beta: float = opt(
        0.1, "β: strength of the KL penalty toward the reference (the temperature of the implicit reward)."
    )
    loss_type: list[str] = opt(
        ["sigmoid"],
        "One or more of: sigmoid hinge ipo exo_pair nca_pair robust bco_pair sppo_hard aot aot_unpaired apo_zero "
        "apo_down discopop sft sigmoid_norm (several are summed with --loss_weights); or one of the rest of the "
        "family, alone: simpo cpo orpo (no reference model; orpo's --beta is its λ) kto (unpaired rows).",
    )
    loss_weights: list[float] | None = opt(None, "Weight of each --loss_type (default 1.0 each).")
    label_smoothing: float = opt(
        0.0,
        "ε: label-noise rate for robust, exo_pair, aot, aot_unpaired, simpo, cpo — and conservative DPO for sigmoid "
        "(TRL 1.16 ignores it there; nanodpo applies it like TRL <= 0.28 and the DPO authors' code).",
    )
    f_divergence_type: str = opt(
        "reverse_kl",
        "f-divergence of the regulariser (f-DPO).",
        ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"),
    )
    f_alpha_divergence_coef: float = opt(0.5, "α of the alpha-divergence.")
    ld_alpha: float | None = opt(None, "LD-DPO: weight of the completion tokens past the shorter one's length.")
    use_weighting: bool = opt(False, "WPO: weight each pair by the policy's own probability of both completions.")
    discopop_tau: float = opt(0.05, "τ of the DiscoPOP loss.")
    rpo_alpha: float | None = opt(None, "RPO: add α × the NLL of the chosen completion (= loss_type sigmoid+sft).")
    reference_free: bool = opt(False, "Use no reference model: its log-probs are taken as 0.")
    # --- the rest of the preference family (nanodpo/dpo.py, second table); checked in dpo.check_dpo_options ---
    simpo_gamma: float = opt(0.5, "simpo: γ, the target reward margin (TRL's CPOConfig default).")
    cpo_alpha: float | None = opt(
        None, "cpo, simpo: weight α of the chosen completion's NLL term. Default (none): 1.0 for cpo, 0.0 for simpo."
    )
    desirable_weight: float = opt(1.0, "kto: λ_D, the weight of the desirable rows' losses.")
    undesirable_weight: float = opt(1.0, "kto: λ_U, the weight of the undesirable rows' losses.")
    unpair_preference_data: bool = opt(
        False,
        "kto: read pairs (prompt, chosen, rejected) as two unpaired rows each, chosen desirable and rejected "
        "undesirable (TRL's unpair_preference_dataset).",
    )
    precompute_ref_logps: bool = opt(
        False, "Compute the reference log-probs once before training (cached on disk), then free the reference."
    )
    precompute_ref_batch_size: int | None = opt(None, "Batch size for --precompute_ref_logps (default: eval batch).")
    batch_layout: str = opt(
        "prefix_shared",
        "How a micro-batch's pairs are laid out, the same numbers either way: padded [chosen; rejected] rows (TRL's "
        "batch; the demo's readable path, nanodpo/dpo_batch.py); the fast path (nanodpo/fast/dpo_packing.py): "
        "padding_free, the sequences packed into rows without padding, each isolated; prefix_shared (the default), "
        "packed, and each pair's prompt computed once for both answers (flash_attention_2 falls back to padding_free).",
        ("prefix_shared", "padding_free", "padded"),
    )
    max_tokens_per_batch: int | None = opt(
        None,
        "Fill each micro-batch with pairs up to this many tokens (prompt shared) instead of "
        "--per_device_train_batch_size pairs.",
    )
    max_prompt_length: int | None = opt(
        None, "Keep only the last N prompt tokens (the end of a long multi-turn prompt matters most)."
    )
    truncation_mode: str = opt(
        "keep_start", "How sequences over --max_length are cut (TRL's rule).", ("keep_start", "keep_end")
    )
    # --- online DPO (nanodpo/online.py); checked in losses/options.py `check_online_options` ---
    online: bool = opt(
        False,
        "Online DPO (TRL's OnlineDPOTrainer): the data is prompts only; every micro-batch the policy samples two "
        "answers per prompt, the judges score them, and the DPO step trains on the pair, the higher score chosen.",
    )
    reward_model: list[str] = opt(
        [],
        "--online judge: a Hugging Face sequence-classification model (folder or hub id) scoring prompt + answer, "
        "read with its own tokenizer and chat template. Several are summed (--reward_weights).",
    )
    judge: list[str] = opt(
        [],
        "--online judge: a Python function as module:function (or path/file.py:function) called as "
        "function(prompts=..., completions=..., completion_ids=..., <other columns>=...) -> one number per answer, "
        "like TRL's reward functions; the demo's: nanodpo.demo.judge:politeness. Several are summed.",
    )
    reward_weights: list[float] | None = opt(
        None, "--online: the weight of each judge in the summed score, --reward_model ones first (default 1.0 each)."
    )
    max_new_tokens: int = opt(64, "--online: the most tokens sampled per answer (TRL's default).")
    temperature: float = opt(0.9, "--online: sampling temperature (TRL's default).")
    top_p: float = opt(1.0, "--online: nucleus sampling: draw from the most likely tokens whose probability reaches p.")
    missing_eos_penalty: float | None = opt(
        None, "--online: subtracted from the score of an answer that did not end (no EOS in --max_new_tokens)."
    )
    log_samples: int = opt(
        2,
        "--online: this many sampled pairs (prompt, chosen, rejected, scores) written every --logging_steps to "
        "OUTPUT_DIR/samples.jsonl and the trackers (0: none).",
    )


@dataclass
class SFTConfig(TrainConfig):
    """Options of train_sft.py (names as TRL's SFTConfig where it has one)."""

    output_dir: str = opt("out/sft", "Where checkpoints, the final model, config.yaml and metrics.jsonl go.")
    learning_rate: float = opt(2e-5, "Peak learning rate (TRL's SFT default).")
    dataset_info: str | None = opt(None, DATASET_INFO_HELP)
    train_on_prompt: bool = opt(False, "Train on every token, not only the assistant turns / completion.")
    eos_token: str | None = opt(
        None,
        "The EOS token: appended to text rows and string completions, and saved as the model's EOS (TRL's "
        "eos_token). Default: the tokenizer's, except that after training on conversations the chat template's "
        "end-of-turn token (<|im_end|>) is saved as EOS, so generation stops at the end of a turn.",
    )
    packing: bool = opt(False, "Pack several examples into each row of --max_length tokens (documents stay isolated).")
    packing_strategy: str = opt("bfd", "bfd: best-fit decreasing, isolated documents; wrapped: concatenate-and-chunk "
                                "(attention crosses documents; for teaching).", ("bfd", "wrapped"))


@dataclass
class PTConfig(TrainConfig):
    """Options of train_pt.py: pretraining from scratch or continued, always packed."""

    output_dir: str = opt("out/pt", "Where checkpoints, the final model, config.yaml and metrics.jsonl go.")
    learning_rate: float = opt(3e-4, "Peak learning rate.")
    lr_scheduler_type: str = opt("cosine", "Learning-rate schedule after warmup.", ("constant", "linear", "cosine"))
    from_scratch: bool = opt(
        False, "Random init from --model's config (with the overrides below) instead of its weights."
    )
    hidden_size: int | None = opt(None, "From scratch: override the hidden size.")
    num_hidden_layers: int | None = opt(None, "From scratch: override the number of layers.")
    num_attention_heads: int | None = opt(None, "From scratch: override the number of attention heads.")
    num_key_value_heads: int | None = opt(None, "From scratch: override the number of key/value heads (GQA).")
    intermediate_size: int | None = opt(None, "From scratch: override the MLP width.")
    max_position_embeddings: int | None = opt(None, "From scratch: override the maximum position.")
    text_column: str = opt("text", "Column holding the document text.")
    add_eos: bool = opt(True, "Append the EOS token to every document (marks document ends for the model).")
    packing_strategy: str = opt("bfd", "bfd: best-fit decreasing, isolated documents; wrapped: concatenate-and-chunk "
                                "(attention crosses documents; the classic recipe).", ("bfd", "wrapped"))
    packing_overflow: str = opt("split", "bfd: a document longer than --max_length is split into pieces (no token "
                                "lost) or truncated.", ("split", "truncate"))
    streaming: bool = opt(False, "Read the corpus lazily (bigger than RAM), packing on the fly in file order.")
    stream_buffer_docs: int = opt(1000, "Streaming: documents packed together at a time.")
    peak_tflops: float | None = opt(None, "Peak TFLOPS of one device (e.g. 989 for H100 bf16) to log MFU.")


# ----------------------------------------------------------------------------------------------------------------
# The range of every numeric option, checked right after parsing, before anything is loaded; a float option must also
# be finite (no nan / inf). "[a, b)" includes a and excludes b. DPO's loss options (beta, label_smoothing, ld_alpha,
# discopop_tau) depend on the loss type and are checked with it, in nanodpo/dpo.py `check_dpo_options`;
# f_alpha_divergence_coef, loss_weights and reward_weights take any finite number.

RANGES = {
    "seed": "[0, 4294967295]",  # numpy's seed range
    "lora_r": ">= 1",
    "lora_alpha": "> 0",
    "lora_dropout": "[0, 1)",
    "max_samples": ">= 1",
    "max_eval_samples": ">= 1",
    "max_length": ">= 2",  # a token to predict from and a token to score
    "per_device_train_batch_size": ">= 1",
    "per_device_eval_batch_size": ">= 1",
    "gradient_accumulation_steps": ">= 1",
    "num_train_epochs": "> 0",
    "max_steps": ">= -1",  # -1 (or 0): train for --num_train_epochs
    "learning_rate": ">= 0",
    "warmup_steps": ">= 0",
    "warmup_ratio": "[0, 1]",
    "weight_decay": ">= 0",
    "adam_beta1": "[0, 1)",
    "adam_beta2": "[0, 1)",
    "adam_epsilon": ">= 0",
    "max_grad_norm": ">= 0",  # 0: no clipping
    "logging_steps": ">= 1",
    "eval_steps": ">= 1",
    "save_steps": ">= 1",
    "save_total_limit": ">= 1",
    "max_nonfinite_steps": ">= 1",
    # DPO
    "rpo_alpha": ">= 0",
    "precompute_ref_batch_size": ">= 1",
    "max_tokens_per_batch": ">= 1",
    "max_prompt_length": ">= 0",
    "simpo_gamma": ">= 0",  # SimPO's target margin
    "cpo_alpha": ">= 0",
    "desirable_weight": "> 0",
    "undesirable_weight": "> 0",
    "max_new_tokens": ">= 1",  # online DPO: an answer has at least one token
    "temperature": "> 0",
    "top_p": "(0, 1]",
    "missing_eos_penalty": ">= 0",
    "log_samples": ">= 0",
    # PT
    "hidden_size": ">= 1",
    "num_hidden_layers": ">= 1",
    "num_attention_heads": ">= 1",
    "num_key_value_heads": ">= 1",
    "intermediate_size": ">= 1",
    "max_position_embeddings": ">= 1",
    "stream_buffer_docs": ">= 1",
    "peak_tflops": "> 0",
}


def in_range(value: float, spec: str) -> bool:
    """`value` within `spec`: '>= 1', '> 0', or an interval such as '[0, 1)'."""
    if spec[0] in "[(":
        low, high = (float(x) for x in spec[1:-1].split(","))
        above = value >= low if spec[0] == "[" else value > low
        below = value <= high if spec[-1] == "]" else value < high
        return above and below
    op, bound = spec.split()
    return value >= float(bound) if op == ">=" else value > float(bound)


def _check_ranges(cfg) -> None:
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, bool) or not isinstance(item, (int, float)):
                continue
            if not math.isfinite(item):
                raise UserError(f"--{f.name} must be a finite number, got {item}")
            spec = RANGES.get(f.name)
            if spec is not None and not in_range(item, spec):
                wanted = f"in {spec}" if spec[0] in "[(" else spec
                raise UserError(f"--{f.name} must be {wanted}, got {item}")


# ----------------------------------------------------------------------------------------------------------------
# Parsing: YAML + CLI, with types taken from the dataclass annotations.


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unwrap_optional(tp) -> tuple[Any, bool]:
    """`int | None` -> (int, True); `int` -> (int, False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _parse_bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "no", "n", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _convert(name: str, tp, value, where: str):
    """Check/convert one value (from YAML or CLI text) to the field's type; UserError names the key on failure."""
    base, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise UserError(f"{where}: '{name}' cannot be null")
    try:
        if typing.get_origin(base) is list:
            (item_type,) = typing.get_args(base)
            items = value if isinstance(value, list) else [value]
            return [_convert_scalar(item_type, item) for item in items]
        return _convert_scalar(base, value)
    except (TypeError, ValueError) as err:
        raise UserError(f"{where}: '{name}' has a wrong value {value!r} ({err})") from None


def _convert_scalar(tp, value):
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            return _parse_bool(value)
        raise TypeError("expected true or false")
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise TypeError("expected an integer")
        return int(value)
    if tp is float:
        if isinstance(value, bool):
            raise TypeError("expected a number")
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)):
            raise TypeError("expected a string")
        return str(value)
    raise TypeError(f"unsupported option type {tp}")


def _check_choices(cfg) -> None:
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        value = getattr(cfg, f.name)
        if not choices or value is None:
            continue
        for item in value if isinstance(value, list) else [value]:
            if item not in choices:
                raise UserError(f"--{f.name} {item!r} is not one of: {', '.join(choices)}")


def build_arg_parser(cls, description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description, argument_default=argparse.SUPPRESS, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--config", help="YAML file of options; flags given on the command line override it.")
    for f in dataclasses.fields(cls):
        tp = _field_types(cls)[f.name]
        base, _ = _unwrap_optional(tp)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{f.metadata.get('help', '')} (default: {default})"
        choices = f.metadata.get("choices")
        allowed = "{" + ",".join(choices) + "}" if choices else None  # what --help shows, as argparse spells choices
        if typing.get_origin(base) is list:
            parser.add_argument(f"--{f.name}", nargs="*", help=help_text, metavar=allowed or "VALUE")
        elif base is bool:
            # `--use_lora` alone means true; `--use_lora false` also works (YAML-style values).
            parser.add_argument(f"--{f.name}", nargs="?", const="true", help=help_text, metavar="BOOL")
        else:
            parser.add_argument(f"--{f.name}", help=help_text, metavar=allowed or base.__name__.upper())
    return parser


# TRL's and TrainingArguments' names that nanodpo spells differently (README.md, "Flags from TRL"): an unknown option
# with one of these names is answered with nanodpo's. TRL_NOT_NEEDED: TRL options nanodpo has no use for, and why.
TRL_NAMES = {
    "model_name_or_path": "model",
    "dataset_name": "dataset",
    "dataset_train_split": "dataset_split",
    "dataset_test_split": "eval_split",
    "use_peft": "use_lora",
    "peft_config": "use_lora",
    "lora_rank": "lora_r",
    "torch_dtype": "dtype",
    "max_seq_length": "max_length",
    "precompute_ref_log_probs": "precompute_ref_logps",
    "quantization_bit": "load_in_4bit",
    "eval_strategy": "eval_steps",
    "save_strategy": "save_steps",
    "load_best_model_at_end": "metric_for_best_model",
    "padding_free": "batch_layout",
    "use_liger_kernel": "logps",
}
TRL_NOT_NEEDED = {
    "model_init_kwargs": "its parts are --dtype, --attn_implementation and --load_in_4bit",
    "deepspeed": "give accelerate the DeepSpeed config: accelerate launch --config_file configs/accelerate/zero2.yaml",
    "dataset_text_field": "the format is recognised from the columns",
    "remove_unused_columns": "the collators read only their own columns",
    "ddp_find_unused_parameters": "accelerate sets up DDP",
}


def unknown_option(name: str, options: list[str], spell=lambda name: f"--{name}") -> str:
    """The refusal of an unknown option, with the one most likely meant: nanodpo's name for a TRL option, or else the
    closest option name. `spell` writes a name as the user wrote it (a flag, or a YAML key)."""
    if TRL_NAMES.get(name) in options:
        return f"unknown option {spell(name)}: did you mean {spell(TRL_NAMES[name])}? ({name} is TRL's name for it)"
    if name in TRL_NOT_NEEDED:
        return f"unknown option {spell(name)}: TRL's, not needed in nanodpo ({TRL_NOT_NEEDED[name]})"
    close = difflib.get_close_matches(name, options, n=1)
    if close:
        return f"unknown option {spell(name)}: did you mean {spell(close[0])}?"
    return f"unknown option {spell(name)} (see --help for the list)"


def _refuse_unknown_arguments(unknown: list[str], options: list[str]) -> None:
    """Command-line words argparse did not take: the first unknown option (or stray value), refused with a hint."""
    flags = [word.lstrip("-").split("=")[0] for word in unknown if word.startswith("-")]
    if flags:
        raise UserError(f"command line: {unknown_option(flags[0], options)}")
    raise UserError(
        f"command line: unexpected argument {unknown[0]!r} (options are --name value; a YAML file goes after --config)"
    )


def load_yaml(path: str) -> dict:
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise UserError(f"--config {path}: not valid YAML ({err})") from None
    except UnicodeDecodeError:
        raise UserError(f"--config {path}: not UTF-8 text") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of option: value, got {type(data).__name__}")
    return data


def parse_config(cls, argv: list[str] | None = None, description: str | None = None):
    """Build `cls` from dataclass defaults, then `--config` YAML, then the command-line flags."""
    parser = build_arg_parser(cls, description)
    namespace, unknown = parser.parse_known_args(argv)
    types_by_name = _field_types(cls)
    if unknown:
        _refuse_unknown_arguments(unknown, list(types_by_name))
    args = vars(namespace)
    config_path = args.pop("config", None)
    values: dict[str, Any] = {}
    if config_path is not None:
        for key, value in load_yaml(config_path).items():
            if key not in types_by_name:
                where = unknown_option(str(key), list(types_by_name), spell=lambda name: f"'{name}'")
                raise UserError(f"--config {config_path}: {where}")
            values[key] = _convert(key, types_by_name[key], value, f"--config {config_path}")
    for key, value in args.items():
        values[key] = _convert(key, types_by_name[key], value, "command line")
    cfg = cls(**values)
    _check_choices(cfg)
    _check_ranges(cfg)
    cfg.report_to = trackers(cfg.report_to)
    return cfg


def trackers(report_to: list[str]) -> list[str]:
    """--report_to as the trackers the run opens: jsonl (OUTPUT_DIR/metrics.jsonl) always — it costs nothing, and
    the plot and the curve diagnosis read it — then wandb and tensorboard where asked for ('all': both)."""
    if "none" in report_to and len(set(report_to)) > 1:
        raise UserError(f"--report_to {' '.join(report_to)}: 'none' cannot be combined with a tracker")
    return ["jsonl", *(name for name in ("wandb", "tensorboard") if name in report_to or "all" in report_to)]


def config_to_dict(cfg, **extra) -> dict:
    """The options as a plain dict (with `extra` entries, e.g. what a tracker records next to them)."""
    return {**dataclasses.asdict(cfg), **extra}


def save_config(cfg, path: str | Path) -> None:
    """Write the run's full config as YAML; `--config` on that file reproduces the run."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True), encoding="utf-8")
