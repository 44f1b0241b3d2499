"""SimPO, CPO and ORPO (nanodpo/dpo.py, the family table) against TRL 1.16's CPOTrainer and ORPOTrainer.

  * the loss functions against TRL's own `cpo_loss` / `odds_ratio_loss` on the same log-probs (1e-6);
  * one `dpo_step` on the padded batch (readable path) equals the padding-free and prefix-shared layouts (1e-5);
  * train_dpo.py end to end against the TRL trainer on the same tiny model, data, seed and hyperparameters, fp32,
    with and without gradient accumulation: step 1 (same weights) within 1e-5 relative, the 10-step AdamW curve
    within 1e-3 relative (values near 0 on a scale of 0.01). Measured: `pytest -s` prints the worst differences.
"""

import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import train_dpo
from nanodpo.config import DPOConfig, parse_config
from nanodpo.data import Row
from nanodpo.dpo_batch import PreferenceCollator
from nanodpo.dpo_data import build_examples, load_preference_data
from nanodpo.errors import UserError
from nanodpo.fast.dpo_packing import PackedPreferenceCollator
from nanodpo.logps import TokenStats
from nanodpo.losses.family import cpo_loss, orpo_log_odds, orpo_loss, simpo_loss
from nanodpo.losses.options import check_dpo_options
from nanodpo.losses.pair import chosen_nll
from nanodpo.recipe import choose_loss
from nanodpo.tracking import read_metrics
from tests import tiny

trl = pytest.importorskip("trl")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

STEPS = 10
FAMILY = ["simpo", "cpo", "orpo"]
# What TRL's trainers log for each loss (logits/* differ by definition: see nanodpo/dpo.py's differences).
COMPARED = {
    "simpo": ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
              "logps/rejected"],
    "cpo": ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected", "nll_loss"],
    "orpo": ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
             "logps/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen"],
}  # fmt: skip
# Non-default family options, so that every term is exercised: SimPO with an NLL term, CPO with its default α = 1.
OPTIONS = {"simpo": {"beta": 2.0, "simpo_gamma": 0.5, "cpo_alpha": 0.2}, "cpo": {"beta": 0.1}, "orpo": {"beta": 0.1}}


def config(**overrides) -> DPOConfig:
    argv = []
    for key, value in overrides.items():
        argv += [f"--{key}", *map(str, value if isinstance(value, list) else [value])]
    return parse_config(DPOConfig, argv)


# ----------------------------------------------------------------------------------------------------------------
# The loss functions against TRL's


def trl_self(**fields):
    """The attributes TRL's cpo_loss / odds_ratio_loss read from their trainer."""
    defaults = {"accelerator": SimpleNamespace(device="cpu"), "alpha": 0.0, "label_smoothing": 0.0}
    return SimpleNamespace(**{**defaults, **fields})


def logps_pair(seed=0, averaged=False):
    g = torch.Generator().manual_seed(seed)
    scale = 1.5 if averaged else 30.0
    chosen = -(torch.rand(6, generator=g) * scale + 0.01)
    rejected = -(torch.rand(6, generator=g) * scale + 0.01)
    return chosen, rejected


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_simpo_and_cpo_losses_match_trl(smoothing):
    from trl.experimental.cpo import CPOTrainer

    chosen, rejected = logps_pair(averaged=True)
    theirs = CPOTrainer.cpo_loss(
        trl_self(beta=2.0, loss_type="simpo", simpo_gamma=0.7, label_smoothing=smoothing), chosen, rejected
    )
    ours = simpo_loss(chosen, rejected, beta=2.0, simpo_gamma=0.7, label_smoothing=smoothing)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)

    chosen, rejected = logps_pair(seed=1)
    theirs = CPOTrainer.cpo_loss(trl_self(beta=0.1, loss_type="sigmoid", label_smoothing=smoothing), chosen, rejected)
    ours = cpo_loss(chosen, rejected, beta=0.1, label_smoothing=smoothing)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_orpo_loss_matches_trl():
    from trl.experimental.orpo import ORPOTrainer

    chosen, rejected = logps_pair(averaged=True)
    chosen[0] = -1e-4  # near log 1: log(1 - e^x) must not cancel
    losses, chosen_rewards, rejected_rewards, mean_ratio, mean_log_odds = ORPOTrainer.odds_ratio_loss(
        trl_self(beta=0.25), chosen, rejected
    )
    ours = orpo_loss(chosen, rejected, beta=0.25)
    # TRL returns +β·log σ(log odds) and subtracts its mean; nanodpo's per-pair loss is the term itself, -β·log σ.
    torch.testing.assert_close(ours[0], -losses, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours[1], chosen_rewards)
    torch.testing.assert_close(ours[2], rejected_rewards)
    log_odds = orpo_log_odds(chosen, rejected)
    torch.testing.assert_close(log_odds.mean(), mean_log_odds)
    torch.testing.assert_close(torch.nn.functional.logsigmoid(log_odds).mean(), mean_ratio)
    assert torch.isfinite(log_odds).all()


