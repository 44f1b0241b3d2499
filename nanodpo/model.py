"""Loading models and tokenizers: dtype, attention kernel, 4-bit (QLoRA), LoRA, GGUF files, and the frozen reference
model — placed for the run's distribution (sharded under FSDP2 / ZeRO-3: `prepare_reference`).

HF `transformers` is used only to load (`AutoModelForCausalLM`, `AutoTokenizer`, `BitsAndBytesConfig`, `GgufConfig`);
`peft` wraps the model with LoRA. What `peft.prepare_model_for_kbit_training` does is spelled out in
`prepare_for_kbit_training` so a reader sees each step. Setups that cannot work are refused before anything loads
(`check_model_options`, `check_sharding_options`, `check_model_source`).
"""

import copy
import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import MethodType

import torch
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, GgufConfig, Qwen2Config
from transformers.integrations import is_deepspeed_zero3_enabled

from nanodpo.errors import UserError, require_extra, say_once
from nanodpo.sft_data import resolve_chat_template, set_eos_token

# ----------------------------------------------------------------------------------------------------------------
# The preset `nanodpo-tiny`: the offline demo's model (nanodpo/demo/), with the tokenizer nanodpo ships.

TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "tokenizer"

# Special token ids of the shipped tokenizer (make_tokenizer.SPECIAL_TOKENS, in this order).
PAD_TOKEN_ID = 0  # <|endoftext|>
IM_START_TOKEN_ID = 1  # <|im_start|>
EOS_TOKEN_ID = 2  # <|im_end|>

# A Qwen2 small enough to train on a CPU in minutes: with the demo tokenizer's ~1,200 tokens, ~3.5M parameters (0.3M
# of them the embedding, tied to the output layer); about 1k tokens/s of training per CPU core at sequence length 256.
# head_dim = 256 / 4 = 64; 2 key/value heads (grouped-query attention, as in Qwen2).
TINY_MODEL_PRESET = dict(
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=True,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    pad_token_id=PAD_TOKEN_ID,
    eos_token_id=EOS_TOKEN_ID,
    bos_token_id=None,
)


def tiny_model_config(vocab_size: int, **overrides):
    """A `transformers.Qwen2Config` of TINY_MODEL_PRESET with this vocabulary (and any field overridden)."""
    return Qwen2Config(**{**TINY_MODEL_PRESET, "vocab_size": vocab_size, **overrides})


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
    if cfg.model not in PRESETS:
        check_model_source(cfg.model)
    if cfg.tokenizer:
        check_model_source(cfg.tokenizer, "--tokenizer")
    if cfg.load_in_4bit and cfg.model.endswith(".gguf"):
        raise UserError(
            "--load_in_4bit with a GGUF --model: transformers loads a GGUF file through its own quantizer, which "
            "cannot be combined with bitsandbytes; train without --load_in_4bit (the GGUF is dequantized to --dtype), "
            "or save it as a folder first (python -c \"from transformers import AutoModelForCausalLM as M; "
            "M.from_pretrained('DIR', gguf_file='FILE.gguf').save_pretrained('OUT')\")"
        )
    if cfg.load_in_4bit and not cfg.use_lora:
        raise UserError("--load_in_4bit trains a LoRA adapter on frozen 4-bit weights: add --use_lora")
    if cfg.load_in_4bit:
        require_extra("bitsandbytes", "qlora", "--load_in_4bit")
    check_precision_options(cfg, os.environ)
    if cfg.attn_implementation == "flash_attention_2" and not torch.cuda.is_available():
        raise UserError("--attn_implementation flash_attention_2 needs a CUDA GPU; use sdpa")
    if cfg.attn_implementation == "flash_attention_2" and cfg.dtype == "float32" and not (cfg.bf16 or cfg.fp16):
        # (transformers would fail only at the first forward: "FlashAttention only supports fp16 and bf16")
        raise UserError(
            "--attn_implementation flash_attention_2 has no float32 kernel, and --dtype float32 without mixed "
            "precision runs attention in float32: add --bf16 (float32 weights, bfloat16 compute; --fp16 on a T4/V100)"
        )
    check_sharding_options(cfg, os.environ)


