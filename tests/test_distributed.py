"""Several processes on CPU (gloo): the three scripts give the same run with 2 processes as with 1.

How the runs are made comparable
--------------------------------
A 2-process run with per-device batch b and accumulation a is compared with a 1-process run with batch b and
accumulation 2a: the same global batch of 2ab examples and, with `--train_sampling_strategy sequential`, the SAME
examples in every optimizer step, in the same micro-batches:
  * train_dpo.py: accelerate shards the batch sampler batch by batch — process i gets batches i, i+2, i+4, ... —
    so step 1 of the 2-process run is micro-batches {0, 2, ..., 2a-2} on process 0 and {1, 3, ..., 2a-1} on
    process 1: batches 0 .. 2a-1, exactly the 2a micro-batches of step 1 of the 1-process run.
  * train_sft.py / train_pt.py: the same loader of micro-batches of b rows, so again step 1 is micro-batches
    0 .. 2a-1, rows 0 .. 2ab-1; its loss, the token mean over the whole step, does not depend on which process
    holds which micro-batch.
The data sizes are multiples of the global batch, so no step is ever a partial one (accelerate pads a short last batch
of a multi-process run with copies of the first examples; one process would run it short).

So the gradient of every step is the same mean over the same micro-batches, only summed in another order (all-reduce),
and so are the logged values: each micro-batch's metrics are computed on its own process and every process's
micro-batches enter the logged mean (nanodpo.training.gather_metrics) — rewards, accuracies and log-probs are then the
mean over all pairs of the step, token metrics the mean of the micro-batches' token means, as with one process.
SFT/PT losses are the token mean over the whole step on all processes (train_sft.py's loop, training.step_targets).

Tolerances (relative; values near 0 are compared on a scale of 0.01):
  * step 1 (same weights): loss, every metric and grad_norm within 1e-5;
  * later steps: 3e-3 with AdamW (its first updates, g/√v, amplify fp32 rounding), 1e-4 with SGD.
Measured here: see the `max relative difference` lines printed with `pytest -s`.

The 2-process runs of the three scripts share one `accelerate launch` (ACCELERATE_USE_CPU=1, --multi_gpu,
--num_processes 2: gloo), each script's main() in turn on the same process group — two Python start-ups cost more
than all the training here. Every run prints "... x 2 processes" (asserted: without ACCELERATE_USE_CPU, on a machine
without GPUs, accelerate would silently start two independent 1-process runs). The 1-process runs are made in the
test process itself.

Resume across process counts (same global batch): SFT's 1-process checkpoint-3 continued on 2 processes, DPO's
2-process checkpoint-3 continued on 1 process; step 4 must equal step 4 of the run the checkpoint came from.

Evaluation runs on 7 pairs / 5 rows with batch 2: the last batch is uneven. DPO's prepared eval loader pads it with
copies that `gather_for_metrics` drops; SFT/PT's evaluate_lm shards rows i::n and adds sums over processes. Both are
compared with the 1-process eval at the same step.

FSDP2 on CPU: `accelerate launch` does not build FSDP on CPU. With ACCELERATE_USE_CPU=1 the state becomes MULTI_CPU and
the FSDP settings are silently ignored (the model is wrapped in DistributedDataParallel); without it, on a machine
without GPUs, the two processes never form a process group (DistributedType.NO, two independent runs).
`AcceleratorState` only turns FSDP on for GPU-like distributed types. torch's `fully_shard` itself works on CPU with
gloo, so the FSDP2 test launches train_dpo.py through a 10-line shim that sets the accelerator's state to FSDP with
the plugin accelerate builds from configs/accelerate/fsdp2_lora.yaml (through accelerate's own launch-argument code);
everything after that — `fsdp2_prepare_model` (per-decoder-layer units, DTensor parameters), `no_sync`, clipping of
sharded gradients, the reference (a frozen copy sharded like the policy, or the LoRA model with its adapter disabled),
the chunked LM head inside the head's own FSDP unit, the full state dict gathered for saving — is accelerate's and
nanodpo's real FSDP2 path. Four DPO configurations share one launch (full fine-tuning with an online reference and
gradient checkpointing, full fine-tuning with precomputed reference log-probs and tied embeddings, LoRA with the
chunked head, LoRA with the readable path), each compared with its 1-process twin.

Every configs/accelerate/*.yaml is also loaded by accelerate's config class and taken through its launch-argument
code to the environment it would launch with, from which the FSDP / DeepSpeed plugins are built and checked
(DeepSpeed's config: ZeRO stage, offload, 16-bit save, and accumulation and clipping left "auto", so they come from
the training config). DeepSpeed ZeRO-2/ZeRO-3 training itself runs on CPU in tests/test_deepspeed.py.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file

from nanodpo.tracking import read_metrics
from tests import tiny

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))
NOT_COMPARED = {"step", "elapsed_s", "tokens_per_s", "mfu"}  # wall-clock values


# ----------------------------------------------------------------------------------------------------------------
# Running the scripts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def to_argv(options: dict) -> list[str]:
    argv = []
    for key, value in options.items():
        argv += [f"--{key}", *map(str, value if isinstance(value, list) else [value])]
    return argv


def base_env(**extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **extra}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def run(cmd: list[str], env: dict, timeout: int = 240) -> str:
    # A new session, so that a hung run is stopped with its worker processes (torchrun's children).
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise AssertionError(f"timed out: {output[-6000:]}") from None
    assert proc.returncode == 0, output[-6000:]
    # Both processes really formed one group of 2 (without ACCELERATE_USE_CPU they would silently be 2 runs of 1).
    assert "accumulation x 2 processes)" in output, output[-3000:]
    return output


def run_one(script: str, options: dict, env: dict | None = None) -> None:
    """The same script in this process (1 process), with a fresh accelerate state."""
    from accelerate.state import AcceleratorState

    module = __import__(script.removesuffix(".py"))
    AcceleratorState._reset_state(reset_partial_state=True)
    with mock.patch.dict(os.environ, env or {}):
        try:
            module.main(to_argv(options))
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)


def train_records(out: Path) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def eval_records(out: Path) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if "eval_loss" in r]


def assert_same_curve(two: list[dict], one: list[dict], rtol: float, first_rtol: float = 1e-5, label: str = ""):
    """Every logged value of every step: step 1 within first_rtol, later steps within rtol (relative)."""
    assert [r["step"] for r in two] == [r["step"] for r in one] and two
    worst = {}
    for i, (a, b) in enumerate(zip(two, one)):
        assert a.keys() == b.keys(), (a.keys() ^ b.keys())
        for key in a.keys() - NOT_COMPARED:
            rel = abs(a[key] - b[key]) / max(abs(b[key]), 1e-2)
            worst[key] = max(worst.get(key, 0.0), rel)
            tol = first_rtol if i == 0 else rtol
            assert rel <= tol, f"{label} step {a['step']} {key}: 2 processes {a[key]} vs 1 process {b[key]}"
    print(f"{label}: max relative difference, 2 processes vs 1:", {k: f"{v:.1e}" for k, v in sorted(worst.items())})


# ----------------------------------------------------------------------------------------------------------------
# Data


def sft_rows(n: int) -> list[dict]:
    """Chat rows with answers of very different lengths (so token means and means of means differ)."""
    exchanges = [
        ("What is the capital of France?", "The capital of France is Paris."),
        ("Name a fruit.", "An apple."),
        ("你好，请问今天天气怎么样？", "今天天气很好，阳光明媚。"),
        ("What is 2 + 2?", "4"),
        ("Tell me about DPO.", "Direct preference optimization trains a policy from pairs of chosen and rejected "
         "answers. The reference model stays frozen while the policy learns to prefer the chosen completion."),
    ]  # fmt: skip
    rows = []
    for i in range(n):
        q, a = exchanges[i % len(exchanges)]
        messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        if i % 3 == 0:
            q2, a2 = exchanges[(i + 2) % len(exchanges)]
            messages += [{"role": "user", "content": q2}, {"role": "assistant", "content": a2}]
        rows.append({"messages": messages})
    return rows


def pt_rows(n: int) -> list[dict]:
    return [{"text": " ".join(tiny._CORPUS[(i + k) % len(tiny._CORPUS)] for k in range(1 + i % 3))} for i in range(n)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    tiny.make_model_dir(root / "model", seed=0)
    tiny.write_jsonl(root / "dpo_train.jsonl", tiny.preference_rows(16, "explicit"))
    tiny.write_jsonl(root / "dpo_eval.jsonl", tiny.preference_rows(23, "explicit")[16:])  # 7: uneven last batch
    tiny.write_jsonl(root / "sft_train.jsonl", sft_rows(16))
    tiny.write_jsonl(root / "sft_eval.jsonl", sft_rows(5))
    tiny.write_jsonl(root / "pt_train.jsonl", pt_rows(48))
    tiny.write_jsonl(root / "pt_eval.jsonl", pt_rows(5))
    prompts = [{"prompt": row["prompt"]} for row in tiny.preference_rows(24, "conversational")]
    tiny.write_jsonl(root / "online_train.jsonl", prompts[:16])
    tiny.write_jsonl(root / "online_eval.jsonl", prompts[16:])
    tiny.make_reward_model_dir(root / "reward_model")
    return root


def common(workdir: Path, out: Path, **overrides) -> dict:
    options = {
        "model": str(workdir / "model"),
        "output_dir": str(out),
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2,  # the 2-process runs; their 1-process twins use 4
        "per_device_eval_batch_size": 2,
        "max_steps": 4,
        "lr_scheduler_type": "constant",
        "logging_steps": 1,
        "train_sampling_strategy": "sequential",
        "seed": 0,
        "report_to": "jsonl",
        "disable_tqdm": "true",
    }
    options.update(overrides)
    return options


# ----------------------------------------------------------------------------------------------------------------
# Accelerate configs


def launch_env(config: Path) -> tuple[object, object, dict]:
    """What `accelerate launch --config_file CONFIG` would launch with: (parsed args, config, environment)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config), "train_dpo.py"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    env = {}
    if args.use_deepspeed:
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)  # as accelerate's launch_command sets it
        _, env = prepare_deepspeed_cmd_env(args)
    elif args.multi_gpu or args.use_fsdp:
        env = prepare_multi_gpu_env(args)
    return args, defaults, env


