"""Shared test setup: offline, quiet, and (for modules that ask) a fresh accelerate state for every test.

`accelerate` keeps its state (mixed precision, device, process group) in a process-wide singleton; tests that call
a script's `main()` in-process with different settings (e.g. one with --bf16, then one without) need it reset.
Modules that keep a TRL trainer alive across tests must NOT reset it, so the reset is opt-in:
`pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")`.
"""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
