"""The demo pipeline: what `python train_pt.py && python train_sft.py && accelerate launch train_dpo.py` does with
no arguments.

    python train_pt.py     writes out/demo/data/*.jsonl (the world, if missing), pretrains -> out/demo/pt
    python train_sft.py    teaches out/demo/pt to chat, both styles                       -> out/demo/sft
    python train_dpo.py    prefers the polite style                                       -> out/demo/dpo
                           and prints the polite-answer rate on held-out questions, SFT vs DPO

Each stage's options are in configs/demo_<stage>.yaml (real usage: read them); extra flags still override them,
e.g. `python train_dpo.py --config configs/demo_dpo.yaml --beta 0.2`.
"""

import sys
from pathlib import Path

from nanodpo.config import DPOConfig, PTConfig, SFTConfig, parse_config
from nanodpo.demo.evaluate import style_report
from nanodpo.demo.world import SYSTEM_PROMPT, write_demo_data
from nanodpo.errors import UserError
from nanodpo.model import is_main_process
from nanodpo.repo import ROOT, repo_path

DEMO_DIR = Path("out/demo")
DATA_DIR = DEMO_DIR / "data"
CONFIGS = {"pt": PTConfig, "sft": SFTConfig, "dpo": DPOConfig}
PREVIOUS = {"pt": None, "sft": ("pt", "python train_pt.py"), "dpo": ("sft", "python train_sft.py")}


def config_path(stage: str) -> Path:
    """configs/demo_<stage>.yaml in the clone (a UserError saying so without one)."""
    return repo_path(f"configs/demo_{stage}.yaml")


def demo_argv(stage: str) -> list[str]:
    """The command line a script runs with when given none: its demo config, after checking what it needs."""
    path = config_path(stage)
    if not (DATA_DIR / "dpo.jsonl").is_file():
        write_demo_data(DATA_DIR)
        print(f"demo: wrote the Little World datasets to {DATA_DIR}/")
    previous = PREVIOUS[stage]
    if previous is not None:
        name, command = previous
        if not (DEMO_DIR / name / "config.json").is_file():
            raise UserError(
                f"the demo's {stage} stage starts from {DEMO_DIR / name}, which is missing: run `{command}` first"
            )
    print(f"demo: {stage} stage with {path.relative_to(ROOT)} (any flag you add overrides it)")
    return ["--config", str(path)]


def main_or_demo(main, stage: str) -> None:
    """What `python train_<stage>.py` runs: `main()` on the command line — or, given no arguments at all, the
    script's stage of the offline demo (its demo config, then what to run next)."""
    if len(sys.argv) > 1:
        main()
        return
    argv = demo_argv(stage)
    main(argv)
    if is_main_process():
        after_stage(stage, parse_config(CONFIGS[stage], argv))


def after_stage(stage: str, cfg) -> None:
    """After the DPO stage: how often SFT and DPO answer held-out questions politely."""
    if stage != "dpo":
        print(f"demo: next, run `{'python train_sft.py' if stage == 'pt' else 'accelerate launch train_dpo.py'}`")
        return
    print(style_report(DEMO_DIR / "sft", Path(cfg.output_dir), DATA_DIR / "heldout.jsonl"))
    # SYSTEM_PROMPT: the system prompt of all the demo's training data
    print(
        f"demo: chat with it: python -m nanodpo.tools.chat --model {cfg.output_dir} --compare {DEMO_DIR / 'sft'} "
        f'--system "{SYSTEM_PROMPT}"'
    )
    print(f"demo: its curves: python -m nanodpo.tools.plot {cfg.output_dir} --diagnose")
