"""Never lose a run: SIGKILL + resume reproduces the uninterrupted run bit for bit (DPO, packed SFT, streamed PT),
SIGTERM saves and exits, a kill inside a checkpoint write leaves the previous checkpoint loadable, a full disk is a
clear error, non-finite steps are skipped and then stop the run, and checkpoints are rotated and validated."""

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanodpo.config import DPOConfig, parse_config
from nanodpo.errors import UserError
from nanodpo.scale.checkpoint import _check_compatible, checkpoint_problem, checkpoints_in, write_failure
from nanodpo.tracking import read_metrics
from nanodpo.training import RunState
from tests import tiny

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fresh_accelerate_state")]
ROOT = Path(__file__).resolve().parents[1]
TIMING = {"tokens_per_s", "mfu"}  # wall-clock measurements: the only fields allowed to differ
STEPS = 8


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    tiny.make_model_dir(root / "model", seed=5)
    tiny.write_jsonl(root / "dpo.jsonl", tiny.preference_rows(12, "explicit"))
    thanks = [{"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "You are welcome!"}]
    chats = [
        {"messages": [{"role": "user", "content": f"What is {i} + {i}?"}, {"role": "assistant", "content": f"{2 * i}."}]
         + (thanks if i % 2 else [])}
        for i in range(20)
    ]  # fmt: skip
    tiny.write_jsonl(root / "sft.jsonl", chats)
    documents = [{"text": f"Document {i}: " + "the fox runs. " * (1 + i % 5)} for i in range(40)]
    tiny.write_jsonl(root / "pt.jsonl", documents)
    tiny.write_jsonl(root / "prompts.jsonl", [{"prompt": row["prompt"]} for row in tiny.preference_rows(12)])
    return root


def script_args(kind: str, data: Path, out: Path) -> list[str]:
    common = [
        "--model", str(data / "model"), "--output_dir", str(out), "--max_steps", str(STEPS), "--logging_steps", "3",
        "--save_steps", "2", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
        "--learning_rate", "1e-3", "--max_length", "64", "--disable_tqdm", "--seed", "7",
    ]  # fmt: skip
    if kind == "dpo":
        return ["train_dpo.py", "--dataset", str(data / "dpo.jsonl"), *common]
    if kind == "dpo_online":  # the answers' random seeds come from the prompts' draws: nothing else to restore
        return ["train_dpo.py", "--dataset", str(data / "prompts.jsonl"), "--online", "--judge",
                "tests.online_judges:char_score", "--max_new_tokens", "6", *common]  # fmt: skip
    if kind == "sft":
        return ["train_sft.py", "--dataset", str(data / "sft.jsonl"), "--packing", *common]
    return ["train_pt.py", "--dataset", str(data / "pt.jsonl"), "--streaming", "--stream_buffer_docs", "16", *common]


def launch(args: list[str], **kwargs) -> subprocess.Popen:  # a run to signal from outside
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)  # fmt: skip


def run_to_end(args: list[str]) -> str:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def wait_for_checkpoint(out: Path, proc: subprocess.Popen, at_least: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = [int(p.name.split("-")[1]) for p in checkpoints_in(out)]
        if done and max(done) >= at_least:
            return
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    raise AssertionError("no checkpoint in time")


def comparable(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(out / "metrics.jsonl")]


KILL_AT_BACKWARD = """
import os, signal, sys
kill_at = int(sys.argv[1]); sys.argv = sys.argv[2:]
sys.path.insert(0, os.getcwd())
from accelerate import Accelerator
original, calls = Accelerator.backward, [0]
def backward_then_maybe_die(self, loss, **kwargs):
    calls[0] += 1
    if calls[0] == kill_at:  # SIGKILL: no handler, no cleanup, no flush
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, loss, **kwargs)
Accelerator.backward = backward_then_maybe_die
import runpy
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("kind", ["dpo", "dpo_online", "sft", "pt"])
def test_sigkill_and_resume_is_bit_exact(kind, data, tmp_path):
    run_to_end(script_args(kind, data, tmp_path / "straight"))
    expected = comparable(tmp_path / "straight")

    out = tmp_path / "killed"
    args = script_args(kind, data, out)
    # Killed at a random micro-batch after the first checkpoint (step 2 = micro-batch 4). An odd micro-batch is the
    # first half of an accumulation: the partial step must be redone from the checkpoint.
    kill_at = random.Random(kind).choice([5, 7, 9, 11, 13])
    result = subprocess.run([sys.executable, "-c", KILL_AT_BACKWARD, str(kill_at), *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    assert len(read_metrics(out / "metrics.jsonl")) < len(expected)

    run_to_end([*args, "--resume_from_checkpoint", "latest"])
    assert comparable(out) == expected  # every logged number, bit for bit
    if kind == "dpo_online":  # and every sampled pair logged, word for word
        samples = (tmp_path / "straight" / "samples.jsonl").read_text()
        assert (out / "samples.jsonl").read_text() == samples and samples.count("\n") == 6  # steps 3, 6, 8


def test_sigterm_saves_prints_the_resume_command_and_resume_finishes(data, tmp_path):
    run_to_end(script_args("dpo", data, tmp_path / "straight"))
    out = tmp_path / "stopped"
    args = script_args("dpo", data, out)
    proc = launch(args)
    wait_for_checkpoint(out, proc, at_least=2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, output[-3000:]
    assert "--resume_from_checkpoint latest" in output
    assert "Traceback" not in output
    run_to_end([*args, "--resume_from_checkpoint", "latest"])
    assert comparable(out) == comparable(tmp_path / "straight")


KILL_IN_WRITE = """
import os, signal, sys
sys.argv = sys.argv[1:]
sys.path.insert(0, os.getcwd())
import nanodpo.scale.checkpoint as ckpt
original = ckpt._fsync_tree
def fsync_then_die(directory):
    original(directory)
    if directory.name == ".tmp-checkpoint-4":  # the second checkpoint: files written, not yet renamed
        os.kill(os.getpid(), signal.SIGKILL)
ckpt._fsync_tree = fsync_then_die
import runpy
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_kill_inside_a_checkpoint_write_keeps_the_previous_one(data, tmp_path):
    out = tmp_path / "out"
    args = script_args("sft", data, out)
    result = subprocess.run([sys.executable, "-c", KILL_IN_WRITE, *args], cwd=ROOT, capture_output=True, timeout=600)
    assert result.returncode == -signal.SIGKILL
    assert [p.name for p in checkpoints_in(out)] == ["checkpoint-2"]
    assert not (out / "checkpoint-4").exists()
    # The survivor is complete and resumable; the run then finishes.
    run_to_end([*args, "--resume_from_checkpoint", "latest"])
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r] == [3, 6, 8]
    assert not list(out.glob(".tmp-*"))


def in_process(kind: str, data: Path, out: Path, *extra: str):
    import train_dpo
    import train_pt
    import train_sft

    script, *argv = script_args(kind, data, out)
    module = {"train_dpo.py": train_dpo, "train_sft.py": train_sft, "train_pt.py": train_pt}[script]
    return module.main([*argv, *extra])


# What a full disk looks like from each library that writes a checkpoint (seen on a real full filesystem).
TORCH_FULL = RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 86528 vs 86416")
TOKENIZERS_FULL = Exception("No space left on device (os error 28)")
SAFETENSORS_FULL = Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                             'left on device" })')  # fmt: skip


