"""The GPU suite: what a CPU cannot run — bf16 autocast on CUDA, bitsandbytes 4-bit (QLoRA), the chunked LM head's
numbers and host syncs on CUDA, the fused AdamW kernel, flash-attention's varlen kernel, FSDP2 (and DeepSpeed ZeRO-2/3
over NCCL on 2 GPUs), and the real-size bench against TRL (tokens/s, MFU, peak memory).

On a machine with a GPU and no network, run it as scripts/gpu_check.sh does (it installs the carried wheels first;
README.md, "GPU"):

    python -m pytest -m gpu tests/gpu -v -s --timeout 240      # -s shows the measured numbers

Without CUDA every test here is skipped with the reason. Tests that need more are skipped with theirs:
flash-attention when `flash_attn` does not import, the 2-GPU FSDP2 and DeepSpeed tests below 2 GPUs (on one GPU,
FSDP2 runs with one process instead and must equal the plain run). Under scripts/gpu_check.sh a package it carries
(trl, datasets, bitsandbytes) that does not import fails its test instead of skipping it.

Order: the quick in-process checks first, the training runs next, the bench (about 2 minutes) last. The training
runs are each script's main() in this process (a fresh accelerate state each): a Python start-up saved per run.
The tiny model (tests/tiny.py) keeps every run to seconds.

Reviewed against the libraries' documentation (November 2026):
  * bf16: `Accelerator(mixed_precision="bf16")` autocasts the forward (train_*.py --bf16); weights stay fp32.
  * fp16 (T4/V100): `Accelerator(mixed_precision="fp16")` autocasts to float16 and scales the loss with a CUDA
    `GradScaler` (backward scales, clip_grad_norm_ unscales, the prepared optimizer's step is the scaler's step and
    update); an overflow the loop skips must still `update()` the scaler (training.decide_update).
  * QLoRA: transformers' `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=
    bfloat16)`; the quantized model is placed on its GPU while loading (`device_map`), as nanodpo.model.load_pretrained
    does; `prepare_model_for_kbit_training`'s steps are nanodpo's `prepare_for_kbit_training`.
  * flash-attention varlen: transformers' padding-free path — one row [1, N] with `position_ids` restarting at 0 per
    sequence and the precomputed `cu_seq_lens_q/k`, `max_length_q/k`, no attention_mask (nanodpo.packing).
  * FSDP2: accelerate's `fsdp_version: 2` config (configs/accelerate/fsdp2_full.yaml) under `accelerate launch`, NCCL;
    with one process accelerate still shards (a one-rank mesh): the same numbers as no FSDP.
  * DeepSpeed: configs/accelerate/zero2.yaml / zero3.yaml under `accelerate launch`; the reference engine as TRL's
    `prepare_deepspeed`.
"""

import importlib
import math
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from nanodpo.tracking import read_metrics
from tests import tiny

ROOT = Path(__file__).resolve().parents[2]
CHECK_OUT = os.environ.get("NANODPO_GPU_CHECK_OUT")  # set by scripts/gpu_check.sh: where its files go
GPUS = torch.cuda.device_count()

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="no CUDA device: the GPU suite (bf16, bnb 4-bit, the chunked head on CUDA, fused AdamW, "
        "flash-attention varlen, FSDP2 and DeepSpeed over NCCL, the CUDA bench) runs on a CUDA machine: "
        "scripts/gpu_check.sh",
    ),
]


def needs(module: str, carried: bool = True):
    """`module`, imported; else the test is skipped — or, under scripts/gpu_check.sh, fails if the check carries it
    (a missing wheel is a broken check, not a reason to skip)."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        if carried and CHECK_OUT:
            pytest.fail(f"{module} does not import ({err}): scripts/gpu_wheels.sh should have carried it in .whl/")
        pytest.skip(f"{module} does not import ({err})")


def env() -> dict:
    e = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), e.get("PYTHONPATH", "")])
    return e


def run(cmd: list[str], timeout: int) -> str:
    """A subprocess, its output returned; a timeout below the per-test one (gpu_check.sh: 240 s), so a hung run
    fails its test with its output instead of stopping the suite."""
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd[:6])}\n{(err.stdout or '')[-3000:]}")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-6000:]
    return done.stdout + done.stderr


def argv(options: dict) -> list[str]:
    return [item for key, value in options.items() for item in (f"--{key}", str(value))]


def records(out: Path) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def train(script: str, options: dict) -> list[dict]:
    """`script`'s main() in this process, from a fresh accelerate state; its training records."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        importlib.import_module(script.removesuffix(".py")).main(argv(options))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        torch.cuda.empty_cache()
    return records(Path(options["output_dir"]))


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
    print(f"{label}: largest relative gap {worst:.1e} (tolerance {rtol:.0e})")


