"""nanodpo/model.py's loading: a GGUF file as --model, the message for a --model that does not exist, and the sharded
setups refused before anything is loaded.

GGUF: the test writes a tiny Qwen2 GGUF itself with the `gguf` package (F32 tensors, the tokenizer and chat template
in its metadata, llama.cpp's tensor names from `gguf.get_tensor_name_map`), so the model transformers dequantizes
from it must give the HF model's logits exactly; each training script then trains from it and saves ordinary
safetensors that `AutoModelForCausalLM` loads.
"""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nanodpo.config import DPOConfig, parse_config
from nanodpo.errors import UserError
from nanodpo.model import check_model_options, check_sharding_options, load_pretrained, load_tokenizer
from tests import tiny

gguf = pytest.importorskip("gguf", reason="the gguf package (pip install -e .[test]) writes the test's GGUF file")


def write_gguf(model, tokenizer, path: Path) -> Path:
    """`model` (a Qwen2ForCausalLM) and its byte-level BPE tokenizer as a GGUF file with F32 tensors."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_name("nanodpo-tiny")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_vocab_size(config.vocab_size)
    # The tokenizer: llama.cpp's "gpt2" (byte-level BPE) model, tokens in id order, merges, special tokens as CONTROL.
    tokens = [token for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]
    special = set(tokenizer.all_special_tokens)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_chat_template(tokenizer.chat_template)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        writer.add_tensor(names.get_name(hf_name, try_suffixes=(".weight", ".bias")), tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(the GGUF file, the HF model it was written from, its tokenizer)."""
    root = tmp_path_factory.mktemp("gguf")
    tokenizer = tiny.make_tokenizer()
    model = tiny.make_model(tokenizer, seed=5).eval()
    return write_gguf(model, tokenizer, root / "tiny-f32.gguf"), model, tokenizer


def model_cfg(model: str, **overrides):
    return parse_config(DPOConfig, ["--model", model, *sum(([f"--{k}", str(v)] for k, v in overrides.items()), [])])


