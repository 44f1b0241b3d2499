"""Checkpoints: saving models in HF format, and saving/restoring everything a run needs to continue exactly.

Layout of a run:
    OUTPUT_DIR/checkpoint-<step>/   every --save_steps: model (or LoRA adapter), tokenizer, config.yaml, README.md
                                    (the model card: scale/model_card.py), plus
                                    optimizer.pt, scheduler.pt, rng_state_<rank>.pth, trainer_state.json
    OUTPUT_DIR/                     the final model, metrics.jsonl, config.yaml, README.md

A LoRA run saves a peft adapter (`adapter_config.json`, `adapter_model.safetensors`) that
`PeftModel.from_pretrained(base, DIR)` loads; a full run saves a model `AutoModelForCausalLM` loads.

What a checkpoint holds, so `--resume_from_checkpoint latest` continues bit for bit (CPU, fp32):
    weights                 safetensors (the model, or only the adapter)
    optimizer.pt            optimizer state (AdamW moments, step counts); under FSDP2 gathered from the shards,
                            keyed by parameter name; under DeepSpeed the engine's own files in deepspeed/ instead
    scheduler.pt            learning-rate schedule position
    scaler.pt               fp16 loss-scaler state (with --fp16)
    rng_state_<rank>.pth    python / numpy / torch (/ cuda) random states of every process
    trainer_state.json      step, epoch, batches consumed in the epoch (the data position; for streamed data the
                            same count is replayed), token count, skipped-step counts, the unfinished logging
                            interval's metric values, the reference-log-prob cache key, world size, global batch and
                            sharding
Loading uses safetensors for weights and `torch.load(weights_only=True)` for the rest: nothing is unpickled — except
under DeepSpeed, whose engine files (DIR/deepspeed/: the ZeRO partitions of weights, fp32 master weights and moments,
one per process) DeepSpeed itself loads with pickle.

Writes are atomic: everything goes to `OUTPUT_DIR/.tmp-checkpoint-<step>` first, is fsynced, and only then renamed;
a kill or a full disk during a save leaves the previous checkpoints untouched and loadable. A failed write (a full
disk, whatever library was writing) is one clear error, and the half-written folder is removed.

Reads are checked first (`checkpoint_problem`): a checkpoint with a missing or damaged file (a truncated
safetensors or optimizer file, an unreadable trainer_state.json) is never loaded. `--resume_from_checkpoint latest`
takes the newest intact one and says which it skipped; a damaged checkpoint named explicitly is refused, naming the
file.
"""

import dataclasses
import json
import os
import random
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch
import yaml
from accelerate.utils import DistributedType
from safetensors import safe_open
from safetensors.torch import load_file

from nanodpo.config import config_to_dict, save_config
from nanodpo.errors import UserError
from nanodpo.model import is_dtensor, is_main_process, is_peft_model
from nanodpo.scale.model_card import write_model_card
from nanodpo.training import RunState

TRAINER_STATE = "trainer_state.json"
# Options that must match for a checkpoint to be resumed: they change the model, the data or its order.
MUST_MATCH = (
    "model", "use_lora", "lora_r", "lora_alpha", "lora_target_modules", "load_in_4bit", "from_scratch",
    "hidden_size", "num_hidden_layers", "dataset", "dataset_split", "max_samples", "max_length", "seed",
    "train_sampling_strategy", "packing", "packing_strategy", "loss_type", "beta", "simpo_gamma", "cpo_alpha",
    "desirable_weight", "undesirable_weight", "unpair_preference_data", "eos_token", "online", "reward_model",
    "judge", "reward_weights", "max_new_tokens", "temperature", "top_p", "missing_eos_penalty",
)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Saving


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_model_files(accelerator, model, tokenizer, cfg, directory: Path, final: Path) -> None:
    """The model (or adapter), tokenizer, config.yaml and model card, into `directory`, for the folder `final`."""
    unwrapped = accelerator.unwrap_model(model)
    # Under FSDP/ZeRO-3 each process holds a shard; get_state_dict gathers the full weights (on the main process).
    state_dict = accelerator.get_state_dict(model)
    # Tied weights (lm_head = embed_tokens): gathered from FSDP2 shards they come back as two separate copies, which
    # save_pretrained cannot tell are one tensor. Keep only the source, as a one-process save does.
    for tied, source in (getattr(unwrapped, "all_tied_weights_keys", None) or {}).items():
        if tied in state_dict and source in state_dict:
            del state_dict[tied]
    unwrapped.save_pretrained(directory, state_dict=state_dict, safe_serialization=True)
    if is_peft_model(unwrapped):  # an adapter folder: keep the base's generation_config (its EOS) next to it
        unwrapped.get_base_model().generation_config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    save_config(cfg, directory / "config.yaml")
    write_model_card(cfg, directory, final, is_peft_model(unwrapped), accelerator.num_processes)


