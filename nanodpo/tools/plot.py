"""Plot a run's curves from OUTPUT_DIR/metrics.jsonl, and say in plain words what they show (no wandb needed).

Usage
-----
    python -m nanodpo.tools.plot out/demo/dpo                     # PNGs into out/demo/dpo/plots/
    python -m nanodpo.tools.plot out/demo/dpo --out figs/         # ... or into figs/
    python -m nanodpo.tools.plot out/demo/dpo --diagnose          # also print what the curves say
    python -m nanodpo.tools.plot out/demo/dpo --diagnose --lang zh   # 用中文输出诊断

Every run writes the metrics.jsonl this reads, whatever --report_to says. Figures, one per metric with the train
curve and the eval points overlaid (`eval_loss` on the `loss` panel, and so on), plus `overview.png` with all
panels in a grid — the panels a tutorial reads in wandb:

    loss, grad_norm, learning_rate                              every run
    rewards/chosen|rejected|margins|accuracies                  DPO: the implicit rewards β·log(π/π_ref)
    logps/chosen|rejected, logits/chosen|rejected               DPO: the policy's summed log-probs, mean logits
    objective/scores, objective/scores_margin                   online DPO: the judges' mean score of the sampled
                                                                answers, and chosen − rejected
    objective/kl, objective/rlhf_reward                         online DPO: log π_θ − log π_ref of the sampled
                                                                answers, and score − β·kl (what RLHF maximises)
    val/contain_eos_token, completions/mean_length              online DPO: the share of answers that ended, and
                                                                their length in tokens
    loss_scale, overflow_steps_skipped                          --fp16: the loss scaler's scale (log axis), and
                                                                the overflowed steps it skipped
    any other number the run logged (nll_loss, entropy, ...)

Steps whose value was NaN or inf are marked with a red dotted line.

Reading the DPO curves (what `--diagnose` checks, see `diagnose`):
- loss starts at ln 2 ≈ 0.693 (policy = reference) and should fall; rewards/margins should rise above 0 and
  rewards/accuracies toward 1.
- logps/chosen falling while margins grow: both answers are pushed down, the rejected one faster.
- accuracies at 1.0 early, with a loss that drops in steps at each epoch: the model memorises the pairs.
- a loss flat at 0.693: nothing is learned (learning rate, beta, masks).
- grad_norm spikes and NaN: the optimisation is unstable.
- online DPO: objective/scores should rise while objective/kl grows slowly. Answers that stop ending
  (val/contain_eos_token falling) while completions/mean_length climbs to --max_new_tokens: the judge rewards
  length — the policy learns to talk, not to answer.
- --fp16: a few overflow skips early on are normal (the loss scale starts at 2^16 and halves until the gradients
  fit fp16; their grad_norm is inf), and one now and then when the scaler tries a larger scale. A scale that keeps
  falling, toward 0, is not: fp16 cannot hold the gradients.

From Python (train_dpo.py calls `diagnose` at the end of a run):
    from nanodpo.tools.plot import load_records, plot_metrics, diagnose, format_report
    records = load_records("out/demo/dpo")
    plot_metrics(records, "out/demo/dpo/plots")
    print(format_report(diagnose(records), lang="en"))
"""

import argparse
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from nanodpo.errors import UserError, exit_on_user_error, require_extra
from nanodpo.tracking import read_metrics

# The panels, in the order wandb's DPO dashboards are usually read. Other numeric metrics follow, sorted by name.
PANELS = [
    "loss",
    "grad_norm",
    "learning_rate",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
    "objective/scores",
    "objective/scores_margin",
    "objective/kl",
    "objective/rlhf_reward",
    "val/contain_eos_token",
    "completions/mean_length",
]
# Bookkeeping fields: the x axis or counters, not curves worth a panel.
NOT_PLOTTED = {"step", "epoch", "elapsed_s", "num_tokens"}

LN2 = math.log(2)  # DPO's sigmoid loss when the policy scores both answers like the reference: -log σ(0)


# ----------------------------------------------------------------------------------------------------------------
# 1. Reading metrics.jsonl


