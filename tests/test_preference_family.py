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
from nanodpo.dpo_data import build_cpo_examples, load_preference_data
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
        ({"loss_type": "kto", "per_device_train_batch_size": 1}, "1 is too small for kto"),
        ({"loss_type": "orpo", "truncation_mode": "keep_end"}, "--truncation_mode keep_end does not apply"),
        ({"loss_type": "cpo", "max_prompt_length": 8}, "--max_prompt_length does not apply to --loss_type cpo"),
        ({"loss_type": "kto", "max_tokens_per_batch": 100}, "--max_tokens_per_batch is not supported with kto"),
    ],
)
def test_refused_family_options(overrides, message):
    with pytest.raises(UserError, match=message):
        check_dpo_options(config(**overrides))


@pytest.mark.parametrize("overrides", [
    {"loss_type": "kto", "precompute_ref_logps": "true"},  # its mismatched pairs are fixed when the data is read
    {"loss_type": "kto", "per_device_eval_batch_size": 1},  # (they come from blocks of the train batch size)
    {"loss_type": "kto", "truncation_mode": "keep_end", "max_prompt_length": 8},  # DPOTrainer's tokenization
])  # fmt: skip
def test_accepted_family_options(overrides):
    check_dpo_options(config(**overrides))


# ----------------------------------------------------------------------------------------------------------------
# Token ids equal CPOTrainer's and ORPOTrainer's, on every test tokenizer


def msg(role, content):
    return {"role": role, "content": content}


LONG = "The reference model stays frozen while the policy learns to prefer the chosen completion. "
MAX_LENGTH = 40
# Each format with the cases where the trainers tokenize differently: a BPE merge across the boundary (with the
# `merge` tokenizer: in every row; one where only chosen merges, so the two prompts differ), the eos token already
# there, no prompt, an answer cut to fit MAX_LENGTH, a prompt alone over it (dropped), a prompt ending with an
# assistant message (continued).
EDGE_ROWS = {
    "explicit": [
        {"prompt": "Human: What is the capital of Fr", "chosen": "ance? Paris.", "rejected": "ance? Whatever."},
        {"prompt": "What is 2 + 2?", "chosen": " 4", "rejected": "\n5, whatever"},
        {"prompt": "", "chosen": "No prompt at all.", "rejected": "Nothing<|im_end|>"},
        {"prompt": "Hi", "chosen": " " + LONG * 3, "rejected": " No."},
        *tiny.preference_rows(4, "explicit"),
        {"prompt": LONG * 3, "chosen": " Yes.", "rejected": " No."},
    ],
    "conversational": [
        {"prompt": [msg("user", "Hi"), msg("assistant", "Hello, how")], "chosen": [msg("assistant", " can I help?")],
         "rejected": [msg("assistant", " what?")]},
        *tiny.preference_rows(7, "conversational"),  # (the multi-turn ones are over MAX_LENGTH: dropped)
        {"prompt": [msg("user", "Hi")], "chosen": [msg("assistant", LONG * 2)], "rejected": [msg("assistant", "No.")]},
    ],
    "implicit": [*tiny.preference_rows(6, "implicit"), {"chosen": "Same answer.", "rejected": "Same answer."}],
}  # fmt: skip


def trl_family_trainer(trainer: str, rows: list[dict], tokenizer, out: Path, **options):
    """TRL's CPOTrainer or ORPOTrainer on `rows` (a fresh tiny model), CPU, fp32, sequential order."""
    from datasets import Dataset

    module = __import__(f"trl.experimental.{trainer}", fromlist=["x"])
    name = trainer.upper()
    options = {"max_length": MAX_LENGTH, "per_device_train_batch_size": 4, "train_sampling_strategy": "sequential",
               **options}  # fmt: skip
    args = getattr(module, f"{name}Config")(output_dir=str(out), report_to="none", bf16=False, use_cpu=True,
                                            remove_unused_columns=False, **options)  # fmt: skip
    return getattr(module, f"{name}Trainer")(
        model=tiny.make_model(tokenizer), args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )


def row_index(example: dict) -> int:
    return int(example["origin"].rsplit("row ", 1)[1]) - 1