def check_precision_options(cfg, env) -> None:
    """The run's mixed precision — --bf16 / --fp16, or accelerate's own — and weights its optimizer can step, checked
    before anything is loaded. `env`: what `accelerate launch` exported (see check_sharding_options)."""
    if cfg.bf16 and cfg.fp16:
        raise UserError("--bf16 and --fp16 are exclusive: pick one mixed-precision mode")
    take_launcher_precision(cfg, env)
    check_master_weights(cfg, env)
    if cfg.fp16 and not torch.cuda.is_available():
        # accelerate would not refuse: on a CPU it silently drops fp16 (no autocast, no loss scaling) and trains fp32.
        raise UserError("--fp16 needs a CUDA GPU (accelerate runs fp16 on GPUs only); use --bf16 or no mixed precision")
    # Without including_emulation=False, torch says yes on a T4 or V100: it can store bf16 tensors, not compute fast.
    if cfg.bf16 and torch.cuda.is_available() and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise UserError(
            f"--bf16: this GPU ({torch.cuda.get_device_name()}) has no bfloat16 compute (bf16 needs an Ampere or "
            "later GPU: A100, RTX 30xx, H100 ...); on a T4 or V100 use --fp16 (float16 with loss scaling)"
        )


def take_launcher_precision(cfg, env) -> None:
    """accelerate's own mixed precision — `accelerate launch --mixed_precision`, or the accelerate config file's
    `mixed_precision`, which accelerate exports as ACCELERATE_MIXED_PRECISION — is honoured: a training config that
    sets neither --bf16 nor --fp16 takes it (and its saved config.yaml says so); one that sets the other is refused.
    accelerate exports 'no' also where nothing was configured, so 'no' leaves the training config's choice alone."""
    launcher = env.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    ours = "bf16" if cfg.bf16 else "fp16" if cfg.fp16 else "no"
    if launcher in ("no", ours):
        return
    source = f"accelerate's mixed_precision is {launcher} (from accelerate launch --mixed_precision or its config file)"
    if launcher not in ("bf16", "fp16"):
        raise UserError(f"{source}: nanodpo trains in bf16, fp16 or fp32; launch with --mixed_precision bf16/fp16/no")
    if ours != "no":
        raise UserError(
            f"{source} but the training config says --{ours}: make them agree (launch with --mixed_precision {ours}, "
            f"or train with --{launcher})"
        )
    setattr(cfg, launcher, True)
    say_once(f"mixed precision {launcher}: {source}")


def check_master_weights(cfg, env) -> None:
    """Refuse full fine-tuning of bfloat16/float16 weights that no fp32 copy backs.

    An optimizer that steps bf16 weights loses every update smaller than half their spacing (bf16 keeps 8 bits of
    mantissa): at DPO's learning rates (5e-7) about 1% of the weights move at all, where fp32 moves all of them. So the
    trained weights must be float32 — with --bf16 the forward still computes in bf16 (autocast: TRL's and HF's
    recipe) — unless something keeps an fp32 master copy for the optimizer:
      * DeepSpeed with its bf16/fp16 section (accelerate fills it in from --bf16/--fp16): its optimizers step fp32
        master weights and copy them back;
      * FSDP2 with mixed precision: accelerate upcasts the trainable weights to fp32 when it shards them, and the
        mixed-precision policy computes in bf16.
    One process and DDP keep no copy. LoRA is fine with any base dtype: peft creates the adapters, the only weights
    trained, in float32. `--dtype auto` takes the checkpoint's dtype (bfloat16 for most hub models), so it needs one
    of the two as well.
    """
    if cfg.use_lora or cfg.dtype == "float32":
        return
    # What accelerate builds in the processes it launches (read from the environment, as check_sharding_options
    # does): DeepSpeed or FSDP as configured — except with ACCELERATE_USE_CPU, where it runs DDP.
    cpu = _env_flag(env, "ACCELERATE_USE_CPU")
    deepspeed = _env_flag(env, "ACCELERATE_USE_DEEPSPEED") and not cpu
    fsdp = _env_flag(env, "ACCELERATE_USE_FSDP") and not cpu
    if (cfg.bf16 or cfg.fp16) and (deepspeed or fsdp):
        return
    weights = f"--dtype {cfg.dtype}"
    if cfg.dtype == "auto":
        weights += " (the checkpoint's dtype, bfloat16 for most hub models)"
    lost = "nothing keeps fp32 master weights, and an optimizer stepping half-precision weights loses small updates"
    if cfg.fp16:
        lost += " (and loss scaling cannot unscale float16 gradients)"
    if deepspeed or fsdp:
        setup = "DeepSpeed" if deepspeed else "FSDP2"
        raise UserError(
            f"full fine-tuning of {weights} weights under {setup} without --bf16/--fp16: {lost}; add --bf16 or --fp16 "
            f"({setup} then keeps an fp32 copy)"
        )
    flag = "--fp16" if cfg.fp16 else "--bf16"
    raise UserError(
        f"full fine-tuning of {weights} weights on one process or DDP: {lost}; use --dtype float32 with {flag} "
        f"(fp32 weights, {flag[2:]} compute), shard with FSDP2 or DeepSpeed and {flag} (both keep an fp32 copy), or "
        "train a LoRA adapter (--use_lora)"
    )