def test_simpo_by_hand():
    """ℓ_w = -0.5, ℓ_l = -1.5, β = 2, γ = 0.5: margin 2·1 - 0.5 = 1.5, loss -log σ(1.5)."""
    losses, chosen_rewards, _ = simpo_loss(torch.tensor([-0.5]), torch.tensor([-1.5]), beta=2.0, simpo_gamma=0.5)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-1.5)), rel=1e-6)
    assert chosen_rewards.item() == pytest.approx(-1.0)


# ----------------------------------------------------------------------------------------------------------------
# Options


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"loss_type": ["simpo", "sigmoid"]}, "cannot be summed"),
        ({"loss_type": "cpo", "rpo_alpha": 0.5}, "--rpo_alpha applies to the DPO loss types"),
        ({"loss_type": "orpo", "reference_free": "true"}, "--reference_free applies"),
        ({"loss_type": "simpo", "precompute_ref_logps": "true"}, "nothing to precompute"),
        ({"loss_type": "orpo", "cpo_alpha": 1.0}, "--cpo_alpha applies to simpo and cpo only"),
        ({"loss_type": "cpo", "simpo_gamma": 1.0}, "--simpo_gamma applies to simpo only"),
        ({"loss_type": "simpo", "cpo_alpha": -1}, "--cpo_alpha must be >= 0"),
        ({"loss_type": "sigmoid", "simpo_gamma": 1.0}, "--simpo_gamma applies to the family losses"),
        ({"loss_type": "orpo", "label_smoothing": 0.1}, "--label_smoothing applies to simpo and cpo only"),
        ({"loss_type": "cpo", "desirable_weight": 2.0}, "--desirable_weight applies to kto only"),
        ({"loss_type": "kto", "per_device_train_batch_size": 1}, "at least 2 rows"),
        ({"loss_type": "kto", "per_device_eval_batch_size": 1}, "--per_device_eval_batch_size 1 is too small"),
        ({"loss_type": "kto", "precompute_ref_logps": "true"}, "micro-batch's mismatched rows"),
        ({"loss_type": "kto", "max_tokens_per_batch": 100}, "--max_tokens_per_batch is not supported with kto"),
    ],
)
def test_refused_family_options(overrides, message):
    with pytest.raises(UserError, match=message):
        check_dpo_options(config(**overrides))


# ----------------------------------------------------------------------------------------------------------------
# Pairs whose chosen equals their rejected


def test_identical_pairs_are_counted_in_one_notice(tmp_path, capsys):
    rows = tiny.preference_rows(5)
    for i in (1, 3):
        rows[i]["rejected"] = rows[i]["chosen"]
    path = tiny.write_jsonl(tmp_path / "pairs.jsonl", rows)
    load_preference_data(config(dataset=path), tiny.make_tokenizer())
    printed = capsys.readouterr().out
    assert printed.count("notice:") == 1
    assert f"notice: 2 of 5 train pairs have the same chosen and rejected completion (e.g. {path}, row 2)" in printed
    load_preference_data(config(dataset=tiny.write_jsonl(tmp_path / "ok.jsonl", rows[:1])), tiny.make_tokenizer())
    assert "notice" not in capsys.readouterr().out


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "simpo", "cpo", "orpo"])
def test_identical_pair_has_zero_preference_gradient(loss_type):
    """What the notice says: a loss on the chosen - rejected difference gets no gradient from such a pair."""
    token_logps = torch.tensor([[-1.0, -2.0, -0.5]] * 2, requires_grad=True)  # chosen row == rejected row
    mask = torch.ones(2, 3)
    cfg = config(loss_type=loss_type, **({"cpo_alpha": 0.0} if loss_type == "cpo" else {}))
    ref = None if loss_type in FAMILY else torch.tensor([-4.0])
    out = choose_loss(cfg)(TokenStats(logps=token_logps, mask=mask), mask, ref, ref)
    preference_term = out.loss - (chosen_nll(token_logps, mask) if loss_type == "orpo" else 0.0)
    (grad,) = torch.autograd.grad(preference_term, token_logps)
    # The two rows are the same tokens, so each weight's gradient is their two gradients' sum: it cancels.
    assert grad.abs().sum() > 0 and torch.count_nonzero(grad[0] + grad[1]) == 0


# ----------------------------------------------------------------------------------------------------------------
# Every layout gives the same step


LAYOUTS = {"padding_free": (False, True), "prefix_shared": (True, False), "prefix_shared_packed": (True, True)}


def dpo_step(policy, reference, batch, cfg):
    """One micro-batch of train_dpo.py: its loss (with grad) and its metrics."""
    out, _, metrics = tiny.dpo_forward(policy, reference, batch, cfg)
    return out.loss, metrics


