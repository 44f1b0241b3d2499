"""Online DPO (train_dpo.py --online): sampling, judges, bad input, and parity with TRL 1.16's OnlineDPOTrainer.

Parity: nanodpo samples its answers; TRL's generation is replaced by a replay of exactly those answers (after checking
TRL tokenizes the prompts to the same ids), the same judge scores them in both, and both train the same tiny model
for 10 steps of 2 micro-batches. Compared: the loss (TRL logs it rounded to 4 decimals, so it is read from its
training_step), rewards/*, logps/*, objective/* and val/contain_eos_token, grad_norm at step 1. TRL 1.16 sums
objective/kl and objective/entropy over the padding after an answer's EOS too (huggingface/trl#6803, fixed by #6818):
the test masks TRL's per-token log-probs there, which changes no loss or gradient. And TRL's training_step
backpropagates each micro-batch's loss undivided, so with gradient accumulation its gradient is the sum over the
micro-batches, not their mean (DPOTrainer's objective, and nanodpo's): the test divides it by the accumulation.

The tiny model's generation config lists 40 stop tokens besides <|im_end|>, so that about half the answers of a random
model end within 8 tokens: pairs of unequal length, padding after EOS, and the missing-EOS penalty all occur.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import train_dpo
from nanodpo import online
from nanodpo.errors import UserError
from nanodpo.generation import sample_completions
from nanodpo.tracking import read_metrics
from tests import online_judges, tiny

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fresh_accelerate_state")]

STEPS = 10
STOPS = [2, *range(100, 140)]  # <|im_end|> and 40 ordinary tokens: about 1 in 12 sampled tokens ends an answer
COMPARED = [
    "loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
    "logps/rejected", "objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
    "objective/scores", "objective/scores_margin", "val/contain_eos_token",
]  # fmt: skip


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("online")
    tiny.make_model_dir(root / "model", seed=0)
    GenerationConfig(eos_token_id=STOPS, pad_token_id=0).save_pretrained(root / "model")
    string_rows = tiny.preference_rows(16, "explicit")
    tiny.write_jsonl(root / "prompts.jsonl", [{"prompt": r["prompt"], "row": i} for i, r in enumerate(string_rows)])
    chat_rows = tiny.preference_rows(16, "conversational")
    tiny.write_jsonl(root / "chat_prompts.jsonl", [{"prompt": r["prompt"]} for r in chat_rows])
    tiny.make_reward_model_dir(root / "reward_model")  # a tokenizer of its own: decode, then re-encode
    return root


def options(workdir: Path, out: Path, **overrides) -> list[str]:
    values = {
        "model": str(workdir / "model"), "dataset": str(workdir / "prompts.jsonl"), "output_dir": str(out),
        "online": True, "judge": "tests.online_judges:char_score", "max_new_tokens": 8, "missing_eos_penalty": 0.5,
        "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": STEPS,
        "learning_rate": 1e-3, "lr_scheduler_type": "constant", "logging_steps": 1,
        "train_sampling_strategy": "sequential", "max_length": 128, "seed": 0, "disable_tqdm": True, "beta": 0.1,
    }  # fmt: skip
    values.update(overrides)
    argv = []
    for key, value in values.items():
        argv += [f"--{key}", *map(str, value if isinstance(value, list) else [value])]
    return argv


def train_records(out: Path) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


# ----------------------------------------------------------------------------------------------------------------
# Sampling


def left_padded_prompts(tokenizer, texts):
    batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    return batch["input_ids"].repeat(2, 1), batch["attention_mask"].repeat(2, 1)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.8)])
def test_sampling_equals_transformers_generate(workdir, temperature, top_p):
    """The same tokens as model.generate(do_sample=True) from the same random state — rows of different prompt
    lengths (left padding), rows that stop early (then padded), top-p's boundary — and the same with a fixed seed."""
    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    model = AutoModelForCausalLM.from_pretrained(workdir / "model").eval()
    prompt_ids, prompt_mask = left_padded_prompts(tokenizer, ["Hi", "What is the capital of France?", "你好"])
    kwargs = dict(max_new_tokens=12, temperature=temperature, top_p=top_p, stop_ids=torch.tensor(STOPS), pad_id=0)
    ours = sample_completions(model, prompt_ids, prompt_mask, generator=torch.Generator().manual_seed(7),
                              to_the_end=False, **kwargs)  # fmt: skip
    torch.manual_seed(7)
    theirs = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=True, max_new_tokens=12,
                            temperature=temperature, top_p=top_p, top_k=0, eos_token_id=STOPS, pad_token_id=0)
    theirs = theirs[:, prompt_ids.shape[1] :]
    assert torch.equal(ours, theirs[:, : ours.shape[1]]) and (theirs[:, ours.shape[1] :] == 0).all()
    ended = torch.isin(ours, torch.tensor(STOPS)).any(1)
    assert ended.any() and not ended.all()  # both kinds of rows were compared
    again = sample_completions(model, prompt_ids, prompt_mask, generator=torch.Generator().manual_seed(7),
                               to_the_end=True, **kwargs)  # fmt: skip
    assert torch.equal(again[:, : ours.shape[1]], ours) and (again[:, ours.shape[1] :] == 0).all()


