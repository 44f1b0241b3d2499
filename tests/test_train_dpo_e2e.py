"""End to end: train_dpo.py against TRL 1.16's DPOTrainer on the same tiny model, data, seed and hyperparameters.

Both run fp32, gradient accumulation 2, constant LR, no dropout, sequential data order (each optimizer step covers
the same 8 pairs in both), and log every step; the AdamW curve also with a tokenizer that adds a BOS token.
Tolerances (see the foundation issue):
  * step 1 (same weights, one forward/backward): loss, metrics and grad norm within 1e-5 relative;
  * AdamW curves within 3e-3 relative over 10 steps (Adam's first updates amplify fp32 rounding);
  * SGD curves within 1e-4.
"""

import math
from pathlib import Path

import pytest
import torch

import train_dpo
from nanodpo.tracking import read_metrics
from tests import tiny

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fresh_accelerate_state")]

STEPS = 10
COMPARED = ["loss", "rewards/margins", "rewards/accuracies", "logps/chosen"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo_e2e")
    tiny.make_model_dir(root / "model", seed=0)
    tiny.write_jsonl(root / "train.jsonl", tiny.preference_rows(16, "explicit"))
    tiny.write_jsonl(root / "eval.jsonl", tiny.preference_rows(8, "conversational"))
    return root


def nanodpo_args(workdir: Path, out: Path, **overrides) -> list[str]:
    options = {
        "model": str(workdir / "model"),
        "dataset": str(workdir / "train.jsonl"),
        "output_dir": str(out),
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "max_steps": STEPS,
        "learning_rate": 1e-3,
        "lr_scheduler_type": "constant",
        "logging_steps": 1,
        "train_sampling_strategy": "sequential",
        "max_length": 64,
        "seed": 0,
        "report_to": "jsonl",
        "disable_tqdm": True,
        "beta": 0.1,
    }
    options.update(overrides)
    argv = []
    for key, value in options.items():
        argv.append(f"--{key}")
        if isinstance(value, list):
            argv.extend(str(v) for v in value)
        else:
            argv.append(str(value))
    return argv


def run_nanodpo(workdir: Path, out: Path, **overrides) -> list[dict]:
    train_dpo.main(nanodpo_args(workdir, out, **overrides))
    return [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def run_trl(workdir: Path, out: Path, model=None, optim="adamw_torch", loss_type="sigmoid", learning_rate=1e-3,
            model_dir: Path | None = None):  # fmt: skip
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    model_dir = model_dir or workdir / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    dataset = load_dataset("json", data_files=str(workdir / "train.jsonl"), split="train")
    args = DPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=STEPS,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        logging_steps=1,
        train_sampling_strategy="sequential",
        max_length=64,
        seed=0,
        report_to="none",
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        save_strategy="no",
        optim=optim,
        loss_type=[loss_type],
        beta=0.1,
        disable_tqdm=True,
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    return [r for r in trainer.state.log_history if "loss" in r]


def assert_curves_close(ours: list[dict], theirs: list[dict], rtol: float, first_step_rtol: float = 1e-5):
    assert len(ours) == len(theirs) == STEPS
    worst = {}
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a["step"] == b["step"] == i + 1
        keys = COMPARED + (["grad_norm"] if i == 0 else [])
        for key in keys:
            tol = first_step_rtol if i == 0 else rtol
            scale = max(abs(b[key]), 1e-2)  # margins start at exactly 0
            rel = abs(a[key] - b[key]) / scale
            worst[key] = max(worst.get(key, 0.0), rel)
            assert rel <= tol, f"step {i + 1} {key}: nanodpo {a[key]} vs TRL {b[key]}"
    print("max relative difference to TRL per metric:", {k: f"{v:.1e}" for k, v in worst.items()})


@pytest.mark.parametrize("tokenizer_kind", ["plain", "bos"])
def test_adamw_curve_matches_trl(workdir, tmp_path, tokenizer_kind):
    """On the test tokenizer without a BOS token, and on one that adds it (as Llama's)."""
    model_dir = workdir / "model"
    if tokenizer_kind != "plain":
        model_dir = tiny.make_model_dir(tmp_path / "model", seed=0, tokenizer=tokenizer_kind)
    ours = run_nanodpo(workdir, tmp_path / "nano", model=str(model_dir))
    theirs = run_trl(workdir, tmp_path / "trl", model_dir=model_dir)
    assert_curves_close(ours, theirs, rtol=3e-3)
    # Training actually moved: the loss left ln 2 and the margin grew.
    assert ours[-1]["loss"] < math.log(2) - 0.05
    assert ours[-1]["rewards/margins"] > 0
    # The final model is saved in HF format with tokenizer and config.
    assert (tmp_path / "nano" / "model.safetensors").exists()
    assert (tmp_path / "nano" / "config.yaml").exists()


def test_sgd_curve_matches_trl(workdir, tmp_path):
    ours = run_nanodpo(workdir, tmp_path / "nano", optim="sgd", learning_rate=0.5)
    theirs = run_trl(workdir, tmp_path / "trl", optim="sgd", learning_rate=0.5)
    assert_curves_close(ours, theirs, rtol=1e-4)
    assert ours[-1]["loss"] < ours[0]["loss"]


def test_ipo_curve_matches_trl(workdir, tmp_path):
    ours = run_nanodpo(workdir, tmp_path / "nano", loss_type="ipo")
    theirs = run_trl(workdir, tmp_path / "trl", loss_type="ipo")
    assert_curves_close(ours, theirs, rtol=3e-3)


def test_lora_curve_matches_trl(workdir, tmp_path):
    from nanodpo.config import DPOConfig, parse_config
    from nanodpo.model import load_policy
    from nanodpo.training import seed_everything

    lora = {"use_lora": "true", "lora_r": 8, "lora_alpha": 16, "learning_rate": 1e-2}
    ours = run_nanodpo(workdir, tmp_path / "nano", **lora)
    # The same starting LoRA weights: build the policy exactly as train_dpo.py does (same seed, same code path) and
    # hand it to TRL, whose reference is then the same model with the adapter disabled.
    cfg = parse_config(DPOConfig, nanodpo_args(workdir, tmp_path / "unused", **lora))
    seed_everything(cfg.seed)
    policy = load_policy(cfg)
    theirs = run_trl(workdir, tmp_path / "trl", model=policy, learning_rate=1e-2)
    assert_curves_close(ours, theirs, rtol=3e-3)
    # A peft adapter was saved and reloads.
    assert (tmp_path / "nano" / "adapter_config.json").exists()


def test_precomputed_reference_gives_the_same_curve(workdir, tmp_path, monkeypatch):
    monkeypatch.setenv("NANODPO_CACHE", str(tmp_path / "cache"))
    online = run_nanodpo(workdir, tmp_path / "online")
    precomputed = run_nanodpo(workdir, tmp_path / "pre", precompute_ref_logps="true")
    for a, b in zip(online, precomputed):
        for key in COMPARED:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)
    # A rerun reuses the cache (one file, not two).
    cache_files = list((tmp_path / "cache" / "ref_logps").glob("*.safetensors"))
    assert len(cache_files) == 1
    again = run_nanodpo(workdir, tmp_path / "pre2", precompute_ref_logps="true")
    assert len(list((tmp_path / "cache" / "ref_logps").glob("*.safetensors"))) == 1
    assert again[-1]["loss"] == pytest.approx(precomputed[-1]["loss"], rel=1e-6)


def test_eval_metrics_logged_with_eval_prefix(workdir, tmp_path):
    out = tmp_path / "nano"
    train_dpo.main(nanodpo_args(workdir, out, eval_dataset=str(workdir / "eval.jsonl"), eval_steps=5))
    records = read_metrics(out / "metrics.jsonl")
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [5, 10]
    for name in ["eval_rewards/accuracies", "eval_rewards/margins", "eval_logps/chosen", "eval_logits/chosen"]:
        assert name in evals[-1]
    train = [r for r in records if "loss" in r]
    for name in [
        "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
        "logps/rejected", "logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy", "grad_norm",
        "learning_rate", "num_tokens", "epoch",
    ]:  # fmt: skip
        assert name in train[0], name


def test_single_step_gradients_match_trl(workdir, tmp_path):
    """One forward/backward from the same weights on the same batch: every parameter's gradient within 1e-5."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    from nanodpo.config import DPOConfig, parse_config
    from nanodpo.dpo_batch import PreferenceCollator
    from nanodpo.dpo_data import load_preference_data
    from nanodpo.training import make_accelerator

    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    trl_model = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=torch.float32)
    dataset = load_dataset("json", data_files=str(workdir / "train.jsonl"), split="train")
    args = TRLConfig(
        output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, max_length=64, report_to="none",
        bf16=False, gradient_checkpointing=False, use_cpu=True, train_sampling_strategy="sequential",
        loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.3],
    )  # fmt: skip
    trainer = DPOTrainer(model=trl_model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trl_batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, trl_batch)
    trl_loss.backward()
    trl_grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}

    cfg = parse_config(DPOConfig, nanodpo_args(workdir, tmp_path / "nano", rpo_alpha=0.3))
    accelerator = make_accelerator(cfg)
    examples = load_preference_data(cfg, tokenizer, split="train")[:4]
    batch = PreferenceCollator(pad_token_id=tokenizer.pad_token_id, max_length=64)(examples)
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(batch[key], trl_batch[key].cpu()), key
    policy = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=torch.float32).eval()
    policy.train()
    out, _, metrics = tiny.dpo_forward(policy, reference, batch, cfg, accelerator)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(trl_loss.item(), rel=1e-5)
    assert metrics["nll_loss"] > 0
    for name, param in policy.named_parameters():
        torch.testing.assert_close(param.grad, trl_grads[name], rtol=1e-5, atol=1e-7, msg=name)