def test_accelerate_configs_are_valid():
    """Every shipped accelerate config loads, has only keys accelerate knows, launches the intended mode, and for
    FSDP / DeepSpeed builds the plugin the training processes would build."""
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    names = {p.name for p in ACCELERATE_CONFIGS}
    assert {"single_gpu.yaml", "ddp.yaml", "fsdp2_full.yaml", "fsdp2_lora.yaml", "zero2.yaml", "zero3.yaml",
            "zero3_offload.yaml", "two_nodes_fsdp2.yaml"} <= names  # fmt: skip
    launch_options = {action.dest for action in launch_command_parser()._actions}
    seen = set()
    for path in ACCELERATE_CONFIGS:
        config = load_config_from_file(str(path))  # refuses unknown top-level keys
        assert isinstance(config, ClusterConfig), path
        # Keys inside fsdp_config / deepspeed_config are copied onto launch arguments by name; an unknown one
        # (a typo) would be silently ignored by accelerate, so refuse it here.
        for key in config.fsdp_config or {}:
            assert (key if key.startswith("fsdp_") else f"fsdp_{key}") in launch_options, (path, key)
        for key in config.deepspeed_config or {}:
            assert key in launch_options, (path, key)
        # Every setting line is commented.
        for line in path.read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#") and not line.rstrip().endswith(":"):
                assert " # " in line, (path, line)

        args, _, env = launch_env(path)
        seen.add(config.distributed_type)
        with mock.patch.dict(os.environ, env):
            if config.distributed_type == DistributedType.FSDP:
                plugin = FullyShardedDataParallelPlugin()
                assert plugin.fsdp_version == 2, path
                assert plugin.auto_wrap_policy is transformer_auto_wrap_policy, path
                assert plugin.state_dict_type.name == "FULL_STATE_DICT", path  # HF-format save of the whole model
            if config.distributed_type == DistributedType.DEEPSPEED:
                ds = DeepSpeedPlugin().deepspeed_config
                stage = ds["zero_optimization"]["stage"]
                assert stage in (2, 3), path
                # From the training config, not the accelerate config (a number here would override it):
                assert ds["gradient_accumulation_steps"] == "auto", path
                assert ds["gradient_clipping"] == "auto", path
                assert "optimizer" not in ds and "scheduler" not in ds, path
                if stage == 3:
                    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True, path
                    assert config.deepspeed_config["zero3_init_flag"] is True, path  # see zero3.yaml
                offload = ds["zero_optimization"]["offload_optimizer"]["device"]
                assert offload == ("cpu" if "offload" in path.name else "none"), path
        if config.num_machines > 1:
            assert config.num_processes % config.num_machines == 0 and config.main_process_ip, path
            # what torchrun gets on each node: --nnodes 2 --nproc_per_node 8 --node_rank R --master_addr IP
            assert (args.num_machines, args.num_processes // args.num_machines) == (2, 8), path
            assert args.main_process_ip == config.main_process_ip and args.machine_rank == 0, path
    assert {DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.FSDP, DistributedType.DEEPSPEED} <= seen


# ----------------------------------------------------------------------------------------------------------------
# DPO, SFT and PT under DDP: the runs (shared by the tests below)

# One 2-process launch runs the scripts' main() one after the other (a start-up of two Python processes importing
# torch and transformers costs more than all the training here); each builds its own Accelerator on the same gloo
# group of processes. test_fsdp2_* launches train_dpo.py itself as a script.
RUN_PLAN = """
import json, os, sys
from accelerate.state import AcceleratorState, PartialState

# One process group for all the runs: end_training() would destroy it, and forming it again hangs under torchrun.
no_op = lambda self, group=None: None
PartialState.destroy_process_group = AcceleratorState.destroy_process_group = no_op
for script, argv, env in json.load(open(sys.argv[1])):
    os.environ.update(env)
    __import__(script).main(argv)
    AcceleratorState._reset_state(reset_partial_state=False)  # the next script builds its own Accelerator
"""
DRIVER = RUN_PLAN


def dpo_options(workdir: Path) -> dict:
    """Full fine-tuning, AdamW, the reference precomputed (sharded over the processes), eval every 2 steps on 7 pairs
    (uneven last batch), a checkpoint at step 3 (mid-epoch: 16 pairs are 2 steps)."""
    return dict(
        dataset=str(workdir / "dpo_train.jsonl"), eval_dataset=str(workdir / "dpo_eval.jsonl"), eval_steps=2,
        learning_rate=1e-3, max_length=64, beta=0.1, precompute_ref_logps="true", save_steps=3,
    )  # fmt: skip


def sft_options(workdir: Path) -> dict:
    """SGD (tolerance 1e-4), chat rows with answers of very different lengths, eval on 5 rows, checkpoint at 3."""
    return dict(
        dataset=str(workdir / "sft_train.jsonl"), eval_dataset=str(workdir / "sft_eval.jsonl"), eval_steps=2,
        optim="sgd", learning_rate=0.5, max_length=128, save_steps=3,
    )  # fmt: skip


def dpo_budget_options(workdir: Path) -> dict:
    """--max_tokens_per_batch: micro-batches of 1-3 pairs (up to 150 tokens) instead of 2, in the default packed
    layout, the reference online; 2 steps, so no process runs out of micro-batches (no wrap-around padding)."""
    return dict(
        dataset=str(workdir / "dpo_train.jsonl"), learning_rate=1e-3, max_length=64, beta=0.1,
        max_tokens_per_batch=150, max_steps=2,
    )  # fmt: skip


def online_options(workdir: Path) -> dict:
    """Online DPO: each process samples the answers to its own prompts (seeded by their draws, so a micro-batch gets
    the same answers on either process), judged by a function; eval every 2 steps on 8 prompts; 3 steps. (An eval
    set of 7 would not do: 2 processes pad the last batch with a copy of the first prompt, and a micro-batch's
    answers are one random stream, so the last prompt's answers would differ from 1 process's.)"""
    return dict(
        dataset=str(workdir / "online_train.jsonl"), eval_dataset=str(workdir / "online_eval.jsonl"), eval_steps=2,
        online="true", judge="tests.online_judges:char_score", max_new_tokens=8, missing_eos_penalty=0.5,
        learning_rate=1e-3, max_length=64, beta=0.1, max_steps=3,
    )  # fmt: skip


def without_eval(options: dict) -> dict:
    return {key: value for key, value in options.items() if not key.startswith("eval_")}


def pt_options(workdir: Path) -> dict:
    """Continued pretraining, AdamW, packed rows of 32 tokens (wrapped: at least 4 steps' worth), eval on 5 rows."""
    return dict(
        dataset=str(workdir / "pt_train.jsonl"), eval_dataset=str(workdir / "pt_eval.jsonl"), eval_steps=2,
        learning_rate=1e-3, max_length=32, packing_strategy="wrapped",
    )  # fmt: skip


@pytest.fixture(scope="module")
def runs(workdir, tmp_path_factory):
    """Every script with 2 processes (batch 2 × accumulation 2) and 1 process (batch 2 × accumulation 4), plus the
    resumes across process counts: SFT's 1-process checkpoint-3 continued on 2 processes, DPO's 2-process
    checkpoint-3 continued on 1 process. Returns (root folder, output of the 2-process launch)."""
    root = tmp_path_factory.mktemp("runs")
    options = {
        "dpo": dpo_options(workdir), "sft": sft_options(workdir), "pt": pt_options(workdir),
        "dpo_budget": dpo_budget_options(workdir), "dpo_online": online_options(workdir),
    }  # fmt: skip
    envs = {name: {"NANODPO_CACHE": str(root / f"cache_{name}")} for name in ("one", "two")}

    # 1 process, in this process: the references (and the SFT checkpoint resumed below on 2 processes).
    scripts = {"dpo": "dpo", "sft": "sft", "pt": "pt", "dpo_budget": "dpo", "dpo_online": "dpo"}
    for name, script in scripts.items():
        run_one(f"train_{script}.py", common(workdir, root / f"{name}_one", gradient_accumulation_steps=4,
                                             **options[name]), env=envs["one"])  # fmt: skip

    # 2 processes, one launch.
    plan = [
        (f"train_{script}", to_argv(common(workdir, root / f"{name}_two", **options[name])), envs["two"])
        for name, script in scripts.items()
    ]
    resume = dict(resume_from_checkpoint=str(root / "sft_one" / "checkpoint-3"))
    plan.append(("train_sft", to_argv(common(workdir, root / "sft_resumed_two", **options["sft"], **resume)), {}))
    (root / "plan.json").write_text(json.dumps(plan))
    (root / "driver.py").write_text(DRIVER)
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), str(root / "driver.py"), str(root / "plan.json"),
    ]  # fmt: skip
    output = run(cmd, base_env(ACCELERATE_USE_CPU="1"))
    assert output.count("accumulation x 2 processes)") == len(plan)  # every run really had 2 processes

    # The 2-process DPO checkpoint continued on 1 process (its reference cache reused).
    resume = dict(resume_from_checkpoint=str(root / "dpo_two" / "checkpoint-3"))
    run_one("train_dpo.py", common(workdir, root / "dpo_resumed_one", gradient_accumulation_steps=4,
                                   **options["dpo"], **resume), env=envs["two"])  # fmt: skip
    return root, output