@pytest.mark.parametrize("kind", tiny.TOKENIZERS)
def test_prompts_are_tokenized_as_trl_on_every_test_tokenizer(tmp_path, kind):
    """The ids the policy answers are TRL OnlineDPOTrainer's: the chat template with the assistant's turn opened
    (conversations) or the text as it is (strings), no special tokens added — with or without a BOS token, and when
    BPE merges across what would be the prompt/answer boundary."""
    from trl.data_utils import maybe_apply_chat_template

    from nanodpo.config import DPOConfig, parse_config

    rows = [{"prompt": r["prompt"]} for kind_ in ("explicit", "conversational") for r in tiny.preference_rows(6, kind_)]
    tiny.write_jsonl(tmp_path / "prompts.jsonl", rows)
    cfg = parse_config(DPOConfig, ["--dataset", str(tmp_path / "prompts.jsonl"), "--online", "--judge",
                                   "tests.online_judges:char_score", "--max_new_tokens", "8"])  # fmt: skip
    tokenizer = tiny.make_tokenizer(kind=kind)
    examples = online.load_prompts(cfg, tokenizer, "train")
    for row, example in zip(rows, examples):
        text = maybe_apply_chat_template(row, tokenizer)["prompt"]
        assert example["prompt_ids"] == tokenizer(text=text, add_special_tokens=False)["input_ids"], row


def test_draw_seeds_depend_on_the_draws_only():
    assert online.draw_seed(0, [4, 5]) == online.draw_seed(0, [4, 5]) != online.draw_seed(0, [5, 4])
    assert online.draw_seed(0, [4, 5]) != online.draw_seed(1, [4, 5])
    sampler = online.EpochDraws(3, shuffle=False, seed=0)
    sampler.set_epoch(2)
    assert list(sampler) == [6, 7, 8]


# ----------------------------------------------------------------------------------------------------------------
# Parity with TRL's OnlineDPOTrainer


def run_trl(workdir: Path, out: Path, replay: list, monkeypatch, *, dataset: str, reward_funcs, policy=None,
            loss_type="sigmoid", reward_weights=None, peft_config=None, steps=STEPS, learning_rate=1e-3):  # fmt: skip
    """TRL's OnlineDPOTrainer on the answers nanodpo sampled (`replay`, in order); its records and exact losses."""
    from datasets import load_dataset
    from trl.data_utils import maybe_apply_chat_template
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer
    from trl.experimental.utils import truncate_right

    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")

    def replay_generate(self, model, prompts, images=None):
        prompt_ids, prompt_mask, completion_ids = replay.pop(0)
        texts = [maybe_apply_chat_template({"prompt": p}, self.processing_class)["prompt"] for p in prompts]
        own = self.processing_class(text=texts, return_tensors="pt", padding=True, padding_side="left",
                                    add_special_tokens=False)  # fmt: skip
        assert torch.equal(own["input_ids"].repeat(2, 1), prompt_ids)  # the same prompts, tokenized alike
        assert torch.equal(own["attention_mask"].repeat(2, 1), prompt_mask)
        completion_ids, completion_mask = truncate_right(completion_ids, self.eos_token_ids, tokenizer.pad_token_id)
        return prompt_ids, prompt_mask, completion_ids, completion_mask, None

    real_forward, real_step = OnlineDPOTrainer._forward, OnlineDPOTrainer.training_step

    def masked_forward(self, model, prompt_ids, prompt_mask, completion_ids, completion_mask, vision_inputs=None):
        return real_forward(self, model, prompt_ids, prompt_mask, completion_ids, completion_mask) * completion_mask

    losses = []

    def recording_step(self, model, inputs, num_items_in_batch=None):
        loss = real_step(self, model, inputs, num_items_in_batch)
        losses.append(loss.item() * self.args.gradient_accumulation_steps)
        return loss

    monkeypatch.setattr(OnlineDPOTrainer, "_generate", replay_generate)
    monkeypatch.setattr(OnlineDPOTrainer, "_forward", masked_forward)
    monkeypatch.setattr(OnlineDPOTrainer, "training_step", recording_step)
    args = OnlineDPOConfig(
        output_dir=str(out), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=steps,
        learning_rate=learning_rate, lr_scheduler_type="constant", logging_steps=1, seed=0,
        train_sampling_strategy="sequential", report_to="none", bf16=False, gradient_checkpointing=False,
        use_cpu=True, save_strategy="no",
        beta=[0.1], loss_type=loss_type, max_new_tokens=8, max_length=512, missing_eos_penalty=0.5,
        reward_weights=reward_weights, disable_tqdm=True,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=torch.float32)
    trainer = OnlineDPOTrainer(
        model=model, reward_funcs=reward_funcs, args=args, processing_class=tokenizer, peft_config=peft_config,
        train_dataset=load_dataset("json", data_files=str(workdir / dataset), split="train"),
    )  # fmt: skip
    if policy is not None:  # nanodpo's starting adapter (the same init, drawn in nanodpo's order)
        adapter = {k: v for k, v in policy.state_dict().items() if "lora_" in k}
        missing = trainer.model.load_state_dict(adapter, strict=False)
        assert not missing.unexpected_keys and adapter
    # TRL's training_step (replacing Trainer's, which divides the loss by the accumulation) backpropagates each
    # micro-batch's loss whole: its step's gradient is the SUM over micro-batches, 2x the mean (DPOTrainer's objective,
    # and nanodpo's). Divided here, as Trainer would.
    backward = trainer.accelerator.backward
    trainer.accelerator.backward = lambda loss, **kwargs: backward(loss / args.gradient_accumulation_steps, **kwargs)
    trainer.train()
    assert not replay
    records = [r for r in trainer.state.log_history if "objective/kl" in r]
    for record, step_losses in zip(records, zip(losses[::2], losses[1::2])):
        record["loss"] = sum(step_losses) / 2  # the mean of the step's micro-batch losses, unrounded
    return records


