"""The offline demo end to end (README's first command), at reduced size: PT -> SFT -> DPO on Little World data.

The full-size numbers (each stage's wall time, style rates, eval accuracies) come from `python -m
nanodpo.tools.bench demo`; here the same configs (configs/demo_*.yaml) run with fewer steps and smaller data, in a
temporary folder, each stage in its own process as a user runs it, and the test checks what the demo is for: DPO
makes the polite style the model's answer to held-out questions, with high eval accuracy, and the answers stay on
topic.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nanodpo.demo import world
from nanodpo.demo.evaluate import format_report, style_rate

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent

# Reduced sizes: about half of the demo's compute, ~2.5 minutes on 2 cores (configs/demo_*.yaml has the full size).
# Cutting pretraining further (150 steps) still flips the style, but the SFT model no longer answers on topic, so
# the on-topic check below would compare two broken models: 250 steps is the least that keeps it meaningful.
DATA = dict(pt_docs=2000, sft=800, dpo=400, heldout=40, pt_eval=50, sft_eval=40, dpo_eval=50)
OVERRIDES = {
    "pt": ["--max_steps", "250", "--eval_steps", "1000"],  # eval once, at the end
    "sft": ["--num_train_epochs", "2", "--eval_steps", "1000"],
    "dpo": ["--per_device_train_batch_size", "8", "--eval_steps", "1000"],  # 50 steps at the demo's lr
}


def run_script(script: str, args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, str(REPO / script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def last_eval(metrics_path: Path) -> dict:
    records = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines()]
    return [r for r in records if any(k.startswith("eval_") for k in r)][-1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Run the three stages as `python train_*.py --config configs/demo_*.yaml <smaller>` in a fresh folder."""
    cwd = tmp_path_factory.mktemp("demo")
    world.write_demo_data(cwd / "out/demo/data", **DATA)
    for stage, script in (("pt", "train_pt.py"), ("sft", "train_sft.py"), ("dpo", "train_dpo.py")):
        args = ["--config", str(REPO / f"configs/demo_{stage}.yaml"), "--disable_tqdm", *OVERRIDES[stage]]
        result = run_script(script, args, cwd)
        assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    out = cwd / "out/demo"
    heldout = out / "data/heldout.jsonl"
    return {
        "out": out,
        "sft": style_rate(out / "sft", heldout),
        "dpo": style_rate(out / "dpo", heldout),
        "dpo_eval": last_eval(out / "dpo/metrics.jsonl"),
    }


def test_dpo_makes_the_polite_style_the_answer(demo):
    sft, dpo = demo["sft"], demo["dpo"]
    report = format_report(sft, dpo)
    print(report)
    assert dpo["polite"] >= 0.85, report
    assert dpo["polite"] - sft["polite"] >= 0.3, report  # a wide margin (SFT: about half)
    assert dpo["blunt"] <= 0.05, report
    assert "→" in report and "礼貌回答" in report


def test_dpo_eval_accuracy_and_margin(demo):
    record = demo["dpo_eval"]
    assert record["eval_rewards/accuracies"] >= 0.9, record
    assert record["eval_rewards/margins"] > 0, record


def test_answers_stay_on_topic(demo):
    sft, dpo = demo["sft"], demo["dpo"]
    report = format_report(sft, dpo)
    assert sft["on_topic"] >= 0.25, report  # the SFT model answers what was asked (~40% at this size, 63% full size)
    assert dpo["on_topic"] >= sft["on_topic"] - 0.1, report
    # Answers are sentences, not just a polite opener: DPO changed the manners and kept the content.
    lengths = [len(a["answer"]) for a in dpo["answers"]]
    assert sum(lengths) / len(lengths) >= 0.7 * sum(len(a["answer"]) for a in sft["answers"]) / len(lengths)


def test_every_stage_logged_metrics(demo):
    for stage in ("pt", "sft", "dpo"):
        assert last_eval(demo["out"] / stage / "metrics.jsonl")["eval_loss"] > 0


@pytest.mark.parametrize(
    "script, earlier, command",
    [("train_sft.py", "out/demo/pt", "python train_pt.py"), ("train_dpo.py", "out/demo/sft", "python train_sft.py")],
)
def test_a_later_stage_alone_names_the_command_to_run_first(tmp_path, script, earlier, command):
    result = run_script(script, [], tmp_path)  # no arguments: the demo stage, in a folder with no earlier stage
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"run `{command}` first" in result.stderr and earlier in result.stderr
    assert (tmp_path / "out/demo/data/dpo.jsonl").is_file()  # the data is written before the check


def test_bench_demo_is_dispatched_and_documented():
    # The full-size numbers come from `python -m nanodpo.tools.bench demo`; here only that the entry point is wired.
    result = subprocess.run(
        [sys.executable, "-m", "nanodpo.tools.bench", "demo", "--help"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "--accelerate" in result.stdout and "--out" in result.stdout
