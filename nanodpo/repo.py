"""nanodpo is used from a clone of its repository: where the scripts and configs are.

The training loops are the scripts at the clone's root — train_pt.py, train_sft.py, train_dpo.py — with configs/
beside them; they are meant to be read and changed, so they are not hidden inside the package. `pip install -e .` in
the clone makes the `nanodpo` package (data, losses, models, checkpoints, tools) importable from anywhere. A wheel
(`pip install .`) holds that package only: what needs a script or a config (the demo, the bench) says so, naming the
clone it needs, instead of failing on a missing file.

    git clone <this repository's URL> nanodpo && cd nanodpo && pip install -e .
"""

from pathlib import Path

from nanodpo.errors import UserError

ROOT = Path(__file__).resolve().parents[1]  # the clone: nanodpo/, train_*.py and configs/ side by side


def repo_path(name: str) -> Path:
    """ROOT / `name` (a script or config of the clone), or a UserError if nanodpo is installed without its clone."""
    path = ROOT / name
    if not path.exists():
        raise UserError(
            f"{name} is not at {ROOT}: the installed nanodpo package holds the library only, not the train_*.py "
            "scripts and configs/. Use nanodpo from a clone of its repository: git clone <its URL> nanodpo && "
            "cd nanodpo && pip install -e ."
        )
    return path