def run_nanodpo_recorded(workdir: Path, out: Path, monkeypatch, **overrides) -> tuple[list[dict], list]:
    """train_dpo.py --online; its records and every micro-batch's (prompt_ids, prompt_mask, answers)."""
    recorded = []

    def recording(model, prompt_ids, prompt_mask, **kwargs):
        completion_ids = sample_completions(model, prompt_ids, prompt_mask, **kwargs)
        recorded.append((prompt_ids.clone(), prompt_mask.clone(), completion_ids.clone()))
        return completion_ids

    monkeypatch.setattr(online, "sample_completions", recording)
    train_dpo.main(options(workdir, out, **overrides))
    monkeypatch.undo()
    return train_records(out), recorded


def test_full_fine_tuning_matches_trl(workdir, tmp_path, monkeypatch):
    ours, replay = run_nanodpo_recorded(workdir, tmp_path / "nano", monkeypatch)
    ended = torch.cat([torch.isin(ids, torch.tensor(STOPS)).any(1) for _, _, ids in replay])
    assert 0.2 < ended.float().mean() < 0.8  # answers of both kinds: padding after EOS, and the penalty
    theirs = run_trl(workdir, tmp_path / "trl", replay, monkeypatch, dataset="prompts.jsonl",
                     reward_funcs=online_judges.char_score)  # fmt: skip
    worst = tiny.assert_curves_close(ours, theirs, COMPARED, STEPS, rtol=1e-4, first_step_rtol=1e-6)
    print("full fine-tuning, largest relative difference to TRL:", worst)
    # It trained: the policy moved away from the reference, and prefers the answers the judge chose.
    assert ours[-1]["objective/kl"] > 0.05 and sum(r["rewards/margins"] for r in ours[1:]) > 0


def test_lora_with_a_reward_model_and_weights_matches_trl(workdir, tmp_path, monkeypatch):
    """LoRA (the reference: the adapter off, in both), conversational prompts, two judges summed with weights: the
    reward model (its own tokenizer and chat template) and a function."""
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification

    from nanodpo.config import DPOConfig, parse_config
    from nanodpo.model import load_policy
    from nanodpo.training import seed_everything

    lora = dict(use_lora=True, lora_r=8, lora_alpha=16, learning_rate=1e-2, dataset=str(workdir / "chat_prompts.jsonl"),
                reward_model=str(workdir / "reward_model"), reward_weights=[2.0, 0.5])  # fmt: skip
    ours, replay = run_nanodpo_recorded(workdir, tmp_path / "nano", monkeypatch, **lora)
    cfg = parse_config(DPOConfig, options(workdir, tmp_path / "unused", **lora))
    seed_everything(cfg.seed)
    policy = load_policy(cfg)  # the starting adapter, as train_dpo.py built it
    reward_model = AutoModelForSequenceClassification.from_pretrained(workdir / "reward_model")
    theirs = run_trl(
        workdir, tmp_path / "trl", replay, monkeypatch, dataset="chat_prompts.jsonl", policy=policy,
        reward_funcs=[reward_model, online_judges.char_score], reward_weights=[2.0, 0.5], learning_rate=1e-2,
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
    )  # fmt: skip
    worst = tiny.assert_curves_close(ours, theirs, COMPARED, STEPS, rtol=1e-4, first_step_rtol=1e-6)
    print("LoRA + reward model, largest relative difference to TRL:", worst)
    assert (tmp_path / "nano" / "adapter_config.json").exists()


