"""Every configs/*.yaml trains: on a tiny model, with the config's own precision and options, its weights move.

Each training config runs in this process (`main(["--config", CONFIG, <overrides>])`) with everything it says —
dtype, bf16 autocast, 4-bit quantization, LoRA, gradient checkpointing, precomputed reference log-probs, the loss,
packing, streaming, the log-prob path and batch layout, online sampling — except what a CPU test cannot have. Those
overrides, the same for every config of a script, are all in `OVERRIDES` below:

  * the model: a 2-layer Qwen2 with a test tokenizer instead of the hub id (the `nanodpo-tiny` preset is kept); the
    from-scratch 1B config's architecture shrinks to the tiny one;
  * the data: local stand-ins with the hub dataset's columns and its train/test splits (a `save_to_disk` folder, so
    `dataset_split` / `eval_split` select as on the hub): UltraFeedback's chosen/rejected conversations, Capybara's
    messages, gzipped jsonl text for pretraining, prompts for online DPO;
  * the size: 2 optimizer steps of 2 micro-batches of 2 rows, 128 tokens, an evaluation after each step on 4 rows;
  * `attn_implementation: flash_attention_2` (CUDA only) becomes sdpa unless flash-attn is installed.

A weight moves when an optimizer step changes it: every step of every run is checked with torch's global optimizer
hooks (the trainable tensors before and after `optimizer.step()`). A config that cannot train in one process —
full fine-tuning of bf16 weights, which FSDP2 / DeepSpeed back with fp32 master weights — must be refused with a
message that says what to launch instead. Sharded full fine-tuning trains on CPU in tests/test_distributed.py (FSDP2)
and tests/test_deepspeed.py (ZeRO-2/3) with fp32 weights; with bf16 compute it needs a GPU (tests/gpu/test_gpu.py).
Which accelerate launch each config is meant for, and its precision under that launch: tests/test_first_run.py.

Found by this test: the 7B QLoRA config (`bnb_4bit_quant_storage: bfloat16`, so ZeRO-3 / FSDP2 can shard the packed
4-bit weights) crashed on its first forward, because the kbit preparation upcast the bf16-held packed bytes to fp32.
"""

import gzip
import importlib.util
import json
import os
from pathlib import Path
from unittest import mock

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from nanodpo.errors import UserError
from tests import tiny

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
REFUSED_IN_ONE_PROCESS = {"dpo_qwen2.5_7b_full.yaml": "full fine-tuning of --dtype bfloat16 weights on one process"}
SIZE = {"max_steps": 2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "max_length": 128,
        "eval_steps": 1, "max_eval_samples": 4, "logging_steps": 1, "disable_tqdm": True}  # fmt: skip


def script_of(config: str) -> str:
    kind = config.removeprefix("demo_").removesuffix(".yaml").split("_")[0]
    return {"dpo": "train_dpo", "online": "train_dpo", "pt": "train_pt", "sft": "train_sft"}[kind]


def save_splits(path: Path, rows: list[dict], test: int = 4) -> str:
    """A `save_to_disk` DatasetDict with a train and a test split, as a hub dataset has."""
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list(rows[test:]), "test": Dataset.from_list(rows[:test])}).save_to_disk(path)
    return str(path)


def ultrafeedback_rows(n: int) -> list[dict]:
    """trl-lib/ultrafeedback_binarized's shape: whole conversations, the prompt implicit in both, and the scores."""
    rows = []
    for row in tiny.preference_rows(n, "conversational"):
        rows.append({"chosen": row["prompt"] + row["chosen"], "rejected": row["prompt"] + row["rejected"],
                     "score_chosen": 8.0, "score_rejected": 3.0})  # fmt: skip
    return rows