# ----------------------------------------------------------------------------------------------------------------
# The chunked LM head and the optimizer on CUDA (in-process, seconds).


def confident_model_and_batch(workdir: Path, scale: float):
    """The tiny model with its LM head scaled up (×60: logits up to about ±40; ×100: ±70, beyond the chunked head's
    UNSHIFTED_LIMIT), and 4 sequences it continued itself,
    greedily, after a random 8-token prompt: each scored label is the model's argmax, most with p > 0.5 — where
    log p(y) = logit_y - logsumexp is a difference of two close numbers, the case bf16 rounding hurts most."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=torch.float32).cuda()
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (4, 8), generator=g).cuda()
    with torch.no_grad():
        for _ in range(40):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    loss_mask = torch.zeros_like(ids)
    loss_mask[:, 8:] = 1
    return model, ids, loss_mask


def stats_and_grads(model, ids, loss_mask, chunk_size: int | None, bf16: bool):
    """log-probs [N, T-1] and every parameter's gradient of Σ w_t·log p_t, by the readable path (chunk_size None)
    or the chunked one, in fp32 or under bf16 autocast."""
    from nanodpo.fast.chunked_head import fast_token_stats
    from nanodpo.logps import token_stats

    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        if chunk_size is None:
            stats = token_stats(model(input_ids=ids).logits, ids, loss_mask)
        else:
            stats = fast_token_stats(model, {"input_ids": ids}, ids, loss_mask, None, chunk_size)
    weights = torch.linspace(0.5, 2.0, stats.logps.numel(), device="cuda").view_as(stats.logps)
    (stats.logps * weights).sum().backward()
    return stats.logps.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("scale", [60.0, 100.0], ids=["unshifted", "shifted"])
def test_chunked_head_equals_readable_in_bf16_on_a_confident_model(workdir, scale):
    """Under bf16 autocast on CUDA the chunked head (chunks of 16) is as accurate as the readable path: against the
    fp32 truth its log-probs' largest error is at most 1.5x the readable path's (+0.01), and so is every parameter's
    gradient error (relative, Frobenius; +1e-3). (The same on CPU: mean p(label) 0.75 / 0.85, the errors equal.)"""
    from nanodpo.fast.chunked_head import UNSHIFTED_LIMIT

    model, ids, loss_mask = confident_model_and_batch(workdir, scale)
    truth, truth_grads = stats_and_grads(model, ids, loss_mask, None, bf16=False)
    probs = truth[:, 7:].exp()
    with torch.no_grad():
        top = model(input_ids=ids).logits.abs().amax().item()
    print(f"mean p(label) of the scored tokens: {probs.mean():.2f}; largest |logit| {top:.0f}")
    assert probs.mean() > 0.5, "the model is not confident: the test's premise fails"
    assert (top > UNSHIFTED_LIMIT) == (scale > 60)
    readable, readable_grads = stats_and_grads(model, ids, loss_mask, None, bf16=True)
    chunked, chunked_grads = stats_and_grads(model, ids, loss_mask, 16, bf16=True)
    ours, theirs = (chunked - truth).abs().max().item(), (readable - truth).abs().max().item()
    print(f"log-probs, largest error vs fp32: chunked {ours:.3g}, readable {theirs:.3g}")
    assert ours <= 1.5 * theirs + 1e-2
    for name, true in truth_grads.items():
        ours = ((chunked_grads[name] - true).norm() / true.norm().clamp(min=1e-12)).item()
        theirs = ((readable_grads[name] - true).norm() / true.norm().clamp(min=1e-12)).item()
        assert ours <= 1.5 * theirs + 1e-3, f"{name}: chunked {ours:.2e}, readable {theirs:.2e}"


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16_autocast"])
def test_chunk_loop_never_syncs_the_host(bf16):
    """The chunked head's forward and backward over 32 chunks ask the GPU for a value once: the one check, after the
    forward's loop, of whether every logit was small enough for the unshifted exp (torch's sync debug mode reports
    every synchronizing call; a bool() per chunk would report 64 more). In fp32 (the head writes into a reused
    buffer) and under bf16 autocast."""
    from nanodpo.fast.chunked_head import label_stats

    torch.manual_seed(0)
    head = torch.nn.Linear(256, 8192).cuda()
    hidden = torch.randn(2048, 256, device="cuda", requires_grad=True)
    labels = torch.randint(0, 8192, (2048,), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            logps = label_stats(hidden, labels, head, 64, True, True)[0]
        logps.sum().backward()

    step()  # warm-up: cuBLAS handles, the allocator

    def syncs_of(work) -> int:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                work()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    assert syncs_of(lambda: bool(hidden.sum() > 0)) == 1  # the detector works
    count = syncs_of(step)
    print(f"host syncs in one chunked forward + backward (32 chunks): {count}")
    assert count == 1


def test_default_chunk_size_is_near_the_fastest():
    """The chunked head alone at Qwen2.5-0.5B's size (4,096 scored tokens, hidden 896, vocabulary 151,936, fp32
    weights, bf16 autocast), forward + backward, at chunk sizes 256 to 4,096: time (median of 5, synchronized) and
    peak memory printed; the CUDA default (CHUNK_SIZE["cuda"]) within 15% of the fastest — else retune it."""
    from nanodpo.fast import chunked_head
    from nanodpo.fast.chunked_head import CHUNK_SIZE, label_stats

    torch.manual_seed(0)
    head = torch.nn.Linear(896, 151_936, bias=False).cuda()
    hidden = torch.randn(4096, 896, device="cuda", requires_grad=True)
    labels = torch.randint(0, 151_936, (4096,), device="cuda")

    def step(chunk_size: int) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logps = label_stats(hidden, labels, head, chunk_size, True, False)[0]
        logps.sum().backward()
        head.weight.grad = hidden.grad = None

    times = {}
    for chunk_size in (256, 512, 1024, 2048, 4096):
        chunked_head._SCRATCH.clear()  # (the reused buffers are counted in the peak)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(chunk_size)
        runs = []
        for _ in range(5):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            step(chunk_size)
            end.record()
            torch.cuda.synchronize()
            runs.append(start.elapsed_time(end))
        times[chunk_size] = sorted(runs)[2]
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        print(f"chunk {chunk_size:5d}: {times[chunk_size]:6.2f} ms forward + backward, peak {peak:.2f} GiB above start")
    best = min(times.values())
    assert times[CHUNK_SIZE["cuda"]] <= 1.15 * best, times


def test_fused_adamw_kernel_runs(workdir, tmp_path, monkeypatch):
    """train_dpo.py on CUDA steps with torch's fused AdamW kernel (built before accelerate moves the model)."""
    calls = []
    fused = torch._fused_adamw_
    monkeypatch.setattr(torch, "_fused_adamw_", lambda *a, **k: calls.append(1) or fused(*a, **k))
    steps = train("train_dpo.py", common(workdir, tmp_path / "out", dataset=str(workdir / "dpo.jsonl"), max_steps=2))
    assert len(steps) == 2
    assert len(calls) >= 2, f"the fused AdamW kernel ran {len(calls)} times in 2 steps"


