"""KTO (nanodpo/losses/kto.py, nanodpo/dpo_data.py unpaired rows) against TRL 1.16's KTOTrainer, on every test
tokenizer (tests/tiny.py `TOKENIZERS`).

  * unpairing preference rows equals TRL's `unpair_preference_dataset` (its order included: blocks of 1000 pairs);
  * token ids and the mismatched (KL) completions equal those of KTOTrainer's prepared dataset: formed once, per block
    of the train batch size over the kept rows, so they do not depend on the data order, the batch or the processes;
  * bad rows are refused with file, row and field named;
  * one step on the padded batch equals the padding-free and prefix-shared layouts (1e-5);
  * the first step (loss, logged values, gradients) equals KTOTrainer's on every tokenizer (1e-6);
  * train_dpo.py --loss_type kto end to end against KTOTrainer (loss_type "kto"), fp32, shuffled data, gradient
    accumulation 2, on rows whose labels are mixed and, in some micro-batches, all desirable (so `rewards/rejected`
    is absent there, as TRL logs it): step 1 within 1e-6 relative, the 10-step AdamW curve and the evaluation within
    1e-4; also with LoRA. Measured: `pytest -s` prints the worst differences;
  * --precompute_ref_logps gives the same run as the reference scored on the fly.
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
from nanodpo.dpo_data import (
    add_kl_completions,
    build_unpaired_examples,
    load_unpaired_data,
    prepare_unpaired_row,
    unpair_rows,
)
from nanodpo.errors import UserError
from nanodpo.fast.dpo_packing import PackedPreferenceCollator
from nanodpo.losses.kto import combine_kto_metrics, kto_loss
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


# The run both sides make: batch 4 x accumulation 2, shuffled, 10 AdamW steps, λ_U 1.33.
TRAINING = dict(
    per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=STEPS, learning_rate=1e-3,
    lr_scheduler_type="constant", logging_steps=1, train_sampling_strategy="random", max_length=64, seed=0, beta=0.1,
    undesirable_weight=1.33,
)  # fmt: skip


def kto_trainer(train_rows, tmp_path: Path, model_dir: Path, eval_rows=None, model=None, **options):
    """TRL's KTOTrainer with TRAINING's settings (`options` override them); `model`: a policy built by nanodpo."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    options = {**TRAINING, **options}
    sampling = options.pop("train_sampling_strategy")
    args = KTOConfig(output_dir=str(tmp_path / "trl"), report_to="none", bf16=False, use_cpu=True, save_strategy="no",
                     disable_tqdm=True, loss_type="kto", train_sampling_strategy="sequential", **options)  # fmt: skip
    eval_dataset = Dataset.from_list(eval_rows) if eval_rows else None
    trainer = KTOTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(train_rows), eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )  # fmt: skip
    # KTOTrainer refuses any order but "sequential" (its mismatched completions are fixed per block of rows, so a
    # shuffled batch no longer holds its own block); the refusal is its only use of the option, so shuffled data is
    # what KTOTrainer's pairs give when the sampler is shuffled after it.
    trainer.args.train_sampling_strategy = sampling
    return trainer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny.make_model_dir(tmp_path_factory.mktemp("kto") / "model", seed=0)


LONG = "The reference model stays frozen while the policy learns to prefer the chosen completion. "


def rows_with_a_dropped_one(kind: str) -> list[dict]:
    """10 rows, the 4th with a prompt over max_length 96 (dropped by both): 9 kept, so the blocks of 4 rows that the
    mismatched completions are formed in start after the dropped row, and the last block has one row."""
    rows = unpaired_rows(10, kind)
    prompt = LONG * 6 if kind == "explicit" else [{"role": "user", "content": LONG * 6}]
    rows[3] = {**rows[3], "prompt": prompt}
    return rows


@pytest.mark.parametrize("kind", ["explicit", "conversational"])
@pytest.mark.parametrize("tokenizer_kind", tiny.TOKENIZERS)
def test_token_ids_and_mismatched_completions_match_trl(kind, tokenizer_kind, tmp_path):
    rows = rows_with_a_dropped_one(kind)
    model_dir = tiny.make_model_dir(tmp_path / "model", tokenizer=tokenizer_kind)
    trainer = kto_trainer(rows, tmp_path, model_dir, max_length=96)
    prepared = trainer.train_dataset
    tokenizer = trainer.processing_class
    path = tiny.write_jsonl(tmp_path / "rows.jsonl", rows)
    examples = load_unpaired_data(config(dataset=str(path), loss_type="kto", max_length=96), tokenizer)
    assert len(examples) == len(prepared) == 9
    assert [ex["prompt_ids"] for ex in examples] == prepared["prompt_ids"]
    assert [ex["completion_ids"] for ex in examples] == prepared["completion_ids"]
    assert [ex["kl_completion_ids"] for ex in examples] == prepared["KL_completion_ids"]
    assert examples[8]["kl_completion_ids"] == examples[8]["completion_ids"]  # a block of one row: its own
    if tokenizer_kind == "bos":
        assert all(ex["prompt_ids"][0] == tokenizer.bos_token_id for ex in examples)
    # The collated batches: the rows, then their mismatched rows, as TRL's collator lays them out.
    collate = UnpairedCollator(PreferenceCollator(tokenizer.pad_token_id, 96))
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
    add_kl_completions(examples, 6)
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
# The first step against KTOTrainer, on every test tokenizer


