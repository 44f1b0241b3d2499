"""Loading models and tokenizers: dtype, attention kernel, 4-bit (QLoRA), LoRA, and the frozen reference model.

HF `transformers` is used only to load (`AutoModelForCausalLM`, `AutoTokenizer`, `BitsAndBytesConfig`); `peft` wraps
the model with LoRA. What `peft.prepare_model_for_kbit_training` does is spelled out in `prepare_for_kbit_training`
so a reader sees each step.
"""

import os

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from nanodpo.demo import TOKENIZER_DIR, tiny_model_config
from nanodpo.errors import UserError
from nanodpo.sft_data import resolve_chat_template

# Architectures nanodpo ships (no weights: pretrain them with train_pt.py --from_scratch), with their tokenizer.
PRESETS = {"nanodpo-tiny": (tiny_model_config, TOKENIZER_DIR)}

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "uint8": torch.uint8,
    "auto": "auto",
}


def check_model_options(cfg) -> None:
    """Refuse contradictory model flags before anything is loaded."""
    if not cfg.model:
        raise UserError("--model is required (a hub id such as Qwen/Qwen2.5-0.5B-Instruct, or a local folder)")
    if cfg.model in PRESETS and not getattr(cfg, "from_scratch", False):
        raise UserError(f"--model {cfg.model} is a preset architecture without weights: add --from_scratch")
    if cfg.load_in_4bit and not cfg.use_lora:
        raise UserError("--load_in_4bit trains a LoRA adapter on frozen 4-bit weights: add --use_lora")
    if cfg.bf16 and cfg.fp16:
        raise UserError("--bf16 and --fp16 are exclusive: pick one mixed-precision mode")
    if cfg.fp16 and not torch.cuda.is_available():
        raise UserError("--fp16 needs a CUDA GPU (loss scaling has no CPU kernel); use --bf16 or no mixed precision")
    if cfg.bf16 and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise UserError("--bf16 is not supported by this GPU; use --fp16")
    if cfg.attn_implementation == "flash_attention_2" and not torch.cuda.is_available():
        raise UserError("--attn_implementation flash_attention_2 needs a CUDA GPU; use sdpa")


def load_tokenizer(cfg):
    """The tokenizer of --tokenizer (or --model), with --chat_template applied. A missing pad token falls back to EOS,
    as TRL does."""
    name = cfg.tokenizer or cfg.model
    if name in PRESETS:  # a preset's tokenizer ships with nanodpo
        name = str(PRESETS[name][1])
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load a tokenizer from '{name}': {err}") from None
    if cfg.chat_template:
        # Set on the tokenizer itself, so every stage renders with it and it is saved with the model.
        tokenizer.chat_template = resolve_chat_template(tokenizer, cfg.chat_template)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(f"the tokenizer of '{name}' has neither a pad token nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_config(cfg, vocab_size: int):
    """The architecture of --model (a preset, or a hub id / folder's config.json), for a model built from scratch."""
    if cfg.model in PRESETS:
        return PRESETS[cfg.model][0](vocab_size)
    try:
        return AutoConfig.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load a model config from --model '{cfg.model}': {err}") from None


def quantization_config(cfg) -> BitsAndBytesConfig | None:
    if not cfg.load_in_4bit:
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=cfg.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=DTYPES[cfg.bnb_4bit_compute_dtype],
        bnb_4bit_quant_storage=DTYPES[cfg.bnb_4bit_quant_storage],
    )


def load_pretrained(cfg, device: torch.device | None = None) -> nn.Module:
    """The model weights of --model, in --dtype, with the chosen attention kernel (and 4-bit if asked)."""
    kwargs = dict(
        dtype=DTYPES[cfg.dtype],
        attn_implementation=cfg.attn_implementation,
        trust_remote_code=cfg.trust_remote_code,
    )
    quant = quantization_config(cfg)
    if quant is not None:
        kwargs["quantization_config"] = quant
        # bitsandbytes quantizes while loading, so the weights must land on their device right away.
        kwargs["device_map"] = {"": device if device is not None else "cpu"}
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.model, **kwargs)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load a causal LM from --model '{cfg.model}': {err}") from None
    return model


def disable_dropout(model: nn.Module) -> None:
    """Dropout makes the policy and the reference disagree on the same input; DPO turns it off (as TRL does)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def prepare_for_kbit_training(model: nn.Module, gradient_checkpointing: bool) -> None:
    """What `peft.prepare_model_for_kbit_training` does, step by step, for a 4-bit base model.

    1. Freeze every base weight: only the LoRA matrices (added next) will train.
    2. Keep the small float parameters (norms, biases, embeddings) in fp32: 4-bit matmuls compute in
       `bnb_4bit_compute_dtype`, but norm statistics in half precision lose too much.
    3. With gradient checkpointing, make the embedding output require grad: with frozen embeddings nothing before
       the first checkpointed block needs grad, and checkpointing would then drop the whole backward.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    for param in model.parameters():
        if param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()
    if gradient_checkpointing:
        model.enable_input_require_grads()


def add_lora(model: nn.Module, cfg) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    targets = cfg.lora_target_modules
    target_modules = "all-linear" if targets == ["all-linear"] else targets
    lora_config = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=target_modules,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, lora_config)
    except ValueError as err:
        raise UserError(f"--lora_target_modules {targets}: {err}") from None


def load_policy(cfg, device: torch.device | None = None) -> nn.Module:
    """The model to train: pretrained weights, optionally 4-bit, optionally wrapped with a new LoRA adapter."""
    model = load_pretrained(cfg, device)
    if cfg.disable_dropout:
        disable_dropout(model)
    if cfg.load_in_4bit:
        prepare_for_kbit_training(model, cfg.gradient_checkpointing)
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs and LoRA; the KV cache is useless in training.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.use_lora:
        model = add_lora(model, cfg)
    if cfg.print_trainable_parameters and is_main_process():
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")
    return model


def load_reference(cfg, device: torch.device | None = None) -> nn.Module:
    """A frozen copy of the starting weights for full fine-tuning (LoRA uses the policy with its adapter disabled)."""
    model = load_pretrained(cfg, device)
    disable_dropout(model)
    model.requires_grad_(False)
    model.eval()
    return model


def is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def decay_parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices only, never on biases and norm weights (1-D parameters)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or name.endswith(".bias") else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