def _env_flag(env, name: str) -> bool:
    return env.get(name, "false").lower() in ("1", "true", "yes", "on")  # accelerate's str_to_bool


def check_sharding_options(cfg, env) -> None:
    """Refuse a sharded setup that cannot work, before anything is loaded. `env`: what `accelerate launch` exported
    from its config file (ACCELERATE_USE_FSDP, FSDP_VERSION, ACCELERATE_USE_DEEPSPEED, ...), which the processes'
    accelerate plugins are built from."""
    fsdp = env.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    deepspeed = env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    zero3 = deepspeed and env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"
    if fsdp and env.get("FSDP_VERSION", "1") != "2":
        raise UserError(
            "FSDP version 1 is not supported: nanodpo shards with FSDP2 (its reference model and chunked LM head "
            "rely on per-module units); set fsdp_version: 2 in the accelerate config (see fsdp2_full.yaml)"
        )
    if (fsdp or zero3) and cfg.load_in_4bit and cfg.bnb_4bit_quant_storage == "uint8":
        storage = cfg.dtype if cfg.dtype in ("bfloat16", "float16", "float32") else "bfloat16"
        raise UserError(
            f"--load_in_4bit under {'FSDP2' if fsdp else 'ZeRO-3'} needs --bnb_4bit_quant_storage {storage} (a float "
            "storage, the same as --dtype): packed uint8 4-bit weights are not sharded, every process would hold "
            "them all"
        )
    if fsdp and env.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "false").lower() == "true":
        if cfg.load_in_4bit:
            raise UserError(
                "fsdp_cpu_ram_efficient_loading: true cannot load 4-bit weights (they are quantized while loading, "
                "which the meta device of ranks > 0 cannot do): set it to false in the accelerate config"
            )


def check_model_source(name: str, flag: str = "--model") -> None:
    """Refuse, before anything is loaded, a --model that is neither an existing local folder or .gguf file nor a
    well-formed hub id (HF would answer "Repo id must be in the form 'repo_name' or 'namespace/repo_name'", which
    hides the likely cause: a mistyped local path)."""
    if name.endswith(".gguf"):
        if not Path(name).expanduser().is_file():
            raise UserError(f"{flag} '{name}': no such GGUF file")
        if importlib.util.find_spec("gguf") is None:
            raise UserError(f"{flag} '{name}' is a GGUF file: reading it needs the gguf package (pip install gguf)")
        return
    if Path(name).expanduser().exists():
        return
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise UserError(
            f"{flag} '{name}': no such local folder, and not a hub id either (a hub id is NAME or ORG/NAME, e.g. "
            "Qwen/Qwen2.5-0.5B-Instruct)"
        ) from None


def pretrained_location(name: str) -> tuple[str, dict]:
    """What `from_pretrained` is given for --model: a .gguf file is (its folder, gguf_file=its name) — transformers
    then reads the config and the tokenizer from the GGUF metadata and dequantizes every tensor (Q4_1, Q8_0, ...) to
    the `dtype` asked for; saving writes ordinary safetensors. Any other name (a folder, a hub id) is passed as is."""
    if name.endswith(".gguf"):
        path = Path(name).expanduser()
        return str(path.parent), {"gguf_file": path.name}
    return name, {}