def tokenizer_class(data: Path) -> type:
    from transformers import AutoTokenizer

    return type(AutoTokenizer.from_pretrained(data / "model"))


@pytest.mark.parametrize("writer, error, into", [
    ("torch.save", OSError(28, "No space left on device"), ".tmp-checkpoint-4"),
    ("torch.save", TORCH_FULL, ".tmp-checkpoint-4"),
    ("tokenizer", TOKENIZERS_FULL, ".tmp-checkpoint-4"),
    ("model", SAFETENSORS_FULL, ".tmp-out-final"),  # the final model's save
])  # fmt: skip
def test_full_disk_at_save_time_is_a_clear_error(writer, error, into, data, tmp_path, monkeypatch):
    """Whatever the library raises on a full disk becomes the one clear message; nothing half-written is left."""
    import shutil as shutil_module

    from transformers import PreTrainedModel

    owner, name = {"torch.save": (torch, "save"), "tokenizer": (tokenizer_class(data), "save_pretrained"),
                   "model": (PreTrainedModel, "save_pretrained")}[writer]  # fmt: skip
    original = getattr(owner, name)

    def full_disk(*args, **kwargs):
        if any(into in str(a) for a in [*args, *kwargs.values()]):
            raise error
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, full_disk)
    if error is TORCH_FULL:  # the disk really is full: torch's own words do not say so, the free space does
        real_usage = shutil_module.disk_usage
        monkeypatch.setattr(shutil_module, "disk_usage", lambda p: real_usage(p)._replace(free=0))
    out = tmp_path / "out"
    with pytest.raises(UserError) as err:
        in_process("sft", data, out)
    final = into.endswith("final")
    assert f"cannot write {out if final else out / 'checkpoint-4'}: No space left on device — nothing was replaced" \
        in str(err.value)  # fmt: skip
    expected = ["checkpoint-2", "checkpoint-4", "checkpoint-6"] if final else ["checkpoint-2"]
    assert [p.name for p in checkpoints_in(out)] == expected
    assert not list(out.glob(".tmp-*")) and not list(tmp_path.glob(".tmp-*"))
    assert all(checkpoint_problem(p) is None for p in checkpoints_in(out))  # the earlier ones are intact


