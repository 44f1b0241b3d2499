"""The GPU suite: what a CPU cannot run — bf16 on CUDA, bitsandbytes 4-bit (QLoRA), flash-attention's varlen kernel,
FSDP2 and DeepSpeed ZeRO-2/3 over NCCL on 2 GPUs, and the bench's CUDA numbers (tokens/s, MFU, peak memory) against TRL.

Run it on any CUDA machine, from the repository root, with one command:

    pytest -m gpu tests/gpu -v -s            # -s shows the measured numbers (bench table, FSDP2 gaps)

Without CUDA every test here is skipped with the reason (the default `pytest` run collects and skips them). Tests
that need more are skipped with theirs: flash-attention when `flash_attn` does not import (pip install flash-attn
--no-build-isolation), the FSDP2 and DeepSpeed tests below 2 GPUs.

Reviewed against the libraries' documentation (November 2026):
  * bf16: `Accelerator(mixed_precision="bf16")` autocasts the forward (train_*.py --bf16); weights stay fp32.
  * fp16 (T4/V100): `Accelerator(mixed_precision="fp16")` autocasts to float16 and scales the loss with a CUDA
    `GradScaler` (backward scales, clip_grad_norm_ unscales, the prepared optimizer's step is the scaler's step and
    update); an overflow the loop skips must still `update()` the scaler (training.decide_update).
  * QLoRA: transformers' `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=
    bfloat16)`; the quantized model must be placed on its GPU while loading (`device_map`), which
    nanodpo.model.load_pretrained does; `prepare_model_for_kbit_training`'s steps are nanodpo's
    `prepare_for_kbit_training`. (bitsandbytes' FSDP-QLoRA guide: a float `bnb_4bit_quant_storage` for sharding.)
  * flash-attention varlen: transformers' padding-free path — one row [1, N] with `position_ids` restarting at 0 per
    sequence and the precomputed `cu_seq_lens_q/k`, `max_length_q/k` (what `DataCollatorWithFlattening(
    return_flash_attn_kwargs=True)` gives), no attention_mask; nanodpo.packing.collate_packed builds exactly that.
  * FSDP2: accelerate's `fsdp_version: 2` config (configs/accelerate/fsdp2_full.yaml) under `accelerate launch`,
    NCCL; the global batch kept equal between 2 processes and 1 (per_device × accumulation × processes).
  * DeepSpeed: configs/accelerate/zero2.yaml / zero3.yaml under `accelerate launch` (its DeepSpeed plugin builds the
    engine config; `bf16` comes from `Accelerator(mixed_precision=...)`, i.e. --bf16); the reference engine as TRL's
    `prepare_deepspeed`.
"""

import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanodpo.tracking import read_metrics
from tests import tiny

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="no CUDA device: the GPU suite (bf16, bnb 4-bit, flash-attention varlen, FSDP2 and DeepSpeed over "
        "NCCL, the CUDA bench) runs on a CUDA machine with `pytest -m gpu tests/gpu`",
    ),
]


def env() -> dict:
    e = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), e.get("PYTHONPATH", "")])
    return e


def run(cmd: list[str], timeout: int = 900) -> str:
    done = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-6000:]
    return done.stdout + done.stderr


def train(script: str, options: dict, launcher: list[str] | None = None) -> str:
    argv = [item for key, value in options.items() for item in (f"--{key}", str(value))]
    return run([*(launcher or [sys.executable]), str(ROOT / script), *argv])


def records(out: Path) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    tiny.make_model_dir(root / "model", seed=0)
    tiny.write_jsonl(root / "dpo.jsonl", tiny.preference_rows(16))
    tiny.write_jsonl(root / "sft.jsonl", [{"prompt": r["prompt"], "completion": r["chosen"]}
                                          for r in tiny.preference_rows(16)])  # fmt: skip
    return root


def common(workdir: Path, out: Path, **overrides) -> dict:
    options = {
        "model": str(workdir / "model"), "output_dir": str(out), "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2, "max_steps": 4, "learning_rate": 1e-3, "max_length": 64,
        "lr_scheduler_type": "constant", "logging_steps": 1, "train_sampling_strategy": "sequential", "seed": 0,
        "report_to": "jsonl", "disable_tqdm": "true",
    }  # fmt: skip
    return {**options, **overrides}


def assert_close_curves(ours: list[dict], ref: list[dict], keys: tuple[str, ...], rtol: float, label: str) -> None:
    assert [r["step"] for r in ours] == [r["step"] for r in ref] and ours
    worst = 0.0
    for a, b in zip(ours, ref):
        for key in keys:
            gap = abs(a[key] - b[key]) / max(abs(b[key]), 1e-2)
            worst = max(worst, gap)
            assert gap <= rtol, f"{label} step {a['step']} {key}: {a[key]} vs {b[key]}"
    print(f"{label}: largest relative gap {worst:.1e}")