def load_tokenizer(cfg):
    """The tokenizer of --tokenizer (or --model), with --chat_template and SFT's --eos_token applied. A missing pad
    token falls back to EOS — to the new one under --eos_token, as TRL's SFTTrainer does."""
    name = cfg.tokenizer or cfg.model
    if name in PRESETS:  # a preset's tokenizer ships with nanodpo
        name = str(PRESETS[name][1])
    try:
        location, gguf = pretrained_location(name)
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=cfg.trust_remote_code, **gguf)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load a tokenizer from '{name}': {err}") from None
    if cfg.chat_template:
        # Set on the tokenizer itself, so every stage renders with it and it is saved with the model.
        tokenizer.chat_template = resolve_chat_template(tokenizer, cfg.chat_template)
    if getattr(cfg, "eos_token", None):
        set_eos_token(tokenizer, cfg.eos_token)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(f"the tokenizer of '{name}' has neither a pad token nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def set_eos_token_id(model: nn.Module, token_id: int) -> None:
    """Make `token_id` the model's EOS: config.json's, and the first of generation_config's (the others stay: any of
    them stops generation). What TRL's SFTTrainer does with its eos_token."""
    model = model.get_base_model() if is_peft_model(model) else model
    model.config.get_text_config().eos_token_id = token_id
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    model.generation_config.eos_token_id = [token_id, *[i for i in ids if i != token_id]]


def load_model_config(cfg, vocab_size: int):
    """The architecture of --model (a preset, a hub id / folder's config.json, or a GGUF file's metadata), for a model
    built from scratch."""
    if cfg.model in PRESETS:
        return PRESETS[cfg.model][0](vocab_size)
    try:
        location, gguf = pretrained_location(cfg.model)
        return AutoConfig.from_pretrained(location, trust_remote_code=cfg.trust_remote_code, **gguf)
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
        # bitsandbytes quantizes while loading, so the weights must land on their device right away. Under ZeRO-3
        # DeepSpeed places them (transformers refuses a device_map there).
        if not is_deepspeed_zero3_enabled():
            kwargs["device_map"] = {"": device if device is not None else "cpu"}
    location, gguf = pretrained_location(cfg.model)
    if gguf:
        # Every tensor unpacked to a dense --dtype weight while loading (transformers would otherwise keep quantized
        # GGUF blocks where it has a kernel for them: inference-only modules that neither train nor save).
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs, **gguf)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load a causal LM from --model '{cfg.model}': {err}") from None
    if quant is not None:
        keep_4bit_training_layout(model)
    if getattr(model, "hf_quantizer", None) is not None and gguf:
        # Dense now: an ordinary model, which save_pretrained writes as safetensors (a model still marked as
        # GGUF-quantized refuses to be saved).
        model.hf_quantizer.remove_quantization_config(model)
    return model


def keep_4bit_training_layout(model: nn.Module) -> None:
    """bitsandbytes, on a CPU with AVX512-BF16, repacks a 4-bit weight into an inference-only layout the first time
    its layer runs in eval mode without grad (an evaluation, online DPO's sampling); every training forward after
    that fails ("a view of a leaf Variable ... in-place operation"). Keep the layout training uses."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def disable_dropout(model: nn.Module) -> None:
    """Dropout makes the policy and the reference disagree on the same input; DPO turns it off (as TRL does)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def prepare_for_kbit_training(model: nn.Module, gradient_checkpointing: bool) -> None:
    """What `peft.prepare_model_for_kbit_training` does, step by step, for a 4-bit base model.

    1. Freeze every base weight: only the LoRA matrices (added next) will train.
    2. Keep the small float parameters (norms, biases, embeddings) in fp32: 4-bit matmuls compute in
       `bnb_4bit_compute_dtype`, but norm statistics in half precision lose too much. The 4-bit weights stay as they
       are: with `--bnb_4bit_quant_storage bfloat16` their packed bytes are held in a bf16 tensor, not bf16 values.
    3. With gradient checkpointing, make the embedding output require grad: with frozen embeddings nothing before
       the first checkpointed block needs grad, and checkpointing would then drop the whole backward.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    for param in model.parameters():
        if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != "Params4bit":
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
        trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
        total = sum(numel(p) for p in model.parameters())
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")
    return model


def numel(param: torch.Tensor) -> int:
    """A parameter's full size, also when ZeRO-3 has already partitioned it (its own tensor is then empty)."""
    return getattr(param, "ds_numel", param.numel())


def load_reference(cfg, device: torch.device | None = None) -> nn.Module:
    """A frozen copy of the starting weights for full fine-tuning (LoRA uses the policy with its adapter disabled)."""
    model = load_pretrained(cfg, device)
    disable_dropout(model)
    model.requires_grad_(False)
    model.eval()
    return model