# ----------------------------------------------------------------------------------------------------------------
# Training runs (tiny model, seconds each).


def test_bf16_dpo_and_sft_track_fp32(workdir, tmp_path):
    """--bf16 on CUDA (autocast, fp32 weights) trains DPO and SFT like fp32 does: the same curves to bf16 precision
    (2e-2 relative on the loss and log-probs over 4 steps of AdamW at lr 1e-3), the loss going down."""
    for script, data, keys in (("train_dpo.py", "dpo.jsonl", ("loss", "logps/chosen", "logps/rejected")),
                               ("train_sft.py", "sft.jsonl", ("loss",))):  # fmt: skip
        name = script.removeprefix("train_").removesuffix(".py")
        options = dict(dataset=str(workdir / data))
        bf16 = train(script, common(workdir, tmp_path / f"{name}_bf16", bf16="true", **options))
        fp32 = train(script, common(workdir, tmp_path / f"{name}_fp32", **options))
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
    calls = ",".join(map(str, backward_calls))
    run([sys.executable, "-c", OVERFLOW_AT_BACKWARD, calls, str(ROOT / "train_dpo.py"), *argv(options)], timeout=120)


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
    bnb = needs("bitsandbytes")
    out = tmp_path / "qlora"
    steps = train("train_dpo.py", common(workdir, out, dataset=str(workdir / "dpo.jsonl"), load_in_4bit="true",
                                         use_lora="true", bf16="true", learning_rate=5e-3, bnb_4bit_quant_type="nf4",
                                         bnb_4bit_compute_dtype="bfloat16"))  # fmt: skip
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
    needs("flash_attn", carried=False)
    from transformers import AutoModelForCausalLM

    from nanodpo.logps import token_logps
    from nanodpo.packing import Document, collate_packed, pack_documents
    from nanodpo.training import lm_model_inputs

    model = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=torch.bfloat16,
                                                 attn_implementation="flash_attention_2").cuda()  # fmt: skip
    g = torch.Generator().manual_seed(0)
    lengths = (9, 33, 17, 60)
    docs = [Document(torch.randint(3, 500, (n,), generator=g).tolist(), [0] * 4 + [1] * (n - 4)) for n in lengths]

    def logps(rows):
        batch = collate_packed(rows, "flash_attention_2", 0)
        batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
        with torch.no_grad():
            stats = token_logps(model, lm_model_inputs(batch))
        return stats.logps[stats.mask.bool()].float()

    packed = logps(pack_documents(docs, 128))
    alone = torch.cat([logps(pack_documents([doc], 128)) for doc in docs])
    assert packed.shape == alone.shape
    torch.testing.assert_close(packed, alone, rtol=2e-2, atol=2e-2)

    curves = {}
    for layout in ("padded", "padding_free"):
        # fp32 weights, bf16 autocast: full fine-tuning of bf16 weights on one process is refused (no fp32 copy).
        curves[layout] = train("train_dpo.py", common(workdir, tmp_path / layout, dataset=str(workdir / "dpo.jsonl"),
                                                      bf16="true", dtype="float32", max_steps=1, batch_layout=layout,
                                                      attn_implementation="flash_attention_2"))  # fmt: skip
    keys = ("loss", "logps/chosen", "logps/rejected")
    assert_close_curves(curves["padding_free"], curves["padded"], keys, rtol=2e-2, label="flash varlen vs padded")