def test_gguf_loads_with_the_hf_models_logits_and_tokenizer(tiny_gguf):
    path, model, tokenizer = tiny_gguf
    cfg = model_cfg(str(path))
    check_model_options(cfg)
    loaded = load_pretrained(cfg).eval()
    ids = torch.tensor([tokenizer("Human: What is the capital of France? 你好")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    ours = load_tokenizer(cfg)
    text = "<|im_start|>user\nName a fruit.<|im_end|>\n很好，很暴躁。"
    assert ours(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert (ours.eos_token, ours.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert ours.chat_template == tokenizer.chat_template
    # dequantized to --dtype
    assert load_pretrained(model_cfg(str(path), dtype="bfloat16")).dtype == torch.bfloat16


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_accelerate_state")
def test_every_script_trains_from_a_gguf_and_saves_safetensors(tiny_gguf, tmp_path):
    import train_dpo
    import train_pt
    import train_sft

    path, model, tokenizer = tiny_gguf
    tiny.write_jsonl(tmp_path / "dpo.jsonl", tiny.preference_rows(4))
    rows = tiny.preference_rows(8)
    tiny.write_jsonl(tmp_path / "sft.jsonl", [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows])
    tiny.write_jsonl(tmp_path / "pt.jsonl", [{"text": r["prompt"] + r["chosen"]} for r in rows])
    common = ["--model", str(path), "--max_steps", "1", "--per_device_train_batch_size", "2", "--disable_tqdm",
              "--learning_rate", "1e-3", "--max_length", "64"]  # fmt: skip
    runs = {
        "dpo": (train_dpo, ["--dataset", str(tmp_path / "dpo.jsonl")]),
        "sft": (train_sft, ["--dataset", str(tmp_path / "sft.jsonl")]),
        "pt": (train_pt, ["--dataset", str(tmp_path / "pt.jsonl"), "--max_length", "32"]),
    }
    for name, (script, extra) in runs.items():
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
        out = tmp_path / name
        script.main([*common, *extra, "--output_dir", str(out)])
        assert (out / "model.safetensors").exists() and not list(out.glob("*.gguf")), name
        saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        assert type(saved) is type(model) and saved.config.num_hidden_layers == model.config.num_hidden_layers
        assert AutoTokenizer.from_pretrained(out).chat_template == tokenizer.chat_template
        changed = [n for n, p in saved.state_dict().items() if not torch.equal(p, model.state_dict()[n])]
        assert changed, f"{name}: one step changed no weight"


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_accelerate_state")
def test_pretraining_from_scratch_takes_a_ggufs_architecture_and_tokenizer_only(tiny_gguf, tmp_path):
    """`train_pt.py --model FILE.gguf --from_scratch`: the GGUF's config (with the overrides) and tokenizer, new
    random weights; the run saves an ordinary safetensors model."""
    from safetensors.torch import load_file

    import train_pt

    path, model, tokenizer = tiny_gguf
    tiny.write_jsonl(tmp_path / "pt.jsonl", [{"text": r["prompt"] + r["chosen"]} for r in tiny.preference_rows(8)])
    out = tmp_path / "out"
    train_pt.main([
        "--model", str(path), "--from_scratch", "--num_hidden_layers", "1", "--intermediate_size", "96",
        "--dataset", str(tmp_path / "pt.jsonl"), "--output_dir", str(out), "--max_steps", "2", "--max_length", "32",
        "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--disable_tqdm",
    ])  # fmt: skip
    assert (out / "model.safetensors").exists() and not list(out.glob("*.gguf"))
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    # The architecture is the GGUF's, with --num_hidden_layers and --intermediate_size applied.
    assert type(saved) is type(model)
    expected = {**model.config.to_dict(), "num_hidden_layers": 1, "intermediate_size": 96}
    architecture = (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "max_position_embeddings", "rope_parameters", "tie_word_embeddings",
    )  # fmt: skip
    for key in architecture:
        assert getattr(saved.config, key) == expected[key], key
    assert saved.config.rms_norm_eps == pytest.approx(model.config.rms_norm_eps)  # stored as float32 in the GGUF
    # Random init, not the GGUF's weights: two Adam steps of 1e-3 move a weight by at most ~2e-3, so a model
    # started from the GGUF would still be within 1e-2 of it everywhere.
    original = model.state_dict()
    same_shape = [n for n, p in saved.state_dict().items() if p.ndim == 2 and original[n].shape == p.shape]
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.q_proj.weight"} <= set(same_shape)
    for name in same_shape:
        assert not torch.allclose(saved.state_dict()[name], original[name], atol=1e-2), name
    # What was saved is exactly what loads back.
    for name, tensor in load_file(out / "model.safetensors").items():
        assert torch.equal(saved.state_dict()[name], tensor), name
    # The tokenizer saved with it is the GGUF's.
    ours = AutoTokenizer.from_pretrained(out)
    text = "<|im_start|>user\nName a fruit.<|im_end|>\n很好，很暴躁。"
    assert ours(text)["input_ids"] == tokenizer(text)["input_ids"] and ours.get_vocab() == tokenizer.get_vocab()
    assert (ours.eos_token, ours.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert ours.chat_template == tokenizer.chat_template


def test_missing_model_folder_says_so():
    with pytest.raises(UserError, match=r"--model '/no/such/dir': no such local folder, and not a hub id either"):
        check_model_options(model_cfg("/no/such/dir"))
    with pytest.raises(UserError, match=r"--tokenizer '\./nothing/here': no such local folder"):
        check_model_options(model_cfg("Qwen/Qwen2.5-0.5B-Instruct", tokenizer="./nothing/here"))
    with pytest.raises(UserError, match=r"--model '/no/such/model.gguf': no such GGUF file"):
        check_model_options(model_cfg("/no/such/model.gguf"))
    check_model_options(model_cfg("Qwen/Qwen2.5-0.5B-Instruct"))  # a hub id: left to the hub


def test_sharded_setups_that_cannot_work_are_refused():
    fsdp2 = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
    zero3 = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}
    qlora = SimpleNamespace(load_in_4bit=True, bnb_4bit_quant_storage="uint8", dtype="bfloat16",
                            precompute_ref_logps=False)  # fmt: skip
    full = SimpleNamespace(load_in_4bit=False, bnb_4bit_quant_storage="uint8", dtype="float32",
                           precompute_ref_logps=True)  # fmt: skip
    with pytest.raises(UserError, match="FSDP version 1 is not supported"):
        check_sharding_options(full, {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"})
    for env, name in ((fsdp2, "FSDP2"), (zero3, "ZeRO-3")):
        with pytest.raises(UserError, match=f"--load_in_4bit under {name} needs --bnb_4bit_quant_storage bfloat16"):
            check_sharding_options(qlora, env)
    with pytest.raises(UserError, match="fsdp_cpu_ram_efficient_loading: true cannot load 4-bit weights"):
        check_sharding_options(SimpleNamespace(**{**vars(qlora), "bnb_4bit_quant_storage": "bfloat16"}),
                               {**fsdp2, "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"})  # fmt: skip
    # what the shipped configs launch with passes; so does ram-efficient loading of full weights (the precomputed
    # reference is scored after sharding: tests/test_distributed.py runs it)
    check_sharding_options(full, fsdp2)
    check_sharding_options(full, {**fsdp2, "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"})
    check_sharding_options(SimpleNamespace(**{**vars(qlora), "bnb_4bit_quant_storage": "bfloat16"}), zero3)
    check_sharding_options(qlora, {})  # one GPU: uint8 storage is fine


def test_bench_reads_a_gguf_once_into_a_safetensors_folder(tiny_gguf, tmp_path):
    """`python -m nanodpo.tools.bench ... --model FILE.gguf`: the file is dequantized once (nanodpo's loading) into a
    folder every run reads; the training-state floor counts weights + gradients + AdamW (+ the online reference)."""
    from nanodpo.tools.bench import local_model, state_floor_mb

    path, model, _ = tiny_gguf
    folder = local_model(str(path), tmp_path)
    saved = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    for name, tensor in model.state_dict().items():
        assert torch.equal(saved.state_dict()[name], tensor), name
    assert local_model(folder, tmp_path) == folder  # a folder is used as it is
    params = sum(p.numel() for p in model.parameters()) / 2**20
    full = state_floor_mb("dpo", {"model": folder})
    assert full["plain"] == pytest.approx(16 * params) and full["nanodpo"] == pytest.approx(20 * params)
    lora = state_floor_mb("dpo", {"model": folder, "use_lora": True})
    linears = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"]
    adapter = sum(16 * (m.in_features + m.out_features) for m in linears) / 2**20  # r 16, all linear layers
    assert lora["nanodpo"] == lora["plain"] == pytest.approx(4 * params + 16 * adapter)  # no reference copy


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_reference_engine_is_inference_only(stage, monkeypatch):
    """Under DeepSpeed the reference becomes an engine without optimizer (TRL 1.16's `prepare_deepspeed`): the run's
    config minus optimizer, scheduler and optimizer offload; ZeRO-3 keeps partitioning it (buckets sized to the
    model), ZeRO-1/2 hold a plain copy (stage 0). Here `deepspeed.initialize` is only recorded, to see the config
    it gets from every kind of run config; the real engine runs in tests/test_deepspeed.py."""
    from nanodpo.model import prepare_reference

    seen = {}

    class Engine(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.module = model

    def initialize(model, config):
        seen["config"] = config
        return Engine(model), None, None, None

    monkeypatch.setitem(sys.modules, "deepspeed", SimpleNamespace(initialize=initialize))
    run_config = {
        "zero_optimization": {"stage": stage, "offload_optimizer": {"device": "cpu"}},
        "optimizer": {"type": "AdamW"}, "scheduler": {"type": "WarmupLR"}, "gradient_accumulation_steps": 4,
    }  # fmt: skip
    from accelerate.utils import DistributedType

    accelerator = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED,
                                  state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=run_config)))
    model = tiny.make_model(tiny.make_tokenizer())
    engine = prepare_reference(accelerator, model)
    assert isinstance(engine, Engine) and not engine.training
    assert not any(p.requires_grad for p in model.parameters())
    config = seen["config"]
    assert "optimizer" not in config and "scheduler" not in config
    assert "offload_optimizer" not in config["zero_optimization"]
    assert config["gradient_accumulation_steps"] == 4
    assert config["zero_optimization"]["stage"] == (3 if stage == 3 else 0)
    assert ("zero_optimization.stage3_prefetch_bucket_size" in config) == (stage == 3)
    assert run_config["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}  # the run's own config untouched
