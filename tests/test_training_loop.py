"""The loop's machinery: learning-rate schedules equal HF's formulas; epochs, warmup, bf16 autocast, gradient
checkpointing, periodic checkpoints and every tracker work together in one short run."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

import train_dpo
from nanodpo.config import DPOConfig, parse_config
from nanodpo.model import decay_parameter_groups
from nanodpo.tracking import read_metrics
from nanodpo.training import count_training_steps, make_scheduler
from tests import tiny

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.mark.parametrize(
    "schedule, hf_factory",
    [
        ("constant", lambda opt, w, t: get_constant_schedule_with_warmup(opt, w)),
        ("linear", get_linear_schedule_with_warmup),
        ("cosine", get_cosine_schedule_with_warmup),
    ],
)
@pytest.mark.parametrize("warmup", [0, 3])
def test_schedules_equal_hf(schedule, hf_factory, warmup):
    total = 20
    cfg = parse_config(DPOConfig, ["--lr_scheduler_type", schedule, "--warmup_steps", str(warmup)])
    ours_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    hf_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    ours, hf = make_scheduler(ours_opt, cfg, total), hf_factory(hf_opt, warmup, total)
    for _ in range(total):
        assert ours.get_last_lr()[0] == pytest.approx(hf.get_last_lr()[0], abs=1e-12)
        ours_opt.step(), hf_opt.step(), ours.step(), hf.step()


def test_warmup_ratio_and_step_counts():
    cfg = parse_config(DPOConfig, ["--warmup_ratio", "0.1", "--gradient_accumulation_steps", "4"])
    assert count_training_steps(cfg, micro_batches_per_epoch=10) == (3, 3)  # a partial last group is a step
    cfg = parse_config(DPOConfig, ["--num_train_epochs", "2.5", "--gradient_accumulation_steps", "2"])
    assert count_training_steps(cfg, micro_batches_per_epoch=8) == (10, 4)
    cfg = parse_config(DPOConfig, ["--max_steps", "7"])
    assert count_training_steps(cfg, micro_batches_per_epoch=8)[0] == 7


def test_no_weight_decay_on_biases_and_norms():
    model = tiny.make_model(tiny.make_tokenizer())
    decay, no_decay = decay_parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("norm" in names[id(p)] or names[id(p)].endswith("bias") for p in no_decay["params"])
    assert all(p.ndim == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1


@pytest.mark.slow
def test_full_featured_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tiny.make_model_dir(tmp_path / "model")
    tiny.write_jsonl(tmp_path / "train.jsonl", tiny.preference_rows(12, "implicit"))
    tiny.write_jsonl(tmp_path / "eval.jsonl", tiny.preference_rows(4, "explicit"))
    out = tmp_path / "out"
    argv = [
        "--model", str(tmp_path / "model"), "--dataset", str(tmp_path / "train.jsonl"),
        "--eval_dataset", str(tmp_path / "eval.jsonl"), "--output_dir", str(out),
        "--num_train_epochs", "2", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
        "--learning_rate", "1e-3", "--lr_scheduler_type", "cosine", "--warmup_ratio", "0.2",
        "--bf16", "--gradient_checkpointing", "--save_steps", "2", "--eval_steps", "3", "--logging_steps", "1",
        "--report_to", "all", "--max_length", "64", "--disable_tqdm",
    ]  # fmt: skip
    train_dpo.main(argv)
    records = read_metrics(out / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    # 12 pairs / 2 per micro-batch = 6 micro-batches = 3 optimizer steps per epoch, 2 epochs.
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert train[-1]["epoch"] == pytest.approx(2.0)
    # cosine with 2 warmup steps (ceil(0.2 * 6)): the logged rate is the one after each step, as HF logs it.
    cfg = parse_config(DPOConfig, argv)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    expected = get_cosine_schedule_with_warmup(opt, 2, 6)
    for record in train:
        opt.step(), expected.step()
        assert record["learning_rate"] == pytest.approx(expected.get_last_lr()[0], rel=1e-9)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    assert [r["step"] for r in records if "eval_loss" in r] == [3, 6]
    # Checkpoints at steps 2 and 4 (6 is the final model in OUTPUT_DIR), each loadable, with config and tokenizer.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    for ckpt in [out / "checkpoint-2", out / "checkpoint-4", out]:
        assert (ckpt / "model.safetensors").exists() and (ckpt / "tokenizer.json").exists()
        assert parse_config(DPOConfig, ["--config", str(ckpt / "config.yaml")]) == cfg
    assert not list(out.glob(".tmp-*")), "no temporary save directories left behind"
    assert list((out / "runs").rglob("events.out.tfevents.*")), "tensorboard events written"
    assert list((out / "wandb").glob("offline-run-*")), "wandb offline run written"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "checkpoint-2")


def test_help_documents_every_option():
    result = subprocess.run(
        [sys.executable, str(ROOT / "train_dpo.py"), "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0
    for flag in ["--beta", "--loss_type", "--use_lora", "--load_in_4bit", "--precompute_ref_logps", "--report_to"]:
        assert flag in result.stdout
    assert "accelerate launch" in result.stdout  # the usage guide is the script's docstring


def test_one_thread_on_a_multicore_cpu_is_pointed_out(monkeypatch, capsys):
    """`accelerate launch` on a machine without a GPU sets OMP_NUM_THREADS=1; the run says how to use every core."""
    import nanodpo.training as training

    cfg = parse_config(DPOConfig, ["--model", "m", "--dataset", "d.jsonl"])
    monkeypatch.setattr(training.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(training.torch, "get_num_threads", lambda: 1)
    training.make_accelerator(cfg)
    assert "--num_cpu_threads_per_process 4" in capsys.readouterr().out
    monkeypatch.setattr(training.torch, "get_num_threads", lambda: 4)
    training.make_accelerator(cfg)
    assert "note:" not in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("script", ["dpo", "sft", "pt"])
def test_gradients_sync_on_the_last_micro_batch_of_each_step(tmp_path, monkeypatch, script):
    """What every backward sees as `accelerator.sync_gradients`: True only on the last micro-batch of an optimizer step
    — also the last, shorter step of an epoch. DeepSpeed's engine steps its optimizer inside backward exactly when
    it is True (accelerate's DeepSpeedEngineWrapper), so this is one engine step per optimizer step; under DDP it is
    the one all-reduce. 10 rows, 2 per micro-batch, 3 micro-batches per step: steps of 3 and 2 micro-batches."""
    from accelerate import Accelerator

    import train_pt
    import train_sft

    seen = []
    real_backward = Accelerator.backward

    def recording_backward(self, loss, **kwargs):
        seen.append(self.sync_gradients)
        return real_backward(self, loss, **kwargs)

    monkeypatch.setattr(Accelerator, "backward", recording_backward)
    tiny.make_model_dir(tmp_path / "model")
    rows = {
        "dpo": tiny.preference_rows(10, "explicit"),
        "sft": [{"prompt": f"Q{i}?", "completion": f" A{i}."} for i in range(10)],
        "pt": [{"text": f"Document {i}: " + "the fox runs. " * 3} for i in range(60)],
    }[script]
    tiny.write_jsonl(tmp_path / "train.jsonl", rows)
    argv = ["--model", str(tmp_path / "model"), "--dataset", str(tmp_path / "train.jsonl"), "--output_dir",
            str(tmp_path / "out"), "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "3",
            "--num_train_epochs", "1", "--max_length", "32", "--report_to", "none", "--disable_tqdm"]  # fmt: skip
    if script == "pt":
        argv += ["--packing_strategy", "wrapped"]  # 60 short documents -> whole rows of 32 tokens
    {"dpo": train_dpo, "sft": train_sft, "pt": train_pt}[script].main(argv)
    micro_batches = len(seen)
    full, last = divmod(micro_batches, 3)
    expected = [False, False, True] * full + ([False] * (last - 1) + [True] if last else [])
    assert seen == expected and last, (micro_batches, seen)
