"""The chunked LM head's memory saving, measured: peak RSS of a DPO training step, readable path vs chunked path.

Each path runs train_dpo.py in a process of its own (peak RSS, `ru_maxrss`, is a per-process high-water mark), on
the same model and data: Qwen2 with Qwen2.5's vocabulary of 151,936 (hidden 64, 2 layers, random init, fp32, so
the LM head's [tokens, 151,936] logits dominate as they do for a real model at these lengths), 4 preference pairs
of up to 512 tokens per optimizer step (2 micro-batches of 2 pairs), an online reference (full fine-tuning), one
step. The readable path (`--logps readable --batch_layout padded`) holds the padded batch's full fp32 logits and
log-softmax (4 sequences x 512 x 151,936 x 4 bytes = 1.2 GB each); the chunked path never more than two chunks of 256
tokens.
The chunked process's peak must be at most 0.7x the readable one's (measured: see the printed line with -s).

The same measurement checks the memory plan's logits formula (nanodpo/tools/memplan.py `logits_bytes`): the readable
peak above the chunked one is predicted from the padded micro-batch's token count within 25%.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nanodpo.fast.chunked_head import CHUNK_SIZE
from nanodpo.tools.bench import VOCAB_SIZE, make_model_dir, make_rows, write_data
from nanodpo.tools.memplan import logits_bytes

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, resource, sys
import train_dpo
train_dpo.main(json.loads(sys.argv[1]))
print("PEAK_RSS_MB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, flush=True)
"""


def peak_rss_mb(argv: list[str], tmp_path: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "NANODPO_CACHE": str(tmp_path)}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(argv)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "optimizer steps: 1" in done.stdout
    return float(done.stdout.split("PEAK_RSS_MB")[1].split()[0])


def test_chunked_head_peak_rss_at_most_0_7_of_readable(tmp_path):
    size = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=256)
    make_model_dir(tmp_path / "model", size)
    data = write_data(tmp_path, "dpo", make_rows(4, scale=1.0, seed=3))
    common = [
        "--model", str(tmp_path / "model"), "--dataset", str(data), "--max_length", "512", "--max_steps", "1",
        "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--disable_tqdm", "true",
        "--train_sampling_strategy", "sequential",
    ]  # fmt: skip
    readable = peak_rss_mb([*common, "--output_dir", str(tmp_path / "readable"), "--logps", "readable",
                            "--batch_layout", "padded"], tmp_path)  # fmt: skip
    chunked = peak_rss_mb([*common, "--output_dir", str(tmp_path / "chunked")], tmp_path)
    print(f"peak RSS per process: readable {readable:.0f} MB, chunked {chunked:.0f} MB, ratio {chunked / readable:.2f}")
    assert chunked <= 0.7 * readable, (chunked, readable)

    tokens = max(padded_micro_batch_tokens(common))
    predicted = (logits_bytes(VOCAB_SIZE, tokens, "readable", autocast_bf16=False)
                 - logits_bytes(VOCAB_SIZE, tokens, "chunked", chunk_size=CHUNK_SIZE["cpu"])) / 2**20  # fmt: skip
    print(f"readable peak above chunked: measured {readable - chunked:.0f} MB, memory plan {predicted:.0f} MB")
    assert abs((readable - chunked) - predicted) <= 0.25 * predicted


def padded_micro_batch_tokens(argv: list[str]) -> list[int]:
    """[chosen; rejected] positions of each readable-path micro-batch (2 pairs, padded to the longest)."""
    from nanodpo.config import DPOConfig, parse_config
    from nanodpo.dpo_batch import PreferenceCollator
    from nanodpo.dpo_data import load_preference_data
    from nanodpo.model import load_tokenizer

    cfg = parse_config(DPOConfig, argv + ["--output_dir", "unused"])
    tokenizer = load_tokenizer(cfg)
    examples = load_preference_data(cfg, tokenizer)
    collate = PreferenceCollator(tokenizer.pad_token_id, cfg.max_length, cfg.truncation_mode)
    return [collate(examples[i : i + 2])["input_ids"].numel() for i in range(0, len(examples), 2)]