def test_bf16_dpo_and_sft_track_fp32(workdir, tmp_path):
    """--bf16 on CUDA (autocast, fp32 weights) trains DPO and SFT like fp32 does: the same curves to bf16 precision
    (2e-2 relative on loss and log-probs over 4 steps), finite, the loss going down."""
    for script, data, keys in (("train_dpo.py", "dpo.jsonl", ("loss", "logps/chosen", "logps/rejected")),
                               ("train_sft.py", "sft.jsonl", ("loss",))):  # fmt: skip
        name = script.removeprefix("train_").removesuffix(".py")
        opts = dict(dataset=str(workdir / data))
        train(script, common(workdir, tmp_path / f"{name}_bf16", bf16="true", **opts))
        train(script, common(workdir, tmp_path / f"{name}_fp32", **opts))
        bf16, fp32 = records(tmp_path / f"{name}_bf16"), records(tmp_path / f"{name}_fp32")
        assert_close_curves(bf16, fp32, keys, rtol=2e-2, label=f"{name} bf16 vs fp32")
        assert bf16[-1]["loss"] < bf16[0]["loss"]


OVERFLOW_AT_BACKWARD = """
import os, sys
overflow_at = {int(n) for n in sys.argv[1].split(",") if n}; sys.argv = sys.argv[2:]
sys.path.insert(0, os.getcwd())
from accelerate import Accelerator
original, calls = Accelerator.backward, [0]
def backward(self, loss, **kwargs):
    calls[0] += 1
    if calls[0] in overflow_at:  # the loss's value unchanged, its gradient x1e36: past fp16's range
        loss = loss + 1e36 * (loss - loss.detach())
    return original(self, loss, **kwargs)
Accelerator.backward = backward
import runpy
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def overflowing(options: dict, backward_calls: list[int]) -> None:
    """train_dpo.py with `options`, its backward calls numbered in `backward_calls` (from 1) overflowing fp16."""
    argv = [item for key, value in options.items() for item in (f"--{key}", str(value))]
    calls = ",".join(map(str, backward_calls))
    run([sys.executable, "-c", OVERFLOW_AT_BACKWARD, calls, str(ROOT / "train_dpo.py"), *argv])


def nonfinite(value) -> bool:
    return value in ("inf", "-inf", "nan")  # how metrics.jsonl writes them (JSON has no inf)


def test_fp16_dpo_survives_overflows_and_resumes_with_its_scale(workdir, tmp_path):
    """--fp16 on CUDA (float16 autocast, accelerate's GradScaler from 2^16), the T4/V100 setting. Steps 1 and 3 are
    made to overflow (micro-batches 1 and 5, 2 per step), as fp16 runs do early on; the tiny model may overflow on
    its own too. Each overflowed step is skipped and halves the scale; the next step runs (before issue 23 it raised
    "unscale_() has already been called"); none counts as non-finite; the loss goes down. Resumed from checkpoint-2
    (scaler.pt) with step 3 overflowing again, the run logs the uninterrupted run's loss scales and overflow counts
    exactly, its losses to 1e-3 (GPU kernels need not be bit-reproducible)."""
    straight = tmp_path / "straight"
    options = common(workdir, straight, dataset=str(workdir / "dpo.jsonl"), fp16="true", max_steps=8, save_steps=2)
    overflowing(options, [1, 5])
    ours = records(straight)
    by_step = {r["step"]: r for r in ours}
    assert sorted(by_step) == list(range(1, 9))
    for step in (1, 3):
        assert nonfinite(by_step[step]["grad_norm"]), by_step[step]
        assert by_step[step + 1]["loss_scale"] == by_step[step]["loss_scale"] / 2
    overflowed = [r["step"] for r in ours if nonfinite(r["grad_norm"])]
    assert [r["overflow_steps_skipped"] for r in ours] == [sum(s <= r["step"] for s in overflowed) for r in ours]
    assert len(overflowed) < len(ours) and not any("nonfinite_steps_skipped" in r for r in ours)
    assert all(math.isfinite(r["loss"]) for r in ours) and ours[-1]["loss"] < ours[0]["loss"]
    print(f"fp16: overflowed steps {overflowed}, loss scales {[r['loss_scale'] for r in ours]}")

    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    for late in resumed.glob("checkpoint-*"):
        if late.name != "checkpoint-2":
            shutil.rmtree(late)
    overflowing({**options, "output_dir": str(resumed), "resume_from_checkpoint": "latest"}, [1])  # step 3
    again = records(resumed)
    assert [r["step"] for r in again] == [r["step"] for r in ours]
    for a, b in zip(again, ours):
        assert (a["loss_scale"], a["overflow_steps_skipped"]) == (b["loss_scale"], b["overflow_steps_skipped"]), a
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3), (a, b)


def test_qlora_dpo(workdir, tmp_path):
    """QLoRA DPO: bitsandbytes NF4 base (Linear4bit on the GPU), a LoRA adapter, bf16 compute; the reference is the
    same 4-bit model with the adapter off. 4 steps: finite, the loss going down, an adapter saved."""
    bnb = pytest.importorskip("bitsandbytes")
    out = tmp_path / "qlora"
    train("train_dpo.py", common(workdir, out, dataset=str(workdir / "dpo.jsonl"), load_in_4bit="true",
                                 use_lora="true", bf16="true", learning_rate=5e-3, bnb_4bit_quant_type="nf4",
                                 bnb_4bit_compute_dtype="bfloat16"))  # fmt: skip
    steps = records(out)
    assert len(steps) == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert (out / "adapter_model.safetensors").exists()
    # the policy really was 4-bit: load it the way nanodpo does and look
    from nanodpo.config import DPOConfig, parse_config
    from nanodpo.model import load_policy

    cfg = parse_config(DPOConfig, ["--model", str(workdir / "model"), "--load_in_4bit", "true", "--use_lora", "true"])
    policy = load_policy(cfg, torch.device("cuda"))
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in policy.modules())


def test_flash_attention_varlen_packed_equals_unpacked(workdir, tmp_path):
    """flash_attention_2's varlen kernel: documents packed into one row [1, N] (position_ids and cu_seq_lens, no
    padding) give each document's log-probs as when it runs alone; and a DPO step in the padding-free layout equals
    the padded batch's. bf16 (flash-attention has no fp32 kernel): within 2e-2."""
    pytest.importorskip("flash_attn", reason="flash_attn does not import (pip install flash-attn --no-build-isolation)")
    from transformers import AutoModelForCausalLM

    from nanodpo.packing import Document, collate_packed, pack_documents
    from nanodpo.training import lm_token_stats

    model = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=torch.bfloat16,
                                                 attn_implementation="flash_attention_2").cuda()  # fmt: skip
    g = torch.Generator().manual_seed(0)
    lengths = (9, 33, 17, 60)
    docs = [Document(torch.randint(3, 500, (n,), generator=g).tolist(), [0] * 4 + [1] * (n - 4)) for n in lengths]

    def logps(rows):
        batch = collate_packed(rows, "flash_attention_2", 0)
        batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
        with torch.no_grad():
            stats = lm_token_stats(model, batch)
        return stats.logps[stats.mask.bool()].float()

    packed = logps(pack_documents(docs, 128))
    alone = torch.cat([logps(pack_documents([doc], 128)) for doc in docs])
    assert packed.shape == alone.shape
    torch.testing.assert_close(packed, alone, rtol=2e-2, atol=2e-2)

    layouts = {"padded": dict(batch_layout="padded"), "padding_free": dict(batch_layout="padding_free")}
    for name, layout in layouts.items():
        # fp32 weights, bf16 autocast: full fine-tuning of bf16 weights on one process is refused (no fp32 copy).
        train("train_dpo.py", common(workdir, tmp_path / name, dataset=str(workdir / "dpo.jsonl"), bf16="true",
                                     dtype="float32", attn_implementation="flash_attention_2", max_steps=1,
                                     **layout))  # fmt: skip
    keys = ("loss", "logps/chosen", "logps/rejected")
    padding_free, padded = records(tmp_path / "padding_free"), records(tmp_path / "padded")
    assert_close_curves(padding_free, padded, keys, rtol=2e-2, label="flash varlen vs padded")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason=f"FSDP2 needs 2 GPUs, found {torch.cuda.device_count()}")