def _save_failed(directory: Path, reason: str) -> UserError:
    return UserError(
        f"cannot write {directory}: {reason} — nothing was replaced; earlier checkpoints in "
        f"{directory.parent} are intact (free some space or fix permissions, then --resume_from_checkpoint latest)"
    )


# How libraries word a failed write: torch.save's zip writer ("[enforce fail at inline_container.cc:...] unexpected
# pos 86528 vs 86416", "PytorchStreamWriter failed writing file data/0: file write failed"), and the Rust io errors of
# the tokenizers and safetensors libraries ("No space left on device (os error 28)", "IoError(Os { code: 28, ...").
_WRITE_FAILED = re.compile(r"unexpected pos|file write failed|no space left|disk quota|read-only file system|"
                           r"os error \d+|ioerror", re.IGNORECASE)  # fmt: skip
_LOW_SPACE = 16 * 2**20  # bytes: below this, a failed write is taken for a full disk


def write_failure(err: BaseException, directory: Path) -> str | None:
    """Why writing into `directory` failed, in words, when `err` is a failure to write files — whatever library
    raised it: an OSError anywhere in the exception's chain, or the wording of another library's error (above), or a
    disk with next to no free space left. None for anything else (a bug, which keeps its traceback)."""
    chain, cause = [], err
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    for cause in chain:
        if isinstance(cause, OSError):
            return cause.strerror or str(cause)
    text = " ".join(str(cause) for cause in chain)
    code = re.search(r"os error (\d+)|Os \{ code: (\d+)", text)
    if code:
        return os.strerror(int(code.group(1) or code.group(2)))
    try:
        disk_full = shutil.disk_usage(directory if directory.exists() else directory.parent).free < _LOW_SPACE
    except OSError:
        disk_full = False
    if disk_full or "no space left" in text.lower():
        return os.strerror(28)  # ENOSPC: "No space left on device"
    if _WRITE_FAILED.search(text):
        return f"the write failed ({text.strip().splitlines()[-1]})"
    return None


def sharding(accelerator) -> str | None:
    """How the optimizer state is split over the processes: "fsdp2", "deepspeed", or None (whole on each)."""
    return {DistributedType.FSDP: "fsdp2", DistributedType.DEEPSPEED: "deepspeed"}.get(accelerator.distributed_type)


def _optimizer_state(accelerator, model, optimizer, directory: Path) -> dict | None:
    """The optimizer state for optimizer.pt (main process), or None where it is written otherwise. Every process.

    * Whole (one process, DDP): `optimizer.state_dict()`.
    * FSDP2: each process holds its shard of every moment (DTensor). torch's `get_optimizer_state_dict` gathers
      them into the full state, keyed by parameter name, so it loads on any number of processes.
    * DeepSpeed: the ZeRO optimizer also holds the fp32 master weights, partitioned over the processes: the
      engine writes its own files (`engine.save_checkpoint`, one per process, into DIR/deepspeed), which load back
      on the same number of processes.
    """
    kind = sharding(accelerator)
    if kind == "deepspeed":
        model.save_checkpoint(str(directory / "deepspeed"), tag="state")
        return None
    if kind == "fsdp2":
        # Imported here: torch.distributed.checkpoint costs ~50 MB and 0.6 s at start-up, for FSDP2 runs only.
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(model, optimizer.optimizer, options=options)
    return optimizer.state_dict()