def test_ipo_matches_trl(workdir, tmp_path, monkeypatch):
    """--online --loss_type ipo is OnlineDPOTrainer's IPO: the summed log-ratios, not DPOTrainer's per-token ones."""
    ours, replay = run_nanodpo_recorded(workdir, tmp_path / "nano", monkeypatch, loss_type="ipo", max_steps=3)
    theirs = run_trl(workdir, tmp_path / "trl", replay, monkeypatch, dataset="prompts.jsonl", loss_type="ipo",
                     reward_funcs=online_judges.char_score, steps=3)  # fmt: skip
    # objective/kl ~0.01 is a difference of log-probs ~50: fp32 leaves it ~3e-6 (3e-4 of the 0.01 floor) in both.
    worst = tiny.assert_curves_close(ours, theirs, COMPARED, 3, rtol=1e-3, first_step_rtol=1e-6)
    print("ipo, largest relative difference to TRL:", worst)
    assert ours[0]["loss"] == pytest.approx((1 / (2 * 0.1)) ** 2)  # policy = reference: h = 0


# ----------------------------------------------------------------------------------------------------------------
# What a run writes


def test_metrics_samples_and_columns(workdir, tmp_path):
    """TRL's metric names every step; samples.jsonl every --logging_steps with what the judge preferred; a judge
    reading a column of the prompt rows gets it (repeated for the two answers)."""
    out = tmp_path / "out"
    train_dpo.main(options(workdir, out, judge="tests.online_judges:needs_row", max_steps=4, logging_steps=2,
                           log_samples=3, missing_eos_penalty=None))  # fmt: skip
    records = train_records(out)
    assert [r["step"] for r in records] == [2, 4]
    for name in COMPARED + ["completions/mean_length", "grad_norm", "num_tokens"]:
        assert name in records[0], name
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [2, 2, 2, 4, 4, 4]
    for s in samples:
        assert s["split"] == "train" and s["chosen_score"] >= s["rejected_score"]
        assert set(s) == {"step", "split", "prompt", "chosen", "rejected", "chosen_score", "rejected_score"}
        row = int(s["chosen_score"])  # needs_row: the row number, plus the answer's length / 1000
        assert s["chosen_score"] == pytest.approx(row + len(s["chosen"]) / 1000)


def test_eval_on_held_out_prompts(workdir, tmp_path):
    out = tmp_path / "out"
    train_dpo.main(options(workdir, out, max_steps=2, eval_dataset=str(workdir / "chat_prompts.jsonl"),
                           dataset=str(workdir / "chat_prompts.jsonl"), max_eval_samples=6, eval_steps=1))  # fmt: skip
    evals = [r for r in read_metrics(out / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [1, 2]
    for name in ("eval_objective/scores", "eval_objective/kl", "eval_val/contain_eos_token", "eval_rewards/margins"):
        assert name in evals[0], name
    assert evals[0]["eval_objective/kl"] != 0  # after one update the policy is no longer the reference


# ----------------------------------------------------------------------------------------------------------------
# Bad input: a clear error before anything is written


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"max_new_tokens": 0}, "--max_new_tokens must be >= 1"),
        ({"judge": "tests.online_judges:one_short"}, "returned 3 values for 4 answers"),
        ({"judge": "tests.online_judges:nan_for_empty"}, "scored answer 0 nan"),
        ({"judge": "tests.online_judges:missing"}, "has no function missing"),
        ({"judge": "no_such_module_xyz:f"}, "cannot import no_such_module_xyz"),
        ({"judge": []}, "--online needs a judge"),
        ({"reward_weights": [1.0, 2.0]}, "--reward_weights has 2 value(s) but there are 1 judge(s)"),
        ({"online": False}, "--judge applies to online DPO"),
        ({"loss_type": "kto"}, "--loss_type kto is not one"),
        ({"precompute_ref_logps": True}, "nothing to precompute"),
        ({"loss_type": ["ipo", "sigmoid"]}, "OnlineDPOTrainer's IPO"),
        ({"max_length": 8}, "leaves no room for a prompt"),
    ],
)
def test_bad_options_and_judges_are_refused_before_anything_is_written(workdir, tmp_path, overrides, message):
    out = tmp_path / "out"
    with pytest.raises(UserError) as err:
        train_dpo.main(options(workdir, out, **overrides))
    assert message in str(err.value)
    assert not out.exists()


