"""The GPU path's defects that a CPU can show (tests/gpu/ checks the rest on CUDA; scripts/gpu_check.sh runs it).

* The optimizer is built before `accelerator.prepare` moves the model: it must be fused when the parameters WILL
  live on CUDA, not only when they already do.
* The packed DPO collator builds its dense [R, 1, L, L] mask only for sdpa/eager: flash-attention never reads it.
* flash-attention with float32 weights and no mixed precision is refused before anything loads.
* MFU's FLOP count: frozen weights 4·N, trained 6·N, no input embeddings, full sizes under ZeRO-3.
* scripts/gpu_check.sh installs its wheels with no network (pip --no-index) and, without CUDA, ends green with every
  GPU test skipped for its reason.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanodpo import training
from nanodpo.config import DPOConfig, parse_config
from nanodpo.data import Row
from nanodpo.dpo_data import build_examples
from nanodpo.errors import UserError
from nanodpo.fast import dpo_packing
from nanodpo.model import check_model_options
from nanodpo.tracking import flops_per_token
from tests import tiny

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.make_tokenizer()


def config(*argv: str) -> DPOConfig:
    return parse_config(DPOConfig, ["--model", "Qwen/Qwen2.5-0.5B-Instruct", *argv])


def test_optimizer_is_fused_when_the_parameters_will_live_on_cuda(tokenizer, monkeypatch):
    """Built while the model is still on the CPU (as before `accelerator.prepare`): for a CUDA run the AdamW is
    fused, and its first step runs the fused kernel (here its CPU twin: the device is checked only at the step).
    A CPU run keeps torch's default (not fused); SGD is never fused."""
    model = tiny.make_model(tokenizer)
    calls = []
    fused_adamw = torch._fused_adamw_
    monkeypatch.setattr(torch, "_fused_adamw_", lambda *a, **k: calls.append(1) or fused_adamw(*a, **k))

    optimizer = training.make_optimizer(model, config(), torch.device("cuda"))
    assert all(group["fused"] for group in optimizer.param_groups)
    model(input_ids=torch.tensor([[5, 6, 7]]), labels=torch.tensor([[5, 6, 7]])).loss.backward()
    optimizer.step()
    assert calls, "the fused AdamW kernel did not run"

    on_cpu = training.make_optimizer(model, config(), torch.device("cpu"))
    assert not any(group["fused"] for group in on_cpu.param_groups)
    assert isinstance(training.make_optimizer(model, config("--optim", "sgd"), torch.device("cuda")), torch.optim.SGD)


@pytest.mark.parametrize("attn", ["sdpa", "flash_attention_2"])
def test_packed_collator_builds_the_dense_mask_only_for_sdpa(tokenizer, attn, monkeypatch):
    """flash-attention's varlen kernel reads cu_seq_lens: its batch carries no mask, and none is built (a 24k-token
    micro-batch's [L, L] bool mask is 0.6 GB of host memory). sdpa still gets its block-causal mask."""
    rows = tiny.preference_rows(6)
    examples, _ = build_examples([Row(r, "mem", i) for i, r in enumerate(rows)], tokenizer)
    square, zeros = [], torch.zeros

    def recording_zeros(*size, **kwargs):
        if len(size) == 4:  # [rows, 1, L, L]
            square.append(size)
        return zeros(*size, **kwargs)

    monkeypatch.setattr(torch, "zeros", recording_zeros)
    batch = dpo_packing.PackedPreferenceCollator(tokenizer.pad_token_id, 64, "keep_start", attn, False, True)(examples)
    if attn == "sdpa":
        assert batch["packed_attention_mask"].dim() == 4 and len(square) == 1
    else:
        assert "packed_attention_mask" not in batch and square == []
        assert batch["packed_cu_seq_lens"][-1] == batch["attention_mask"].sum()