def save_model(accelerator, model, tokenizer, cfg, directory: str | Path) -> Path:
    """The final model (+ tokenizer + config.yaml) into `directory`, atomically. Call on every process."""
    directory = Path(directory)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tmp = directory.parent / f".tmp-{directory.name}-final"
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            _write_model_files(accelerator, model, tokenizer, cfg, tmp, directory)
            _fsync_tree(tmp)
            directory.mkdir(parents=True, exist_ok=True)
            # The final model goes into OUTPUT_DIR itself, next to metrics.jsonl and the checkpoints: move the files
            # in one by one (each os.replace is atomic).
            for item in tmp.iterdir():
                os.replace(item, directory / item.name)
            tmp.rmdir()
        except Exception as err:
            shutil.rmtree(tmp, ignore_errors=True)
            reason = write_failure(err, directory)
            if reason is None:
                raise
            raise _save_failed(directory, reason) from None
    else:
        accelerator.get_state_dict(model)  # non-main processes still take part in gathering sharded weights
    accelerator.wait_for_everyone()
    return directory


def _rng_state() -> dict:
    numpy_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(accelerator, model, optimizer, scheduler, tokenizer, cfg, state: RunState) -> Path:
    """OUTPUT_DIR/checkpoint-<step>: everything to resume (see the module docstring), atomically. All processes."""
    output_dir = Path(cfg.output_dir)
    final = output_dir / f"checkpoint-{state.step}"
    tmp = output_dir / f".tmp-checkpoint-{state.step}"
    accelerator.wait_for_everyone()
    error = None
    if accelerator.is_main_process:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as err:
            error = err
    accelerator.wait_for_everyone()
    try:
        if accelerator.is_main_process:
            if error is not None:
                raise error
            _write_model_files(accelerator, model, tokenizer, cfg, tmp, final)
        else:
            accelerator.get_state_dict(model)  # non-main processes still take part in gathering sharded weights
        optimizer_state = _optimizer_state(accelerator, model, optimizer, tmp)  # every process: collective if sharded
        if accelerator.is_main_process:
            if optimizer_state is not None:
                torch.save(optimizer_state, tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            if accelerator.scaler is not None:  # fp16 loss scaling: its current scale and growth tracker
                torch.save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
            (tmp / TRAINER_STATE).write_text(json.dumps(dataclasses.asdict(state), indent=1))
        accelerator.wait_for_everyone()
        torch.save(_rng_state(), tmp / f"rng_state_{accelerator.process_index}.pth")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _fsync_tree(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)  # the checkpoint appears whole, or not at all
            _rotate_checkpoints(cfg, state, just_written=final)
    except Exception as err:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        reason = write_failure(err, output_dir)
        if reason is None:
            raise
        raise _save_failed(final, reason) from None
    accelerator.wait_for_everyone()
    return final


def checkpoints_in(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (those with trainer_state.json), oldest first."""
    found = []
    for path in Path(output_dir).glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match and (path / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def _rotate_checkpoints(cfg, state: RunState, just_written: Path) -> None:
    """Keep the newest --save_total_limit checkpoints, plus the best one; never the one just written."""
    if not cfg.save_total_limit:
        return
    keep = set(checkpoints_in(cfg.output_dir)[-cfg.save_total_limit :]) | {just_written}
    if state.best_checkpoint:
        keep.add(Path(state.best_checkpoint))
    for path in checkpoints_in(cfg.output_dir):
        if path not in keep:
            shutil.rmtree(path, ignore_errors=True)


def update_best(cfg, state: RunState, eval_record: dict) -> None:
    """Remember which checkpoint (the one saved at this step) has the best --metric_for_best_model."""
    name = cfg.metric_for_best_model
    if not name or name not in eval_record:
        return
    value = eval_record[name]
    best = state.best_metric
    better = best is None or (value > best if cfg.greater_is_better else value < best)
    if better:
        state.best_metric = value
        state.best_checkpoint = str(Path(cfg.output_dir) / f"checkpoint-{state.step}")


# ----------------------------------------------------------------------------------------------------------------
# Starting and resuming


def check_output_dir(cfg) -> None:
    """Refuse to start a new run on top of another one (its metrics and checkpoints would be mixed with ours)."""
    output_dir = Path(cfg.output_dir)
    if cfg.resume_from_checkpoint or not output_dir.exists():
        return
    other_run = [p.name for p in output_dir.iterdir() if p.name in ("metrics.jsonl", "config.yaml") or
                 p.name.startswith("checkpoint-")]  # fmt: skip
    if not other_run:
        return
    if cfg.overwrite_output_dir:
        shutil.rmtree(output_dir)
        return
    raise UserError(
        f"--output_dir {output_dir} already holds a run ({', '.join(sorted(other_run)[:3])}); use "
        "--resume_from_checkpoint latest to continue it, --overwrite_output_dir to replace it, or another --output_dir"
    )


def resolve_resume(cfg) -> Path | None:
    """The checkpoint --resume_from_checkpoint names, checked whole (`checkpoint_problem`): 'latest' is the newest
    intact checkpoint (each damaged one skipped is named); a damaged checkpoint named explicitly is refused."""
    if not cfg.resume_from_checkpoint:
        return None
    if cfg.resume_from_checkpoint == "latest":
        found = checkpoints_in(cfg.output_dir)
        if not found:
            raise UserError(f"--resume_from_checkpoint latest: no checkpoint-<step> folder in {cfg.output_dir}")
        damaged = []
        for path in reversed(found):
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            damaged.append(f"{path.name}: {problem}")
            if is_main_process():
                print(f"--resume_from_checkpoint latest: skipping the damaged {path} ({problem})")
        raise UserError(
            f"--resume_from_checkpoint latest: every checkpoint in {cfg.output_dir} is damaged "
            f"({'; '.join(damaged)}); start again with --overwrite_output_dir"
        )
    path = Path(cfg.resume_from_checkpoint).expanduser()
    if not (path / TRAINER_STATE).is_file():
        raise UserError(f"--resume_from_checkpoint {path}: not a nanodpo checkpoint (no {TRAINER_STATE})")
    problem = checkpoint_problem(path)
    if problem is not None:
        others = [p.name for p in checkpoints_in(path.parent) if p != path]
        hint = f" (other checkpoints there: {', '.join(others)}; 'latest' takes the newest intact one)"
        raise UserError(f"--resume_from_checkpoint {path}: damaged checkpoint: {problem}{hint if others else ''}")
    return path


def checkpoint_problem(path: Path) -> str | None:
    """What is wrong with the checkpoint folder `path` (naming the file), or None if every file a resume reads is
    there and sound: trainer_state.json and config.yaml parse, every safetensors header parses and covers its file,
    and every torch.save file (optimizer, scheduler, random states; DeepSpeed's) is a whole zip archive. Cheap: no
    tensor is read."""
    try:
        saved = RunState(**json.loads((path / TRAINER_STATE).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as err:
        return f"{TRAINER_STATE} cannot be read ({err})"
    try:
        if not isinstance(yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")), dict):
            return "config.yaml holds no options"
    except (OSError, ValueError, yaml.YAMLError) as err:
        return f"config.yaml cannot be read ({type(err).__name__}: {str(err).splitlines()[0]})"
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        return "no model weights (model*.safetensors or adapter_model.safetensors)"
    required = ["scheduler.pt", "rng_state_0.pth"]
    if saved.sharding == "deepspeed":
        engine_files = sorted((path / "deepspeed").rglob("*.pt"))
        if not engine_files:
            return "deepspeed/ holds no engine files"
    else:
        required.append("optimizer.pt")
        engine_files = []
    missing = [name for name in required if not (path / name).is_file()]
    if missing:
        return f"{missing[0]} is missing"
    for file in weights:
        try:
            with safe_open(file, framework="pt"):
                pass
        except Exception as err:  # safetensors raises its own SafetensorError (and OSError for an unreadable file)
            return f"{file.name} is damaged ({err})"
    torch_files = [path / name for name in required if name.endswith((".pt", ".pth"))]
    torch_files += sorted(path.glob("rng_state_*.pth")) + sorted(path.glob("scaler.pt")) + engine_files
    for file in dict.fromkeys(torch_files):
        problem = _zip_problem(file)
        if problem is not None:
            return f"{file.relative_to(path)} is damaged ({problem})"
    return None


def _zip_problem(file: Path) -> str | None:
    """torch.save writes a zip archive whose index is at the end: a cut file has none, and every entry must lie
    within the file."""
    try:
        size = file.stat().st_size
        with zipfile.ZipFile(file) as archive:
            for entry in archive.infolist():
                if entry.header_offset + entry.compress_size > size:
                    return f"entry {entry.filename} runs past the end of the file"
    except (OSError, zipfile.BadZipFile) as err:
        return str(err)
    return None


def _check_compatible(cfg, path: Path, saved: RunState, global_batch: int, world_size: int, kind: str | None) -> None:
    saved_cfg = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")) or {}
    current = config_to_dict(cfg)
    for key in MUST_MATCH:
        if key in saved_cfg and key in current and saved_cfg[key] != current[key]:
            raise UserError(
                f"--resume_from_checkpoint {path}: it was trained with {key}={saved_cfg[key]!r}, this run has "
                f"{key}={current[key]!r}; resume with the same options (or start a new run)"
            )
    if saved.global_batch != global_batch:
        raise UserError(
            f"--resume_from_checkpoint {path}: its global batch was {saved.global_batch} pairs/rows, this run's is "
            f"{global_batch} (per-device batch × accumulation × processes); keep the global batch the same"
        )
    if saved.sharding != kind:
        written, now = saved.sharding or "one process or DDP", kind or "one process or DDP"
        raise UserError(
            f"--resume_from_checkpoint {path}: its optimizer state was written under {written}, this run is under "
            f"{now}; resume it the way it was trained (its weights alone load anywhere: --model {path})"
        )
    if kind == "deepspeed" and saved.world_size != world_size:
        raise UserError(
            f"--resume_from_checkpoint {path}: a DeepSpeed checkpoint holds the ZeRO optimizer state split over "
            f"{saved.world_size} processes; resume it on {saved.world_size} processes, not {world_size}"
        )
    if saved.world_size != world_size:
        # Safe: with the same global batch, step k covers the same examples whatever the number of processes.
        if is_main_process():  # once, not once per process
            print(f"resuming a {saved.world_size}-process checkpoint on {world_size} processes (same global batch)")


def _load_weights(model, path: Path) -> None:
    sharded = any(is_dtensor(p) for p in model.parameters())  # FSDP2
    if (path / "adapter_model.safetensors").is_file():
        # Imported here, not at the top: peft pulls in bitsandbytes, ~180 MB of RSS and seconds of start-up that a
        # full fine-tuning run never uses.
        from peft import set_peft_model_state_dict

        tensors = load_file(path / "adapter_model.safetensors")
        if sharded:  # the file names the adapter's weights without the adapter's name, as peft saves them
            by_saved_name = {name.replace(f".{model.active_adapter}.", "."): name for name in model.state_dict()}
            unknown = [k for k in tensors if k not in by_saved_name]
            if unknown:
                raise UserError(f"{path}: adapter weights do not fit this model ({unknown[:3]} ...)")
            _copy_weights(model, {by_saved_name[k]: v for k, v in tensors.items()}, sharded)
            return
        result = set_peft_model_state_dict(model, tensors)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise UserError(f"{path}: adapter weights do not fit this model ({unexpected[:3]} ...)")
        return
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise UserError(f"{path}: no model weights (model*.safetensors or adapter_model.safetensors)")
    loaded = set()
    params = dict(model.state_dict())
    for file in files:
        tensors = load_file(file)
        unknown = [k for k in tensors if k not in params]
        if unknown:
            raise UserError(f"{file}: weights of another model ({unknown[:3]} ...)")
        _copy_weights(model, tensors, sharded)
        loaded |= set(tensors)
    # save_pretrained leaves out weights tied to another (lm_head = embed_tokens); everything else must be there.
    storage = {k: (v.to_local() if is_dtensor(v) else v).data_ptr() for k, v in params.items()}
    pointers = {storage[k] for k in loaded}
    missing = [k for k in params if k not in loaded and storage[k] not in pointers]
    if missing:
        raise UserError(f"{path}: weights missing for {missing[:3]} ...")


def _copy_weights(model, tensors: dict[str, torch.Tensor], sharded: bool) -> None:
    """Whole tensors, named as in the model's state dict (the callers check), into the model's parameters: as they
    are, or under FSDP2 each process's shard of them."""
    if not sharded:
        model.load_state_dict(tensors, strict=False)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict  # FSDP2 only

    set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True, strict=False))


def start_or_resume(accelerator, model, optimizer, scheduler, cfg, ref_cache_key: str | None = None) -> RunState:
    """A new run's RunState, or, with --resume_from_checkpoint, the checkpoint's: weights, optimizer, schedule,
    random states and data position restored, and metrics.jsonl cut back to its step."""
    global_batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes
    path = resolve_resume(cfg)
    if path is None:
        return RunState(ref_cache_key=ref_cache_key, world_size=accelerator.num_processes, global_batch=global_batch,
                        sharding=sharding(accelerator))  # fmt: skip
    state = load_checkpoint(accelerator, model, optimizer, scheduler, cfg, path, global_batch)
    if ref_cache_key is not None and state.ref_cache_key not in (None, ref_cache_key):
        raise UserError(f"{path} was trained against other reference log-probs (data or model changed)")
    truncate_metrics(cfg.output_dir, state.step, accelerator.is_main_process)
    return state


def load_checkpoint(accelerator, model, optimizer, scheduler, cfg, path: Path, global_batch: int) -> RunState:
    """Restore weights, optimizer, schedule, random states and the run's position from `path`."""
    saved = RunState(**json.loads((path / TRAINER_STATE).read_text()))
    kind = sharding(accelerator)
    _check_compatible(cfg, path, saved, global_batch, accelerator.num_processes, kind)
    if kind == "deepspeed":
        # The engine's own files: weights, the ZeRO optimizer's fp32 master weights and its moments, per process.
        model.load_checkpoint(str(path / "deepspeed"), tag="state", load_lr_scheduler_states=False)
    else:
        _load_weights(accelerator.unwrap_model(model), path)
        optimizer_state = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
        if kind == "fsdp2":  # the full state, keyed by parameter name: each process keeps its shard of it
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict  # FSDP2 only

            options = StateDictOptions(full_state_dict=True)
            set_optimizer_state_dict(model, optimizer.optimizer, optimizer_state, options=options)
        else:
            optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    if accelerator.scaler is not None and (path / "scaler.pt").is_file():
        accelerator.scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
    rng_file = path / f"rng_state_{accelerator.process_index}.pth"
    if not rng_file.is_file():
        rng_file = path / "rng_state_0.pth"
    _set_rng_state(torch.load(rng_file, weights_only=True))
    saved.world_size = accelerator.num_processes
    accelerator.print(
        f"resumed from {path} at step {saved.step} (epoch {saved.epoch}, step {saved.steps_in_epoch} of it)"
    )
    return saved


def truncate_metrics(output_dir: str | Path, step: int, is_main_process: bool) -> None:
    """Drop the records of metrics.jsonl and samples.jsonl (online DPO) after `step` (logged by the interrupted run
    after its last checkpoint)."""
    for name in ("metrics.jsonl", "samples.jsonl"):
        path = Path(output_dir) / name
        if is_main_process and path.exists():
            _truncate_records(path, step)


def _truncate_records(path: Path, step: int) -> None:
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the kill
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)
