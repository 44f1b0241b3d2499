"""Padding-free and prefix-shared DPO (nanodpo/fast/dpo_packing.py) equal the padded [chosen; rejected] batch.

The oracle is the readable path on PreferenceCollator's padded batch (TRL's layout). Every packed layout — padding-
free, prefix-shared, both; sdpa and eager; keep_start and keep_end truncation — gives the same per-token log-probs,
loss, metrics and gradients within 1e-5 (fp32), for the policy and the no_grad reference, online and precomputed.
"""


from functools import partial

import pytest
import torch

import train_dpo
from nanodpo import errors
from nanodpo.config import DPOConfig, parse_config
from nanodpo.data import Row
from nanodpo.dpo import concatenated_inputs, sequence_logps
from nanodpo.dpo_batch import PreferenceCollator
from nanodpo.dpo_data import build_examples
from nanodpo.errors import UserError
from nanodpo.fast.chunked_head import chunked_token_logps
from nanodpo.fast.dpo_packing import (
    PackedPreferenceCollator,
    TokenBudgetBatchSampler,
    packed_inputs,
    pair_tokens,
    resolve_layout,
    shared_unit,
)
from nanodpo.logps import token_logps
from nanodpo.recipe import choose_data
from nanodpo.reference import reference_from_model
from nanodpo.tracking import read_metrics
from tests import tiny

LAYOUTS = {"padding_free": (False, True), "prefix_shared": (True, False), "prefix_shared_packed": (True, True)}


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.make_tokenizer()


@pytest.fixture(scope="module")
def examples(tokenizer):
    """Multi-turn conversations of varied lengths, plus edge pairs: equal completions (the whole sequence is shared)
    and a chosen completion that is a prefix of the rejected one."""
    rows = tiny.preference_rows(10, "conversational") + [
        {"prompt": "What is 2 + 2?", "chosen": " 4.", "rejected": " 4."},
        {"prompt": "Name a fruit.", "chosen": " An apple", "rejected": " An apple, or a pear."},
    ]
    examples, _ = build_examples([Row(r, "mem", i) for i, r in enumerate(rows)], tokenizer)
    return examples


def config(**overrides) -> DPOConfig:
    argv = []
    for key, value in overrides.items():
        argv += [f"--{key}", str(value)]
    return parse_config(DPOConfig, argv)


