"""QLoRA on CPU: bitsandbytes 4-bit base + LoRA trains, the loss falls, and the saved adapter reloads with peft
and reproduces the run's final eval metrics."""


import pytest
import torch

import train_dpo
from nanodpo.config import DPOConfig, parse_config
from nanodpo.dpo_batch import PreferenceCollator
from nanodpo.dpo_data import load_preference_data
from nanodpo.model import load_pretrained, load_tokenizer
from nanodpo.recipe import choose_step
from nanodpo.tracking import read_metrics
from nanodpo.training import make_accelerator, make_eval_loader
from tests import tiny

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fresh_accelerate_state")]


def test_qlora_trains_and_adapter_reloads(tmp_path):
    tiny.make_model_dir(tmp_path / "model", seed=1)
    rows = tiny.preference_rows(8, "explicit")
    tiny.write_jsonl(tmp_path / "train.jsonl", rows)
    tiny.write_jsonl(tmp_path / "eval.jsonl", rows[:4])
    out = tmp_path / "out"
    argv = [
        "--model", str(tmp_path / "model"), "--dataset", str(tmp_path / "train.jsonl"),
        "--eval_dataset", str(tmp_path / "eval.jsonl"), "--output_dir", str(out),
        "--load_in_4bit", "--use_lora", "--lora_r", "8", "--lora_alpha", "16",
        "--bnb_4bit_quant_type", "nf4", "--bnb_4bit_use_double_quant", "true",
        "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1", "--max_steps", "8",
        "--learning_rate", "5e-3", "--lr_scheduler_type", "constant", "--logging_steps", "1",
        "--max_length", "64", "--seed", "0", "--disable_tqdm", "--beta", "0.1",
    ]  # fmt: skip
    train_dpo.main(argv)

    records = read_metrics(out / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    assert len(train) == 8
    assert train[-1]["loss"] < train[0]["loss"] - 0.05, [r["loss"] for r in train]
    final_eval = [r for r in records if "eval_loss" in r][-1]
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()

    # Reload: the 4-bit base from --model, the adapter from OUTPUT_DIR, and evaluate again.
    from peft import PeftModel

    cfg = parse_config(DPOConfig, argv)
    accelerator = make_accelerator(cfg)
    tokenizer = load_tokenizer(cfg)
    base = load_pretrained(cfg, accelerator.device)
    model = PeftModel.from_pretrained(base, out)
    eval_examples = load_preference_data(cfg, tokenizer, split="eval")
    collator = PreferenceCollator(pad_token_id=tokenizer.pad_token_id, max_length=cfg.max_length)
    loader = make_eval_loader(eval_examples, collator, cfg.per_device_eval_batch_size)
    with torch.no_grad():
        cfg.batch_layout = "padded"  # the layout of the loader above
        again = train_dpo.evaluate(model, loader, choose_step(cfg, None, accelerator), accelerator)
    for name in ["eval_loss", "eval_rewards/margins", "eval_rewards/accuracies", "eval_logps/chosen"]:
        assert again[name] == pytest.approx(final_eval[name], rel=1e-4, abs=1e-5), name
    assert final_eval["eval_rewards/margins"] > 0