def _number(value) -> float | None:
    """A metric value as a float: numbers as they are, the strings "nan"/"inf"/"-inf" (how the tracker writes them,
    since JSON has no NaN) as float NaN/inf; anything else (text, bools, lists) is not a curve value."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.strip().lower() in ("nan", "inf", "+inf", "-inf", "infinity", "-infinity"):
        return float(value.strip().lower().replace("infinity", "inf"))
    return None


def clean_records(records: list[dict]) -> list[dict]:
    """Records with float values (NaN/inf restored from strings), keeping only the latest run in the file.

    metrics.jsonl is opened in append mode: running again into the same OUTPUT_DIR, or resuming from a checkpoint,
    adds records whose step goes back. A record with a smaller step than the one before it drops every earlier
    record at that step or later, so a rerun replaces the old run and a resumed run continues the old one.
    """
    kept: list[dict] = []
    last_step = None
    for raw in records:
        step = _number(raw.get("step"))
        if step is None or not math.isfinite(step):
            continue
        if last_step is not None and step < last_step:
            kept = [r for r in kept if r["step"] < step]
        last_step = step
        record = {"step": int(step)}
        for name, value in raw.items():
            number = _number(value)
            if name != "step" and number is not None:
                record[name] = number
        kept.append(record)
    return kept


def load_records(output_dir: str | Path) -> list[dict]:
    """The cleaned records of OUTPUT_DIR/metrics.jsonl (OUTPUT_DIR may also be the metrics file itself)."""
    path = Path(output_dir)
    if not path.exists():
        raise UserError(f"{path}: no such folder (pass the OUTPUT_DIR of a training run)")
    if path.is_dir():
        path = path / "metrics.jsonl"
        if not path.is_file():
            raise UserError(
                f"{path} not found: the run did not log to a file; train with --report_to jsonl (the default)"
            )
    try:
        records = read_metrics(path)
    except ValueError as err:  # json.JSONDecodeError
        lines = path.read_text(encoding="utf-8").splitlines()
        bad = next(i for i, line in enumerate(lines, 1) if line.strip() and not _parses(line))
        raise UserError(f"{path}, line {bad}: not a JSON object ({err.msg})") from None
    cleaned = clean_records(records)
    if not cleaned:
        raise UserError(f"{path} holds no records with a 'step' yet (did the run log anything?)")
    return cleaned


def _parses(line: str) -> bool:
    try:
        json.loads(line)
        return True
    except ValueError:
        return False


def series(records: list[dict], name: str, finite_only: bool = True) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, in file order. Train and eval never mix: eval names carry an `eval_` prefix."""
    steps, values = [], []
    for record in records:
        value = record.get(name)
        if value is None or (finite_only and not math.isfinite(value)):
            continue
        steps.append(record["step"])
        values.append(value)
    return steps, values


def panel_names(records: list[dict]) -> list[str]:
    """The metrics to draw, eval names folded onto their train name (`eval_loss` → the `loss` panel)."""
    found = set()
    for record in records:
        for name in record:
            base = name[len("eval_") :] if name.startswith("eval_") else name
            if base not in NOT_PLOTTED:
                found.add(base)
    return [p for p in PANELS if p in found] + sorted(found - set(PANELS))


# ----------------------------------------------------------------------------------------------------------------
# 2. Figures


