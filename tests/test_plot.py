"""nanodpo.tools.plot: figures from metrics.jsonl, and the curve diagnostics on synthetic curves (one test per finding,
healthy curves trigger nothing)."""

import json
import math
import random
import subprocess
import sys

import pytest

from nanodpo.errors import UserError
from nanodpo.tools.plot import (
    LN2,
    clean_records,
    diagnose,
    format_report,
    load_records,
    main,
    panel_names,
)

STEPS = 200


def dpo_run(steps=STEPS, epochs=1, seed=0, eval_every=25):
    """A healthy DPO run: loss falls from ln 2, margins and chosen rewards rise, accuracies climb to ~0.9, noise."""
    rng = random.Random(seed)
    records = []
    for t in range(1, steps + 1):
        g = 1 - math.exp(-t / 60)
        margin = 2.0 * g + rng.gauss(0, 0.05)
        chosen = 0.3 * g + rng.gauss(0, 0.02)
        records.append(
            {
                "step": t,
                "loss": math.log1p(math.exp(-margin)) + rng.gauss(0, 0.02),
                "grad_norm": 1.0 + abs(rng.gauss(0, 0.3)),
                "learning_rate": 5e-6 * (1 - t / steps),
                "rewards/chosen": chosen,
                "rewards/rejected": chosen - margin,
                "rewards/margins": margin,
                "rewards/accuracies": min(1.0, max(0.0, 0.5 + 0.4 * g + rng.gauss(0, 0.05))),
                "logps/chosen": -45.0 + 3.0 * g + rng.gauss(0, 0.5),
                "logps/rejected": -50.0 - 15.0 * g + rng.gauss(0, 0.5),
                "logits/chosen": -1.0 + rng.gauss(0, 0.1),
                "logits/rejected": -1.1 + rng.gauss(0, 0.1),
                "num_tokens": 1000 * t,
                "epoch": t * epochs / steps,
            }
        )
        if t % eval_every == 0:
            records.append(
                {
                    "step": t,
                    "eval_loss": math.log1p(math.exp(-1.8 * g)),
                    "eval_rewards/margins": 1.8 * g,
                    "eval_rewards/accuracies": 0.5 + 0.38 * g,
                    "eval_logps/chosen": -45.0 + 2.5 * g,
                    "epoch": t * epochs / steps,
                }
            )
    return records


def codes(records, lang="en"):
    return [f.code for f in diagnose(records, lang)]


def test_healthy_run_triggers_nothing():
    assert diagnose(dpo_run()) == []
    assert format_report([]) == "Curve diagnostics: nothing unusual in the curves."


def test_healthy_smooth_multi_epoch_run_triggers_nothing():
    # Three epochs with a loss that decays smoothly across the boundaries: no steps, no memorising signal.
    assert diagnose(dpo_run(steps=240, epochs=3, seed=1)) == []


def test_nan_and_inf():
    records = dpo_run()
    records[60]["loss"] = "nan"  # as the tracker writes non-finite floats
    records[60]["grad_norm"] = "inf"
    records[70]["rewards/margins"] = float("nan")
    findings = diagnose(records)
    assert [f.code for f in findings] == ["nan"]
    f = findings[0]
    step = records[60]["step"]
    assert f.severity == "error"
    assert f.values["step"] == step and f.values["count"] == 2
    assert f"loss was nan at step {step}" in f.message
    assert "grad_norm" in f.message and "rewards/margins" in f.message
    assert "--learning_rate" in f.remedy


def test_loss_stuck_at_ln2():
    rng = random.Random(2)
    records = [
        {
            "step": t,
            "loss": LN2 + rng.gauss(0, 0.001),
            "grad_norm": 0.0,
            "rewards/margins": rng.gauss(0, 1e-4),
            "rewards/accuracies": 0.0,
            "logps/chosen": -45.0,
            "rewards/chosen": 0.0,
        }
        for t in range(1, 101)
    ]
    findings = diagnose(records)
    assert [f.code for f in findings] == ["loss_stuck_ln2"]
    f = findings[0]
    assert f.values["start"] == 1 and f.values["end"] == 100
    assert "0.693" in f.message and "step 1 to step 100" in f.message and "grad_norm median 0.00" in f.message
    assert "--learning_rate" in f.remedy and "--beta" in f.remedy


def _ramp(t, steps, a, b):
    """a for the first 10% of the steps, b for the last 10%, linear in between."""
    lo, hi = steps // 10, steps - steps // 10
    if t <= lo:
        return a
    if t > hi:
        return b
    return a + (b - a) * (t - lo) / (hi - lo)


