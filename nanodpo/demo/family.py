"""The preference family on the offline demo: how polite is the model after each loss?

    python train_pt.py && python train_sft.py       # the demo's first two stages (out/demo/pt, out/demo/sft)
    python -m nanodpo.demo.family                   # DPO, SimPO, CPO and KTO after SFT; ORPO straight from PT

Each run is `train_dpo.py --config configs/demo_dpo.yaml` with the loss's own options (FAMILY below: the same data,
batch and schedule; only what each loss needs differs), into out/demo/family/<loss>. Then every model answers the
100 held-out questions greedily (nanodpo/demo/evaluate.py) and a table of the answer styles is printed and saved to
out/demo/family/results.json. ORPO starts from the pretrained model, which has never seen a conversation: its NLL
term is the SFT stage (it trains on the chosen answers, prompt included, as TRL does), its odds-ratio term the
preference stage. KTO reads the pairs as unpaired rows (`--unpair_preference_data`): 1,000 👍 and 1,000 👎.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

from nanodpo.demo.evaluate import style_rate
from nanodpo.demo.stages import DATA_DIR, DEMO_DIR, config_path
from nanodpo.errors import exit_on_user_error
from nanodpo.repo import repo_path

OUT_DIR = DEMO_DIR / "family"

# loss -> (start from, options on top of configs/demo_dpo.yaml). The preference losses share DPO's learning rate;
# ORPO also has to learn to chat from scratch: the SFT stage's learning rate, and 4 epochs (its data is 1,000 pairs,
# against SFT's 1,600 conversations twice over; 2 epochs: on topic 43%, correct 28%).
FAMILY = {
    "dpo": ("sft", {"loss_type": "sigmoid"}),
    "simpo": ("sft", {"loss_type": "simpo", "beta": 2.0, "simpo_gamma": 1.0}),
    "cpo": ("sft", {"loss_type": "cpo"}),
    "kto": ("sft", {"loss_type": "kto", "unpair_preference_data": "true"}),
    "orpo": ("pt", {"loss_type": "orpo", "learning_rate": 1e-3, "num_train_epochs": 4}),
}

ROWS = (("polite", "polite"), ("blunt", "blunt"), ("on_topic", "on topic"), ("correct", "correct fact"))


def train(loss: str) -> Path:
    start, options = FAMILY[loss]
    return train_dpo_run(loss, OUT_DIR / loss, {"config": config_path("dpo"), "model": DEMO_DIR / start, **options})


def train_dpo_run(name: str, out: Path, options: dict) -> Path:
    """train_dpo.py with these options into `out` (replacing what is there), run as a user runs it (the package
    imports no script)."""
    argv = ["--output_dir", str(out), "--overwrite_output_dir", "true"]
    for key, value in options.items():
        argv += [f"--{key}", str(value)]
    print(f"{name}: train_dpo.py {' '.join(argv)}")
    subprocess.run([sys.executable, str(repo_path("train_dpo.py")), *argv], check=True)
    return out


def format_table(results: dict[str, dict], by_language: bool = False) -> str:
    """Rows of rates (polite, blunt, on topic, correct; with `by_language`, polite per language too), a column per
    model."""
    names = list(results)
    lines = ["greedy answers, held-out".ljust(26) + "".join(f"{name:>8s}" for name in names)]
    for key, label in ROWS:
        lines.append(label.ljust(26) + "".join(f"{results[name][key]:>8.0%}" for name in names))
        for lang in ("en", "zh") if key == "polite" and by_language else ():
            rates = [results[name]["by_lang"][lang]["polite"] for name in names]
            lines.append(f"  {lang} questions".ljust(26) + "".join(f"{rate:>8.0%}" for rate in rates))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m nanodpo.demo.family", description=__doc__.split("\n\n")[0])
    p.add_argument("losses", nargs="*", default=list(FAMILY), help=f"which of {', '.join(FAMILY)} (default: all)")
    p.add_argument("--skip_training", action="store_true", help="only evaluate out/demo/family/<loss>")
    args = p.parse_args(argv)
    repo_path("train_dpo.py")  # (a clear error without the clone, before anything runs)
    for stage in ("pt", "sft"):
        if not (DEMO_DIR / stage / "config.json").is_file():
            raise SystemExit(f"error: {DEMO_DIR / stage} is missing: run python train_pt.py && python train_sft.py")
    for loss in args.losses:
        if not args.skip_training:
            train(loss)
    heldout = DATA_DIR / "heldout.jsonl"
    results = {"sft": style_rate(DEMO_DIR / "sft", heldout)}
    for loss in args.losses:
        results[loss] = style_rate(OUT_DIR / loss, heldout)
    summary = {name: {k: v for k, v in r.items() if k != "answers"} for name, r in results.items()}
    (OUT_DIR / "results.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False), encoding="utf-8")
    print(format_table(results))


if __name__ == "__main__":
    exit_on_user_error(main)