def test_dpo_token_budget_two_processes_match_one(runs):
    """With --max_tokens_per_batch, accelerate deals the budget micro-batches out to the processes in turn, so a
    2-process step (2 × 2 micro-batches) covers the micro-batches a 1-process step with 4 accumulations does."""
    root, output = runs
    assert "global batch: 4 micro-batches of up to 150 tokens (2 accumulation x 2 processes)" in output
    two, one = train_records(root / "dpo_budget_two"), train_records(root / "dpo_budget_one")
    assert len(two) == 2
    assert_same_curve(two, one, rtol=1e-4, label="dpo token budget")


def test_dpo_two_processes_match_one(runs):
    root, output = runs
    assert "global batch: 8 pairs (2 per device x 2 accumulation x 2 processes)" in output
    two, one = train_records(root / "dpo_two"), train_records(root / "dpo_one")
    assert len(two) == 4  # only the main process logs: one record per step
    assert_same_curve(two, one, rtol=3e-3, label="dpo train")
    assert two[-1]["loss"] < two[0]["loss"]


def test_online_dpo_two_processes_match_one(runs):
    """Online DPO: the 2 processes sample, judge and train on the answers to their own prompts, and together equal
    1 process with twice the accumulation — training and the eval on held-out prompts."""
    root, output = runs
    assert "global batch: 8 prompts (2 per device x 2 accumulation x 2 processes)" in output
    two, one = root / "dpo_online_two", root / "dpo_online_one"
    assert len(train_records(two)) == 3
    assert_same_curve(train_records(two), train_records(one), rtol=3e-3, label="online dpo train")
    assert_same_curve(eval_records(two), eval_records(one), rtol=3e-3, label="online dpo eval")
    assert train_records(two)[-1]["objective/kl"] != 0


