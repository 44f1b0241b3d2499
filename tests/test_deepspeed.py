"""DeepSpeed ZeRO-2 and ZeRO-3 on 2 CPU processes (gloo): DPO, SFT and PT equal 1 process with the same global batch.

DeepSpeed itself runs on CPU: with no GPU visible it picks its CPU accelerator, and its collectives go over gloo.
What accelerate lacks there is bookkeeping: `ACCELERATE_USE_DEEPSPEED` makes its state DEEPSPEED, but on a machine
without GPUs every process is left with num_processes 1 and process_index 0 (each would read all the data and each
would write the files). A 6-line shim (SHIM below) fills both in from the process group DeepSpeed formed, and turns
off DeepSpeed's shared-memory all-reduce (a C++ op compiled at start-up; gloo does the same reduction). Everything
after that is accelerate's, DeepSpeed's and nanodpo's real path:
  * the run's DeepSpeed config, built by accelerate's own launch-argument code from configs/accelerate/zero2.yaml
    or zero3.yaml (ZeRO stage, 16-bit save; accumulation, batch sizes and clipping filled in from the training
    config by nanodpo.training.make_accelerator);
  * under ZeRO-3, weights partitioned from the moment they load (transformers loads inside `deepspeed.zero.Init`
    once accelerate's DeepSpeed config is set: each process never holds a whole copy);
  * `deepspeed.initialize` and the engine's backward / step / clipping (accelerator.backward, gradient_sync);
  * the full-fine-tuning reference as an inference-only engine (nanodpo.model.prepare_reference), ZeRO-3-
    partitioned under ZeRO-3, a plain copy (stage 0) under ZeRO-2;
  * the chunked LM head inside the head's own forward, so ZeRO-3's hooks gather its weight;
  * --precompute_ref_logps scored by the prepared, partitioned policy, with the same cache key as on 1 process;
  * the final model gathered into one state dict and saved by the main process.

Each 2-process run (batch 2 x accumulation 2) is compared with 1 process without DeepSpeed (batch 2 x accumulation
4) on the same micro-batches (see tests/test_distributed.py): every logged value of 3 SGD steps within 1e-4 (step 1
within 1e-5), eval values within 1e-4, and the saved weights within 1e-5 (AdamW under zero3_offload.yaml: 3e-3 and
1e-4). Checkpoints resume bit for bit. All runs share one launch, as the DDP and FSDP2 tests do.
"""

import json
import os
import re
from pathlib import Path
from unittest import mock

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file
from transformers.integrations import unset_hf_deepspeed_config

from nanodpo import training
from nanodpo.config import DPOConfig, PTConfig, SFTConfig, parse_config
from nanodpo.errors import UserError
from nanodpo.model import check_sharding_options
from tests import tiny
from tests.test_distributed import (
    ROOT,
    RUN_PLAN,
    assert_resumed_exactly,
    assert_same_curve,
    base_env,
    common,
    eval_records,
    launch_env,
    launch_plan,
    online_options,
    pt_options,
    pt_rows,
    resume_options,
    resumed_twins,
    run_one,
    sft_rows,
    to_argv,
    train_records,
)

pytestmark = pytest.mark.slow
deepspeed = pytest.importorskip("deepspeed", reason="DeepSpeed is in the test extra: pip install -e '.[test]'")

SHIM = """
import importlib
import torch.distributed as dist
from accelerate.state import PartialState

# Plain gloo collectives: no shared-memory C++ op compiled at start-up. (By its module: `deepspeed.comm.torch` as an
# attribute is torch itself, re-exported by deepspeed.comm.)
importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
state = PartialState()  # DeepSpeed's init_distributed forms the gloo group here
# On a machine without GPUs accelerate leaves every process at "process 0 of 1": fill in the group's real ranks.
state._shared_state.update(num_processes=dist.get_world_size(), process_index=dist.get_rank(),
                           local_process_index=dist.get_rank(), backend="gloo")
"""

