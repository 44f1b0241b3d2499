"""The demo, timed: the README's pipeline at full size, each stage in its own process, in a fresh folder.

    python -m nanodpo.tools.bench demo                 # (or python -m nanodpo.demo.bench) in a temporary folder
    python -m nanodpo.tools.bench demo --out /tmp/d    # keep the outputs there (out/demo/{data,pt,sft,dpo})
    python -m nanodpo.tools.bench demo --accelerate    # the DPO stage as `accelerate launch train_dpo.py`

Runs `python train_pt.py`, `python train_sft.py` and `python train_dpo.py` with no arguments — exactly what a
newcomer runs — with the working directory set to the output folder, so the stages find and write out/demo/ there
(the configs come from the repository's configs/demo_*.yaml). Prints each stage's wall time and CPU time (CPU time
is the honest measure on a busy machine: wall time grows with every other process sharing the cores), then the
final metrics: PT and SFT eval loss, DPO eval rewards/accuracies and margins, and the held-out style rates of SFT
and DPO (written by the DPO stage to out/demo/dpo/style_eval.json).

Exit status 1 if a stage fails (its output is shown) or a target of the demo is missed: polite rate after DPO
>= 90%, eval rewards/accuracies >= 0.9, eval margin > 0, on-topic rate after DPO at most 10 points below SFT's.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nanodpo.demo.stages import DEMO_DIR
from nanodpo.errors import exit_on_user_error
from nanodpo.repo import repo_path

STAGES = (
    ("pt", ["train_pt.py"]),
    ("sft", ["train_sft.py"]),
    ("dpo", ["train_dpo.py"]),
)
TARGETS = {"polite": 0.9, "eval_rewards/accuracies": 0.9, "eval_rewards/margins": 0.0}
ON_TOPIC_DROP = 0.1  # DPO may not cost more than 10 points of on-topic answers (it changes manners, not content)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _last_eval(metrics_path: Path) -> dict:
    """The last record holding an eval_* metric in a metrics.jsonl."""
    last = {}
    if metrics_path.is_file():
        for line in metrics_path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if any(key.startswith("eval_") for key in record):
                last = record
    return last


def run_stage(name: str, command: list[str], cwd: Path, log_path: Path, env: dict) -> tuple[float, float]:
    """Run one stage to completion, its output to log_path (and the terminal with --verbose); (wall s, CPU s)."""
    start_wall, start_cpu = time.perf_counter(), _children_cpu()
    with log_path.open("w", encoding="utf-8") as log:
        result = subprocess.run(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall, cpu = time.perf_counter() - start_wall, _children_cpu() - start_cpu
    if result.returncode != 0:
        print(log_path.read_text(encoding="utf-8")[-6000:], file=sys.stderr)
        raise SystemExit(f"demo bench: the {name} stage failed (exit {result.returncode}); full log: {log_path}")
    return wall, cpu


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nanodpo.tools.bench demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="folder to run in (default: a temporary one, deleted after)")
    parser.add_argument("--accelerate", action="store_true", help="DPO stage via `accelerate launch` (as the README)")
    args = parser.parse_args(argv)
    scripts = {name: repo_path(script[0]) for name, script in STAGES}

    workdir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="nanodpo-demo-"))
    if (workdir / DEMO_DIR).exists():
        raise SystemExit(f"demo bench: {workdir / DEMO_DIR} already exists: pass an empty --out folder")
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    env.setdefault("HF_HUB_OFFLINE", "1")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"demo bench in {workdir} ({os.cpu_count()} CPUs, load average {load:.1f} at start)", flush=True)

    times = {}
    try:
        for name, script in scripts.items():
            command = [sys.executable, str(script)]
            if name == "dpo" and args.accelerate:
                command = [sys.executable, "-m", "accelerate.commands.launch", str(script)]
            wall, cpu = run_stage(name, command, workdir, workdir / f"{name}.log", env)
            times[name] = (wall, cpu)
            print(f"  {name:4s} {wall:7.1f} s wall  {cpu:7.1f} s CPU", flush=True)
        total_wall = sum(w for w, _ in times.values())
        total_cpu = sum(c for _, c in times.values())
        print(f"  all  {total_wall:7.1f} s wall  {total_cpu:7.1f} s CPU  (target: 5 minutes on an idle 2-core CPU)")

        out = workdir / DEMO_DIR
        pt, sft, dpo = (_last_eval(out / stage / "metrics.jsonl") for stage in ("pt", "sft", "dpo"))
        style = json.loads((out / "dpo" / "style_eval.json").read_text(encoding="utf-8"))
        print(f"\nPT  eval_loss {pt.get('eval_loss', float('nan')):.3f} (step {pt.get('step')})")
        print(f"SFT eval_loss {sft.get('eval_loss', float('nan')):.3f} (step {sft.get('step')})")
        print(
            f"DPO eval_loss {dpo.get('eval_loss', float('nan')):.3f}  eval_rewards/accuracies "
            f"{dpo.get('eval_rewards/accuracies', float('nan')):.3f}  eval_rewards/margins "
            f"{dpo.get('eval_rewards/margins', float('nan')):.3f}  (step {dpo.get('step')})"
        )
        print(f"\nheld-out questions ({style['dpo']['n']}), greedy:   SFT      DPO")
        for key in ("polite", "blunt", "neither", "on_topic", "correct"):
            print(f"  {key:30s}{style['sft'][key]:6.0%}   {style['dpo'][key]:6.0%}")
        for lang in ("en", "zh"):
            s, d = style["sft"]["by_lang"][lang], style["dpo"]["by_lang"][lang]
            print(f"  polite ({lang})                   {s['polite']:6.0%}   {d['polite']:6.0%}")

        measured = {**style["dpo"], **dpo}
        missed = [
            f"{key} {measured.get(key, float('nan')):.3f} (target {'>' if bound == 0 else '>='} {bound})"
            for key, bound in TARGETS.items()
            if not (measured.get(key, float("nan")) > bound if bound == 0 else measured.get(key, float("nan")) >= bound)
        ]
        if style["dpo"]["on_topic"] < style["sft"]["on_topic"] - ON_TOPIC_DROP:
            missed.append(f"on_topic fell from {style['sft']['on_topic']:.0%} to {style['dpo']['on_topic']:.0%}")
        if missed:
            raise SystemExit("demo bench: targets missed: " + "; ".join(missed))
        print("\nall targets met")
    finally:
        if args.out is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    exit_on_user_error(main)
