"""Saving models in HF format: `save_pretrained` (safetensors) + tokenizer + the run's full config.

Layout of a run:
    OUTPUT_DIR/checkpoint-<step>/   every --save_steps (model or LoRA adapter, tokenizer, config.yaml)
    OUTPUT_DIR/                     the final model, metrics.jsonl, config.yaml

A LoRA run saves a peft adapter (`adapter_config.json`, `adapter_model.safetensors`) that
`PeftModel.from_pretrained(base, OUTPUT_DIR)` loads; a full run saves a model `AutoModelForCausalLM` loads.

Writes are atomic: everything goes to a temporary sibling directory first, is flushed to disk, and only then
renamed into place, so a kill during a save never leaves a half-written checkpoint under the final name.
"""

import os
import shutil
import tempfile
from pathlib import Path

from nanodpo.config import save_config


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())


def _write_model_files(accelerator, model, tokenizer, cfg, directory: Path) -> None:
    unwrapped = accelerator.unwrap_model(model)
    # Under FSDP/ZeRO-3 each process holds a shard; get_state_dict gathers the full weights (on the main process).
    state_dict = accelerator.get_state_dict(model)
    unwrapped.save_pretrained(directory, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    save_config(cfg, directory / "config.yaml")


def save_model(accelerator, model, tokenizer, cfg, directory: str | Path) -> Path:
    """Save model/adapter + tokenizer + config.yaml into `directory`, atomically. Call on every process."""
    directory = Path(directory)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{directory.name}-", dir=directory.parent))
        try:
            _write_model_files(accelerator, model, tokenizer, cfg, tmp)
            _fsync_tree(tmp)
            if directory.exists() and any(directory.iterdir()) and directory == Path(cfg.output_dir):
                # The final model goes into OUTPUT_DIR itself, next to metrics.jsonl and the checkpoints:
                # move the files in one by one (each os.replace is atomic).
                for item in tmp.iterdir():
                    os.replace(item, directory / item.name)
                tmp.rmdir()
            else:
                if directory.exists():
                    shutil.rmtree(directory)
                os.replace(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    else:
        # Non-main processes still take part in gathering sharded weights.
        accelerator.get_state_dict(model)
    accelerator.wait_for_everyone()
    return directory


def save_if_due(accelerator, model, tokenizer, cfg, step: int, last_step: bool) -> None:
    """checkpoint-<step>/ every --save_steps; the final model into OUTPUT_DIR on the last step."""
    if last_step:
        save_model(accelerator, model, tokenizer, cfg, cfg.output_dir)
    elif cfg.save_steps and step % cfg.save_steps == 0:
        save_model(accelerator, model, tokenizer, cfg, f"{cfg.output_dir}/checkpoint-{step}")