def test_fsdp2_dpo_two_gpus_equal_one(workdir, tmp_path):
    """Full-fine-tuning DPO under configs/accelerate/fsdp2_full.yaml on 2 GPUs (NCCL) with an online reference
    (sharded like the policy) and the chunked LM head, against 1 GPU with twice the accumulation: the same global
    batch and examples. fp32, SGD: step 1 within 1e-4, 3 steps within 1e-3 (GPU reductions are not ordered the same
    across process counts; CPU/gloo gives 1e-6, tests/test_distributed.py)."""
    options = dict(dataset=str(workdir / "dpo.jsonl"), optim="sgd", learning_rate=0.5, max_steps=3)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(ROOT / "configs/accelerate/fsdp2_full.yaml"), "--num_processes", "2", "--mixed_precision", "no"]
    out = train("train_dpo.py", common(workdir, tmp_path / "two", **options), launcher)  # fmt: skip
    assert "accumulation x 2 processes)" in out
    train("train_dpo.py", common(workdir, tmp_path / "one", gradient_accumulation_steps=4, **options))
    two, one = records(tmp_path / "two"), records(tmp_path / "one")
    keys = ("loss", "grad_norm", "logps/chosen", "logps/rejected", "rewards/margins")
    assert_close_curves(two[:1], one[:1], keys, rtol=1e-4, label="fsdp2 2 GPUs vs 1, step 1")
    assert_close_curves(two, one, keys, rtol=1e-3, label="fsdp2 2 GPUs vs 1")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason=f"DeepSpeed needs 2 GPUs, found {torch.cuda.device_count()}")