@pytest.mark.parametrize("kind", list(EDGE_ROWS))
@pytest.mark.parametrize("tokenizer_kind", tiny.TOKENIZERS)
def test_token_ids_match_cpo_and_orpo_trainers(tmp_path, tokenizer_kind, kind):
    tokenizer = tiny.make_tokenizer(kind=tokenizer_kind)
    rows = EDGE_ROWS[kind]
    ours, stats = build_cpo_examples([Row(r, "mem", i + 1) for i, r in enumerate(rows)], tokenizer, MAX_LENGTH)
    batch = PreferenceCollator(tokenizer.pad_token_id, MAX_LENGTH)(ours)
    for trainer in ("cpo", "orpo"):
        theirs = trl_family_trainer(trainer, rows, tokenizer, tmp_path / trainer).train_dataset
        for i, ex in enumerate(ours):  # every kept row, as TRL's labels: -100 on its own prompt
            expected = theirs[row_index(ex)]
            for side in ("chosen", "rejected"):
                prompt = ex.get(f"{side}_prompt_ids", ex["prompt_ids"])
                assert prompt + ex[f"{side}_ids"] == expected[f"{side}_input_ids"], (trainer, ex["origin"], side)
                assert [-100] * len(prompt) + ex[f"{side}_ids"] == expected[f"{side}_labels"], (ex["origin"], side)
            # and so the collated batch: sequence i (chosen) and B + i (rejected)
            for row, side in ((i, "chosen"), (len(ours) + i, "rejected")):
                ids = expected[f"{side}_input_ids"]
                assert batch["input_ids"][row, : len(ids)].tolist() == ids
                mask = batch["completion_mask"][row].tolist()
                assert [t if m else -100 for t, m in zip(ids, mask)] == expected[f"{side}_labels"]
        # TRL keeps a prompt that alone reaches MAX_LENGTH (with no completion token); nanodpo drops it
        dropped = set(range(len(rows))) - set(map(row_index, ours))
        assert all(len(theirs[i]["chosen_labels"]) >= MAX_LENGTH for i in dropped)
    assert stats.dropped >= 1 if kind != "implicit" else stats.dropped == 0
    # The cases are really exercised.
    if tokenizer_kind in ("bos", "bos_off"):
        assert all(ex["prompt_ids"][0] == tokenizer.bos_token_id for ex in ours)
    if kind != "implicit":
        assert any(len(ex["prompt_ids"]) + len(ex["chosen_ids"]) == MAX_LENGTH for ex in ours)  # an answer was cut
    if tokenizer_kind == "merge" and kind == "explicit":
        assert any("rejected_prompt_ids" in ex for ex in ours)  # only chosen's prompt merged with its answer


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
    """On CPOTrainer's token ids, with the `merge` tokenizer: one pair's chosen and rejected prompts differ."""
    tokenizer = tiny.make_tokenizer(kind="merge")
    rows = EDGE_ROWS["explicit"][:6]
    examples, _ = build_cpo_examples([Row(r, "mem", i + 1) for i, r in enumerate(rows)], tokenizer, max_length=48)
    assert any("rejected_prompt_ids" in ex for ex in examples)
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
# The first step against the TRL trainers, on every test tokenizer


def trl_options(loss_type: str) -> dict:
    """OPTIONS in TRL's names (CPOTrainer's loss_type; orpo: ORPOTrainer, whose beta is λ)."""
    if loss_type == "orpo":
        return dict(OPTIONS["orpo"])
    return {**OPTIONS[loss_type], "loss_type": "simpo" if loss_type == "simpo" else "sigmoid"}


def trl_trainer_name(loss_type: str) -> str:
    return "orpo" if loss_type == "orpo" else "cpo"