@pytest.mark.parametrize("tokenizer_kind", tiny.TOKENIZERS)
def test_first_step_matches_trl(tmp_path, tokenizer_kind):
    """One forward/backward from the same weights on the first 4 rows (3 desirable, 1 not; the reference a second
    copy): the loss, every value TRL logs within 1e-6, every parameter's gradient within 1e-5."""
    from transformers import AutoModelForCausalLM

    rows = unpaired_rows(12)[3:11]
    model_dir = tiny.make_model_dir(tmp_path / "model", tokenizer=tokenizer_kind)
    trainer = kto_trainer(rows, tmp_path, model_dir, train_sampling_strategy="sequential")
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, next(iter(trainer.get_train_dataloader())))
    trl_loss.backward()
    trl_metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}

    path = tiny.write_jsonl(tmp_path / "rows.jsonl", rows)
    cfg = config(dataset=str(path), loss_type="kto", max_length=64, beta=0.1, undesirable_weight=1.33)
    examples = load_unpaired_data(cfg, trainer.processing_class)
    batch = UnpairedCollator(PreferenceCollator(trainer.processing_class.pad_token_id, 64))(examples[:4])
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    policy.train()
    out, _, metrics = tiny.dpo_forward(policy, reference, batch, cfg)
    out.loss.backward()
    ours = combine_kto_metrics([{**metrics, "loss": out.loss.item()}])[0]
    assert out.loss.item() == pytest.approx(trl_loss.item(), rel=1e-6)
    assert trl_metrics["kl"] == 0 and ours["kl"] == 0  # step 1: policy = reference
    for name in COMPARED[1:]:
        assert tiny.relative_difference(ours, trl_metrics, name) <= 1e-6, (name, ours[name], trl_metrics[name])
    for name, param in policy.named_parameters():
        torch.testing.assert_close(param.grad, trainer.model.get_parameter(name).grad, rtol=1e-5, atol=1e-7, msg=name)


# ----------------------------------------------------------------------------------------------------------------
# End to end against KTOTrainer: 10 steps, shuffled, accumulation 2


def nanodpo_argv(model_dir: Path, path: Path, out: Path, eval_path: Path | None = None, **overrides) -> list[str]:
    options = {"model": model_dir, "dataset": path, "output_dir": out, "loss_type": "kto", "report_to": "jsonl",
               "disable_tqdm": "true", **TRAINING, **overrides}  # fmt: skip
    if eval_path is not None:
        options.update(eval_dataset=eval_path, per_device_eval_batch_size=8, eval_steps=STEPS)
    return [item for key, value in options.items() for item in (f"--{key}", str(value))]


def compare_with_trl(records: list[dict], trainer) -> dict:
    """metrics.jsonl against KTOTrainer's log history: the same metrics at every step (rewards/rejected only where
    the step had an undesirable row), within 1e-6 at step 1 and 1e-4 after; the evaluation after step 10 within
    1e-4. Returns the largest relative differences."""
    ours = [r for r in records if "loss" in r]
    theirs = [r for r in trainer.state.log_history if "loss" in r]
    for a, b in zip(ours, theirs):
        assert sorted(k for k in COMPARED if k in a) == sorted(k for k in COMPARED if k in b), f"step {a['step']}"
    worst = tiny.assert_curves_close(ours, theirs, COMPARED, STEPS, rtol=1e-4, first_step_rtol=1e-6,
                                     present_only=True)  # fmt: skip
    our_eval = next(r for r in records if "eval_loss" in r)
    their_eval = next(r for r in trainer.state.log_history if "eval_loss" in r)
    for key in COMPARED:
        name = f"eval_{key}"
        assert (name in our_eval) == (name in their_eval), name
        if name in their_eval:
            gap = tiny.relative_difference(our_eval, their_eval, key, prefix="eval_")
            worst["eval"] = max(worst.get("eval", 0.0), gap)
            assert gap <= 1e-4, (name, our_eval[name], their_eval[name])
    assert ours[-1]["loss"] < ours[0]["loss"]
    return worst


