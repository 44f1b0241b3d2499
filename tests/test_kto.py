"""KTO (nanodpo/dpo.py row `kto`, nanodpo/dpo_data.py unpaired rows) against TRL 1.16's KTOTrainer.

  * unpairing preference rows equals TRL's `unpair_preference_dataset` (its order included: blocks of 1000 pairs);
  * token ids and the mismatched (KL) completions equal those of KTOTrainer's prepared dataset;
  * bad rows are refused with file, row and field named;
  * one step on the padded batch equals the padding-free and prefix-shared layouts (1e-5);
  * train_dpo.py --loss_type kto end to end against KTOTrainer (loss_type "kto"), fp32, with and without gradient
    accumulation, on rows whose labels are mixed and, in one micro-batch, all desirable (so `rewards/rejected` is
    absent there, as TRL logs it): step 1 within 1e-5 relative, the 10-step AdamW curve within 1e-3 (values near 0
    on a scale of 0.01). Measured: `pytest -s` prints the worst differences.
"""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_dpo
from nanodpo.config import DPOConfig, parse_config
from nanodpo.data import Row
from nanodpo.dpo_batch import PreferenceCollator, UnpairedCollator
from nanodpo.dpo_data import build_unpaired_examples, load_unpaired_data, prepare_unpaired_row, unpair_rows
from nanodpo.errors import UserError
from nanodpo.fast.dpo_packing import PackedPreferenceCollator
from nanodpo.losses.kto import kto_loss
from nanodpo.tracking import read_metrics
from tests import tiny
from tests.test_resume import KILL_AT_BACKWARD, ROOT, comparable, run_to_end

trl = pytest.importorskip("trl")

STEPS = 10
COMPARED = ["loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
            "logits/chosen", "logits/rejected", "entropy"]  # fmt: skip


def unpaired_rows(n: int = 24, kind: str = "explicit") -> list[dict]:
    """Rows 0-3 all desirable (a micro-batch without an undesirable row), then mixed labels."""
    rows = []
    for i, pair in enumerate(tiny.preference_rows(n, kind)):
        label = i < 4 or i % 3 != 0
        rows.append({"prompt": pair["prompt"], "completion": pair["chosen" if label else "rejected"], "label": label})
    return rows


def config(**overrides) -> DPOConfig:
    argv = []
    for key, value in overrides.items():
        argv += [f"--{key}", str(value)]
    return parse_config(DPOConfig, argv)


# ----------------------------------------------------------------------------------------------------------------
# Data


@pytest.mark.parametrize("kind", ["explicit", "conversational"])
def test_unpairing_matches_trl(kind):
    from datasets import Dataset
    from trl.data_utils import unpair_preference_dataset

    pairs = tiny.preference_rows(1003, kind)  # more than one block of 1000: TRL's order is per block
    for i, pair in enumerate(pairs):
        pair["id"] = i  # an extra column is carried to both rows
    theirs = unpair_preference_dataset(Dataset.from_list(pairs)).to_list()
    ours = unpair_rows([Row(pair, "pairs.jsonl", i + 1) for i, pair in enumerate(pairs)])
    assert len(ours) == len(theirs) == 2006
    for (row, prompt, completion, label), expected in zip(ours, theirs):
        assert (prompt, completion, label, row.data["id"]) == (
            expected["prompt"], expected["completion"], expected["label"], expected["id"]
        )  # fmt: skip


def kto_trainer(train_rows, tmp_path: Path, model_dir: Path, accumulation=1, eval_rows=None, **options):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = KTOConfig(
        output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, gradient_accumulation_steps=accumulation,
        max_steps=STEPS, learning_rate=1e-3, lr_scheduler_type="constant", logging_steps=1,
        train_sampling_strategy="sequential", max_length=64, seed=0, report_to="none", bf16=False, use_cpu=True,
        save_strategy="no", disable_tqdm=True, beta=0.1, loss_type="kto", **options,
    )  # fmt: skip
    eval_dataset = Dataset.from_list(eval_rows) if eval_rows else None
    return KTOTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(train_rows), eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny.make_model_dir(tmp_path_factory.mktemp("kto") / "model", seed=0)


@pytest.mark.parametrize("kind", ["explicit", "conversational"])
def test_token_ids_and_mismatched_completions_match_trl(kind, model_dir, tmp_path):
    rows = unpaired_rows(10, kind)
    trainer = kto_trainer(rows, tmp_path, model_dir)
    prepared = trainer.train_dataset
    tokenizer = trainer.processing_class
    examples, _ = build_unpaired_examples(
        [prepare_unpaired_row(Row(r, "rows.jsonl", i + 1)) for i, r in enumerate(rows)], tokenizer, max_length=64
    )
    assert [ex["prompt_ids"] for ex in examples] == prepared["prompt_ids"]
    assert [ex["completion_ids"] for ex in examples] == prepared["completion_ids"]
    # TRL's KL completions, rotated within each batch of 4 rows, are the second half of our batches.
    collate = UnpairedCollator(PreferenceCollator(tokenizer.pad_token_id, 64))
    for start in range(0, len(examples), 4):
        batch = collate(examples[start : start + 4])
        trl_batch = trainer.data_collator([prepared[i] for i in range(start, min(start + 4, len(examples)))])
        rows_ids, mismatched_ids = batch["input_ids"].chunk(2)
        for ours, theirs, mask in ((rows_ids, trl_batch["input_ids"], trl_batch["attention_mask"]),
                                   (mismatched_ids, trl_batch["KL_input_ids"], trl_batch["KL_attention_mask"])):
            width = theirs.shape[1]
            assert torch.equal(ours[:, :width] * mask, theirs * mask)  # fmt: skip
        assert torch.equal(batch["label"], trl_batch["label"])