def test_dpo_eval_counts_every_pair_once(runs):
    """7 eval pairs, batch 2 per process: the copies padding the last batch are dropped again (a pair counted twice
    or dropped would move the log-prob means by about 1/7 of the spread between pairs)."""
    root, output = runs
    assert "eval pairs: 7" in output
    two, one = eval_records(root / "dpo_two"), eval_records(root / "dpo_one")
    assert [r["step"] for r in two] == [2, 4]
    assert_same_curve(two, one, rtol=3e-3, label="dpo eval")


def test_dpo_reference_precompute_sharded_gives_the_same_cache(runs):
    """Each process scores half of the batches; gathered in order, the cache equals one process's: the same files
    (the same cache keys) with the same values, for the train and the eval set."""
    root, _ = runs
    two = {p.name: load_file(p) for p in (root / "cache_two" / "ref_logps").glob("*.safetensors")}
    one = {p.name: load_file(p) for p in (root / "cache_one" / "ref_logps").glob("*.safetensors")}
    assert len(two) == 2 and two.keys() == one.keys()
    assert sorted(t["ref_chosen_logps"].numel() for t in two.values()) == [7, 16]
    for name in two:
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            torch.testing.assert_close(two[name][key], one[name][key], rtol=1e-6, atol=1e-5)