def _draw_panel(ax, records: list[dict], name: str, is_dpo: bool) -> None:
    for label, key, style in (("train", name, "-"), ("eval", "eval_" + name, "o-")):
        steps, values = series(records, key)
        if steps:
            ax.plot(steps, values, style, label=label, markersize=3, linewidth=1.2)
        all_steps, all_values = series(records, key, finite_only=False)
        bad_steps = [s for s, v in zip(all_steps, all_values) if not math.isfinite(v)]
        for i, step in enumerate(bad_steps):
            ax.axvline(step, color="red", linestyle=":", linewidth=1, label=f"{label} nan/inf" if i == 0 else None)
    if name == "loss" and is_dpo:
        ax.axhline(LN2, color="grey", linestyle="--", linewidth=0.8, label="ln 2 (policy = reference)")
    if name in ("rewards/margins", "rewards/chosen", "rewards/rejected"):
        ax.axhline(0.0, color="grey", linestyle="--", linewidth=0.8)
    if name == "loss_scale":
        ax.set_yscale("log", base=2)  # the scaler halves and doubles it
    if name in ("rewards/accuracies", "val/contain_eos_token"):
        ax.set_ylim(-0.05, 1.05)
        ax.axhline(0.5, color="grey", linestyle="--", linewidth=0.8)
    ax.set_title(name)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_metrics(records: list[dict], out_dir: str | Path) -> list[Path]:
    """Write one PNG per panel (`rewards/margins` → rewards_margins.png) and overview.png; returns the paths."""
    # Imported here: matplotlib is slow to import (and optional), and its backend must be chosen before pyplot is.
    require_extra("matplotlib", "plot", "python -m nanodpo.tools.plot")
    import matplotlib

    matplotlib.use("Agg")  # files only, no window: works on servers without a display
    import matplotlib.pyplot as plt

    records = clean_records(records)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = panel_names(records)
    if not names:
        raise UserError("metrics.jsonl has no numeric metrics to plot")
    # The ln 2 line marks where DPO's sigmoid loss starts (policy = reference); other losses (ipo, simpo, cpo, orpo,
    # kto, an added NLL term) start elsewhere, so it is drawn only for a run whose loss starts there.
    _, losses = series(records, "loss")
    is_dpo = bool(losses) and abs(losses[0] - LN2) < 0.05
    is_dpo = is_dpo and any("rewards/margins" in r or "eval_rewards/margins" in r for r in records)
    written = []
    for name in names:
        fig, ax = plt.subplots(figsize=(6, 4))
        _draw_panel(ax, records, name, is_dpo)
        fig.subplots_adjust(left=0.15, right=0.97, top=0.91, bottom=0.13)  # fixed margins: faster than tight_layout
        path = out_dir / (name.replace("/", "_") + ".png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.5 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        _draw_panel(ax, records, name, is_dpo)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.tight_layout()
    path = out_dir / "overview.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    written.append(path)
    return written


# ----------------------------------------------------------------------------------------------------------------
# 3. Diagnostics: what the curves say, with the values that say it and what to try.

MIN_POINTS = 5  # fewer logged train steps than this: too short to judge a trend
EDGE_FRACTION = 0.1  # "start" and "end" of a curve: the mean of its first / last 10% of points (at least 1)
STUCK_TOLERANCE = 0.01  # loss within ln 2 ± this over the second half of the run: not learning
SPIKE_FACTOR = 10.0  # a grad_norm above this × the median of the previous SPIKE_WINDOW values is a spike
SPIKE_WINDOW = 20
SPIKE_HISTORY = 5  # need this many earlier values before judging a spike
COLLAPSED_SCALE = 1.0  # fp16: a loss scale below this no longer protects small gradients (training.MIN_LOSS_SCALE)
LATE_OVERFLOWS = 0.01  # fp16: overflow skips in the second half of a run above this fraction of its steps (and 3)
LENGTH_EOS_DROP = 0.25  # online DPO: val/contain_eos_token falling by more than this from start to end ...
LENGTH_GROWTH = 1.2  # ... while completions/mean_length grows by more than this factor: answers growing to the cap


@dataclass
class Finding:
    code: str  # nan | loss_stuck_ln2 | chosen_logps_falling | overfitting | grad_norm_spikes | loss_scale_* |
    # length_growth
    severity: str  # "error" (the run is broken) or "warning" (worth a look)
    message: str  # what the curves show, naming the values that triggered it
    remedy: str  # what to try
    values: dict = field(default_factory=dict)  # the numbers behind the message

    def __str__(self) -> str:
        return f"[{self.severity}] {self.message}\n  -> {self.remedy}"


TEXT = {
    "en": {
        "nan": (
            "non-finite values: {metric} was {value} at step {step}, the first of {count} logged step(s) with "
            "NaN/inf (metrics affected: {metrics}).",
            "The run diverged or divided by zero. Lower --learning_rate or add warmup (--warmup_ratio 0.1), keep "
            "--max_grad_norm 1.0, prefer bf16 to fp16 where the GPU has it (Ampere or later), and look for pairs "
            "whose completion is empty or cut away by --max_length (a mask with no tokens). Restart from a "
            "checkpoint saved before step {step}.",
        ),
        "loss_stuck_ln2": (
            "loss is stuck at ln 2 ≈ 0.693: from step {start} to step {end} it stayed within 0.693 ± {tol} (last "
            "{last:.4f}), rewards/margins {margin}, grad_norm median {grad}. The policy still scores chosen and "
            "rejected answers exactly like the reference: nothing is being learned.",
            "Raise --learning_rate (DPO: about 5e-7 to 5e-6 for full fine-tuning, 5e-6 to 5e-5 with LoRA); check "
            "--beta is not tiny (0.1 is usual); check the completions are not masked away (--max_length, "
            "--max_prompt_length) and that the policy has trainable weights (grad_norm should be > 0).",
        ),
        "chosen_logps_falling": (
            "logps/chosen fell from {c0} to {c1} while rewards/margins rose from {m0} to {m1} (logps/rejected "
            "{r0} → {r1}, rewards/chosen ends at {rc1}): both answers are being pushed down, the rejected one "
            "faster. The margin grows, but the chosen answers also become less likely — probability moves to "
            "answers in neither set (a known DPO failure mode).",
            "A small drop is common; a large one can hurt answers — read some (python -m nanodpo.tools.chat). Lower "
            "--learning_rate or train fewer steps, raise --beta to stay closer to the reference, add an SFT term "
            "on the chosen answers (--rpo_alpha 1.0), and make sure the SFT model was trained on answers like the "
            "chosen ones (DPO works best on its own distribution).",
        ),
        "overfitting": (
            "signs of memorising the training data: {evidence}.",
            "The model is memorising its training pairs (typical of several epochs over a small set): train 1 "
            "epoch (--num_train_epochs 1), use more or more varied data, lower --learning_rate or raise --beta, "
            "judge the run by eval metrics on held-out pairs (--eval_steps), and keep the checkpoint from before "
            "eval_loss rises (--save_steps).",
        ),
        "stepped": (
            "the train loss drops in steps at epoch boundaries — mean loss per epoch {per_epoch}, largest drop "
            "{jump} right at the start of epoch {epoch} (step {step}), while within an epoch it barely moves"
        ),
        "acc_early": "rewards/accuracies reached {acc} by step {step} ({pct}% of training) and stayed there",
        "eval_rising": "eval_loss rose from {e0} (step {s0}) to {e1} (step {s1}) while the train loss fell to {t1}",
        "grad_norm_spikes": (
            "grad_norm spiked {count} time(s): the largest was {value} at step {step}, {ratio}× the running median "
            "{median} (spike steps: {steps}).",
            "Clipping (--max_grad_norm 1.0; 0 disables it) limits each update, so a rare spike is harmless. "
            "Frequent or growing spikes: lower --learning_rate or warm up longer, look at the examples of those "
            "steps (very long or unusual pairs), prefer bf16 to fp16 where the GPU has it. If the loss jumps at "
            "the same steps, resume from an earlier checkpoint with a lower learning rate.",
        ),
        "loss_scale_collapsed": (
            "the fp16 loss scale collapsed: it fell from {first} to {last} by step {step}, with {skipped} overflowed "
            "steps skipped. At a scale below 1 the gradients overflow fp16 even scaled down: this is not the scaler "
            "finding its level (a few early halvings from 65536 are), the run itself overflows.",
            "Lower --learning_rate or warm up longer, keep --max_grad_norm 1.0, and look at the examples of the "
            "last steps (very long or unusual rows). On an Ampere or later GPU train with --bf16 (fp32's range, no "
            "loss scaling); on a T4/V100 resume from a checkpoint saved before step {step} with a lower learning "
            "rate.",
        ),
        "loss_scale_falling": (
            "fp16 overflows keep coming: {late} overflowed steps skipped in the {span} steps after step {start} "
            "({pct}% of them, each a lost update), and the loss scale went from {first} to {last}. A few skips "
            "early on are normal; a scale that keeps falling is heading for a collapse.",
            "Lower --learning_rate, keep --max_grad_norm 1.0, and look at the examples of those steps. On an Ampere "
            "or later GPU prefer --bf16, which needs no loss scaling.",
        ),
        "length_growth": (
            "the sampled answers are growing until --max_new_tokens cuts them off: val/contain_eos_token (the share "
            "of answers that end) fell from {e0} to {e1} while completions/mean_length rose from {n0} to {n1} tokens "
            "(objective/scores {s0} → {s1}). A judge that scores longer answers higher teaches exactly this: the "
            "policy learns to talk, not to answer.",
            "Read what the judge preferred (OUTPUT_DIR/samples.jsonl): if the chosen answers are simply the longer "
            "ones, fix the judge (score per token, or add a judge that penalises rambling, --reward_weights), and "
            "set --missing_eos_penalty (e.g. 1.0) so that an answer which never ends loses its pair; a larger --beta "
            "keeps the policy closer to the reference.",
        ),
        "joiner": "; ",
        "header": "Curve diagnostics: {n} finding(s)",
        "healthy": "Curve diagnostics: nothing unusual in the curves.",
        "remedy": "What to try: ",
        "error": "error",
        "warning": "warning",
    },
    "zh": {
        "nan": (
            "出现非有限值：{metric} 在第 {step} 步为 {value}，共有 {count} 个记录步含 NaN/inf（涉及指标：{metrics}）。",
            "训练发散或出现了除以零。请降低 --learning_rate 或加入预热（--warmup_ratio 0.1），"
            "保持 --max_grad_norm 1.0，GPU 支持时（Ampere 及更新）优先用 bf16 而不是 fp16，"
            "并检查是否有回答为空或被 --max_length 截掉的样本（掩码里没有 token）。"
            "从第 {step} 步之前保存的检查点重新开始。",
        ),
        "loss_stuck_ln2": (
            "loss 停在 ln 2 ≈ 0.693：从第 {start} 步到第 {end} 步一直在 0.693 ± {tol} 之内（最后为 {last:.4f}），"
            "rewards/margins 为 {margin}，grad_norm 中位数为 {grad}。策略模型对 chosen 和 rejected 的打分仍与参考模型"
            "完全相同：模型什么也没学到。",
            "提高 --learning_rate（DPO 全参数微调约 5e-7 到 5e-6，LoRA 约 5e-6 到 5e-5）；检查 --beta 没有设得过小"
            "（常用 0.1）；检查回答部分没有被掩码掉（--max_length、--max_prompt_length），并确认策略模型有可训练的参数"
            "（grad_norm 应大于 0）。",
        ),
        "chosen_logps_falling": (
            "logps/chosen 从 {c0} 降到 {c1}，而 rewards/margins 从 {m0} 升到 {m1}（logps/rejected {r0} → {r1}，"
            "rewards/chosen 最终为 {rc1}）：两个回答的概率都在被压低，rejected 降得更快。差距在变大，但 chosen 回答"
            "本身也变得更不可能——概率流向了两者之外的回答（DPO 的一种已知失效模式）。",
            "小幅下降很常见；下降很多时回答质量可能变差，请实际看看回答（python -m nanodpo.tools.chat）。降低 "
            "--learning_rate 或减少训练步数，增大 --beta 使模型更贴近参考模型，对 chosen 回答加入 SFT 项"
            "（--rpo_alpha 1.0），并确保 SFT 模型训练过与 chosen 类似的回答（DPO 在自身分布上效果最好）。",
        ),
        "overfitting": (
            "模型在记忆训练数据：{evidence}。",
            "模型在背诵训练样本（多轮 epoch 训练小数据集时很典型）：只训练 1 个 epoch（--num_train_epochs 1），"
            "使用更多、更多样的数据，降低 --learning_rate 或增大 --beta，用留出数据上的评估指标判断训练效果"
            "（--eval_steps），并保留 eval_loss 上升之前的检查点（--save_steps）。",
        ),
        "stepped": (
            "训练 loss 在每个 epoch 开始时阶梯式下降——各 epoch 平均 loss 为 {per_epoch}，最大的一次下降 {jump} "
            "恰好发生在第 {epoch} 个 epoch 开始时（第 {step} 步），而在 epoch 内部几乎不变"
        ),
        "acc_early": "rewards/accuracies 在第 {step} 步（训练进度的 {pct}%）就达到 {acc} 并一直保持",
        "eval_rising": "eval_loss 从 {e0}（第 {s0} 步）升到 {e1}（第 {s1} 步），而训练 loss 降到了 {t1}",
        "grad_norm_spikes": (
            "grad_norm 出现 {count} 次尖峰：最大为第 {step} 步的 {value}，是滑动中位数 {median} 的 {ratio} 倍"
            "（尖峰所在步：{steps}）。",
            "梯度裁剪（--max_grad_norm 1.0；设为 0 则关闭）限制了每次更新，偶尔的尖峰无害。尖峰频繁或越来越大时：降低 "
            "--learning_rate 或延长预热，检查这些步对应的样本（特别长或异常的样本对），"
            "GPU 支持时优先用 bf16 而不是 fp16。如果 loss 在同一步也跳了起来，请用更低的学习率从更早的检查点恢复训练。",
        ),
        "loss_scale_collapsed": (
            "fp16 的 loss scale 崩溃了：到第 {step} 步已从 {first} 降到 {last}，共跳过 {skipped} 个溢出步。"
            "scale 小于 1 时，梯度缩小后仍超出 fp16 的范围："
            "这不是 scaler 在寻找合适的值（开始时从 65536 减半几次才是），而是训练本身在溢出。",
            "降低 --learning_rate 或延长预热，保持 --max_grad_norm 1.0，并检查最后几步的样本（特别长或异常的样本）。"
            "在 Ampere 及更新的 GPU 上改用 --bf16（与 fp32 范围相同，无需 loss scaling）；在 T4/V100 上用更低的学习率"
            "从第 {step} 步之前保存的检查点恢复训练。",
        ),
        "loss_scale_falling": (
            "fp16 溢出持续出现：第 {start} 步之后的 {span} 步中跳过了 {late} 个溢出步（占 {pct}%，每个都是一次丢失的"
            "更新），loss scale 从 {first} 变为 {last}。开始时跳过几步是正常的；scale 一直下降则正在走向崩溃。",
            "降低 --learning_rate，保持 --max_grad_norm 1.0，并检查这些步对应的样本。在 Ampere 及更新的 GPU 上优先用 "
            "--bf16，它不需要 loss scaling。",
        ),
        "length_growth": (
            "采样出的回答越来越长，直到被 --max_new_tokens 截断：val/contain_eos_token（能正常结束的回答所占比例）从 "
            "{e0} 降到 {e1}，而 completions/mean_length 从 {n0} 增加到 {n1} 个 token（objective/scores {s0} → {s1}）。"
            "给更长回答打更高分的评判器教出来的正是这个：策略模型学会的是多说，而不是回答问题。",
            "看看评判器偏好了什么（OUTPUT_DIR/samples.jsonl）：如果被选中的回答只是更长的那个，请修正评判器（按 token "
            "平均打分，或加一个惩罚啰嗦的评判器，--reward_weights），并设置 --missing_eos_penalty（例如 1.0），"
            "让永远不结束的回答输掉它所在的样本对；更大的 --beta 能让策略模型更贴近参考模型。",
        ),
        "joiner": "；",
        "header": "曲线诊断：发现 {n} 个问题",
        "healthy": "曲线诊断：曲线没有发现异常。",
        "remedy": "建议：",
        "error": "错误",
        "warning": "警告",
    },
}


def _fmt(value: float) -> str:
    """Numbers as a reader wants them in a sentence: -45.2, 3.40, 0.0012."""
    if not math.isfinite(value):
        return str(value)
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 0.01 or value == 0:
        return f"{value:.2f}"
    return f"{value:.2g}"


def _edges(values: list[float]) -> tuple[float, float]:
    """The mean of the first and of the last EDGE_FRACTION of the values (noise-robust start and end)."""
    k = max(1, round(len(values) * EDGE_FRACTION))
    return statistics.fmean(values[:k]), statistics.fmean(values[-k:])


def _texts(lang: str) -> dict:
    if lang not in TEXT:
        raise UserError(f"--lang {lang}: choose one of {', '.join(TEXT)}")
    return TEXT[lang]


def _finding(code: str, severity: str, lang: str, values: dict) -> Finding:
    message, remedy = _texts(lang)[code]
    return Finding(code, severity, message.format(**values), remedy.format(**values), values)


def _nonfinite_names(record: dict) -> list[str]:
    """The record's NaN/inf metrics — but for an fp16 run's inf grad_norm: an overflow the loss scaler skipped
    (`_check_loss_scale` judges those)."""
    overflow = "loss_scale" in record and math.isfinite(record.get("loss", 0.0))
    return [k for k, v in record.items() if not math.isfinite(v) and not (overflow and k == "grad_norm")]


def _check_nan(records: list[dict], lang: str) -> Finding | None:
    bad_records = [r for r in records if _nonfinite_names(r)]
    if not bad_records:
        return None
    first = bad_records[0]
    metrics = []
    for record in bad_records:
        metrics += [k for k in _nonfinite_names(record) if k not in metrics]
    first_bad = _nonfinite_names(first)
    first_metric = "loss" if "loss" in first_bad else first_bad[0]
    values = dict(
        metric=first_metric,
        value=str(first[first_metric]),
        step=first["step"],
        count=len(bad_records),
        metrics=", ".join(metrics),
    )
    return _finding("nan", "error", lang, values)


def _check_stuck(records: list[dict], lang: str) -> Finding | None:
    steps, losses = series(records, "loss")
    if len(losses) < MIN_POINTS:
        return None
    half = len(losses) // 2
    if max(abs(v - LN2) for v in losses[half:]) >= STUCK_TOLERANCE:
        return None
    # From where the loss entered the band for good (usually step 1: it never left ln 2).
    start = half
    while start > 0 and abs(losses[start - 1] - LN2) < STUCK_TOLERANCE:
        start -= 1
    _, margins = series(records, "rewards/margins")
    _, grads = series(records, "grad_norm")
    values = dict(
        start=steps[start],
        end=steps[-1],
        tol=STUCK_TOLERANCE,
        last=losses[-1],
        margin=_fmt(statistics.fmean(margins[half:])) if margins[half:] else "n/a",
        grad=_fmt(statistics.median(grads)) if grads else "n/a",
    )
    return _finding("loss_stuck_ln2", "warning", lang, values)


def _check_chosen_falling(records: list[dict], lang: str) -> Finding | None:
    _, chosen = series(records, "logps/chosen")
    _, margins = series(records, "rewards/margins")
    if len(chosen) < MIN_POINTS or len(margins) < MIN_POINTS:
        return None
    c0, c1 = _edges(chosen)
    m0, m1 = _edges(margins)
    # A drop of a nat in a summed log-prob is noise; demand 5% of its size too (log-probs scale with length).
    if not (c1 < c0 - max(1.0, 0.05 * abs(c0)) and m1 > m0 + 0.1):
        return None
    _, rejected = series(records, "logps/rejected")
    _, rewards_chosen = series(records, "rewards/chosen")
    r0, r1 = _edges(rejected) if rejected else (math.nan, math.nan)
    rc1 = _edges(rewards_chosen)[1] if rewards_chosen else math.nan
    values = dict(c0=_fmt(c0), c1=_fmt(c1), m0=_fmt(m0), m1=_fmt(m1), r0=_fmt(r0), r1=_fmt(r1), rc1=_fmt(rc1))
    return _finding("chosen_logps_falling", "warning", lang, values)


def _epoch_groups(records: list[dict]) -> list[list[tuple[int, float]]]:
    """Train (step, loss) points grouped by epoch (epoch = step / steps_per_epoch, so 1.0 still ends epoch 1)."""
    groups: dict[int, list[tuple[int, float]]] = {}
    for record in records:
        loss, epoch = record.get("loss"), record.get("epoch")
        if loss is None or epoch is None or not math.isfinite(loss) or not math.isfinite(epoch):
            continue
        groups.setdefault(max(0, math.ceil(epoch - 1e-9) - 1), []).append((record["step"], loss))
    return [groups[i] for i in sorted(groups)]


def _stepped_loss(records: list[dict], texts: dict) -> str | None:
    """A loss that drops at each epoch boundary and stays flat within epochs: the model learns from seeing the
    same examples again, i.e. it memorises them."""
    groups = [g for g in _epoch_groups(records) if len(g) >= 2]
    if len(groups) < 2:
        return None
    within_diffs = [abs(b[1] - a[1]) for g in groups for a, b in zip(g, g[1:])]
    noise = statistics.median(within_diffs)
    best = None
    for epoch_index, (before, after) in enumerate(zip(groups, groups[1:]), start=2):
        k = max(1, min(len(before), len(after)) // 4)
        end_before = statistics.fmean(v for _, v in before[-k:])
        start_after = statistics.fmean(v for _, v in after[:k])
        jump = end_before - start_after
        within_after = start_after - statistics.fmean(v for _, v in after[-k:])
        if jump > 0.05 and jump > 2 * max(within_after, 0.0) and jump > 3 * noise / math.sqrt(k):
            if best is None or jump > best[0]:
                best = (jump, epoch_index, after[0][0])
    if best is None:
        return None
    per_epoch = " → ".join(_fmt(statistics.fmean(v for _, v in g)) for g in groups)
    return texts["stepped"].format(per_epoch=per_epoch, jump=_fmt(best[0]), epoch=best[1], step=best[2])


def _accuracies_early(records: list[dict], texts: dict) -> str | None:
    steps, accs = series(records, "rewards/accuracies")
    if len(accs) < MIN_POINTS:
        return None
    k = max(1, round(len(accs) * EDGE_FRACTION))
    for i in range(len(accs) - k + 1):
        if statistics.fmean(accs[i : i + k]) >= 0.99 and min(accs[i:]) >= 0.95:
            step = steps[i]
            if step <= steps[-1] / 3:
                return texts["acc_early"].format(acc="1.0", step=step, pct=round(100 * step / steps[-1]))
            return None
    return None


def _eval_rising(records: list[dict], texts: dict) -> str | None:
    steps, losses = series(records, "eval_loss")
    if len(losses) < 3:
        return None
    best = min(range(len(losses)), key=losses.__getitem__)
    if best == len(losses) - 1 or losses[-1] <= losses[best] + max(0.02, 0.1 * abs(losses[best])):
        return None
    _, train = series(records, "loss")
    if not train:
        return None
    return texts["eval_rising"].format(
        e0=_fmt(losses[best]), s0=steps[best], e1=_fmt(losses[-1]), s1=steps[-1], t1=_fmt(_edges(train)[1])
    )


def _check_overfitting(records: list[dict], lang: str) -> Finding | None:
    texts = _texts(lang)
    stepped = _stepped_loss(records, texts)
    rising = _eval_rising(records, texts)
    if stepped is None and rising is None:
        return None  # accuracies at 1.0 alone may just mean an easy task
    evidence = [e for e in (_accuracies_early(records, texts), stepped, rising) if e]
    return _finding("overfitting", "warning", lang, dict(evidence=texts["joiner"].join(evidence)))


def _check_grad_spikes(records: list[dict], lang: str) -> Finding | None:
    steps, norms = series(records, "grad_norm")
    spikes = []  # (step, value, running median)
    for i in range(SPIKE_HISTORY, len(norms)):
        median = statistics.median(norms[max(0, i - SPIKE_WINDOW) : i])
        if median > 0 and norms[i] > SPIKE_FACTOR * median and norms[i] > 1e-3:
            spikes.append((steps[i], norms[i], median))
    if not spikes:
        return None
    step, value, median = max(spikes, key=lambda s: s[1] / s[2])
    shown = ", ".join(str(s[0]) for s in spikes[:8]) + (", ..." if len(spikes) > 8 else "")
    values = dict(
        count=len(spikes), value=_fmt(value), step=step, ratio=round(value / median), median=_fmt(median), steps=shown
    )
    return _finding("grad_norm_spikes", "warning", lang, values)


def _check_loss_scale(records: list[dict], lang: str) -> Finding | None:
    """--fp16: the loss scale collapsing (below COLLAPSED_SCALE), or overflow skips that keep coming in the second
    half of the run. A few early skips, while the scale halves down from 65536, are normal and say nothing."""
    steps, scales = series(records, "loss_scale")
    _, skipped = series(records, "overflow_steps_skipped")
    if not scales or len(skipped) != len(scales):
        return None
    values = dict(first=_fmt(scales[0]), last=_fmt(scales[-1]), step=steps[-1], skipped=int(skipped[-1]))
    if scales[-1] < COLLAPSED_SCALE:
        return _finding("loss_scale_collapsed", "error", lang, values)
    half = len(steps) // 2
    late, span = skipped[-1] - skipped[half], steps[-1] - steps[half]
    if len(steps) < MIN_POINTS or late <= max(3, LATE_OVERFLOWS * span):
        return None
    values.update(late=int(late), span=span, start=steps[half], pct=f"{100 * late / span:.1f}")
    return _finding("loss_scale_falling", "warning", lang, values)


def _check_length_growth(records: list[dict], lang: str) -> Finding | None:
    """Online DPO: answers that stop ending while they grow — what a judge that rewards length teaches."""
    _, ended = series(records, "val/contain_eos_token")
    _, lengths = series(records, "completions/mean_length")
    if len(ended) < MIN_POINTS or len(lengths) < MIN_POINTS:
        return None
    e0, e1 = _edges(ended)
    n0, n1 = _edges(lengths)
    if not (e1 < e0 - LENGTH_EOS_DROP and n1 > LENGTH_GROWTH * n0):
        return None
    _, scores = series(records, "objective/scores")
    s0, s1 = _edges(scores) if scores else (math.nan, math.nan)
    values = dict(e0=_fmt(e0), e1=_fmt(e1), n0=_fmt(n0), n1=_fmt(n1), s0=_fmt(s0), s1=_fmt(s1))
    return _finding("length_growth", "warning", lang, values)


def diagnose(records: list[dict], lang: str = "en") -> list[Finding]:
    """What the curves say: a list of findings (empty for a healthy run), each with the values that triggered it
    and a remedy, in English (lang="en") or Chinese (lang="zh"). `records` as read from metrics.jsonl."""
    _texts(lang)
    records = clean_records(records)
    checks = (_check_nan, _check_stuck, _check_chosen_falling, _check_overfitting, _check_grad_spikes,
              _check_loss_scale, _check_length_growth)  # fmt: skip
    return [f for f in (check(records, lang) for check in checks) if f is not None]


def format_report(findings: list[Finding], lang: str = "en") -> str:
    """The findings as a short numbered report (what a run prints at its end)."""
    texts = _texts(lang)
    if not findings:
        return texts["healthy"]
    lines = [texts["header"].format(n=len(findings))]
    for i, f in enumerate(findings, 1):
        lines.append(f"{i}. [{texts[f.severity]}] {f.message}")
        lines.append(f"   {texts['remedy']}{f.remedy}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# 4. Command line


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m nanodpo.tools.plot", description="Plot OUTPUT_DIR/metrics.jsonl and diagnose the curves."
    )
    parser.add_argument("output_dir", help="a training run's OUTPUT_DIR (or its metrics.jsonl)")
    parser.add_argument("--out", default=None, help="where to write the PNGs (default: OUTPUT_DIR/plots)")
    parser.add_argument("--diagnose", action="store_true", help="also print what the curves say")
    parser.add_argument("--lang", default="en", choices=sorted(TEXT), help="language of the diagnostics")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    records = load_records(args.output_dir)
    source = Path(args.output_dir)
    out = Path(args.out) if args.out else (source if source.is_dir() else source.parent) / "plots"
    written = plot_metrics(records, out)
    print(f"wrote {len(written)} figures to {out}/ (overview.png has them all)")
    if args.diagnose:
        print()
        print(format_report(diagnose(records, args.lang), args.lang))


if __name__ == "__main__":
    exit_on_user_error(main)