def grads_of(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(ours: dict, ref: dict):
    assert ours.keys() == ref.keys()
    for name in ref:
        diff = (ours[name] - ref[name]).abs().max() / ref[name].abs().max().clamp(min=1e-6)
        assert diff <= 1e-5, f"{name}: relative difference {diff:.2e}"


def test_prefix_shared_unit_matches_the_drawing():
    unit = shared_unit([10, 11, 12, 20, 21], [10, 11, 12, 30, 31, 32], 0, 1)
    assert unit.input_ids == [10, 11, 12, 20, 21, 30, 31, 32]
    assert unit.position_ids == [0, 1, 2, 3, 4, 3, 4, 5]
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0, 1, 0, 0],
            [1, 1, 1, 0, 0, 1, 1, 0],
            [1, 1, 1, 0, 0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(unit.mask(), expected)
    # rejected token t sits at: t for the prompt, after chosen for its own tokens
    assert [unit.position_of(1, t) for t in range(6)] == [0, 1, 2, 5, 6, 7]


@pytest.mark.parametrize("truncation_mode", ["keep_start", "keep_end"])
@pytest.mark.parametrize(
    "attn, layout", [("sdpa", layout) for layout in LAYOUTS] + [("flash_attention_2", "padding_free")]
)  # flash-attention cannot express the prefix-shared mask
def test_hidden_index_points_at_each_token(tokenizer, examples, layout, attn, truncation_mode):
    """Structure: for every sequence s and token t, the packed row holds token t at hidden_index[s, t] with position
    id t (so the hidden state there predicts token t+1 exactly as in the sequence alone)."""
    share, pack = LAYOUTS[layout]
    collate = PackedPreferenceCollator(tokenizer.pad_token_id, 48, truncation_mode, attn, share, pack)
    batch = collate(examples)
    ids, pos = batch["packed_input_ids"].reshape(-1), batch["packed_position_ids"].reshape(-1)
    for s, n in enumerate(batch["attention_mask"].sum(1).tolist()):
        where = batch["hidden_index"][s, : n - 1]
        assert torch.equal(ids[where], batch["input_ids"][s, : n - 1])
        assert torch.equal(pos[where], torch.arange(n - 1))
    if attn == "flash_attention_2":  # one row, no padding, cu_seq_lens over the 2B sequences
        assert batch["packed_input_ids"].shape[0] == 1 and float(batch["padding_fraction"]) == 0.0
        assert batch["packed_cu_seq_lens"][-1] == batch["attention_mask"].sum()
    real = int(batch["attention_mask"].sum())
    packed_real = round(ids.numel() * (1 - float(batch["padding_fraction"])))
    assert packed_real < real if share else packed_real == real  # shared: each prompt computed once, not twice


def dpo_step(policy, reference, batch, cfg):
    """One micro-batch of train_dpo.py: its loss (with grad) and its metrics."""
    out, _, metrics = tiny.dpo_forward(policy, reference, batch, cfg)
    return out.loss, metrics


def model_inputs(policy, batch):
    return (packed_inputs if "packed_input_ids" in batch else concatenated_inputs)(policy, batch)


def policy_stats(policy, batch, path, chunk_size=16):
    if path == "chunked":
        return chunked_token_logps(policy, model_inputs(policy, batch), chunk_size=chunk_size)
    return token_logps(policy, model_inputs(policy, batch))


@pytest.mark.parametrize("truncation_mode", ["keep_start", "keep_end"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_layouts_equal_padded_batch(tokenizer, examples, attn, truncation_mode):
    """DPO step (policy with grad + reference under no_grad): loss, metrics, log-probs and every gradient."""
    policy = tiny.make_model(tokenizer, seed=1)
    policy.config._attn_implementation = attn
    reference = tiny.make_model(tokenizer, seed=2).eval()
    reference.config._attn_implementation = attn
    cfg = config(max_length=48, truncation_mode=truncation_mode, rpo_alpha=0.5)  # sigmoid + the sft (NLL) term
    cfg.attn_implementation = attn

    padded = PreferenceCollator(tokenizer.pad_token_id, 48, truncation_mode)(examples)
    cfg.logps = "readable"
    ref_loss, ref_metrics = dpo_step(policy, reference, padded, cfg)
    ref_loss.backward()
    ref_grads = grads_of(policy)
    ref_stats = policy_stats(policy, padded, "readable")

    cfg.logps = "chunked"
    slots = {}
    for layout, (share, pack) in LAYOUTS.items():
        batch = PackedPreferenceCollator(tokenizer.pad_token_id, 48, truncation_mode, attn, share, pack)(examples)
        policy.zero_grad(set_to_none=True)
        loss, metrics = dpo_step(policy, reference, batch, cfg)
        loss.backward()
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5), layout
        for name, value in ref_metrics.items():
            assert metrics[name] == pytest.approx(value, rel=1e-5, abs=1e-6), (layout, name)
        assert_grads_close(grads_of(policy), ref_grads)
        for path in ("chunked", "readable"):  # both paths score packed rows
            stats = policy_stats(policy, batch, path)
            torch.testing.assert_close(stats.logps, ref_stats.logps, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(stats.entropy, ref_stats.entropy, rtol=1e-5, atol=1e-5)
            assert torch.equal(stats.mask, ref_stats.mask)
        slots[layout] = batch["packed_input_ids"].numel()
    # fewer token slots than the padded batch; packing several prefix-shared units per row fewer still
    assert max(slots.values()) <= padded["input_ids"].numel()
    assert slots["prefix_shared_packed"] < padded["input_ids"].numel()
    assert slots["prefix_shared_packed"] <= slots["prefix_shared"]


@pytest.mark.parametrize(
    "options",
    [
        {"loss_type": "ipo"},
        {"ld_alpha": 0.5, "use_weighting": "true"},
        {"loss_type": "aot", "label_smoothing": 0.1},
    ],
    ids=["ipo", "ld_wpo", "aot"],
)
def test_loss_variants_equal(tokenizer, examples, options):
    """Losses that read token counts (ipo), per-token positions (LD-DPO), log Σp² (WPO) or sort the batch (aot)."""
    policy = tiny.make_model(tokenizer, seed=1)
    reference = tiny.make_model(tokenizer, seed=2).eval()
    cfg = config(max_length=48, **options)
    padded = PreferenceCollator(tokenizer.pad_token_id, 48)(examples)
    cfg.logps = "readable"
    ref_loss, ref_metrics = dpo_step(policy, reference, padded, cfg)
    ref_loss.backward()
    ref_grads = grads_of(policy)
    policy.zero_grad(set_to_none=True)
    cfg.logps = "chunked"
    batch = choose_data(cfg, tokenizer.pad_token_id).collator(examples)  # the default: shared and packed
    assert "packed_attention_mask" in batch
    loss, metrics = dpo_step(policy, reference, batch, cfg)
    loss.backward()
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    # a difference of two ~-60 sums times β: compare at the scale of the sums
    assert metrics["rewards/margins"] == pytest.approx(ref_metrics["rewards/margins"], rel=1e-5, abs=1e-6)
    assert_grads_close(grads_of(policy), ref_grads)


def test_lora_reference_adapter_disabled_in_packed_layout(tokenizer, examples):
    """A LoRA policy's reference is the policy with its adapter off: the same numbers in the packed layout."""
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model

    policy = get_peft_model(
        tiny.make_model(tokenizer), LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    )
    accelerator = Accelerator(cpu=True)
    padded = PreferenceCollator(tokenizer.pad_token_id, 48)(examples)
    packed = PackedPreferenceCollator(tokenizer.pad_token_id, 48)(examples)
    unwrap_model = accelerator.unwrap_model
    score = partial(reference_from_model, ref_model=None, sum_logps=sequence_logps, unwrap_model=unwrap_model)
    expected = score(policy, padded, model_inputs(policy, padded), token_logps=partial(token_logps, with_metrics=False))
    got = score(policy, packed, model_inputs(policy, packed), token_logps=partial(chunked_token_logps, chunk_size=8))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    adapter_on = policy_stats(policy, packed, "chunked", chunk_size=8)
    assert not torch.allclose(adapter_on.logps.sum(1)[: len(examples)], expected[0])  # the adapter does something


def test_token_budget_batches(examples):
    costs = [pair_tokens(ex, 48, "keep_start", True) for ex in examples]
    order = list(range(len(examples)))[::-1]
    batches = list(TokenBudgetBatchSampler(order, costs, max_tokens=120))
    assert [i for b in batches for i in b] == order  # every pair once, in the sampler's order
    for b in batches:
        assert sum(costs[i] for i in b) <= 120 or len(b) == 1
    assert len(TokenBudgetBatchSampler(order, costs, max_tokens=1)) == len(examples)  # over budget: alone
    # the cost is what the packed layout really holds
    collate = PackedPreferenceCollator(0, 48, "keep_start")
    for i in (0, 3, 10):
        batch = collate([examples[i]])
        assert costs[i] == int((1 - batch["padding_fraction"]) * batch["packed_input_ids"].numel() + 0.5)


def test_layout_options(capsys):

    errors._said_once.clear()
    assert resolve_layout(config()) == "prefix_shared"  # the default
    assert resolve_layout(config(batch_layout="padding_free")) == "padding_free"
    assert type(choose_data(config(batch_layout="padded"), 0).collator) is PreferenceCollator
    # --logps picks the log-prob path and nothing else: the layout stays
    assert resolve_layout(config(logps="readable")) == "prefix_shared"
    with pytest.raises(UserError, match="--batch_layout 'packed' is not one of"):
        config(batch_layout="packed")
    flash = config()
    flash.attn_implementation = "flash_attention_2"
    assert resolve_layout(flash) == "padding_free"
    assert resolve_layout(flash) == "padding_free"
    assert capsys.readouterr().out.count("falling back to padding-free") == 1  # said once


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_train_dpo_layouts_end_to_end(tmp_path, monkeypatch, capsys):
    """train_dpo.py: the default (fast path, prefix-shared packed rows) gives the readable padded run's curve
    (SGD, 3 steps, 1e-5); --precompute_ref_logps and --max_tokens_per_batch run in the packed layout."""
    monkeypatch.setenv("NANODPO_CACHE", str(tmp_path / "cache"))
    tiny.make_model_dir(tmp_path / "model", seed=0)
    tiny.write_jsonl(tmp_path / "train.jsonl", tiny.preference_rows(12, "conversational"))

    def run(name, **overrides):
        options = {
            "model": tmp_path / "model", "dataset": tmp_path / "train.jsonl", "output_dir": tmp_path / name,
            "per_device_train_batch_size": 4, "max_steps": 3, "optim": "sgd", "learning_rate": 0.5,
            "lr_scheduler_type": "constant", "logging_steps": 1, "train_sampling_strategy": "sequential",
            "max_length": 64, "report_to": "jsonl", "disable_tqdm": "true", **overrides,
        }  # fmt: skip
        argv = [item for key, value in options.items() for item in (f"--{key}", str(value))]
        train_dpo.main(argv)
        return [r for r in read_metrics(tmp_path / name / "metrics.jsonl") if "loss" in r]

    readable = run("readable", logps="readable", batch_layout="padded")
    fast = run("fast")
    precomputed = run("pre", precompute_ref_logps="true")
    for a, b, c in zip(readable, fast, precomputed):
        for key in ("loss", "rewards/margins", "logps/chosen", "entropy", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
            if key != "entropy":
                assert c[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
        assert b["padding_fraction"] < a["padding_fraction"]
    capsys.readouterr()
    budget = run("budget", max_tokens_per_batch=150, max_steps=4, save_steps=2, train_sampling_strategy="random")
    assert len(budget) == 4 and all(r["loss"] > 0 for r in budget)
    assert "global batch: 1 micro-batch of up to 150 tokens" in capsys.readouterr().out
    # Resumed from step 2, a token-budget run skips the micro-batches already trained and logs the same steps 3-4.
    resumed = run(
        "budget", max_tokens_per_batch=150, max_steps=4, save_steps=2, train_sampling_strategy="random",
        resume_from_checkpoint=tmp_path / "budget" / "checkpoint-2",
    )  # fmt: skip
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]  # metrics.jsonl truncated at step 2, then continued
    for a, b in zip(resumed, budget):
        assert a["num_tokens"] == b["num_tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