def test_dpo_main_process_writes_once(runs):
    root, output = runs
    for out in (root / "dpo_two", root / "dpo_one"):
        assert (out / "model.safetensors").exists() and (out / "checkpoint-3").is_dir()
    final_two = load_file(root / "dpo_two" / "model.safetensors")
    final_one = load_file(root / "dpo_one" / "model.safetensors")
    for name, tensor in final_one.items():
        torch.testing.assert_close(final_two[name], tensor, rtol=0, atol=1e-4, msg=name)
    assert output.count("done: 4 steps") == 4  # accelerator.print: the main process only, once per run


def test_sft_two_processes_match_one(runs):
    root, output = runs
    assert "global batch: 8 rows (2 per device x 2 accumulation x 2 processes)" in output
    two, one = root / "sft_two", root / "sft_one"
    assert_same_curve(train_records(two), train_records(one), rtol=1e-4, label="sft train")
    assert_same_curve(eval_records(two), eval_records(one), rtol=1e-4, label="sft eval")


def test_pt_two_processes_match_one(workdir, runs):
    from transformers import AutoTokenizer

    from nanodpo.packing import Document, pack_documents

    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    docs = [Document(tokenizer(r["text"])["input_ids"] + [tokenizer.eos_token_id]) for r in pt_rows(48)]
    assert len(pack_documents(docs, 32, "wrapped", "split")) >= 32  # 4 steps of 8 rows, no partial step
    root, _ = runs
    two, one = root / "pt_two", root / "pt_one"
    assert_same_curve(train_records(two), train_records(one), rtol=3e-3, label="pt train")
    assert_same_curve(eval_records(two), eval_records(one), rtol=3e-3, label="pt eval")