def test_chosen_logps_falling_while_margins_grow():
    records = dpo_run()
    for r in records:
        if "loss" in r:
            t = r["step"]
            r["logps/chosen"] = _ramp(t, STEPS, -45.2, -80.1)
            r["logps/rejected"] = _ramp(t, STEPS, -50.0, -130.0)
            r["rewards/margins"] = _ramp(t, STEPS, 0.0, 3.4)
            r["rewards/chosen"] = _ramp(t, STEPS, 0.0, -3.5)
    findings = diagnose(records)
    assert [f.code for f in findings] == ["chosen_logps_falling"]
    f = findings[0]
    assert "logps/chosen fell from -45.2 to -80.1 while rewards/margins rose from 0.00 to 3.40" in f.message
    assert "-50.0 → -130.0" in f.message and "rewards/chosen ends at -3.50" in f.message
    assert "--beta" in f.remedy and "--rpo_alpha" in f.remedy


def online_run(lengths: tuple[float, float], ended: tuple[float, float]) -> list[dict]:
    """A DPO run with online DPO's metrics: answer lengths and the share of answers that end, ramped from start to
    end values; the judge's score rising."""
    records = [r for r in dpo_run() if "loss" in r]
    for r in records:
        t = r["step"]
        r["completions/mean_length"] = _ramp(t, STEPS, *lengths)
        r["val/contain_eos_token"] = _ramp(t, STEPS, *ended)
        r["objective/scores"] = _ramp(t, STEPS, 0.1, 0.9)
        r["objective/kl"] = _ramp(t, STEPS, 0.0, 2.0)
    return records


def test_online_answers_growing_to_the_cap():
    """A judge rewarding length: answers stop ending and grow; the same with steady lengths is healthy."""
    assert diagnose(online_run(lengths=(20.0, 21.0), ended=(0.95, 0.9))) == []
    findings = diagnose(online_run(lengths=(20.0, 64.0), ended=(0.9, 0.05)))
    assert [f.code for f in findings] == ["length_growth"]
    f = findings[0]
    assert "val/contain_eos_token (the share of answers that end) fell from 0.90 to 0.05" in f.message
    assert "completions/mean_length rose from 20.0 to 64.0 tokens" in f.message and "0.10 → 0.90" in f.message
    assert "--missing_eos_penalty" in f.remedy and "samples.jsonl" in f.remedy
    zh = diagnose(online_run(lengths=(20.0, 64.0), ended=(0.9, 0.05)), lang="zh")[0]
    assert "从 0.90 降到 0.05" in zh.message and "--missing_eos_penalty" in zh.remedy


def test_overfitting_stepped_loss_and_early_accuracies():
    # mini_qwen-style: 4 epochs over a small set; the loss is flat within an epoch and drops at each new epoch,
    # accuracies sit at 1.0 from the second epoch on.
    rng = random.Random(3)
    per_epoch, levels = 50, [0.60, 0.12, 0.04, 0.02]
    records = []
    for t in range(1, 4 * per_epoch + 1):
        e = (t - 1) // per_epoch
        records.append(
            {
                "step": t,
                "epoch": t / per_epoch,
                "loss": levels[e] + rng.gauss(0, 0.005),
                "grad_norm": 1.0 + abs(rng.gauss(0, 0.2)),
                "rewards/accuracies": 1.0 if e else 0.7 + rng.gauss(0, 0.05),
                "rewards/margins": 1.0 + 3 * e,
                "logps/chosen": -40.0 + e,
            }
        )
    findings = diagnose(records)
    assert [f.code for f in findings] == ["overfitting"]
    f = findings[0]
    assert "drops in steps at epoch boundaries" in f.message
    assert "0.60 → 0.12 → 0.04 → 0.02" in f.message
    assert "start of epoch 2 (step 51)" in f.message
    assert "rewards/accuracies reached 1.0 by step 51 (26% of training)" in f.message
    assert "--num_train_epochs 1" in f.remedy


def test_overfitting_eval_loss_rising():
    records = dpo_run()
    evals = [r for r in records if "eval_loss" in r]
    for i, r in enumerate(evals):  # eval loss bottoms out at the 3rd evaluation, then climbs
        r["eval_loss"] = 0.40 if i == 2 else 0.40 + 0.08 * abs(i - 2)
    findings = diagnose(records)
    assert [f.code for f in findings] == ["overfitting"]
    assert "eval_loss rose from 0.40 (step 75) to 0.80 (step 200)" in findings[0].message


def test_grad_norm_spikes():
    records = dpo_run()
    train = [r for r in records if "loss" in r]
    train[120]["grad_norm"] = 25.0
    findings = diagnose(records)
    assert [f.code for f in findings] == ["grad_norm_spikes"]
    f = findings[0]
    assert f.values["step"] == train[120]["step"] == 121 and f.values["count"] == 1
    assert "grad_norm spiked 1 time(s): the largest was 25.0 at step 121" in f.message
    assert "--max_grad_norm" in f.remedy