@pytest.mark.parametrize("tokenizer_kind", tiny.TOKENIZERS)
@pytest.mark.parametrize("loss_type", FAMILY)
def test_first_step_matches_trl(tmp_path, loss_type, tokenizer_kind):
    """One forward/backward from the same weights on the first 4 pairs of EDGE_ROWS (a merge at the boundary, two
    prompts that differ with `merge`, the eos token already there, no prompt, an answer cut to fit): the loss and
    every value TRL logs within 1e-6, every parameter's gradient within 1e-5."""
    tokenizer = tiny.make_tokenizer(kind=tokenizer_kind)
    rows = EDGE_ROWS["explicit"][:4]
    trainer = trl_family_trainer(trl_trainer_name(loss_type), rows, tokenizer, tmp_path, **trl_options(loss_type))
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, next(iter(trainer.get_train_dataloader())))
    trl_loss.backward()
    trl_metrics = {name: values[-1] for name, values in trainer._stored_metrics["train"].items()}

    cfg = config(loss_type=loss_type, max_length=MAX_LENGTH, **OPTIONS[loss_type])
    examples, _ = build_cpo_examples([Row(r, "mem", i + 1) for i, r in enumerate(rows)], tokenizer, MAX_LENGTH)
    policy = tiny.make_model(tokenizer)  # TRL's model: the same seed, the same weights
    batch = PreferenceCollator(tokenizer.pad_token_id, MAX_LENGTH)(examples)
    out, _, metrics = tiny.dpo_forward(policy, None, batch, cfg)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(trl_loss.item(), rel=1e-6)
    for name in COMPARED[loss_type][1:]:
        assert tiny.relative_difference(metrics, trl_metrics, name) <= 1e-6, (name, metrics[name], trl_metrics[name])
    for name, param in policy.named_parameters():
        torch.testing.assert_close(param.grad, trainer.model.get_parameter(name).grad, rtol=1e-5, atol=1e-7, msg=name)
    # TRL's `logits/*` is another quantity (every position, padding included); nanodpo names its own differently.
    assert "logits/chosen" not in metrics and "completion_logits/chosen" in metrics


# ----------------------------------------------------------------------------------------------------------------
# End to end against the TRL trainers: 10 steps, shuffled, accumulation 2


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Train and eval data, and one tiny model directory per test tokenizer (made when first asked for)."""
    root = tmp_path_factory.mktemp("family_e2e")
    tiny.write_jsonl(root / "train.jsonl", tiny.preference_rows(16, "explicit"))
    tiny.write_jsonl(root / "eval.jsonl", tiny.preference_rows(22, "explicit")[16:])  # 6 held-out pairs, one batch
    return root


def model_dir(workdir: Path, tokenizer_kind: str) -> Path:
    path = workdir / f"model_{tokenizer_kind}"
    if not path.exists():
        tiny.make_model_dir(path, seed=0, tokenizer=tokenizer_kind)
    return path


def nanodpo_args(workdir: Path, out: Path, tokenizer_kind: str = "plain", **overrides) -> list[str]:
    options = {
        "model": str(model_dir(workdir, tokenizer_kind)), "dataset": str(workdir / "train.jsonl"),
        "output_dir": str(out), "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
        "max_steps": STEPS, "learning_rate": 1e-3, "lr_scheduler_type": "constant", "logging_steps": 1,
        "train_sampling_strategy": "random", "max_length": 64, "seed": 0, "report_to": "jsonl", "disable_tqdm": True,
        "eval_dataset": str(workdir / "eval.jsonl"), "per_device_eval_batch_size": 8,
    }  # fmt: skip
    options.update(overrides)
    argv = []
    for key, value in options.items():
        argv += [f"--{key}", str(value)]
    return argv


def trl_trainer(workdir: Path, out: Path, loss_type: str, tokenizer_kind: str = "plain", model=None, **options):
    """The TRL trainer of `loss_type` with nanodpo_args' settings (`model`: a policy built by nanodpo, e.g. LoRA)."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_dir(workdir, tokenizer_kind)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    dataset = load_dataset("json", data_files=str(workdir / "train.jsonl"), split="train")
    eval_dataset = load_dataset("json", data_files=str(workdir / "eval.jsonl"), split="train")
    options = {
        "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": STEPS,
        "learning_rate": 1e-3, "lr_scheduler_type": "constant", "logging_steps": 1,
        "train_sampling_strategy": "random", "max_length": 64, "seed": 0, "eval_strategy": "steps",
        "eval_steps": STEPS, "per_device_eval_batch_size": 8, **trl_options(loss_type), **options,
    }  # fmt: skip
    module = __import__(f"trl.experimental.{trl_trainer_name(loss_type)}", fromlist=["x"])
    name = trl_trainer_name(loss_type).upper()
    args = getattr(module, f"{name}Config")(output_dir=str(out), report_to="none", bf16=False, use_cpu=True,
                                            save_strategy="no", disable_tqdm=True, remove_unused_columns=False,
                                            **options)  # fmt: skip
    return getattr(module, f"{name}Trainer")(
        model=model, args=args, train_dataset=dataset, eval_dataset=eval_dataset, processing_class=tokenizer
    )


