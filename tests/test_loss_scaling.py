"""fp16 loss scaling (--fp16, the mixed precision of a T4 or V100): an overflow is the loss scaler's business — the
update is skipped, the scale halves, the next step runs, nothing counts as non-finite — and a resumed run goes on with
the saved scale. A NaN loss, an inf gradient norm without a scaler, or a scale collapsed below 1 still count.

accelerate builds no scaler on a CPU: `Accelerator(mixed_precision="fp16", cpu=True)` silently trains in fp32 (no
GradScaler, no autocast), which is why train_*.py refuse --fp16 without a GPU. These tests give it what it builds on
a GPU — a real `torch.amp.GradScaler("cpu")` and fp16 autocast — and drive the real loops with it, overflowing the
gradients at chosen micro-batches. tests/gpu/test_gpu.py runs the real --fp16 on CUDA.
"""

import json
import shutil

import pytest
import torch
from accelerate import Accelerator

from nanodpo import training
from nanodpo.config import DPOConfig, parse_config
from nanodpo.errors import UserError
from nanodpo.model import check_model_options
from nanodpo.scale.checkpoint import RunState
from nanodpo.tracking import read_metrics
from tests.test_resume import comparable, data, in_process  # noqa: F401  (data: the tiny model and datasets)

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
INIT_SCALE = 2.0**10  # small enough that the tiny models' fp16 gradients never overflow on their own


class CPULossScaling(Accelerator):
    """What `Accelerator(mixed_precision="fp16")` is on a GPU — a GradScaler and fp16 autocast — on the CPU. The
    backward calls numbered in `overflow_at` (from 1) overflow fp16: the loss's value is unchanged, its gradient
    ×1e36."""

    overflow_at: set = set()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "mixed_precision": "fp16", "cpu": True})
        assert self.scaler is None  # accelerate's own choice on a CPU
        self.scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
        self.native_amp = True  # prepare() autocasts the model's forward to fp16; clip_grad_norm_ unscales
        self.backward_calls = 0

    def backward(self, loss, **kwargs):
        self.backward_calls += 1
        if self.backward_calls in self.overflow_at:
            loss = loss + 1e36 * (loss - loss.detach())
        super().backward(loss, **kwargs)


def prepared(accelerator):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    return accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))


def one_step(accelerator, model, optimizer, loss_factor: float = 1.0) -> training.Update:
    """One optimizer step, the lines of train_*.py's loop."""
    loss = model(torch.ones(3, 4)).float().pow(2).mean() * loss_factor
    accelerator.backward(loss)
    grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), 1.0))
    update = training.decide_update(accelerator, grad_norm, loss.item())
    if update.applied:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return update


def weights(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()]).clone()


def test_an_overflow_halves_the_scale_and_the_next_step_runs(monkeypatch):
    monkeypatch.setattr(CPULossScaling, "overflow_at", {1})
    accelerator = CPULossScaling()
    model, optimizer = prepared(accelerator)
    state, before = RunState(), weights(model)

    overflow = one_step(accelerator, model, optimizer)
    state.finish_step(0, overflow)
    assert (overflow.applied, overflow.overflow, overflow.nonfinite) == (False, True, False)
    assert overflow.loss_scale == INIT_SCALE and accelerator.scaler.get_scale() == INIT_SCALE / 2
    assert torch.equal(weights(model), before)  # the update was skipped

    after_overflow = one_step(accelerator, model, optimizer)  # before the fix: "unscale_() has already been called"
    state.finish_step(0, after_overflow)
    assert after_overflow.applied and after_overflow.loss_scale == INIT_SCALE / 2
    assert not torch.equal(weights(model), before)
    assert (state.overflow_total, state.nonfinite_total, state.nonfinite_in_a_row) == (1, 0, 0)
    assert state.loss_scale == INIT_SCALE / 2


def test_skipping_the_step_without_telling_the_scaler_breaks_the_next_one():
    """Why decide_update updates the scaler on a skip: the bug of issue 23, as it was."""
    accelerator = CPULossScaling()
    model, optimizer = prepared(accelerator)
    accelerator.backward(model(torch.ones(3, 4)).sum())
    accelerator.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.zero_grad()  # the update skipped, the scaler left as it was
    accelerator.backward(model(torch.ones(3, 4)).sum())
    with pytest.raises(RuntimeError, match="unscale_"):
        accelerator.clip_grad_norm_(model.parameters(), 1.0)


def test_a_nan_loss_still_counts_and_the_scaler_moves_on():
    accelerator = CPULossScaling()
    model, optimizer = prepared(accelerator)
    before = weights(model)
    update = one_step(accelerator, model, optimizer, loss_factor=float("nan"))
    assert not update.applied and update.nonfinite
    assert torch.equal(weights(model), before)
    assert one_step(accelerator, model, optimizer).applied  # the scaler was updated: the next step runs