def assert_resumed_step_matches(root: Path, resumed: str, original: str) -> None:
    """Step 4 of the resumed run equals step 4 of the run the checkpoint came from: same weights and optimizer state
    after step 3, the same global batch and so the same examples in step 4 — within 1e-5, like any step computed from
    the same weights in another layout."""
    records = train_records(root / resumed)
    assert [r["step"] for r in records] == [4], resumed
    assert_same_curve(records, train_records(root / original)[3:], rtol=1e-5, label=f"resume {resumed}")


def test_checkpoint_of_one_process_resumes_on_two(runs):
    root, output = runs
    assert output.count("resuming a 1-process checkpoint on 2 processes") == 1  # main process only
    assert_resumed_step_matches(root, "sft_resumed_two", "sft_one")


def test_checkpoint_of_two_processes_resumes_on_one(runs):
    root, _ = runs
    assert_resumed_step_matches(root, "dpo_resumed_one", "dpo_two")


# ----------------------------------------------------------------------------------------------------------------
# FSDP2 (CPU, through the shim described at the top)

FSDP_SHIM = """
import runpy, sys
import nanodpo.training as training
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

_make_accelerator = training.make_accelerator

def make_accelerator(cfg):
    accelerator = _make_accelerator(cfg)
    # accelerate enables FSDP for GPU-like devices only; on CPU (gloo) turn it on with the env's FSDP plugin.
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # AcceleratorState re-reads it from here
    print(f"fsdp{accelerator.state.fsdp_plugin.fsdp_version} on {accelerator.device}", flush=True)
    return accelerator

training.make_accelerator = make_accelerator
script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


def fsdp_env(config: str) -> dict:
    """The FSDP_* environment `accelerate launch --config_file configs/accelerate/CONFIG` gives its processes."""
    _, _, env = launch_env(ROOT / "configs" / "accelerate" / config)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    return {k: v for k, v in env.items() if k.startswith("FSDP_")}


# The FSDP2 runs share one launch, like DRIVER above: each run's main() in turn on one process group, each with its
# own accelerate state (forced to FSDP by the shim's make_accelerator) and the FSDP_* environment of its config.
FSDP_DRIVER = FSDP_SHIM.split("training.make_accelerator = make_accelerator")[0] + """
training.make_accelerator = make_accelerator
import json
import nanodpo.model

_prepare_reference = nanodpo.model.prepare_reference

def prepare_reference(accelerator, ref_model):  # what the run's reference became, for the test to check
    ref_model = _prepare_reference(accelerator, ref_model)
    params = list(ref_model.parameters())
    local = sum(p.to_local().numel() if type(p).__name__ == "DTensor" else p.numel() for p in params)
    facts = dict(params=len(params), dtensor_params=sum(type(p).__name__ == "DTensor" for p in params),
                 trainable=sum(p.requires_grad for p in params),
                 registered=any(m is ref_model for m in accelerator._models),
                 local_fraction=round(local / sum(p.numel() for p in params), 2))
    print("reference under fsdp2: " + json.dumps(facts), flush=True)
    return ref_model