@pytest.fixture(scope="module")
def kto_data(tmp_path_factory):
    """24 training rows and 6 held-out ones (one eval batch; mismatched in blocks of the train batch size, 4 + 2)."""
    root = tmp_path_factory.mktemp("kto_data")
    all_rows = unpaired_rows(30)
    return all_rows[:24], all_rows[24:], tiny.write_jsonl(root / "rows.jsonl", all_rows[:24]), \
        tiny.write_jsonl(root / "eval.jsonl", all_rows[24:])  # fmt: skip


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize("tokenizer_kind", ["plain", "bos"])
def test_curve_matches_trl(kto_data, tmp_path, tokenizer_kind):
    rows, eval_rows, path, eval_path = kto_data
    model_dir = tiny.make_model_dir(tmp_path / "model", tokenizer=tokenizer_kind)
    out = tmp_path / "nano"
    train_dpo.main(nanodpo_argv(model_dir, path, out, eval_path))
    trainer = kto_trainer(rows, tmp_path, model_dir, eval_rows=eval_rows, eval_strategy="steps", eval_steps=STEPS,
                          per_device_eval_batch_size=8)  # fmt: skip
    trainer.train()
    worst = compare_with_trl(read_metrics(out / "metrics.jsonl"), trainer)
    print(f"kto on the {tokenizer_kind} tokenizer: max relative difference to TRL", worst)


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_accelerate_state")
def test_lora_curve_matches_trl(kto_data, model_dir, tmp_path):
    """With a LoRA adapter: the same starting adapter (built as train_dpo.py builds it, handed to TRL), the reference
    the policy with its adapter disabled on both sides. In file order without accumulation, so that step 1 (rows 0-3)
    has no undesirable row: no `rewards/rejected` is logged there, as TRL logs none."""
    from nanodpo.model import load_policy
    from nanodpo.training import seed_everything

    rows, eval_rows, path, eval_path = kto_data
    lora = {"use_lora": "true", "lora_r": 8, "lora_alpha": 16, "learning_rate": 1e-2, "gradient_accumulation_steps": 1,
            "train_sampling_strategy": "sequential"}  # fmt: skip
    out = tmp_path / "nano"
    train_dpo.main(nanodpo_argv(model_dir, path, out, eval_path, **lora))
    cfg = parse_config(DPOConfig, nanodpo_argv(model_dir, path, tmp_path / "unused", **lora))
    seed_everything(cfg.seed)
    options = {key: lora[key] for key in ("learning_rate", "gradient_accumulation_steps", "train_sampling_strategy")}
    trainer = kto_trainer(rows, tmp_path, model_dir, eval_rows=eval_rows, model=load_policy(cfg), eval_strategy="steps",
                          eval_steps=STEPS, per_device_eval_batch_size=8, **options)  # fmt: skip
    assert trainer.ref_model is None  # TRL's reference: the adapter disabled
    trainer.train()
    records = read_metrics(out / "metrics.jsonl")
    worst = compare_with_trl(records, trainer)
    print("kto with LoRA: max relative difference to TRL", worst)
    assert "rewards/rejected" not in records[0] and "rewards/chosen" in records[0]


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_accelerate_state")
def test_precomputed_reference_gives_the_same_run(kto_data, model_dir, tmp_path, monkeypatch):
    """--precompute_ref_logps (the rows' and the mismatched rows' reference log-probs scored once, before training,
    in batches of another size) logs what the reference scored on the fly gives: every value, train and eval, within
    1e-5 (fp32 rounding of log-probs summed over other paddings, as DPO's precompute test allows)."""
    _, _, path, eval_path = kto_data
    monkeypatch.setenv("NANODPO_CACHE", str(tmp_path / "cache"))
    runs = {}
    for name, precompute in (("online", "false"), ("precomputed", "true")):
        train_dpo.main(nanodpo_argv(model_dir, path, tmp_path / name, eval_path, precompute_ref_logps=precompute,
                                    precompute_ref_batch_size=3))  # fmt: skip
        runs[name] = [r for r in read_metrics(tmp_path / name / "metrics.jsonl") if "loss" in r or "eval_loss" in r]
    assert len(list((tmp_path / "cache" / "ref_logps").glob("*.safetensors"))) == 2  # train and eval
    worst = 0.0
    for a, b in zip(runs["precomputed"], runs["online"], strict=True):
        assert a.keys() == b.keys()
        for key in a.keys() - {"elapsed_s"}:
            gap = abs(a[key] - b[key]) / max(abs(b[key]), 1e-2)
            worst = max(worst, gap)
            assert gap <= 1e-5, (a["step"], key, a[key], b[key])
    print(f"kto with precomputed reference log-probs: max relative difference to on the fly {worst:.1e}")


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