# Every run's main() in turn on the one process group, each with its own accelerate state and the DeepSpeed
# environment of its config; the reference engine of every DPO run is described for the test to check.
DRIVER = SHIM + """
import json, os
import nanodpo.model

_prepare_reference = nanodpo.model.prepare_reference

def prepare_reference(accelerator, ref_model):
    engine = _prepare_reference(accelerator, ref_model)
    params = list(engine.module.parameters())
    full = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    facts = dict(engine=type(engine).__name__, optimizer=type(engine.optimizer).__name__,
                 zero_stage=engine.zero_optimization_stage(), partitioned=sum(hasattr(p, "ds_id") for p in params),
                 params=len(params), trainable=sum(p.requires_grad for p in params),
                 registered=any(m is engine for m in accelerator._models), local_fraction=round(local / full, 2))
    print(f"reference under {os.environ['ACCELERATE_DEEPSPEED_ZERO_STAGE']}: " + json.dumps(facts), flush=True)
    return engine

nanodpo.model.prepare_reference = prepare_reference
""" + RUN_PLAN


def deepspeed_env(config: str) -> dict:
    """The DeepSpeed environment `accelerate launch --config_file configs/accelerate/CONFIG` gives its processes."""
    _, _, env = launch_env(ROOT / "configs" / "accelerate" / config)
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
    return {k: v for k, v in env.items() if k.startswith("ACCELERATE_DEEPSPEED_") or k == "ACCELERATE_USE_DEEPSPEED"}


def deepspeed_runs(workdir: Path) -> dict[str, tuple[str, str, dict]]:
    """(script, accelerate config, options) of every run; SGD, 3 steps; the chunked LM head unless named readable.

    zero3_full_online: full fine-tuning, the reference an inference engine partitioned like the policy, gradient
        checkpointing, eval every 2 steps on 7 pairs (uneven last batch: collective forwards on padded batches).
    zero3_full_precomputed: the reference log-probs scored by the partitioned policy; tied embeddings.
    zero3_full_readable: TRL's padded batch and full logits (--logps readable --batch_layout padded).
    zero3_lora: a LoRA adapter on the partitioned base; the reference is the same model with the adapter off.
    zero3_qlora: the same on a bitsandbytes 4-bit base (QLoRA), its packed weights stored as float so ZeRO-3 can
        partition them (no device_map: DeepSpeed places the weights).
    zero2_full_online: ZeRO-2 (optimizer state and gradients partitioned), the reference a stage-0 engine.
    zero3_token_budget: --max_tokens_per_batch (micro-batches of 1-3 pairs: no fixed batch size for accelerate to
        give DeepSpeed; the training config's is used), 2 steps.
    zero3_sft: train_sft.py, eval every 2 steps on 5 rows.
    zero3_pt: train_pt.py, packed rows of 32 tokens, eval every 2 steps on 5 rows.
    zero3_online: online DPO, full fine-tuning: the answers sampled by the partitioned policy (every process runs all
        --max_new_tokens forwards, each gathering the weights: correct, not fast), judged by a reward model — itself
        an inference engine partitioned like the reference — and a function, weighted.
    zero3_offload_adamw: configs/accelerate/zero3_offload.yaml, optimizer state and parameters offloaded to CPU RAM:
        accelerate hands the step to DeepSpeed's CPU AdamW (a C++ op, compiled on first use), with the parameter
        groups of torch's AdamW (beta2 0.95, decoupled weight decay 0.1 on matrices only); compared with torch's AdamW.
    """
    dpo = dict(
        dataset=str(workdir / "dpo_train.jsonl"), optim="sgd", learning_rate=0.5, max_length=64, beta=0.1, max_steps=3,
    )  # fmt: skip
    evals = dict(eval_dataset=str(workdir / "dpo_eval.jsonl"), eval_steps=2)
    lora = dict(use_lora="true", lora_r=8, lora_alpha=16)
    qlora = dict(load_in_4bit="true", bnb_4bit_quant_storage="float32", dtype="float32")
    sft = dict(
        dataset=str(workdir / "sft_train.jsonl"), eval_dataset=str(workdir / "sft_eval.jsonl"), eval_steps=2,
        optim="sgd", learning_rate=0.5, max_length=128, max_steps=3,
    )  # fmt: skip
    return {
        "zero3_full_online": ("train_dpo", "zero3.yaml", {**dpo, **evals, "gradient_checkpointing": "true"}),
        "zero3_full_precomputed": ("train_dpo", "zero3.yaml", {**dpo, "model": str(workdir / "model_tied"),
                                                               "precompute_ref_logps": "true"}),
        "zero3_full_readable": ("train_dpo", "zero3.yaml", {**dpo, "logps": "readable", "batch_layout": "padded"}),
        "zero3_lora": ("train_dpo", "zero3.yaml", {**dpo, **lora}),
        "zero3_qlora": ("train_dpo", "zero3.yaml", {**dpo, **lora, **qlora}),
        "zero2_full_online": ("train_dpo", "zero2.yaml", dpo),
        "zero3_token_budget": ("train_dpo", "zero3.yaml", {**dpo, "max_tokens_per_batch": 150, "max_steps": 2}),
        "zero3_online": ("train_dpo", "zero3.yaml", {**dpo, **online_options(workdir), "optim": "sgd",
                         "learning_rate": 0.5, "reward_model": str(workdir / "reward_model"),
                         "judge": "tests.online_judges:char_score", "reward_weights": [1.0, 0.5]}),
        "zero3_sft": ("train_sft", "zero3.yaml", sft),
        "zero3_pt": ("train_pt", "zero3.yaml", {**pt_options(workdir), "optim": "sgd", "learning_rate": 0.5,
                                                "max_steps": 3}),
        "zero3_offload_adamw": ("train_dpo", "zero3_offload.yaml", {**dpo, "optim": "adamw_torch",
                                "learning_rate": 1e-3, "adam_beta2": 0.95, "weight_decay": 0.1}),
    }  # fmt: skip