SHARDED_OPTIONS = dict(optim="sgd", learning_rate=0.5, max_steps=3)  # fp32 SGD: the numbers compare tightly
SHARDED_KEYS = ("loss", "grad_norm", "logps/chosen", "logps/rejected", "rewards/margins")


def launch(config: str, processes: int, script: str, options: dict, mixed_precision: str = "no") -> str:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "configs/accelerate" / config), "--num_processes", str(processes), "--mixed_precision",
               mixed_precision, str(ROOT / script), *argv(options)]  # fmt: skip
    return run(command, timeout=200)


@pytest.mark.skipif(GPUS > 1, reason="with 2 GPUs the 2-process FSDP2 test runs instead")
def test_fsdp2_one_process_equals_plain(workdir, tmp_path):
    """One GPU: full-fine-tuning DPO under configs/accelerate/fsdp2_full.yaml with ONE process (accelerate still
    shards: a one-rank mesh, DTensor parameters, the chunked head inside the head's FSDP unit) against the same run
    without FSDP. fp32, SGD, an online reference: step 1 within 1e-5, 3 steps within 1e-4 (CUDA's atomic adds in the
    head's backward are not ordered)."""
    options = dict(dataset=str(workdir / "dpo.jsonl"), **SHARDED_OPTIONS)
    out = launch("fsdp2_full.yaml", 1, "tests/gpu/fsdp_driver.py", common(workdir, tmp_path / "fsdp2", **options))
    assert "distributed: FSDP, FSDP2 True, 1 processes" in out, out[-3000:]
    sharded = records(tmp_path / "fsdp2")
    plain = train("train_dpo.py", common(workdir, tmp_path / "plain", **options))
    assert_close_curves(sharded[:1], plain[:1], SHARDED_KEYS, rtol=1e-5, label="fsdp2 1 process vs plain, step 1")
    assert_close_curves(sharded, plain, SHARDED_KEYS, rtol=1e-4, label="fsdp2 1 process vs plain")


@pytest.mark.skipif(GPUS < 2, reason=f"FSDP2 over 2 processes needs 2 GPUs, found {GPUS} (1 process runs instead)")
def test_fsdp2_dpo_two_gpus_equal_one(workdir, tmp_path):
    """Full-fine-tuning DPO under configs/accelerate/fsdp2_full.yaml on 2 GPUs (NCCL) with an online reference
    (sharded like the policy) and the chunked LM head, against 1 GPU with twice the accumulation: the same global
    batch and examples. fp32, SGD: step 1 within 1e-4, 3 steps within 1e-3 (GPU reductions are not ordered the same
    across process counts; CPU/gloo gives 1e-6, tests/test_distributed.py)."""
    options = dict(dataset=str(workdir / "dpo.jsonl"), **SHARDED_OPTIONS)
    out = launch("fsdp2_full.yaml", 2, "tests/gpu/fsdp_driver.py", common(workdir, tmp_path / "two", **options))
    assert "distributed: FSDP, FSDP2 True, 2 processes" in out, out[-3000:]
    one = train("train_dpo.py", common(workdir, tmp_path / "one", **{**options, "gradient_accumulation_steps": 4}))
    two = records(tmp_path / "two")
    assert_close_curves(two[:1], one[:1], SHARDED_KEYS, rtol=1e-4, label="fsdp2 2 GPUs vs 1, step 1")
    assert_close_curves(two, one, SHARDED_KEYS, rtol=1e-3, label="fsdp2 2 GPUs vs 1")