@pytest.mark.parametrize("loss_type", FAMILY)
def test_layouts_equal_padded_batch(loss_type):
    tokenizer = tiny.make_tokenizer()
    rows = tiny.preference_rows(6, "conversational")
    examples, _ = build_examples([Row(r, "mem", i + 1) for i, r in enumerate(rows)], tokenizer, max_length=48)
    policy = tiny.make_model(tokenizer, seed=1)
    cfg = config(loss_type=loss_type, max_length=48, **OPTIONS[loss_type])
    padded = PreferenceCollator(tokenizer.pad_token_id, 48)(examples)
    cfg.logps = "readable"
    ref_loss, ref_metrics = dpo_step(policy, None, padded, cfg)
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in policy.named_parameters()}
    cfg.logps = "chunked"
    for layout, (share, pack) in LAYOUTS.items():
        batch = PackedPreferenceCollator(tokenizer.pad_token_id, 48, "keep_start", "sdpa", share, pack)(examples)
        policy.zero_grad(set_to_none=True)
        loss, metrics = dpo_step(policy, None, batch, cfg)
        loss.backward()
        tiny.assert_same_step(policy, loss, metrics, ref_loss, ref_metrics, ref_grads, layout, metric_atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# End to end against the TRL trainers


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("family_e2e")
    tiny.make_model_dir(root / "model", seed=0)
    tiny.write_jsonl(root / "train.jsonl", tiny.preference_rows(16, "explicit"))
    tiny.write_jsonl(root / "eval.jsonl", tiny.preference_rows(22, "explicit")[16:])  # 6 held-out pairs, one batch
    return root


def nanodpo_args(workdir: Path, out: Path, **overrides) -> list[str]:
    options = {
        "model": str(workdir / "model"), "dataset": str(workdir / "train.jsonl"), "output_dir": str(out),
        "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": STEPS,
        "learning_rate": 1e-3, "lr_scheduler_type": "constant", "logging_steps": 1,
        "train_sampling_strategy": "sequential", "max_length": 64, "seed": 0, "report_to": "jsonl",
        "disable_tqdm": True,
    }  # fmt: skip
    options.update(overrides)
    argv = []
    for key, value in options.items():
        argv += [f"--{key}", str(value)]
    return argv


def run_nanodpo(workdir: Path, out: Path, **overrides) -> list[dict]:
    train_dpo.main(nanodpo_args(workdir, out, **overrides))
    return [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def trl_trainer(workdir: Path, out: Path, loss_type: str, accumulation: int, max_steps: int = STEPS, **options):
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    model = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=torch.float32)
    dataset = load_dataset("json", data_files=str(workdir / "train.jsonl"), split="train")
    eval_dataset = load_dataset("json", data_files=str(workdir / "eval.jsonl"), split="train")
    options.update(eval_strategy="steps", eval_steps=max_steps, per_device_eval_batch_size=8)
    common = dict(
        output_dir=str(out), per_device_train_batch_size=4, gradient_accumulation_steps=accumulation,
        max_steps=max_steps, learning_rate=1e-3, lr_scheduler_type="constant", logging_steps=1,
        train_sampling_strategy="sequential", max_length=64, seed=0, report_to="none", bf16=False,
        use_cpu=True, save_strategy="no", disable_tqdm=True, remove_unused_columns=False,
    )  # fmt: skip
    if loss_type == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        args = ORPOConfig(**common, **options)
        return ORPOTrainer(
            model=model, args=args, train_dataset=dataset, eval_dataset=eval_dataset, processing_class=tokenizer
        )
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    trl_loss_type = "simpo" if loss_type == "simpo" else "sigmoid"
    args = CPOConfig(**common, loss_type=trl_loss_type, **options)
    return CPOTrainer(
        model=model, args=args, train_dataset=dataset, eval_dataset=eval_dataset, processing_class=tokenizer
    )


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("loss_type", FAMILY)
def test_curve_matches_trl(workdir, tmp_path, loss_type, accumulation):
    options = OPTIONS[loss_type]
    out = tmp_path / "nano"
    train_dpo.main(
        nanodpo_args(
            workdir, out, loss_type=loss_type, gradient_accumulation_steps=accumulation,
            eval_dataset=workdir / "eval.jsonl", per_device_eval_batch_size=8, **options,
        )
    )  # fmt: skip
    records = read_metrics(out / "metrics.jsonl")
    ours = [r for r in records if "loss" in r]
    trainer = trl_trainer(workdir, tmp_path / "trl", loss_type, accumulation, **options)
    trainer.train()
    theirs = [r for r in trainer.state.log_history if "loss" in r]
    worst = tiny.assert_curves_close(ours, theirs, COMPARED[loss_type], STEPS, rtol=1e-3)
    # The evaluation after step 10 (one batch of 6 pairs), under TRL's eval_ names.
    our_eval = next(r for r in records if "eval_loss" in r)
    their_eval = next(r for r in trainer.state.log_history if "eval_loss" in r)
    for key in COMPARED[loss_type]:
        name = f"eval_{key}"
        scale = max(abs(their_eval[name]), 1e-2, *(abs(their_eval[f"eval_rewards/{s}"]) for s in ("chosen", "rejected")
                                                 if key == "rewards/margins"))  # fmt: skip
        worst["eval"] = max(worst.get("eval", 0.0), abs(our_eval[name] - their_eval[name]) / scale)
        assert our_eval[name] == pytest.approx(their_eval[name], rel=1e-3, abs=1e-5 * scale), name
    print(f"{loss_type} accumulation {accumulation}: max relative difference to TRL", worst)
    assert ours[-1]["loss"] < ours[0]["loss"]  # it trained