def resume_runs(workdir: Path) -> dict[str, tuple[str, str, dict]]:
    """2-process runs only: AdamW for 4 steps with a checkpoint at step 2, and the same run resumed from it (the
    engine's own per-process files: weights, fp32 master weights, moments), full fine-tuning under ZeRO-3 and LoRA
    under ZeRO-2."""
    adamw = resume_options(workdir)
    lora = dict(use_lora="true", lora_r=8, lora_alpha=16)
    runs = {"zero3_adamw": ("train_dpo", "zero3.yaml", adamw),
            "zero2_lora_adamw": ("train_dpo", "zero2.yaml", {**adamw, **lora})}  # fmt: skip
    return {**runs, **resumed_twins(runs, workdir)}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepspeed")
    tiny.make_model_dir(root / "model", seed=0)
    tiny.make_model_dir(root / "model_tied", seed=1, tie_word_embeddings=True)
    tiny.write_jsonl(root / "dpo_train.jsonl", tiny.preference_rows(16, "explicit"))
    tiny.write_jsonl(root / "dpo_eval.jsonl", tiny.preference_rows(23, "explicit")[16:])
    tiny.write_jsonl(root / "sft_train.jsonl", sft_rows(16))
    tiny.write_jsonl(root / "sft_eval.jsonl", sft_rows(5))
    tiny.write_jsonl(root / "pt_train.jsonl", pt_rows(48))
    tiny.write_jsonl(root / "pt_eval.jsonl", pt_rows(5))
    prompts = [{"prompt": row["prompt"]} for row in tiny.preference_rows(24, "conversational")]
    tiny.write_jsonl(root / "online_train.jsonl", prompts[:16])
    tiny.write_jsonl(root / "online_eval.jsonl", prompts[16:])
    tiny.make_reward_model_dir(root / "reward_model")
    return root


@pytest.fixture(scope="module")
def deepspeed_launch(workdir):
    """Every run with 2 processes under DeepSpeed (one launch) and 1 process without it (in this process).
    Returns the output of the launch."""
    runs = deepspeed_runs(workdir)
    plan = []
    for name, (script, config, options) in {**runs, **resume_runs(workdir)}.items():
        env = {**deepspeed_env(config), "NANODPO_CACHE": str(workdir / "cache_two")}
        plan.append((script, to_argv(common(workdir, workdir / f"{name}_two", **options)), env))
    # DeepSpeed must see the DeepSpeed setting when the process group is formed (the shim's PartialState).
    env = base_env(ACCELERATE_USE_DEEPSPEED="true", DS_ACCELERATOR="cpu")
    output = launch_plan(workdir, plan, DRIVER, env, timeout=420)
    for name, (script, _, options) in runs.items():
        run_one(f"{script}.py", common(workdir, workdir / f"{name}_one", gradient_accumulation_steps=4, **options),
                env={"NANODPO_CACHE": str(workdir / "cache_one")})  # fmt: skip
    return output