def test_an_overflow_at_a_collapsed_scale_counts(monkeypatch):
    monkeypatch.setattr(CPULossScaling, "overflow_at", {1})
    accelerator = CPULossScaling()
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=training.MIN_LOSS_SCALE / 2)
    model, optimizer = prepared(accelerator)
    update = one_step(accelerator, model, optimizer)
    assert not update.applied and update.nonfinite


def test_an_inf_norm_without_a_scaler_counts():
    accelerator = Accelerator(cpu=True)
    model, optimizer = prepared(accelerator)
    update = one_step(accelerator, model, optimizer, loss_factor=float("inf"))
    assert not update.applied and update.nonfinite and update.loss_scale is None


def fp16_run(kind, data, out, monkeypatch, overflow_at, *extra):  # noqa: F811
    monkeypatch.setattr(training, "Accelerator", CPULossScaling)
    monkeypatch.setattr(CPULossScaling, "overflow_at", set(overflow_at))
    in_process(kind, data, out, "--logging_steps", "1", *extra)
    return [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


@pytest.mark.slow
def test_fp16_dpo_skips_overflows_and_resumes_bit_exact_with_its_scale(data, tmp_path, monkeypatch):  # noqa: F811
    """Steps 1 and 2 overflow (micro-batches 1 and 3 of 2 per step): the scale halves twice, the run goes on and
    counts no non-finite step. Resumed from checkpoint-2, the run logs every number of the uninterrupted one — the
    scale (2^8, not the 2^10 a fresh scaler starts at) included."""
    out = tmp_path / "straight"
    records = fp16_run("dpo", data, out, monkeypatch, {1, 3}, "--max_steps", "4")
    assert [r["loss_scale"] for r in records] == [INIT_SCALE, INIT_SCALE / 2] + [INIT_SCALE / 4] * 2
    assert [r["overflow_steps_skipped"] for r in records] == [1, 2, 2, 2]
    assert all(r["grad_norm"] in ("inf", "nan") for r in records[:2])  # JSON has no inf: written as text
    assert all(isinstance(r["grad_norm"], float) for r in records[2:])
    assert not any("nonfinite_steps_skipped" in r for r in records)
    assert records[-1]["loss"] < records[2]["loss"]  # trained after the overflows
    assert torch.load(out / "checkpoint-2" / "scaler.pt", weights_only=True)["scale"] == INIT_SCALE / 4
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["overflow_total"] == 2

    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    for late in ("checkpoint-4",):
        shutil.rmtree(resumed / late, ignore_errors=True)
    fp16_run("dpo", data, resumed, monkeypatch, set(), "--max_steps", "4", "--resume_from_checkpoint", "latest")
    assert comparable(resumed) == comparable(out)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sft", "pt"])
def test_fp16_sft_and_pt_skip_an_overflow(kind, data, tmp_path, monkeypatch):  # noqa: F811
    records = fp16_run(kind, data, tmp_path / kind, monkeypatch, {2}, "--max_steps", "3")
    assert [r["loss_scale"] for r in records] == [INIT_SCALE, INIT_SCALE / 2, INIT_SCALE / 2]
    assert [r["overflow_steps_skipped"] for r in records] == [1, 1, 1]
    assert not any("nonfinite_steps_skipped" in r for r in records)
    assert all(r["loss"] == r["loss"] for r in records)


@pytest.mark.slow
def test_fp16_lora_on_a_float16_base_skips_an_overflow(data, tmp_path, monkeypatch):  # noqa: F811
    """The T4 user's LoRA run: a float16 base, the adapter trained in float32 (peft keeps it there), loss scaling."""
    records = fp16_run("dpo", data, tmp_path / "lora", monkeypatch, {1}, "--max_steps", "3", "--use_lora", "--dtype",
                       "float16", "--learning_rate", "1e-2")  # fmt: skip
    assert [r["loss_scale"] for r in records] == [INIT_SCALE, INIT_SCALE / 2, INIT_SCALE / 2]
    assert [r["overflow_steps_skipped"] for r in records] == [1, 1, 1]
    assert not any("nonfinite_steps_skipped" in r for r in records) and records[-1]["loss"] < records[1]["loss"]


def t4(monkeypatch):
    """torch on a T4: CUDA, bf16 tensors storable (emulation) but no bf16 compute (compute capability 7.5)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")


def test_bf16_is_refused_on_a_gpu_without_bf16_with_the_advice(data, monkeypatch):  # noqa: F811
    t4(monkeypatch)
    model = str(data / "model")
    with pytest.raises(UserError) as err:
        check_model_options(parse_config(DPOConfig, ["--model", model, "--bf16"]))
    assert "Tesla T4" in str(err.value) and "--fp16" in str(err.value) and "Ampere" in str(err.value)
    check_model_options(parse_config(DPOConfig, ["--model", model, "--fp16"]))  # fp16 is what a T4 runs
    with pytest.raises(UserError, match="--dtype float32"):  # float16 weights: GradScaler cannot unscale their grads
        check_model_options(parse_config(DPOConfig, ["--model", model, "--fp16", "--dtype", "float16"]))
    check_model_options(parse_config(DPOConfig, ["--model", model, "--fp16", "--dtype", "float16", "--use_lora"]))
