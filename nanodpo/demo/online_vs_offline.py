"""Online against offline DPO on the demo: the same SFT model, the same number of steps — which answers better?

    python train_pt.py && python train_sft.py       # the demo's first two stages (out/demo/pt, out/demo/sft)
    python -m nanodpo.demo.online_vs_offline        # both runs, then the held-out table

Offline: configs/demo_dpo.yaml — 1,000 written pairs (the polite answer chosen, the blunt one rejected, same facts),
16 a step for one epoch: 63 steps. Online: configs/demo_online_dpo.yaml — the same 1,000 prompts without their
answers; every step the policy answers 16 of them twice and the politeness rule (nanodpo/demo/judge.py) picks the
chosen one: 63 steps too, with the same learning rate and schedule. Both start from out/demo/sft and go to
out/demo/online_vs_offline/{offline,online}. Then every model answers the 100 held-out questions greedily
(nanodpo/demo/evaluate.py); the table is printed and saved to out/demo/online_vs_offline/results.json, and the online
run's judge score per logged step is printed (its curve: python -m nanodpo.tools.plot
out/demo/online_vs_offline/online).
"""

import argparse
import json
from pathlib import Path

from nanodpo.demo.evaluate import style_rate
from nanodpo.demo.family import format_table, train_dpo_run
from nanodpo.demo.stages import DATA_DIR, DEMO_DIR, config_path
from nanodpo.demo.world import write_demo_data
from nanodpo.tracking import read_metrics

OUT_DIR = DEMO_DIR / "online_vs_offline"
RUNS = {"offline": "dpo", "online": "online_dpo"}  # run -> its configs/demo_<name>.yaml


def train(run: str) -> Path:
    return train_dpo_run(run, OUT_DIR / run, {"config": config_path(RUNS[run])})


def score_curve(run_dir: Path) -> str:
    """The judge's mean score of the sampled answers (and the share that ended) at each logged step."""
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "objective/scores" in r]
    return "\n".join(
        f"step {r['step']:3d}  objective/scores {r['objective/scores']:+.2f}  kl {r['objective/kl']:.2f}  "
        f"ended {r['val/contain_eos_token']:.0%}  length {r['completions/mean_length']:.1f}"
        for r in records
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m nanodpo.demo.online_vs_offline", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="*", default=list(RUNS), help="which of offline, online (default: both)")
    p.add_argument("--skip_training", action="store_true", help="only evaluate out/demo/online_vs_offline/<run>")
    args = p.parse_args(argv)
    if not (DEMO_DIR / "sft" / "config.json").is_file():
        raise SystemExit(f"error: {DEMO_DIR / 'sft'} is missing: run python train_pt.py && python train_sft.py")
    if not (DATA_DIR / "dpo_prompts.jsonl").is_file():  # data written before online DPO existed: the same, and more
        write_demo_data(DATA_DIR)
    for run in args.runs:
        if not args.skip_training:
            train(run)
    heldout = DATA_DIR / "heldout.jsonl"
    results = {"sft": style_rate(DEMO_DIR / "sft", heldout)}
    for run in args.runs:
        results[run] = style_rate(OUT_DIR / run, heldout)
    summary = {name: {k: v for k, v in r.items() if k != "answers"} for name, r in results.items()}
    (OUT_DIR / "results.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False), encoding="utf-8")
    print(format_table(results, by_language=True))
    if "online" in args.runs:
        print("\nonline DPO, the judge's score of the sampled answers:\n" + score_curve(OUT_DIR / "online"))


if __name__ == "__main__":
    main()