@pytest.mark.parametrize("name", list(deepspeed_runs(Path("."))))
def test_deepspeed_two_processes_match_one(workdir, deepspeed_launch, name):
    """2 processes under ZeRO-2/ZeRO-3 equal 1 process without DeepSpeed: every logged value of 3 SGD steps within
    1e-4 (step 1 within 1e-5), the evals within 1e-4, and the saved weights (gathered from the partitions) within
    1e-5, with the same tensor names (AdamW with offload: 3e-3 and 1e-4)."""
    two, one = workdir / f"{name}_two", workdir / f"{name}_one"
    # AdamW: DeepSpeed's CPU AdamW against torch's, whose first updates g/sqrt(v) amplify fp32 rounding (the AdamW
    # tolerance of tests/test_distributed.py); SGD elsewhere.
    rtol, atol = (3e-3, 1e-4) if "adamw" in name else (1e-4, 1e-5)
    assert_same_curve(train_records(two), train_records(one), rtol=rtol, label=f"deepspeed {name}")
    if eval_records(one):
        assert_same_curve(eval_records(two), eval_records(one), rtol=1e-4, first_rtol=1e-4, label=f"{name} eval")
    saved = "adapter_model.safetensors" if "lora" in name else "model.safetensors"
    two_weights, one_weights = load_file(two / saved), load_file(one / saved)
    assert two_weights.keys() == one_weights.keys() and len(one_weights) > 0
    for key, tensor in one_weights.items():
        assert two_weights[key].dtype == tensor.dtype, key
        torch.testing.assert_close(two_weights[key], tensor, rtol=0, atol=atol, msg=key)


def test_deepspeed_reference_is_an_inference_engine(deepspeed_launch):
    """The full-fine-tuning reference is a DeepSpeed engine without optimizer, never registered with accelerate,
    nothing trainable: ZeRO-3-partitioned under ZeRO-3 (each process holds half of it; its only "optimizer" is
    DeepSpeedZeRoOffload, ZeRO-3's parameter gatherer), a whole copy (stage 0, no optimizer) under ZeRO-2."""
    facts = {}  # both processes print to one pipe, so lines may run into each other: find records by their braces
    for stage, text in re.findall(r"reference under (\d): (\{[^{}]*\})", deepspeed_launch):
        facts.setdefault(stage, []).append(json.loads(text))
    common_facts = dict(engine="DeepSpeedEngine", params=27, trainable=0, registered=False)
    zero3 = dict(optimizer="DeepSpeedZeRoOffload", zero_stage=3, partitioned=27, local_fraction=0.5)
    zero2 = dict(optimizer="NoneType", zero_stage=0, partitioned=0, local_fraction=1.0)
    # zero3_full_online, zero3_full_readable, zero3_token_budget, zero3_offload_adamw, zero3_online, zero3_adamw and
    # its resumed run; zero2_full_online: 2 processes each. zero3_online's reward model (15 parameters) too.
    reward_models = [f for f in facts["3"] if f["params"] == 15]
    assert [f for f in facts["3"] if f["params"] != 15] == 14 * [{**common_facts, **zero3}]
    assert reward_models == 2 * [{**common_facts, **zero3, "params": 15, "partitioned": 15}]
    assert facts["2"] == 2 * [{**common_facts, **zero2}]


def test_deepspeed_precomputed_reference_has_the_one_process_cache_key(workdir, deepspeed_launch):
    """Scored by the partitioned policy, the reference log-probs get the cache key of the whole weights (each
    parameter gathered for the fingerprint), so 1 and 2 processes name the same file — and hold the same values."""
    two = sorted((workdir / "cache_two" / "ref_logps").glob("*.safetensors"))
    one = sorted((workdir / "cache_one" / "ref_logps").glob("*.safetensors"))
    assert [p.name for p in two] == [p.name for p in one] and len(one) == 1
    for key, tensor in load_file(one[0]).items():
        torch.testing.assert_close(load_file(two[0])[key], tensor, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["zero3_adamw", "zero2_lora_adamw"])
def test_deepspeed_checkpoint_resumes_exactly(workdir, deepspeed_launch, name):
    """A DeepSpeed run resumed from its step-2 checkpoint continues exactly as the run that wrote it: steps 3 and 4
    (AdamW, so the moments and the fp32 master weights must come back too) and the final weights bit for bit."""
    original, resumed = workdir / f"{name}_two", workdir / f"{name}_resumed_two"
    assert "resumed from" in deepspeed_launch
    files = {p.name for p in (original / "checkpoint-2" / "deepspeed" / "state").iterdir()}
    assert {f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in (0, 1)} <= files  # one ZeRO shard each
    assert_resumed_exactly(original, resumed)