def test_a_causal_lm_as_reward_model_is_refused(workdir, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserError, match="not a sequence\nclassifier|not a sequence classifier"):
        train_dpo.main(options(workdir, out, reward_model=str(workdir / "model")))
    assert not out.exists()


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "Hi", "chosen": " Hello."}, "online DPO samples its own answers"),
        ({"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
         "its last message is from 'assistant'"),
        ({"messages": [{"role": "user", "content": "Hi"}]}, "samples its own answers"),
        ({"question": "Hi"}, "missing; online DPO rows need a 'prompt'"),
        ({"prompt": ""}, "the prompt has no tokens"),
    ],
)  # fmt: skip
def test_prompts_with_answers_are_refused(workdir, tmp_path, row, message):
    tiny.write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Fine."}, row])
    out = tmp_path / "out"
    with pytest.raises(UserError) as err:
        train_dpo.main(options(workdir, out, dataset=str(tmp_path / "bad.jsonl")))
    assert message in str(err.value) and "bad.jsonl, row 2" in str(err.value)
    assert not out.exists()


def test_checked_scores_names_the_judge_and_the_answer():
    import numpy as np

    assert online.checked_scores(torch.tensor([1, 2.5]), "j", ["p", "q"], ["a", "b"]).tolist() == [1.0, 2.5]
    assert online.checked_scores([np.float32(0.5), 2], "j", ["p", "q"], ["a", "b"]).tolist() == [0.5, 2.0]
    with pytest.raises(UserError, match="judge j scored answer 1 inf"):
        online.checked_scores([0.0, math.inf], "j", ["p", "q"], ["a", "b"])
    with pytest.raises(UserError, match="judge j scored answer 0 None"):
        online.checked_scores([None, 1.0], "j", ["p", "q"], ["a", "b"])
    with pytest.raises(UserError, match="returned a float for 2 answers"):
        online.checked_scores(1.0, "j", ["p", "q"], ["a", "b"])


def test_qlora(workdir, tmp_path):
    """A 4-bit base with a LoRA adapter samples, is judged and trains; the reference is the adapter off."""
    out = tmp_path / "out"
    train_dpo.main(options(workdir, out, use_lora=True, load_in_4bit=True, lora_r=8, lora_alpha=16,
                           learning_rate=1e-2, max_steps=3))  # fmt: skip
    records = train_records(out)
    assert len(records) == 3 and records[0]["objective/kl"] == 0 and records[-1]["objective/kl"] != 0
    assert (out / "adapter_model.safetensors").exists()


def test_samples_go_to_every_tracker(tmp_path):
    """samples.jsonl, a wandb table and tensorboard text, at the step of the record they come with."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from nanodpo.config import DPOConfig, parse_config
    from nanodpo.tracking import Tracker

    rows = [{"split": "train", "prompt": "Hi", "chosen": "Hello | there", "rejected": "Go", "chosen_score": 2.0,
             "rejected_score": 1.0}]  # fmt: skip
    pending = [rows]
    cfg = parse_config(DPOConfig, ["--report_to", "tensorboard", "--output_dir", str(tmp_path)])
    logged = []
    with Tracker(cfg, tmp_path, {}, samples=lambda: pending.pop() if pending else []) as tracker:
        tracker.wandb_run = type("Run", (), {"log": lambda self, data, step: logged.append((data, step))})()
        tracker.log({"loss": 0.5}, step=3)
        tracker.log({"loss": 0.4}, step=4)  # nothing new sampled: no rows
        tracker.wandb_run = None
    assert [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()] == [
        {"step": 3, **rows[0]}
    ]
    (table, step), = [(data["samples"], step) for data, step in logged if "samples" in data]
    assert step == 3 and table.columns[:3] == ["step", "split", "prompt"] and table.data[0][4] == "Go"
    runs = list((tmp_path / "runs").iterdir())
    accumulator = EventAccumulator(str(runs[0]))
    accumulator.Reload()
    assert "samples/text_summary" in accumulator.Tags()["tensors"]
    text = accumulator.Tensors("samples/text_summary")[0]
    assert text.step == 3 and b"Hello \\| there" in text.tensor_proto.string_val[0]