nanodpo.model.prepare_reference = prepare_reference
""" + RUN_PLAN


def fsdp_dpo_runs(workdir: Path) -> dict[str, tuple[str, dict]]:
    """DPO under FSDP2, every configuration with the chunked LM head (the default) but `lora_readable`; SGD, 3 steps.

    full_online: full fine-tuning, the reference a frozen copy sharded like the policy
        (nanodpo.model.prepare_reference), with gradient checkpointing (the chunked head inside a checkpointed model).
    full_precomputed: full fine-tuning, reference log-probs scored by the sharded policy; tied embeddings (the LM
        head's weight is the input embedding: its one FSDP unit gets both gradients); a checkpoint at step 2.
    full_precomputed_ram_efficient: fsdp_cpu_ram_efficient_loading: true — sharding puts rank 0's weights on every
        process (accelerate's fsdp2_load_full_state_dict); the reference log-probs are scored after that.
    qlora: LoRA on a bitsandbytes 4-bit base whose packed weights are stored as float (FSDP2 shards them).
    lora / lora_readable: a LoRA adapter on the sharded base, the reference the same model with the adapter off;
        lora_readable takes TRL's padded batch and full logits (--logps readable --batch_layout padded).
    lora_online: online DPO, the answers sampled by the sharded policy (every process runs all --max_new_tokens
        forwards, each gathering the weights: correct, not fast), judged by a reward model sharded like a reference
        and a function, weighted.
    """
    dpo = dict(
        dataset=str(workdir / "dpo_train.jsonl"), optim="sgd", learning_rate=0.5, max_length=64, beta=0.1, max_steps=3,
    )  # fmt: skip
    lora = dict(use_lora="true", lora_r=8, lora_alpha=16)
    return {
        "full_online": ("fsdp2_full.yaml", {**dpo, "gradient_checkpointing": "true"}),
        "full_precomputed": ("fsdp2_full.yaml", {**dpo, "model": str(workdir / "model_tied"),
                                                 "precompute_ref_logps": "true", "save_steps": 2}),
        "full_precomputed_ram_efficient": ("fsdp2_full.yaml", {**dpo, "precompute_ref_logps": "true"}),
        "lora": ("fsdp2_lora.yaml", {**dpo, **lora}),
        "qlora": ("fsdp2_lora.yaml", {**dpo, **lora, "load_in_4bit": "true", "bnb_4bit_quant_storage": "float32",
                                      "dtype": "float32"}),
        "lora_readable": ("fsdp2_lora.yaml", {**dpo, **lora, "logps": "readable", "batch_layout": "padded"}),
        "lora_online": ("fsdp2_lora.yaml", {**without_eval(online_options(workdir)), **lora, "optim": "sgd",
                                            "learning_rate": 0.5, "reward_model": str(workdir / "reward_model"),
                                            "reward_weights": [1.0, 0.5]}),
    }  # fmt: skip


def fsdp_resume_runs(workdir: Path, root: Path) -> dict[str, tuple[str, dict]]:
    """2-process runs only: AdamW for 4 steps with a checkpoint at step 2, and the same run resumed from it (the
    optimizer's full state gathered from the shards, keyed by parameter name, and sharded again on loading), full
    fine-tuning with an online reference and LoRA."""
    adamw = resume_options(workdir)
    runs = {
        "full_adamw": ("fsdp2_full.yaml", adamw),
        "lora_adamw": ("fsdp2_lora.yaml", {**adamw, "use_lora": "true", "lora_r": 8, "lora_alpha": 16}),
    }
    return {**runs, **resumed_twins(runs, root)}


def resume_options(workdir: Path) -> dict:
    """DPO with AdamW (whose moments must come back), 4 steps, a checkpoint at step 2 for a twin to resume from."""
    return dict(
        dataset=str(workdir / "dpo_train.jsonl"), optim="adamw_torch", learning_rate=1e-3, max_length=64, beta=0.1,
        max_steps=4, save_steps=2,
    )  # fmt: skip


def resumed_twins(runs: dict[str, tuple], root: Path) -> dict[str, tuple]:
    """Each run (its options last) again, named NAME_resumed, resumed from ROOT/NAME_two/checkpoint-2."""
    return {
        f"{name}_resumed": (*head, {**options, "resume_from_checkpoint": str(root / f"{name}_two" / "checkpoint-2")})
        for name, (*head, options) in runs.items()
    }


def launch_plan(root: Path, plan: list[tuple[str, list, dict]], driver: str, env: dict, timeout: int = 240) -> str:
    """The plan's runs, (script, argv, env) each, in turn on 2 processes: one torchrun launch of `driver`. Every run
    must really have had 2 processes. Returns the launch's output."""
    (root / "plan.json").write_text(json.dumps(plan))
    (root / "driver.py").write_text(driver)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        str(root / "driver.py"), str(root / "plan.json"),
    ]  # fmt: skip
    output = run(cmd, env, timeout)
    assert output.count("accumulation x 2 processes)") == len(plan)
    return output


@pytest.fixture(scope="module")
def fsdp_runs(workdir, tmp_path_factory):
    """Every FSDP2 DPO configuration with 2 processes (one launch through the shim) and 1 process (in this process),
    the same global batch. Returns (root folder, output of the launch)."""
    root = tmp_path_factory.mktemp("fsdp")
    tiny.make_model_dir(workdir / "model_tied", seed=1, tie_word_embeddings=True)
    runs = fsdp_dpo_runs(workdir)
    plan = []
    for name, (config, options) in {**runs, **fsdp_resume_runs(workdir, root)}.items():
        env = {**fsdp_env(config), "NANODPO_CACHE": str(root / "cache_two")}
        if name.endswith("ram_efficient"):  # what fsdp_cpu_ram_efficient_loading: true launches with
            env.update(FSDP_CPU_RAM_EFFICIENT_LOADING="true")
        plan.append(("train_dpo", to_argv(common(workdir, root / f"{name}_two", **options)), env))
    output = launch_plan(root, plan, FSDP_DRIVER, base_env(ACCELERATE_USE_CPU="1"))
    assert output.count("fsdp2 on cpu") == 2 * len(plan)
    for name, (_, options) in runs.items():
        run_one("train_dpo.py", common(workdir, root / f"{name}_one", gradient_accumulation_steps=4, **options),
                env={"NANODPO_CACHE": str(root / "cache_one")})  # fmt: skip
    return root, output


@pytest.mark.parametrize("name", ["full_online", "full_precomputed", "full_precomputed_ram_efficient", "lora",
                                  "qlora", "lora_readable", "lora_online"])  # fmt: skip
def test_fsdp2_dpo_two_processes_match_one(fsdp_runs, name):
    """DPO under FSDP2 (configs/accelerate/fsdp2_full.yaml, fsdp2_lora.yaml) equals 1 process with the same global
    batch: every logged value of 3 SGD steps within 1e-4 (step 1 within 1e-5), and the saved weights (gathered
    from the shards) within 1e-5, under the same names (tied embeddings: the shared tensor once, as
    save_pretrained writes it), in the final model and in a checkpoint."""
    root, output = fsdp_runs
    assert "fast log-prob path unavailable" not in output  # the chunked head runs on sharded weights
    two, one = root / f"{name}_two", root / f"{name}_one"
    assert_same_curve(train_records(two), train_records(one), rtol=1e-4, label=f"fsdp2 dpo {name}")
    saved = "adapter_model.safetensors" if "lora" in name else "model.safetensors"
    folders = ["", "checkpoint-2"] if name == "full_precomputed" else [""]
    for folder in folders:
        two_weights, one_weights = load_file(two / folder / saved), load_file(one / folder / saved)
        assert two_weights.keys() == one_weights.keys() and len(one_weights) > 0, folder
        for key, tensor in one_weights.items():
            torch.testing.assert_close(two_weights[key], tensor, rtol=0, atol=1e-5, msg=f"{folder} {key}")
    if "lora" in name:
        assert json.loads((two / "adapter_config.json").read_text())["r"] == 8


def assert_resumed_exactly(original: Path, resumed: Path) -> None:
    """The run resumed from checkpoint-2 of `original` logs steps 3 and 4 exactly as `original` did (all but
    wall-clock values) and saves the same final weights, bit for bit."""
    continued = [r for r in train_records(resumed) if r["step"] > 2]
    assert [r["step"] for r in continued] == [3, 4]
    for ours, theirs in zip(continued, train_records(original)[2:]):
        assert {k: v for k, v in ours.items() if k not in NOT_COMPARED} == {
            k: v for k, v in theirs.items() if k not in NOT_COMPARED
        }
    saved = "adapter_model.safetensors" if (original / "adapter_model.safetensors").exists() else "model.safetensors"
    for key, tensor in load_file(original / saved).items():
        assert torch.equal(load_file(resumed / saved)[key], tensor), key


@pytest.mark.parametrize("name", ["full_adamw", "lora_adamw"])
def test_fsdp2_checkpoint_resumes_exactly(fsdp_runs, name):
    """An FSDP2 run resumed from its step-2 checkpoint continues exactly as the run that wrote it: steps 3 and 4
    (AdamW: the moments must come back, each process its shard) and the final weights bit for bit."""
    root, output = fsdp_runs
    original, resumed = root / f"{name}_two", root / f"{name}_resumed_two"
    assert json.loads((original / "checkpoint-2" / "trainer_state.json").read_text())["sharding"] == "fsdp2"
    assert_resumed_exactly(original, resumed)


def test_fsdp2_reference_is_sharded_and_frozen(fsdp_runs):
    """The full-fine-tuning reference under FSDP2 is sharded like the policy — each process holds half of every
    parameter (DTensor shards), none trainable — and not registered among the models accelerate trains."""
    root, output = fsdp_runs
    # Both processes print to one pipe, so their lines may run into each other: find each record by its braces.
    found = [json.loads(text) for text in re.findall(r"reference under fsdp2: (\{[^{}]*\})", output)]
    facts = {"params": 27, "dtensor_params": 27, "trainable": 0, "registered": False, "local_fraction": 0.5}
    assert [f for f in found if f["params"] != 15] == 6 * [facts]  # full_online, full_adamw and its resumed run
    # lora_online's reward model (15 parameters), sharded the same way
    assert [f for f in found if f["params"] == 15] == 2 * [{**facts, "params": 15, "dtensor_params": 15}]
