"""train_dpo.main under `accelerate launch`, printing the accelerator's distributed type first: the FSDP2 tests read
it to know the run really was sharded (with one process, nothing else in the output would show it).

    accelerate launch --config_file configs/accelerate/fsdp2_full.yaml --num_processes 1 tests/gpu/fsdp_driver.py ARGS
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import train_dpo  # noqa: E402
from nanodpo import training  # noqa: E402

make_accelerator = training.make_accelerator


def make_and_report(cfg):
    accelerator = make_accelerator(cfg)
    print(f"distributed: {accelerator.distributed_type.value}, FSDP2 {accelerator.is_fsdp2}, "
          f"{accelerator.num_processes} processes", flush=True)  # fmt: skip
    return accelerator


training.make_accelerator = make_and_report
train_dpo.main(sys.argv[1:])