def write_rows(tmp_path: Path, rows: list) -> Path:
    path = tmp_path / "rows.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"prompt": "Hi", "completion": " Hello."}, r"row 2, field 'label': missing"),
        ({"prompt": "Hi", "completion": " Hello.", "label": "yes"}, r"row 2, field 'label': expected true"),
        ({"prompt": "Hi", "completion": " Hello.", "label": 1}, r"row 2, field 'label': expected true"),
        ({"prompt": "Hi", "label": True}, r"row 2, field 'completion': missing"),
        ({"prompt": "Hi", "completion": "", "label": True}, r"row 2, field 'completion': is an empty string"),
        ({"prompt": "Hi", "completion": [{"role": "assistant", "content": "x"}], "label": True},
         r"row 2, field 'completion': is a list of messages but 'prompt' is a string"),
        ({"prompt": "Hi", "chosen": " a", "rejected": " b"}, r"row 2: a preference pair .* --unpair_preference_data"),
    ],
)  # fmt: skip
def test_bad_rows_are_refused(tmp_path, bad, message):
    path = write_rows(tmp_path, [{"prompt": "Hi", "completion": " Hi!", "label": True}, bad])
    cfg = config(dataset=str(path), loss_type="kto")
    with pytest.raises(UserError, match=f"rows.jsonl, {message}"):
        load_unpaired_data(cfg, tiny.make_tokenizer())


def test_a_last_batch_of_one_row_is_refused(tmp_path):
    path = tiny.write_jsonl(tmp_path / "rows.jsonl", unpaired_rows(9))
    with pytest.raises(UserError, match="9 train rows in batches of 4 leave a last batch of 1 row.*--max_samples 8"):
        load_unpaired_data(config(dataset=str(path), per_device_train_batch_size=4), tiny.make_tokenizer())


def test_unpair_flag_reads_pairs(tmp_path):
    path = tiny.write_jsonl(tmp_path / "pairs.jsonl", tiny.preference_rows(3, "implicit"))
    cfg = config(dataset=str(path), loss_type="kto", unpair_preference_data="true")
    examples = load_unpaired_data(cfg, tiny.make_tokenizer())
    assert [ex["label"] for ex in examples] == [True, True, True, False, False, False]
    assert examples[0]["prompt_ids"] == examples[3]["prompt_ids"]  # the prompt extracted from chosen/rejected
    assert examples[0]["origin"] == examples[3]["origin"] == f"{path}, row 1"


def test_kto_loss_by_hand():
    """β = 0.5, z_ref = 0.2: desirable ρ = 1 -> λ_D·(1 - σ(0.4)); undesirable ρ = -1 -> λ_U·(1 - σ(0.6))."""
    losses, chosen_rewards, rejected_rewards = kto_loss(
        torch.tensor([-9.0]), torch.tensor([-11.0]), torch.tensor([-10.0]), torch.tensor([-10.0]), torch.tensor(0.2),
        beta=0.5, desirable_weight=2.0, undesirable_weight=3.0,
    )  # fmt: skip
    sigmoid = torch.sigmoid(torch.tensor([0.4, 0.6]))
    expected = torch.tensor([2.0, 3.0]) * (1 - sigmoid)
    torch.testing.assert_close(losses, expected)
    assert chosen_rewards.item() == pytest.approx(0.5) and rejected_rewards.item() == pytest.approx(-0.5)


# ----------------------------------------------------------------------------------------------------------------
# Every layout gives the same step


LAYOUTS = {"padding_free": (False, True), "prefix_shared": (True, False), "prefix_shared_packed": (True, True)}


def dpo_step(policy, reference, batch, cfg):
    """One micro-batch of train_dpo.py: its loss (with grad) and its metrics (kto: sums and counts)."""
    out, _, metrics = tiny.dpo_forward(policy, reference, batch, cfg)
    return out.loss, metrics