@pytest.mark.parametrize("config", ["zero2.yaml", "zero3.yaml"])
def test_deepspeed_dpo_two_gpus_equal_one(workdir, tmp_path, config):
    """Full-fine-tuning DPO under configs/accelerate/zero2.yaml / zero3.yaml on 2 GPUs (NCCL; DeepSpeed's CUDA
    accelerator) with an online reference (an inference-only engine, partitioned under ZeRO-3) and the chunked LM
    head, against 1 GPU without DeepSpeed with twice the accumulation: fp32, SGD, step 1 within 1e-4, 3 steps within
    1e-3 (tests/test_deepspeed.py runs the same on CPU/gloo to 1e-6). Then --bf16 under the same config (DeepSpeed's
    bf16 engine: bf16 weights, fp32 master copy) tracks the fp32 run to bf16 precision (2e-2), loss going down."""
    pytest.importorskip("deepspeed", reason="pip install -e '.[deepspeed]'")
    options = dict(dataset=str(workdir / "dpo.jsonl"), optim="sgd", learning_rate=0.5, max_steps=3)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(ROOT / "configs/accelerate" / config), "--num_processes", "2", "--mixed_precision", "no"]
    out = train("train_dpo.py", common(workdir, tmp_path / "two", **options), launcher)  # fmt: skip
    assert "accumulation x 2 processes)" in out
    train("train_dpo.py", common(workdir, tmp_path / "one", gradient_accumulation_steps=4, **options))
    two, one = records(tmp_path / "two"), records(tmp_path / "one")
    keys = ("loss", "grad_norm", "logps/chosen", "logps/rejected", "rewards/margins")
    assert_close_curves(two[:1], one[:1], keys, rtol=1e-4, label=f"{config} 2 GPUs vs 1, step 1")
    assert_close_curves(two, one, keys, rtol=1e-3, label=f"{config} 2 GPUs vs 1")
    launcher[-1] = "bf16"
    train("train_dpo.py", common(workdir, tmp_path / "two_bf16", bf16="true", **options), launcher)
    bf16 = records(tmp_path / "two_bf16")
    assert_close_curves(bf16, two, ("loss", "logps/chosen", "logps/rejected"), rtol=2e-2, label=f"{config} bf16")
    assert bf16[-1]["loss"] < bf16[0]["loss"]


def test_bench_dpo_on_cuda_prints_tokens_per_s_mfu_and_peak_memory_vs_trl(tmp_path):
    """`python -m nanodpo.tools.bench dpo --quick` on CUDA: every implementation's tokens/s, MFU (known GPUs; else pass
    --peak_tflops) and peak CUDA memory, nanodpo's final metrics agreeing with TRL's to bf16 precision."""
    out = run([sys.executable, "-m", "nanodpo.tools.bench", "dpo", "--quick", "--workdir", str(tmp_path)], timeout=1800)
    print(out[-4000:])
    assert "peak CUDA MB" in out
    for name in ("nanodpo", "trl", "nanodpo-precomputed", "plain"):
        assert re.search(rf"^{re.escape(name)}\s+\d+\s", out, re.M), name
    if "MFU" not in out:
        pytest.fail(f"no MFU printed: {torch.cuda.get_device_name()} is not in nanodpo.tools.bench.PEAK_TFLOPS")
    # bf16 on both sides (the bench's GPU setting): agreement to bf16 precision, not the CPU's fp32 1e-3
    gap = float(re.search(r"-> (?:agree|DISAGREE) \(largest relative gap ([0-9.e+-]+)", out).group(1))
    assert gap <= 2e-2, out[-3000:]