def test_flash_attention_in_float32_refused_up_front(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    with pytest.raises(UserError, match="flash_attention_2 has no float32 kernel.*add --bf16"):
        check_model_options(config("--attn_implementation", "flash_attention_2"))
    check_model_options(config("--attn_implementation", "flash_attention_2", "--bf16", "true"))
    flash = ("--attn_implementation", "flash_attention_2")
    check_model_options(config(*flash, "--dtype", "bfloat16", "--use_lora", "true"))  # bf16 weights, fp32 adapter
    check_model_options(config("--dtype", "float32"))  # sdpa: float32 is fine


def test_flops_per_token_counts_frozen_weights_4n_and_skips_input_embeddings(tokenizer):
    """Full fine-tuning: 6·N over every weight but the input embeddings. LoRA: the frozen base 4·N, the adapter
    6·N. Tied embeddings: the shared matrix counted once, as the LM head. ZeRO-3 (parameters partitioned away,
    their full size in `ds_numel`): the same count as the whole model."""
    from peft import LoraConfig, get_peft_model

    seq_len = 128
    model = tiny.make_model(tokenizer)
    config = model.config
    attention = 12 * config.num_hidden_layers * config.hidden_size * seq_len
    embedding = model.get_input_embeddings().weight.numel()
    total = sum(p.numel() for p in model.parameters())
    assert flops_per_token(model, seq_len) == 6 * (total - embedding) + attention

    tied = tiny.make_model(tokenizer, tie_word_embeddings=True)
    assert flops_per_token(tied, seq_len) == 6 * sum(p.numel() for p in tied.parameters()) + attention

    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    adapter = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert adapter > 0
    assert flops_per_token(lora, seq_len) == 4 * (total - embedding) + 6 * adapter + attention

    partitioned = tiny.make_model(tokenizer)
    for p in partitioned.parameters():
        p.ds_numel = p.numel()
        p.data = torch.empty(0)
    assert flops_per_token(partitioned, seq_len) == 6 * (total - embedding) + attention


def make_wheel(folder: Path, name: str) -> Path:
    """A one-module wheel, built by hand (a wheel is a zip of the module, METADATA, WHEEL and RECORD)."""
    import zipfile

    dist = f"{name}-0.1"
    path = folder / f"{dist}-py3-none-any.whl"
    files = {
        f"{name}.py": "VALUE = 42\n",
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\nRequires-Dist: torch>=1.0\n",
        f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{dist}.dist-info/RECORD"] = "".join(f"{f},,\n" for f in files) + f"{dist}.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as archive:
        for file, text in files.items():
            archive.writestr(file, text)
    return path


@pytest.mark.skipif(shutil.which("bash") is None, reason="scripts/gpu_check.sh is a bash script")
def test_gpu_check_installs_offline_and_skips_without_cuda(tmp_path):
    """scripts/gpu_check.sh, the one command a GPU session runs, here on this CPU machine: it installs the wheels of
    its wheel folder (one hand-made wheel) with pip --no-index into its target folder, imports them from there, runs
    the GPU suite — every test skipped, with its reason — and writes the log and the junit file under $OUT."""
    wheels, site, out = tmp_path / "whl", tmp_path / "site", tmp_path / "out"
    wheels.mkdir()
    make_wheel(wheels, "nanodpo_offline_probe")
    env = {**os.environ, "OUT": str(out), "GPU_CHECK_WHEELS": str(wheels), "GPU_CHECK_SITE": str(site),
           "PYTHON": sys.executable}  # fmt: skip
    env.pop("PYTHONPATH", None)
    done = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    log = (out / "gpu_check.log").read_text()
    assert done.returncode == 0, log[-4000:]
    assert (site / "nanodpo_offline_probe.py").exists()
    assert f"carried: nanodpo_offline_probe 0.1 from {site}" in log  # imported from the target folder
    skipped = re.findall(r"^SKIPPED \[\d+\] (.*)$", log, re.M)
    assert skipped and all(re.search("no CUDA device|needs 2 GPUs, found 0", line) for line in skipped), skipped
    junit = (out / "gpu_junit.xml").read_text()
    assert 'failures="0"' in junit and 'errors="0"' in junit
    assert int(re.search(r'skipped="(\d+)"', junit).group(1)) == int(re.search(r'tests="(\d+)"', junit).group(1)) > 5