def test_layouts_equal_padded_batch():
    tokenizer = tiny.make_tokenizer()
    rows = unpaired_rows(6, "conversational")
    for i, row in enumerate(rows):
        row["label"] = i % 3 != 1
    examples, _ = build_unpaired_examples(
        [prepare_unpaired_row(Row(r, "mem", i + 1)) for i, r in enumerate(rows)], tokenizer, max_length=96
    )
    policy = tiny.make_model(tokenizer, seed=1)
    reference = tiny.make_model(tokenizer, seed=2).eval()
    cfg = config(loss_type="kto", max_length=96, undesirable_weight=1.5)
    padded = UnpairedCollator(PreferenceCollator(tokenizer.pad_token_id, 96))(examples)
    cfg.logps = "readable"
    ref_loss, ref_metrics = dpo_step(policy, reference, padded, cfg)
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in policy.named_parameters()}
    assert ref_metrics["rows/chosen"] == 4 and ref_metrics["rows/rejected"] == 2
    cfg.logps = "chunked"
    for layout, (share, pack) in LAYOUTS.items():
        pairs = PackedPreferenceCollator(tokenizer.pad_token_id, 96, "keep_start", "sdpa", share, pack)
        batch = UnpairedCollator(pairs)(examples)
        policy.zero_grad(set_to_none=True)
        loss, metrics = dpo_step(policy, reference, batch, cfg)
        loss.backward()
        tiny.assert_same_step(policy, loss, metrics, ref_loss, ref_metrics, ref_grads, layout, metric_atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# End to end against KTOTrainer


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize("accumulation", [1, 2])
def test_curve_matches_trl(model_dir, tmp_path, accumulation):
    all_rows = unpaired_rows(28)
    rows, eval_rows = all_rows[:24], all_rows[24:]  # 4 held-out rows: one eval batch, mismatched as TRL does
    path = tiny.write_jsonl(tmp_path / "rows.jsonl", rows)
    eval_path = tiny.write_jsonl(tmp_path / "eval.jsonl", eval_rows)
    out = tmp_path / "nano"
    train_dpo.main([
        "--model", str(model_dir), "--dataset", str(path), "--output_dir", str(out), "--loss_type", "kto",
        "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", str(accumulation),
        "--max_steps", str(STEPS), "--learning_rate", "1e-3", "--lr_scheduler_type", "constant",
        "--logging_steps", "1", "--train_sampling_strategy", "sequential", "--max_length", "64", "--seed", "0",
        "--report_to", "jsonl", "--disable_tqdm", "true", "--beta", "0.1", "--undesirable_weight", "1.33",
        "--eval_dataset", str(eval_path), "--per_device_eval_batch_size", "4",
    ])  # fmt: skip
    records = read_metrics(out / "metrics.jsonl")
    ours = [r for r in records if "loss" in r]
    trainer = kto_trainer(
        rows, tmp_path, model_dir, accumulation, eval_rows=eval_rows, undesirable_weight=1.33,
        eval_strategy="steps", eval_steps=STEPS, per_device_eval_batch_size=4,
    )  # fmt: skip
    trainer.train()
    theirs = [r for r in trainer.state.log_history if "loss" in r]
    for a, b in zip(ours, theirs):  # the same metrics logged at every step
        assert sorted(k for k in COMPARED if k in a) == sorted(k for k in COMPARED if k in b), f"step {a['step']}"
    worst = tiny.assert_curves_close(ours, theirs, COMPARED, STEPS, rtol=1e-3, present_only=True)
    our_eval = next(r for r in records if "eval_loss" in r)
    their_eval = next(r for r in trainer.state.log_history if "eval_loss" in r)
    for key in COMPARED:
        name = f"eval_{key}"
        assert (name in our_eval) == (name in their_eval), name
        if name in their_eval:
            scale = max(abs(their_eval[name]), 1e-2)
            worst["eval"] = max(worst.get("eval", 0.0), abs(our_eval[name] - their_eval[name]) / scale)
            assert our_eval[name] == pytest.approx(their_eval[name], rel=1e-3, abs=1e-5), name
    print(f"kto accumulation {accumulation}: max relative difference to TRL", worst)
    assert "rewards/rejected" not in ours[0] if accumulation == 1 else "rewards/rejected" in ours[0]
    assert ours[-1]["loss"] < ours[0]["loss"]


@pytest.mark.slow
def test_sigkill_and_resume_is_bit_exact(model_dir, tmp_path):
    """As tests/test_resume.py for DPO: killed mid-accumulation after the first checkpoint, resumed from it, every
    logged number equals the uninterrupted run's (logging every 3 steps, so an interval spans the checkpoint, and
    some intervals have no undesirable row)."""
    path = tiny.write_jsonl(tmp_path / "rows.jsonl", unpaired_rows(16))

    def args(out: Path) -> list[str]:
        return [
            "train_dpo.py", "--model", str(model_dir), "--dataset", str(path), "--output_dir", str(out),
            "--loss_type", "kto", "--max_steps", "6", "--logging_steps", "3", "--save_steps", "2",
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--learning_rate", "1e-3",
            "--max_length", "64", "--disable_tqdm", "--seed", "7", "--train_sampling_strategy", "random",
        ]  # fmt: skip

    run_to_end(args(tmp_path / "straight"))
    expected = comparable(tmp_path / "straight")
    out = tmp_path / "killed"
    result = subprocess.run([sys.executable, "-c", KILL_AT_BACKWARD, "7", *args(out)], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)  # fmt: skip
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    run_to_end([*args(out), "--resume_from_checkpoint", "latest"])
    assert comparable(out) == expected
