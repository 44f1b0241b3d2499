"""Shared test setup: offline, quiet, and (for modules that ask) a fresh accelerate state for every test.

`accelerate` keeps its state (mixed precision, device, process group) in a process-wide singleton; tests that call
a script's `main()` in-process with different settings (e.g. one with --bf16, then one without) need it reset.
Modules that keep a TRL trainer alive across tests must NOT reset it, so the reset is opt-in:
`pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")`. Modules that generate token by token with tiny
models ask for `one_thread` the same way.
"""

import os

import pytest
import torch

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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run ~10x faster on one thread when the CPU is shared (no threads spinning for a core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