@pytest.mark.parametrize("error, reason", [
    (OSError(28, "No space left on device"), "No space left on device"),
    (PermissionError(13, "Permission denied"), "Permission denied"),
    (TOKENIZERS_FULL, "No space left on device"),
    (SAFETENSORS_FULL, "No space left on device"),
    (TORCH_FULL, "the write failed ([enforce fail at inline_container.cc:664] . unexpected pos 86528 vs 86416)"),
    (RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"), "the write failed"),
    (ValueError("a bug in nanodpo"), None),  # not a failure to write: keeps its traceback
])  # fmt: skip
def test_write_failures_are_recognised_whatever_raised_them(error, reason, tmp_path):
    try:  # an error raised while handling an OSError carries it in its chain
        raise error
    except Exception as err:
        found = write_failure(err, tmp_path)
    assert found == reason or (reason is not None and found.startswith(reason))
    chained = RuntimeError("saving failed")
    chained.__cause__ = OSError(28, "No space left on device")
    assert write_failure(chained, tmp_path) == "No space left on device"


def test_damaged_checkpoints_are_skipped_or_refused(data, tmp_path, capsys):
    """A truncated model.safetensors (or any damaged file): `latest` resumes from the newest intact checkpoint, and
    finishes exactly like the uninterrupted run; the damaged one named explicitly is refused, naming the file."""
    out = tmp_path / "out"
    in_process("sft", data, out)
    expected = comparable(out)
    weights = out / "checkpoint-6" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # cut short, as by a full disk outside nanodpo's own save
    capsys.readouterr()
    in_process("sft", data, out, "--resume_from_checkpoint", "latest")
    printed = capsys.readouterr().out
    assert f"skipping the damaged {out / 'checkpoint-6'} (model.safetensors is damaged" in printed
    assert f"resumed from {out / 'checkpoint-4'} at step 4" in printed
    assert comparable(out) == expected
    assert checkpoint_problem(out / "checkpoint-6") is None  # written again by the resumed run
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(UserError, match=r"checkpoint-6: damaged checkpoint: model.safetensors is damaged \(.*header"):
        in_process("sft", data, out, "--resume_from_checkpoint", str(out / "checkpoint-6"))
    for checkpoint in checkpoints_in(out)[:-1]:
        (checkpoint / "optimizer.pt").write_bytes(b"")
    with pytest.raises(UserError, match="every checkpoint in .* is damaged .*optimizer.pt is damaged"):
        in_process("sft", data, out, "--resume_from_checkpoint", "latest")


@pytest.mark.parametrize("kind", ["dpo", "dpo_online"])
def test_nonfinite_steps_are_skipped_then_stop_the_run(kind, data, tmp_path, monkeypatch):
    from nanodpo import recipe

    real_forward = recipe.concatenated_forward
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        out, policy_stats = real_forward(*args, **kwargs)
        calls["n"] += 1
        micro = calls["n"]  # 2 micro-batches per optimizer step: step k = micro-batches 2k-1, 2k
        if micro in (5, 6) or micro >= 11:  # step 3 once, then steps 6, 7, 8 ... in a row
            out = dataclasses.replace(out, loss=out.loss * float("nan"))
        return out, policy_stats

    monkeypatch.setattr(recipe, "concatenated_forward", poisoned)  # what choose_step picks (online: wraps)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        in_process(kind, data, out, "--logging_steps", "1", "--max_nonfinite_steps", "3", "--max_steps", "20")
    assert exit_info.value.code == 3
    records = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    by_step = {r["step"]: r for r in records}
    assert by_step[3]["nonfinite_steps_skipped"] == 1
    assert by_step[4]["loss"] == by_step[4]["loss"]  # training went on after the skipped step (not NaN)
    # The skipped step did not move the learning-rate schedule (steps 3 and 4 see consecutive schedule points).
    assert max(r["step"] for r in records) == 8
    assert "checkpoint-8" in [p.name for p in checkpoints_in(out)]
    from safetensors.torch import load_file

    weights = load_file(out / "checkpoint-8" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values()), "no NaN ever reached the weights"


def test_output_dir_of_another_run_is_refused(data, tmp_path):
    out = tmp_path / "out"
    in_process("sft", data, out, "--max_steps", "2")
    with pytest.raises(UserError, match="already holds a run"):
        in_process("sft", data, out, "--max_steps", "2")
    in_process("sft", data, out, "--max_steps", "2", "--overwrite_output_dir")
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r] == [2]