def fp16_run(overflows_at: set[int]) -> list[dict]:
    """A healthy DPO run under --fp16: the loss scale starts at 65536 and halves at each overflowed step (logged
    grad_norm inf, as the loop logs it), and the skips are counted."""
    records, scale, skipped = [], 65536.0, 0
    for record in dpo_run():
        if "loss" in record:
            if record["step"] in overflows_at:
                skipped += 1
                record["grad_norm"] = "inf"
            record.update(loss_scale=scale, overflow_steps_skipped=skipped)
            if record["step"] in overflows_at:
                scale /= 2
        records.append(record)
    return records


def test_fp16_early_overflow_skips_are_normal():
    # The scale finds its level in the first steps, then one overflow when the scaler tries a larger scale.
    records = fp16_run({1, 2, 3, 4, 5, 150})
    assert diagnose(records) == [] and diagnose(records, lang="zh") == []
    records[80]["loss"] = "nan"  # a NaN loss under fp16 is still one
    assert codes(records) == ["nan"]


def test_fp16_loss_scale_collapsing():
    collapsing = fp16_run(set(range(1, STEPS + 1, 10)))  # 20 halvings: 65536 -> 0.0625
    findings = diagnose(collapsing)
    assert [f.code for f in findings] == ["loss_scale_collapsed"] and findings[0].severity == "error"
    assert "fell from 65536.0 to 0.06 by step 200, with 20 overflowed steps skipped" in findings[0].message
    assert "--bf16" in findings[0].remedy and "T4" in findings[0].remedy
    assert "loss scale 崩溃" in format_report(diagnose(collapsing, lang="zh"), lang="zh")

    falling = fp16_run(set(range(1, STEPS + 1, 20)))  # 10 halvings, 4 after step 101: 65536 -> 64
    findings = diagnose(falling)
    assert [f.code for f in findings] == ["loss_scale_falling"] and findings[0].severity == "warning"
    assert "4 overflowed steps skipped in the 99 steps after step 101 (4.0% of them" in findings[0].message
    assert "溢出持续出现" in format_report(diagnose(falling, lang="zh"), lang="zh")


def test_chinese_report():
    records = dpo_run()
    records[60]["loss"] = "nan"
    findings = diagnose(records, lang="zh")
    assert [f.code for f in findings] == ["nan"]
    report = format_report(findings, lang="zh")
    assert report.startswith("曲线诊断：发现 1 个问题")
    assert f"loss 在第 {records[60]['step']} 步为 nan" in report and "建议" in report
    assert format_report([], lang="zh") == "曲线诊断：曲线没有发现异常。"
    with pytest.raises(UserError, match="--lang"):
        diagnose(records, lang="fr")


def write_metrics(path, records):
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def test_load_records_keeps_latest_run_and_restores_nan(tmp_path):
    old = [{"step": s, "loss": 9.0} for s in range(1, 6)]
    rerun = [{"step": s, "loss": 1.0} for s in range(1, 5)]
    resumed = [{"step": s, "loss": "nan"} for s in range(3, 5)]  # from checkpoint-2
    write_metrics(tmp_path / "metrics.jsonl", old + rerun + resumed)
    records = load_records(tmp_path)
    # The rerun (step back to 1) replaced the old run; the resume from step 3 replaced its steps 3-4.
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["loss"] for r in records[:2]] == [1.0, 1.0] and all(math.isnan(r["loss"]) for r in records[2:])


def test_plot_writes_pngs_with_train_and_eval_overlaid(tmp_path, capsys):
    records = dpo_run(steps=60)
    records[30]["loss"] = "nan"
    write_metrics(tmp_path / "metrics.jsonl", records)
    names = panel_names(clean_records(records))
    assert names[:11] == [
        "loss", "grad_norm", "learning_rate", "rewards/chosen", "rewards/rejected", "rewards/margins",
        "rewards/accuracies", "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected",
    ]  # fmt: skip
    assert "num_tokens" not in names and "epoch" not in names

    main([str(tmp_path), "--diagnose"])
    out = capsys.readouterr().out
    assert "wrote 12 figures" in out and "1. [error] non-finite values: loss was nan at step" in out
    pngs = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert pngs == sorted([n.replace("/", "_") + ".png" for n in names] + ["overview.png"])
    assert (tmp_path / "plots" / "rewards_margins.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    import matplotlib.pyplot as plt

    from nanodpo.tools.plot import _draw_panel

    fig, ax = plt.subplots()
    _draw_panel(ax, clean_records(records), "loss", is_dpo=True)
    labels = [line.get_label() for line in ax.get_lines()]
    assert {"train", "eval", "train nan/inf", "ln 2 (policy = reference)"} <= set(labels)
    plt.close(fig)



def test_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        main([str(tmp_path / "missing")])
    with pytest.raises(UserError, match="--report_to jsonl"):
        main([str(tmp_path)])
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo\n')
    with pytest.raises(UserError, match="line 2"):
        main([str(tmp_path)])
    result = subprocess.run(
        [sys.executable, "-m", "nanodpo.tools.plot", str(tmp_path / "missing")], capture_output=True, text=True
    )
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr
