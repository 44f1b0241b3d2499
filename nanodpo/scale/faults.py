"""Surviving interruptions and numerical blow-ups: `stop_early`, checked after every optimizer step.

* SIGTERM (preemption, `kill`) or SIGINT (Ctrl-C) (`GracefulStop`): finish the step, save a checkpoint, print the
  command that resumes, exit non-zero; a second signal exits at once; a stop seen by any process stops them all.
* --max_nonfinite_steps NaN/inf steps in a row (each skipped by training.decide_update): save and stop, with a
  message naming the step and the likely causes.
"""

import os
import signal
import sys
from pathlib import Path

import torch

from nanodpo.scale.checkpoint import save_checkpoint
from nanodpo.training import RunState

EXIT_INTERRUPTED = 130  # the shell's code for "stopped by a signal"
EXIT_NONFINITE = 3  # saved and stopped after --max_nonfinite_steps non-finite steps in a row


class GracefulStop:
    def __init__(self):
        self.requested = None  # the signal's name, once one arrived
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a notebook worker): leave signals alone
                pass

    def _handle(self, signum, frame):
        if self.requested is not None:
            # Second signal: the user means it. No save.
            print(f"\n{signal.Signals(signum).name} again: exiting now without saving", file=sys.stderr, flush=True)
            os._exit(EXIT_INTERRUPTED)
        self.requested = signal.Signals(signum).name
        print(
            f"\n{self.requested}: finishing this optimizer step, then saving a checkpoint (send it again to exit now)",
            file=sys.stderr,
            flush=True,
        )

    def should_stop(self, accelerator) -> bool:
        """True on every process when any process got a signal (checked once per optimizer step)."""
        flag = torch.tensor(1 if self.requested else 0, device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="max").item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def nonfinite_message(step: int, count: int, loss: float, grad_norm: float, cfg) -> str:
    # Under fp16 a NaN loss, or gradients overflowing at a loss scale below 1, is fp16's range being exceeded.
    precision = "values past fp16's range (on Ampere or later GPUs --bf16 has fp32's range), " if cfg.fp16 else ""
    return (
        f"step {step}: {count} optimizer steps in a row had a non-finite loss or gradient norm (last: loss {loss}, "
        f"grad_norm {grad_norm}); stopping after saving a checkpoint. Likely causes: a learning rate too high "
        f"(--learning_rate {cfg.learning_rate}), {precision}or a bad data row in the last batches. Lower the "
        "learning rate and resume with --resume_from_checkpoint latest."
    )


def resume_command() -> str:
    args = sys.argv[1:]
    if "--resume_from_checkpoint" not in args:
        args += ["--resume_from_checkpoint", "latest"]
    return " ".join(["python", Path(sys.argv[0]).name, *args]) if sys.argv else ""


def stop_early(accelerator, model, optimizer, scheduler, tokenizer, cfg, state: RunState, stop,
                  loss: float, grad_norm: float) -> None:  # fmt: skip
    """The two early stops, checked after every optimizer step but the last: --max_nonfinite_steps non-finite steps
    in a row, or SIGTERM/SIGINT on any process. Each saves a checkpoint, says why and how to go on, and exits
    non-zero (EXIT_NONFINITE, EXIT_INTERRUPTED; the loops' `with` blocks close the tracker and the progress bar)."""
    if state.nonfinite_in_a_row >= cfg.max_nonfinite_steps:
        save_checkpoint(accelerator, model, optimizer, scheduler, tokenizer, cfg, state)
        accelerator.print(nonfinite_message(state.step, state.nonfinite_in_a_row, loss, grad_norm, cfg))
        sys.exit(EXIT_NONFINITE)
    if stop.should_stop(accelerator):
        path = save_checkpoint(accelerator, model, optimizer, scheduler, tokenizer, cfg, state)
        accelerator.print(f"saved {path}; resume with:\n  {resume_command()}")
        sys.exit(EXIT_INTERRUPTED)