def test_resume_refuses_another_model_or_batch(data, tmp_path):
    out = tmp_path / "out"
    in_process("dpo", data, out, "--max_steps", "4")
    with pytest.raises(UserError, match="max_length"):
        in_process("dpo", data, out, "--resume_from_checkpoint", "latest", "--max_length", "48")
    with pytest.raises(UserError, match="global batch"):
        in_process("dpo", data, out, "--resume_from_checkpoint", "latest", "--gradient_accumulation_steps", "1")
    with pytest.raises(UserError, match="not a nanodpo checkpoint"):
        in_process("dpo", data, out, "--resume_from_checkpoint", str(tmp_path))
    # Sharded optimizer state resumes only the way it was written; DeepSpeed's ZeRO shards on as many processes.
    checkpoint = checkpoints_in(out)[-1]
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["sharding"] is None
    (checkpoint / "trainer_state.json").write_text(json.dumps({**state, "sharding": "fsdp2"}))
    with pytest.raises(UserError, match="written under fsdp2, this run is under one process or DDP"):
        in_process("dpo", data, out, "--resume_from_checkpoint", "latest")
    cfg = parse_config(DPOConfig, script_args("dpo", data, out)[1:] + ["--max_steps", "4"])
    saved = RunState(**{**state, "sharding": "deepspeed", "world_size": 2})
    with pytest.raises(UserError, match="split over 2 processes; resume it on 2 processes, not 4"):
        _check_compatible(cfg, checkpoint, saved, saved.global_batch, 4, "deepspeed")
    _check_compatible(cfg, checkpoint, saved, saved.global_batch, 2, "deepspeed")  # the same process count: fine
    # The preference family's options change the objective too (simpo's target margin here).
    simpo_out = tmp_path / "simpo"
    in_process("dpo", data, simpo_out, "--max_steps", "4", "--loss_type", "simpo")
    with pytest.raises(UserError, match="simpo_gamma"):
        in_process("dpo", data, simpo_out, "--resume_from_checkpoint", "latest", "--loss_type", "simpo",
                   "--simpo_gamma", "1.0")  # fmt: skip


def test_save_total_limit_keeps_the_newest_and_the_best(data, tmp_path, monkeypatch):
    out = tmp_path / "out"
    tiny.write_jsonl(tmp_path / "eval.jsonl", tiny.preference_rows(4, "explicit"))
    in_process("dpo", data, out, "--save_total_limit", "1", "--eval_dataset", str(tmp_path / "eval.jsonl"),
               "--eval_steps", "2", "--metric_for_best_model", "eval_rewards/margins",
               "--greater_is_better")  # fmt: skip
    state = json.loads((checkpoints_in(out)[-1] / "trainer_state.json").read_text())
    kept = sorted(p.name for p in checkpoints_in(out))
    assert "checkpoint-6" in kept  # the newest
    assert Path(state["best_checkpoint"]).name in kept  # the best by eval margin
    assert len(kept) <= 2


def test_checkpoints_load_nothing_pickled(data, tmp_path):
    """Every non-weight file of a checkpoint loads with weights_only=True (no arbitrary code from a checkpoint)."""
    out = tmp_path / "out"
    in_process("dpo", data, out, "--max_steps", "3")
    ckpt = checkpoints_in(out)[-1]
    for name in ["optimizer.pt", "scheduler.pt", "rng_state_0.pth"]:
        torch.load(ckpt / name, weights_only=True)


DAMAGE = [("model.safetensors", "cut"), ("optimizer.pt", "cut"), ("scheduler.pt", "cut"), ("rng_state_0.pth", "cut"),
          ("trainer_state.json", "cut"), ("config.yaml", b"model: [unclosed"), ("optimizer.pt", "missing")]


def test_each_damaged_file_is_named(data, tmp_path):
    import shutil

    out = tmp_path / "out"
    in_process("sft", data, out, "--max_steps", "3")
    assert checkpoint_problem(out / "checkpoint-2") is None
    for i, (name, damage) in enumerate(DAMAGE):
        checkpoint = shutil.copytree(out / "checkpoint-2", tmp_path / f"copy-{i}")
        file = checkpoint / name
        if damage == "missing":
            file.unlink()
        else:
            file.write_bytes(file.read_bytes()[: file.stat().st_size // 2] if damage == "cut" else damage)
        problem = checkpoint_problem(checkpoint)
        assert problem is not None and problem.startswith(name), (name, damage, problem)