@pytest.mark.skipif(GPUS < 2, reason=f"DeepSpeed ZeRO over 2 processes needs 2 GPUs, found {GPUS}")
@pytest.mark.parametrize("config", ["zero2.yaml", "zero3.yaml"])
def test_deepspeed_dpo_two_gpus_equal_one(workdir, tmp_path, config):
    """Full-fine-tuning DPO under configs/accelerate/zero2.yaml / zero3.yaml on 2 GPUs (NCCL) with an online reference
    (an inference-only engine, partitioned under ZeRO-3) and the chunked LM head, against 1 GPU without DeepSpeed
    with twice the accumulation: fp32, SGD, step 1 within 1e-4, 3 steps within 1e-3 (tests/test_deepspeed.py runs
    the same on CPU/gloo to 1e-6). Then --bf16 under the same config (DeepSpeed's bf16 engine: bf16 weights, fp32
    master copy) tracks the fp32 run to bf16 precision (2e-2), the loss going down."""
    needs("deepspeed", carried=False)
    options = dict(dataset=str(workdir / "dpo.jsonl"), **SHARDED_OPTIONS)
    out = launch(config, 2, "train_dpo.py", common(workdir, tmp_path / "two", **options))
    assert "accumulation x 2 processes)" in out
    one = train("train_dpo.py", common(workdir, tmp_path / "one", **{**options, "gradient_accumulation_steps": 4}))
    two = records(tmp_path / "two")
    assert_close_curves(two[:1], one[:1], SHARDED_KEYS, rtol=1e-4, label=f"{config} 2 GPUs vs 1, step 1")
    assert_close_curves(two, one, SHARDED_KEYS, rtol=1e-3, label=f"{config} 2 GPUs vs 1")
    launch(config, 2, "train_dpo.py", common(workdir, tmp_path / "two_bf16", bf16="true", **options), "bf16")
    bf16 = records(tmp_path / "two_bf16")
    assert_close_curves(bf16, two, ("loss", "logps/chosen", "logps/rejected"), rtol=2e-2, label=f"{config} bf16")
    assert bf16[-1]["loss"] < bf16[0]["loss"]


# ----------------------------------------------------------------------------------------------------------------
# The bench, last (about 2 minutes).


def test_bench_dpo_real_size_against_trl(tmp_path):
    """`python -m nanodpo.tools.bench dpo` on CUDA: a Qwen2.5-0.5B-shaped model (random weights, vocabulary 151,936),
    8 pairs a step, nanodpo against TRL 1.16 on the same data — every implementation's tokens/s, peak CUDA memory
    and MFU (against the GPU's dense bf16 peak, attention included), the ratios, and the final metrics agreeing to
    bf16 precision. The table is also written to $OUT/bench_dpo.txt under scripts/gpu_check.sh."""
    needs("trl")
    needs("datasets")
    out = run([sys.executable, "-m", "nanodpo.tools.bench", "dpo", "--workdir", str(tmp_path)], timeout=220)
    print(out[-5000:])
    if CHECK_OUT:
        Path(CHECK_OUT, "bench_dpo.txt").write_text(out)
    assert "hidden 896, 24 layers" in out and "vocab 151,936" in out
    assert "peak CUDA MB" in out
    for name in ("nanodpo", "trl", "nanodpo-precomputed", "plain"):
        assert re.search(rf"^{re.escape(name)}\s+\d+\s", out, re.M), name
    if "MFU (model FLOPs" not in out:
        pytest.fail(f"no MFU printed: {torch.cuda.get_device_name()} is not in nanodpo.tools.bench.PEAK_TFLOPS")
    gap = float(re.search(r"-> (?:agree|DISAGREE) \(largest relative gap ([0-9.e+-]+)", out).group(1))
    assert gap <= 2e-2, out[-3000:]