def compare_with_trl(records: list[dict], trainer, loss_type: str) -> dict:
    """train_dpo.py's metrics.jsonl records against the TRL trainer's log history: every step within 1e-6 (step
    1) and 1e-4 (steps 2-10), the evaluation after step 10 within 1e-4. Returns the largest relative differences."""
    ours = [r for r in records if "loss" in r]
    theirs = [r for r in trainer.state.log_history if "loss" in r]
    worst = tiny.assert_curves_close(ours, theirs, COMPARED[loss_type], STEPS, rtol=1e-4, first_step_rtol=1e-6)
    our_eval = next(r for r in records if "eval_loss" in r)
    their_eval = next(r for r in trainer.state.log_history if "eval_loss" in r)
    for key in COMPARED[loss_type]:
        gap = tiny.relative_difference(our_eval, their_eval, key, prefix="eval_")
        worst["eval"] = max(worst.get("eval", 0.0), gap)
        assert gap <= 1e-4, (f"eval_{key}", our_eval[f"eval_{key}"], their_eval[f"eval_{key}"])
    assert ours[-1]["loss"] < ours[0]["loss"]  # it trained
    return worst


# Every loss on the plain tokenizer and on one other, so that each tokenizer has a 10-step curve (the first step of
# every pairing: test_first_step_matches_trl).
CURVES = [("simpo", "plain"), ("simpo", "merge"), ("cpo", "plain"), ("cpo", "bos"), ("orpo", "plain"),
          ("orpo", "bos_off")]  # fmt: skip


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize("loss_type, tokenizer_kind", CURVES)
def test_curve_matches_trl(workdir, tmp_path, loss_type, tokenizer_kind):
    out = tmp_path / "nano"
    train_dpo.main(nanodpo_args(workdir, out, tokenizer_kind, loss_type=loss_type, **OPTIONS[loss_type]))
    trainer = trl_trainer(workdir, tmp_path / "trl", loss_type, tokenizer_kind)
    trainer.train()
    worst = compare_with_trl(read_metrics(out / "metrics.jsonl"), trainer, loss_type)
    print(f"{loss_type} on the {tokenizer_kind} tokenizer: max relative difference to TRL", worst)


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize("loss_type", FAMILY)
def test_lora_curve_matches_trl(workdir, tmp_path, loss_type):
    """With a LoRA adapter (peft): the same starting adapter (the policy built as train_dpo.py builds it, handed to
    TRL), 10 steps within the same tolerances."""
    from nanodpo.model import load_policy
    from nanodpo.training import seed_everything

    lora = {"use_lora": "true", "lora_r": 8, "lora_alpha": 16, "learning_rate": 1e-2}
    out = tmp_path / "nano"
    train_dpo.main(nanodpo_args(workdir, out, loss_type=loss_type, **lora, **OPTIONS[loss_type]))
    cfg = parse_config(DPOConfig, nanodpo_args(workdir, tmp_path / "unused", loss_type=loss_type, **lora,
                                               **OPTIONS[loss_type]))  # fmt: skip
    seed_everything(cfg.seed)
    trainer = trl_trainer(workdir, tmp_path / "trl", loss_type, model=load_policy(cfg), learning_rate=1e-2)
    trainer.train()
    worst = compare_with_trl(read_metrics(out / "metrics.jsonl"), trainer, loss_type)
    print(f"{loss_type} with LoRA: max relative difference to TRL", worst)
    assert (out / "adapter_config.json").exists()