def capybara_rows(n: int) -> list[dict]:
    """trl-lib/Capybara's shape: `messages`, a user's turn and the assistant's answer, sometimes two exchanges."""
    rows = []
    for i, row in enumerate(tiny.preference_rows(n, "conversational")):
        messages = [row["prompt"][-1], *row["chosen"]]
        if i % 3 == 0:
            messages += [{"role": "user", "content": "And then?"}, {"role": "assistant", "content": "That is all."}]
        rows.append({"source": "stand-in", "messages": messages})
    return rows


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shipped")
    tiny.make_model_dir(root / "model", seed=0)
    pairs = tiny.preference_rows(24, "conversational")
    data = {
        "ultrafeedback": save_splits(root / "ultrafeedback", ultrafeedback_rows(24)),
        "pairs": save_splits(root / "pairs", pairs),
        "prompts": save_splits(root / "prompts", [{"prompt": row["prompt"]} for row in pairs]),
        "capybara": save_splits(root / "capybara", capybara_rows(24)),
    }
    corpus = root / "corpus"
    corpus.mkdir()
    for k in range(2):  # the 1B config's `corpus/*.jsonl.gz`: several gzipped shards, streamed
        texts = [" ".join(tiny._CORPUS[(i + k) % len(tiny._CORPUS)] for _ in range(1 + i % 3)) for i in range(24)]
        with gzip.open(corpus / f"shard{k}.jsonl.gz", "wt", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    tiny.write_jsonl(corpus / "val.jsonl", [{"text": t} for t in tiny._CORPUS[:6]])
    data["corpus"] = str(corpus / "*.jsonl.gz")
    data["corpus_val"] = str(corpus / "val.jsonl")
    return root, data


def overrides(config: str, root: Path, data: dict) -> dict:
    """What replaces the hub, the GPU and the size in `config` (see the module docstring)."""
    text = (ROOT / "configs" / config).read_text(encoding="utf-8")
    model = {} if "model: nanodpo-tiny" in text else {"model": str(root / "model")}
    values = {**model, **SIZE, "output_dir": str(root / "out" / config.removesuffix(".yaml"))}
    if "flash_attention_2" in text and importlib.util.find_spec("flash_attn") is None:
        values["attn_implementation"] = "sdpa"
    script = script_of(config)
    if script == "train_pt":
        values.update(dataset=data["corpus"], eval_dataset=data["corpus_val"])
        if "hidden_size" in text:  # the 1B architecture, shrunk to the tiny model's
            values.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2)  # fmt: skip
    elif script == "train_sft":
        values["dataset"] = data["capybara"]
    elif "online: true" in text:
        values.update(dataset=data["prompts"], max_new_tokens=8)
    elif "ultrafeedback" in text:
        values["dataset"] = data["ultrafeedback"]
    else:
        values["dataset"] = data["pairs"]
    if "eval_dataset" in text and script != "train_pt":
        values["eval_dataset"] = values["dataset"]  # its test split
    return values


def to_argv(options: dict) -> list[str]:
    argv = []
    for key, value in options.items():
        argv += [f"--{key}", str(value)]
    return argv


def train(script: str, argv: list[str]) -> list[bool]:
    """Run `script`'s main in this process; for every optimizer step, whether it changed a trainable weight."""
    from accelerate.state import AcceleratorState

    moved, before = [], {}

    def pre(optimizer, args, kwargs):
        before[id(optimizer)] = [p.detach().clone() for g in optimizer.param_groups for p in g["params"]]

    def post(optimizer, args, kwargs):
        after = [p.detach() for g in optimizer.param_groups for p in g["params"]]
        moved.append(any(not torch.equal(a, b) for a, b in zip(after, before.pop(id(optimizer)))))

    module = __import__(script)
    hooks = [register_optimizer_step_pre_hook(pre),
             register_optimizer_step_post_hook(post)]  # fmt: skip
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        with mock.patch.dict(os.environ, {"WANDB_MODE": "offline"}):
            module.main(argv)
    finally:
        for hook in hooks:
            hook.remove()
        AcceleratorState._reset_state(reset_partial_state=True)
    return moved


def test_every_config_is_covered():
    assert {script_of(c) for c in CONFIGS} == {"train_dpo", "train_sft", "train_pt"}
    assert set(REFUSED_IN_ONE_PROCESS) <= set(CONFIGS)


@pytest.mark.parametrize("config", CONFIGS)
def test_shipped_config_trains_on_a_tiny_model(workdir, config):
    root, data = workdir
    values = overrides(config, root, data)
    argv = ["--config", str(ROOT / "configs" / config), *to_argv(values)]
    if config in REFUSED_IN_ONE_PROCESS:
        with pytest.raises(UserError, match=REFUSED_IN_ONE_PROCESS[config]) as err:
            train(script_of(config), argv)
        print(config, "refused in one process:", err.value)
        assert "FSDP" in str(err.value) or "DeepSpeed" in str(err.value) or "zero" in str(err.value).lower()
        assert not (Path(values["output_dir"]) / "config.yaml").exists()
        return
    moved = train(script_of(config), argv)
    # Every step moved a weight — but the first under warmup, whose learning rate is 0 (as in transformers' schedules).
    warmup = "\nwarmup_" in (ROOT / "configs" / config).read_text(encoding="utf-8")
    assert len(moved) == SIZE["max_steps"] and all(moved[1 if warmup else 0 :]), (config, moved)
    out = Path(values["output_dir"])
    assert (out / "model.safetensors").exists() or (out / "adapter_model.safetensors").exists()
