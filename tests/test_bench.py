"""`python -m nanodpo.tools.bench` still runs and still compares the same training (a smoke run, not a measurement).

The numbers in README come from the full-size bench; here the smallest sizes (1 layer, hidden 32, 128 tokens, one
repetition) only check that every implementation's worker runs, the table and the step-cost lines are printed, and
nanodpo's final metrics agree with TRL's.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


def test_bench_dpo_smoke(tmp_path):
    command = [
        sys.executable, "-m", "nanodpo.tools.bench", "dpo", "--quick", "--max_length", "128", "--steps", "2",
        "--layers", "1", "--hidden", "32", "--workdir", str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    for name in ("nanodpo", "trl", "nanodpo-precomputed", "plain"):
        assert re.search(rf"^{re.escape(name)}\s+\d+\s", out, re.M), (name, out)
    assert "DPO step cost relative to one plain training step" in out
    assert re.search(r"-> agree \(largest relative gap", out), out
    assert "DISAGREE" not in out
