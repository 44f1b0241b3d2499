"""train_pt.py: the loss equals the HF model's own `labels=input_ids` loss, packed rows equal documents run alone,
streaming equals in-memory, from-scratch overrides apply, and throughput/MFU/perplexity are logged."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import train_pt
from nanodpo.errors import UserError
from nanodpo.tracking import read_metrics
from tests import tiny

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fresh_accelerate_state")]
ROOT = Path(__file__).resolve().parents[1]
TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * (1 + i % 3) + f"Story number {i}." for i in range(12)
] + ["你好，今天天气很好。" * (1 + i % 2) for i in range(4)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pt")
    tiny.make_model_dir(root / "model", seed=3)
    tiny.write_jsonl(root / "corpus.jsonl", [{"text": t} for t in TEXTS])
    return root


def run(workdir, out, *extra):
    argv = [
        "--model", str(workdir / "model"), "--dataset", str(workdir / "corpus.jsonl"), "--output_dir", str(out),
        "--max_steps", "1", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
        "--max_length", "64", "--optim", "sgd", "--learning_rate", "0.1", "--train_sampling_strategy", "sequential",
        "--logging_steps", "1", "--disable_tqdm", "--lr_scheduler_type", "constant", *extra,
    ]  # fmt: skip
    train_pt.main(argv)
    return [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def hf_token_mean_loss(model_dir, sequences: list[list[int]]) -> float:
    """The HF model's own loss (labels=input_ids), each sequence alone, averaged over all scored tokens."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in sequences:
            x = torch.tensor([ids])
            loss = model(input_ids=x, labels=x).loss.item()
            total += loss * (len(ids) - 1)
            count += len(ids) - 1
    return total / count


def tokenized(workdir):
    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    return [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in TEXTS]


def test_wrapped_loss_equals_hf_labels_loss(workdir, tmp_path):
    """Concatenate-and-chunk rows are plain sequences: the logged step loss is HF's loss over the step's rows."""
    logged = run(workdir, tmp_path / "out", "--packing_strategy", "wrapped")
    stream = [t for ids in tokenized(workdir) for t in ids]
    rows = [stream[i : i + 64] for i in range(0, len(stream), 64)][:8]  # the first step: 4 × 2 rows, in order
    assert logged[0]["loss"] == pytest.approx(hf_token_mean_loss(workdir / "model", rows), rel=1e-5)


def test_bfd_packed_loss_equals_documents_alone(workdir, tmp_path):
    """bfd rows with block-causal masks: the step loss is the token mean of every document run alone (the first
    token of each document is not scored, as in a document run alone)."""
    logged = run(workdir, tmp_path / "out", "--per_device_train_batch_size", "16", "--gradient_accumulation_steps", "1")
    docs = tokenized(workdir)  # all rows fit in this one step, so every document is scored once
    assert logged[0]["loss"] == pytest.approx(hf_token_mean_loss(workdir / "model", docs), rel=1e-5)
    assert 0 < logged[0]["packing_efficiency"] <= 1


def test_streaming_equals_in_memory(workdir, tmp_path):
    in_memory = run(workdir, tmp_path / "mem", "--max_steps", "3", "--per_device_train_batch_size", "2",
                    "--gradient_accumulation_steps", "1", "--logging_steps", "1")  # fmt: skip
    streamed = run(workdir, tmp_path / "stream", "--max_steps", "3", "--per_device_train_batch_size", "2",
                   "--gradient_accumulation_steps", "1", "--logging_steps", "1", "--streaming",
                   "--stream_buffer_docs", "100")  # fmt: skip
    for a, b in zip(in_memory, streamed, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)


def test_from_scratch_with_overrides_logs_throughput(tmp_path):
    tiny.write_jsonl(tmp_path / "corpus.jsonl", [{"text": t} for t in TEXTS])
    tiny.write_jsonl(tmp_path / "eval.jsonl", [{"text": t} for t in TEXTS[:4]])
    out = tmp_path / "out"
    train_pt.main([
        "--model", "nanodpo-tiny", "--from_scratch", "--hidden_size", "64", "--num_hidden_layers", "2",
        "--intermediate_size", "96", "--num_attention_heads", "4", "--num_key_value_heads", "2",
        "--dataset", str(tmp_path / "corpus.jsonl"), "--eval_dataset", str(tmp_path / "eval.jsonl"),
        "--output_dir", str(out), "--max_steps", "4", "--max_length", "64", "--learning_rate", "3e-3",
        "--per_device_train_batch_size", "4", "--logging_steps", "1", "--peak_tflops", "0.5", "--disable_tqdm",
    ])  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]) == (64, 2, 96)
    records = read_metrics(out / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 for r in train)
    assert train[-1]["loss"] < train[0]["loss"]
    final_eval = [r for r in records if "eval_loss" in r][-1]
    assert final_eval["eval_perplexity"] == pytest.approx(math.exp(final_eval["eval_loss"]), rel=1e-6)


def test_missing_text_column_is_refused(workdir, tmp_path):
    tiny.write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, {"content": "no text column here"}])
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(ROOT / "train_pt.py"), "--model", str(workdir / "model"), "--dataset",
         str(tmp_path / "bad.jsonl"), "--output_dir", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "bad.jsonl, row 2" in result.stderr and "text" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


def test_no_row_length_is_refused(workdir, tmp_path):
    """Pretraining packs into rows of --max_length tokens: `--max_length none` is refused before anything loads."""
    argv = ["--model", str(workdir / "model"), "--dataset", str(tmp_path / "any.jsonl"), "--output_dir",
            str(tmp_path / "out"), "--max_length", "none"]  # fmt: skip
    with pytest.raises(UserError, match="pretraining packs documents into rows of --max_length tokens"):
        train_pt.main(argv)
    assert not (tmp_path / "out").exists()