def accelerator_in_this_process(cfg, env: dict) -> dict | None:
    """make_accelerator(cfg) here, under the environment `accelerate launch` would give (one process): a copy of the
    run's DeepSpeed config as fitted (None without DeepSpeed). The accelerate state is reset after, and transformers'
    ZeRO-3 flag too (or this process's next model would load partitioned)."""
    AcceleratorState._reset_state(reset_partial_state=True)
    with mock.patch.dict(os.environ, env):
        try:
            plugin = training.make_accelerator(cfg).state.deepspeed_plugin
            return dict(plugin.deepspeed_config) if plugin is not None else None
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
            unset_hf_deepspeed_config()


def test_deepspeed_configs_that_would_change_the_run_are_refused():
    """Before anything loads: DeepSpeed launched where accelerate miscounts the processes (no GPUs: each process
    would think it is the only one), ZeRO-3 that cannot gather the model to save it (accelerate would fail at the first
    save), SGD with optimizer offload (accelerate would silently step with DeepSpeed's CPU Adam instead), and a
    DeepSpeed config whose accumulation differs from --gradient_accumulation_steps (accelerate would silently take
    DeepSpeed's). Left "auto", accumulation and batch sizes come from the training config."""

    def deepspeed_config_for(config: str, *options: str, **env) -> dict:
        argv = ["--model", "nanodpo-tiny", "--dataset", "x.jsonl", "--output_dir", "out", *options]
        return accelerator_in_this_process(parse_config(DPOConfig, argv), {**deepspeed_env(config), **env})

    with mock.patch("torch.distributed.is_initialized", return_value=True), \
            mock.patch("torch.distributed.get_world_size", return_value=2):  # accelerate's DeepSpeed state on CPU
        with pytest.raises(UserError, match="DeepSpeed here formed 2 processes but accelerate counts 1"):
            deepspeed_config_for("zero3.yaml")
    with pytest.raises(UserError, match="ZeRO-3 without zero3_save_16bit_model: true"):
        deepspeed_config_for("zero3.yaml", ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL="false")
    with pytest.raises(UserError, match="--optim sgd with ZeRO-Offload"):
        deepspeed_config_for("zero3_offload.yaml", "--optim", "sgd")
    with pytest.raises(UserError, match="sets gradient_accumulation_steps 8 but --gradient_accumulation_steps is 2"):
        deepspeed_config_for("zero3.yaml", "--gradient_accumulation_steps", "2",
                             ACCELERATE_GRADIENT_ACCUMULATION_STEPS="8")  # fmt: skip
    ds_config = deepspeed_config_for("zero3.yaml", "--gradient_accumulation_steps", "4",
                                     "--per_device_train_batch_size", "3", "--max_grad_norm", "0.5")  # fmt: skip
    assert (ds_config["gradient_accumulation_steps"], ds_config["train_micro_batch_size_per_gpu"],
            ds_config["train_batch_size"], ds_config["gradient_clipping"]) == (4, 3, 12, 0.5)  # fmt: skip


def test_readme_launch_commands_pass_every_up_front_check():
    """Each `accelerate launch --config_file configs/accelerate/A train_X.py --config configs/B` in README.md, with
    the environment accelerate launches it with: the training config parses, the sharding checks pass
    (nanodpo.model.check_sharding_options) and so does building its Accelerator (the DeepSpeed checks of
    nanodpo.training.fit_deepspeed_config) — none of them would be refused at start."""
    pattern = r"accelerate launch --config_file configs/accelerate/(\S+)(?: --\S+ \S+)* (train_\w+)\.py --config (\S+)"
    commands = set(re.findall(pattern, (ROOT / "README.md").read_text()))
    assert len(commands) >= 8 and {"zero2.yaml", "zero3.yaml", "zero3_offload.yaml"} <= {c[0] for c in commands}
    classes = {"train_dpo": DPOConfig, "train_sft": SFTConfig, "train_pt": PTConfig}
    for accelerate_config, script, training_config in sorted(commands):
        _, _, env = launch_env(ROOT / "configs" / "accelerate" / accelerate_config)
        cfg = parse_config(classes[script], ["--config", str(ROOT / training_config), "--output_dir", "out"])
        check_sharding_options(cfg, env)
        accelerator_in_this_process(cfg, env)