def prepare_reference(accelerator, ref_model: nn.Module | None) -> nn.Module | None:
    """Place the frozen full-fine-tuning reference for this run's distribution — sharded where the policy is — without
    registering it as a model being trained. (TRL 1.16 prepares its reference the same three ways:
    `trl.models.utils.prepare_fsdp` / `prepare_deepspeed`, else `prepare_model(evaluation_mode=True)`.)

    * FSDP2: sharded exactly like the policy — accelerate's own `fsdp2_prepare_model` (one unit per decoder layer,
      the embeddings and the final norm + LM head as units of their own, the plugin's mixed precision and offload),
      so each process holds 1/N of it and gathers one layer at a time, never a whole copy. Not through
      `accelerator.prepare_model`: that would register it in `accelerator._models`, and accelerate's FSDP clipping
      compares the clipped parameters with every registered model's ("mixed torch.Tensor and DTensor"). (TRL shards
      its reference as one unit, `fully_shard(model)`: a whole gathered copy during each forward.)
    * DeepSpeed: an inference-only engine (no optimizer), ZeRO-3-partitioned under ZeRO-3, a plain copy per process
      (stage 0) under ZeRO-1/2 — TRL's `prepare_deepspeed`.
    * Otherwise (one process, DDP): on the device, never wrapped for gradient sync.
    """
    from accelerate.utils import DistributedType

    if ref_model is None:
        return None
    ref_model.requires_grad_(False)
    ref_model.eval()
    if accelerator.distributed_type == DistributedType.FSDP:
        from accelerate.utils import (
            convert_outputs_to_fp32,
            get_mixed_precision_context_manager,
        )
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        ref_model = fsdp2_prepare_model(accelerator, ref_model)
        if accelerator.native_amp:  # the same autocast accelerate puts around the policy's forward
            autocast = get_mixed_precision_context_manager(accelerator.native_amp, accelerator.autocast_handler)
            ref_model.forward = MethodType(convert_outputs_to_fp32(autocast(ref_model.forward.__func__)), ref_model)
        return ref_model.eval()
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return deepspeed_inference_engine(accelerator, ref_model)
    return accelerator.prepare_model(ref_model, evaluation_mode=True)


def deepspeed_inference_engine(accelerator, model: nn.Module) -> nn.Module:
    """TRL 1.16's `prepare_deepspeed`, step by step: the run's DeepSpeed config without its training-only parts,
    partitioned (ZeRO-3) or not (stage 0 below ZeRO-3), wrapped by `deepspeed.initialize` with no optimizer."""
    import deepspeed  # optional: only DeepSpeed runs get here

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    stage = config["zero_optimization"]["stage"]
    hidden_size = getattr(model.config, "hidden_size", None)
    if hidden_size is not None and stage == 3:  # TRL's buckets, sized to the model
        config.update({
            "zero_optimization.reduce_bucket_size": hidden_size * hidden_size,
            "zero_optimization.stage3_param_persistence_threshold": 10 * hidden_size,
            "zero_optimization.stage3_prefetch_bucket_size": 0.9 * hidden_size * hidden_size,
        })  # fmt: skip
    # No optimizer is passed: drop the blocks that would build one (or a scheduler, or an offloaded Adam).
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    config["zero_optimization"].pop("offload_optimizer", None)
    if stage != 3:
        config["zero_optimization"]["stage"] = 0
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def is_dtensor(tensor) -> bool:
    """An FSDP2 shard (DTensor). Checked without importing torch.distributed.tensor, which costs ~45 MB and 0.5 s
    at start-up: no DTensor exists before FSDP2 has imported it."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def gathered_state_dict(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, whole tensor) for each entry of the model's state dict, one at a time: gathered from the shards under
    FSDP2 (DTensor) or ZeRO-3 (a partitioned parameter), so every process sees what one process would. Collective
    under sharding: every process must iterate it to the end, and never keep a tensor past its own step."""
    for name, tensor in model.state_dict(keep_vars=True).items():
        if hasattr(tensor, "ds_id"):  # a ZeRO-3 parameter: gathered for this step only
            import deepspeed  # optional: only DeepSpeed runs hold such parameters

            with deepspeed.zero.GatheredParameters([tensor]):
                yield name, tensor.detach()
        elif is_dtensor(tensor):
            yield name, tensor.full_tensor().detach()
        else:
            yield name, tensor.detach()


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


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / accelerate wrappers (peft stays: its modules are the ones that run)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)  # torch.compile
