"""A user's first real run: configs that train, precision that means what it says, errors that say what to do.

1. Precision. Full fine-tuning of bf16 weights where nothing keeps an fp32 copy barely trains (an optimizer stepping
   bf16 weights loses updates below their spacing), so it is refused with the fix named (nanodpo.model.
   check_master_weights) on one process and DDP, and allowed where FSDP2 or DeepSpeed keep fp32 master weights, and
   for LoRA (fp32 adapters on any base). The fix — fp32 weights with bf16 autocast (--bf16) — is proven to train:
   10 AdamW steps at DPO's learning rate 5e-7 move the weights as fp32 training does (measured: every weight with a
   gradient moves, the update within 1.9% of fp32's), while AdamW on the same weights in bf16 moves 1.2% of them.
   Every shipped training config passes, launched as its own comments and README.md say.
2. accelerate's own mixed precision (`accelerate launch --mixed_precision`, `accelerate config`) is honoured, and a
   contradiction with --bf16/--fp16 refused.
3. metrics.jsonl is written whatever --report_to says; wandb is checked (installed, logged in, or offline) before any
   data is read.
4. TRL's option names get nanodpo's ("did you mean --model?"), any unknown option the closest name, on the command
   line and in YAML; --help lists the allowed values of every option that has a fixed set.
"""

import json
import re
import shlex
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

import train_dpo
import train_pt
import train_sft
from nanodpo import training
from nanodpo.config import (
    TRL_NAMES,
    TRL_NOT_NEEDED,
    DPOConfig,
    PTConfig,
    SFTConfig,
    build_arg_parser,
    parse_config,
)
from nanodpo.errors import UserError
from nanodpo.model import check_precision_options, load_policy
from nanodpo.tracking import check_trackers, read_metrics
from tests import tiny

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["The quick brown fox jumps over the lazy dog. " * (1 + i % 3) + f"Story number {i}." for i in range(16)]
CLASSES = {"train_dpo": DPOConfig, "train_sft": SFTConfig, "train_pt": PTConfig}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("first_run")
    tiny.make_model_dir(root / "model", seed=3)
    tiny.write_jsonl(root / "corpus.jsonl", [{"text": t} for t in TEXTS])
    tiny.write_jsonl(root / "sft.jsonl", [{"prompt": f"Q{i}?", "completion": f" A{i}."} for i in range(8)])
    return root


def moved(before: dict, after: dict, names) -> torch.Tensor:
    """Each weight's change, all tensors flattened into one vector (in float32)."""
    return torch.cat([(after[n].float() - before[n].float()).flatten() for n in names])


# ----------------------------------------------------------------------------------------------------------------
# 1. Precision


def test_bf16_autocast_moves_the_weights_as_fp32_training_does(workdir, tmp_path):
    """train_pt.py, 10 AdamW steps at lr 5e-7 (the full-fine-tuning configs' rate) from the same weights on the same
    batches: --bf16 (fp32 weights, the forward autocast to bf16 on CPU) against fp32. Both move every weight that has
    a gradient, by the same amounts within 5% (measured 1.9%); the update is not bit-identical (autocast really ran).
    The refused setup — 10 AdamW steps at the same rate on the same weights in bf16 (plain torch: the scripts refuse
    it) — moves under 5% of them (measured 1.2%)."""

    def run(name, *extra):
        AcceleratorState._reset_state(reset_partial_state=True)  # each run builds its own Accelerator
        train_pt.main([
            "--model", str(workdir / "model"), "--dataset", str(workdir / "corpus.jsonl"), "--output_dir",
            str(tmp_path / name), "--max_steps", "10", "--per_device_train_batch_size", "2", "--max_length", "64",
            "--learning_rate", "5e-7", "--lr_scheduler_type", "constant", "--train_sampling_strategy", "sequential",
            "--disable_tqdm", *extra,
        ])  # fmt: skip
        return load_file(tmp_path / name / "model.safetensors")

    start = load_file(workdir / "model" / "model.safetensors")
    fp32, autocast = run("fp32"), run("bf16", "--bf16")
    names = sorted(start)
    delta_fp32, delta_autocast = moved(start, fp32, names), moved(start, autocast, names)
    trained = delta_fp32 != 0  # embedding rows of tokens absent from the batches get no gradient
    gap = float((delta_autocast - delta_fp32).norm() / delta_fp32.norm())
    moved_autocast = float((delta_autocast[trained] != 0).float().mean())

    tokenizer = tiny.make_tokenizer()
    model = tiny.make_model(tokenizer, seed=3).to(torch.bfloat16)  # the same weights, in bf16
    model.load_state_dict(start)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-7, weight_decay=0.0)
    for text in TEXTS[:10]:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    dense = [n for n in names if "embed_tokens" not in n]  # every element of these has a gradient in any batch
    start_bf16 = {n: t.to(torch.bfloat16) for n, t in start.items()}  # what the optimizer started from
    delta_bf16 = moved(start_bf16, {n: p.detach() for n, p in model.state_dict().items()}, dense)
    moved_bf16 = float((delta_bf16 != 0).float().mean())
    print(f"\nweights moved: fp32 {float(trained.float().mean()):.2%} of all; bf16 autocast {moved_autocast:.2%} of "
          f"those, update within {gap:.2%} of fp32's; bf16 weights {moved_bf16:.2%}")  # fmt: skip
    assert float(trained.float().mean()) > 0.5
    assert moved_autocast > 0.999 and gap < 0.05
    assert not torch.equal(delta_autocast, delta_fp32)
    assert moved_bf16 < 0.05


def options(*argv: str):
    return parse_config(DPOConfig, ["--model", "m", "--dataset", "d.jsonl", *argv])


def test_half_precision_weights_without_an_fp32_copy_are_refused():
    """bf16/fp16 weights trained in full are refused where no fp32 copy backs them — one process and DDP (with or
    without mixed precision), FSDP2 and DeepSpeed without it — and allowed where FSDP2 or DeepSpeed keep one, for LoRA
    and QLoRA (fp32 adapters on a bf16 or 4-bit base), and for fp32 weights. `--dtype auto` (the checkpoint's) is
    treated as half precision. The environments are those `accelerate launch` gives (ACCELERATE_USE_CPU turns FSDP
    and DeepSpeed off: DDP)."""
    ddp = {"ACCELERATE_MIXED_PRECISION": "bf16"}
    fsdp = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
    deepspeed = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}
    refused = [
        ({}, ("--dtype", "bfloat16", "--bf16"), "one process or DDP"),
        ({}, ("--dtype", "bfloat16"), "one process or DDP"),
        ({}, ("--dtype", "float16", "--fp16"), "one process or DDP"),
        (ddp, ("--dtype", "bfloat16"), "one process or DDP"),
        ({}, ("--dtype", "auto", "--bf16"), "the checkpoint's dtype"),
        (fsdp, ("--dtype", "bfloat16"), "under FSDP2 without --bf16/--fp16"),
        (deepspeed, ("--dtype", "bfloat16"), "under DeepSpeed without --bf16/--fp16"),
        ({**fsdp, "ACCELERATE_USE_CPU": "True"}, ("--dtype", "bfloat16", "--bf16"), "one process or DDP"),
        ({**deepspeed, "ACCELERATE_USE_CPU": "1"}, ("--dtype", "bfloat16", "--bf16"), "one process or DDP"),
    ]
    fixes = "(--dtype float32 with --(bf|fp)16|add --bf16)"
    for env, argv, where in refused:
        with pytest.raises(UserError, match=f"{re.escape(where)}.*{fixes}") as err:
            check_precision_options(options(*argv), env)
        assert "\n" not in str(err.value)
    allowed = [
        (fsdp, ("--dtype", "bfloat16", "--bf16")),
        (deepspeed, ("--dtype", "bfloat16", "--bf16")),
        (deepspeed, ("--dtype", "auto", "--bf16")),
        ({**fsdp, **ddp}, ("--dtype", "bfloat16")),  # accelerate's bf16, taken (section 2)
        ({}, ("--dtype", "bfloat16", "--bf16", "--use_lora")),
        ({}, ("--dtype", "bfloat16", "--use_lora", "--load_in_4bit")),
        ({}, ("--dtype", "float32", "--bf16")),
        ({}, ()),
    ]
    for env, argv in allowed:
        check_precision_options(options(*argv), env)


def test_the_scripts_refuse_bf16_full_fine_tuning_before_reading_anything(workdir, tmp_path):
    """Each script refuses it in its options section: nothing read (the data file does not exist), nothing written."""
    for script in (train_dpo, train_sft, train_pt):
        out = tmp_path / script.__name__
        argv = ["--model", str(workdir / "model"), "--dataset", str(tmp_path / "absent.jsonl"), "--output_dir",
                str(out), "--dtype", "bfloat16", "--bf16"]  # fmt: skip
        with pytest.raises(UserError, match="use --dtype float32 with --bf16"):
            script.main(argv)
        assert not out.exists()


def test_lora_on_a_bf16_base_trains_fp32_adapters(workdir):
    """What lets LoRA through: on a bf16 base, every trainable weight (the adapters) is float32 and the base stays
    bf16."""
    cfg = options("--dtype", "bfloat16", "--bf16", "--use_lora", "--lora_r", "4")
    cfg.model = str(workdir / "model")
    check_precision_options(cfg, {})
    model = load_policy(cfg)
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert trainable == {torch.float32} and frozen == {torch.bfloat16}


def test_from_scratch_weights_follow_dtype(workdir, tmp_path):
    """--from_scratch builds the weights in --dtype even where the model's config names another dtype (Qwen2.5's says
    bfloat16, which transformers would otherwise use); --dtype auto takes the config's."""
    model_dir = tmp_path / "bf16_config"
    model_dir.mkdir()
    config = json.loads((workdir / "model" / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    tokenizer = tiny.make_tokenizer()
    for dtype, expected in (("float32", torch.float32), ("auto", torch.bfloat16)):
        cfg = parse_config(PTConfig, ["--model", str(model_dir), "--from_scratch", "--dtype", dtype])
        model = train_pt.build_model(cfg, tokenizer, torch.device("cpu"))
        assert {p.dtype for p in model.parameters()} == {expected}, dtype


# One process (gloo) under FSDP2 or DeepSpeed, as tests/test_distributed.py's and test_deepspeed.py's shims run them on
# CPU: a bf16 model prepared with --bf16, one step; what the optimizer steps and what the forward computes in.
MASTER_WEIGHTS = """
import importlib, json, sys
import torch
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from nanodpo import training
from nanodpo.config import DPOConfig, parse_config
from tests import tiny

mode = sys.argv[1]
if mode == "deepspeed":
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # plain gloo collectives
else:
    torch.distributed.init_process_group("gloo")
cfg = parse_config(DPOConfig, ["--model", "m", "--dataset", "d", "--dtype", "bfloat16", "--bf16",
                               "--per_device_train_batch_size", "1"])
accelerator = training.make_accelerator(cfg)
if mode == "fsdp2":  # accelerate builds FSDP on GPUs only: turned on as on a GPU, with its mixed precision
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
    accelerator.state.fsdp_plugin.set_mixed_precision("bf16")
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
model = tiny.make_model(tiny.make_tokenizer()).to(torch.bfloat16)
seen = {}
def record(module, inputs, output):
    seen["compute"] = str(output.dtype)
model.model.layers[0].mlp.down_proj.register_forward_hook(record)
model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
ids = torch.tensor([[5, 6, 7, 8, 9]])
accelerator.backward(model(input_ids=ids, labels=ids).loss)
optimizer.step()
stepper = optimizer
while hasattr(stepper, "optimizer"):  # accelerate's wrapper, DeepSpeed's ZeRO optimizer, torch's AdamW
    stepper = stepper.optimizer
stepped = {p for group in stepper.param_groups for p in group["params"]}
print(json.dumps(dict(compute=seen["compute"], stepped=sorted({str(p.dtype) for p in stepped}),
                      moments=sorted({str(s["exp_avg"].dtype) for s in stepper.state.values()}),
                      model=sorted({str(p.dtype) for p in model.parameters()}))))
"""


@pytest.mark.slow
def test_fsdp2_and_deepspeed_step_fp32_master_weights(tmp_path):
    """Why bf16 weights are allowed under FSDP2 and DeepSpeed with --bf16: one CPU process (gloo) of each, a bf16 model
    prepared by accelerate, one AdamW step. The forward computes in bf16, but AdamW steps fp32 tensors with fp32
    moments: FSDP2's shards, upcast to fp32 by accelerate (the model's own weights are then fp32), and DeepSpeed's fp32
    partitions (the engine's model stays bf16, copied from them)."""
    from tests.test_deepspeed import deepspeed_env
    from tests.test_distributed import base_env, free_port

    script = tmp_path / "master_weights.py"
    script.write_text(MASTER_WEIGHTS)
    process = dict(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    envs = {"fsdp2": dict(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2", ACCELERATE_USE_CPU="1"),
            "deepspeed": deepspeed_env("zero2.yaml")}  # fmt: skip
    runs = {}
    for mode, env in envs.items():  # both at once
        env = base_env(**process, **env, MASTER_PORT=str(free_port()))
        runs[mode] = subprocess.Popen([sys.executable, str(script), mode], text=True, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, env=env)  # fmt: skip
    facts = {}
    for mode, run in runs.items():
        output = run.communicate(timeout=240)[0]
        assert run.returncode == 0, output[-3000:]
        facts[mode] = json.loads(output.strip().splitlines()[-1])
    for mode, fact in facts.items():
        assert fact["compute"] == "torch.bfloat16", (mode, fact)
        assert fact["stepped"] == fact["moments"] == ["torch.float32"], (mode, fact)
    assert facts["fsdp2"]["model"] == ["torch.float32"] and facts["deepspeed"]["model"] == ["torch.bfloat16"]


def launch_commands() -> list[tuple[list[str], str, str]]:
    """(accelerate launch flags or None for python, script, training config) of every command that launches a
    shipped training config, in the configs' own comments and in README.md."""
    pattern = re.compile(r"(accelerate launch(?: --?[\w-]+(?: [^\s-]\S*)?)*|python) (train_\w+)\.py --config "
                         r"(configs/[\w.]+\.yaml)")  # fmt: skip
    texts = [p.read_text(encoding="utf-8") for p in sorted((ROOT / "configs").glob("*.yaml"))]
    texts.append((ROOT / "README.md").read_text(encoding="utf-8"))
    found = {(launcher, script, config) for text in texts for launcher, script, config in pattern.findall(text)}
    return [(None if launcher == "python" else shlex.split(launcher)[2:], script, config)
            for launcher, script, config in sorted(found)]  # fmt: skip


def launch_environment(flags: list[str] | None) -> dict:
    """The environment `accelerate launch FLAGS` gives its processes ({} for `python`), from accelerate's own code."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import (
        prepare_deepspeed_cmd_env,
        prepare_multi_gpu_env,
        prepare_simple_launcher_cmd_env,
    )

    if flags is None:
        return {}
    args = launch_command_parser().parse_args([*flags, "train_dpo.py"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    if args.use_deepspeed:
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)  # as accelerate's launch_command sets it
        return prepare_deepspeed_cmd_env(args)[1]
    if args.multi_gpu or args.use_fsdp:
        return prepare_multi_gpu_env(args)
    return prepare_simple_launcher_cmd_env(args)[1]


def test_every_shipped_config_trains_as_launched():
    """Every configs/*.yaml, launched as its comments and README.md say (its accelerate config, or none), passes the
    precision checks: its full fine-tuning trains fp32 weights, or bf16 ones that FSDP2/DeepSpeed back with fp32."""
    commands = launch_commands()
    training_configs = {f"configs/{p.name}" for p in (ROOT / "configs").glob("*.yaml")}
    assert {config for _, _, config in commands} == training_configs
    for flags, script, config in commands:
        cfg = parse_config(CLASSES[script], ["--config", str(ROOT / config)])
        env = launch_environment(flags)
        check_precision_options(cfg, env)
        sharded = env.get("ACCELERATE_USE_FSDP") == "true" or env.get("ACCELERATE_USE_DEEPSPEED") == "true"
        assert cfg.use_lora or cfg.dtype == "float32" or (sharded and cfg.bf16), (flags, config)


# ----------------------------------------------------------------------------------------------------------------
# 2. accelerate's own mixed precision


def test_accelerates_mixed_precision_is_honoured_or_a_contradiction_refused():
    """ACCELERATE_MIXED_PRECISION (what `accelerate launch --mixed_precision` and `accelerate config` export) is taken
    where the training config sets neither --bf16 nor --fp16 — into the config, so config.yaml records it — and
    reaches the Accelerator; a different choice is refused naming both; 'no' (accelerate's default when nothing is
    configured) leaves --bf16 alone; fp8 is refused."""
    cfg = options()
    check_precision_options(cfg, {"ACCELERATE_MIXED_PRECISION": "bf16"})
    assert cfg.bf16 and not cfg.fp16
    cfg = options("--bf16")
    check_precision_options(cfg, {"ACCELERATE_MIXED_PRECISION": "no"})
    assert cfg.bf16
    with pytest.raises(UserError, match=r"mixed_precision is fp16 .* but the training config says --bf16"):
        check_precision_options(options("--bf16"), {"ACCELERATE_MIXED_PRECISION": "fp16"})
    with pytest.raises(UserError, match="mixed_precision is fp8"):
        check_precision_options(options(), {"ACCELERATE_MIXED_PRECISION": "fp8"})


def test_make_accelerator_keeps_accelerates_setting(monkeypatch):
    """Built for a training config that names no mixed precision, the Accelerator keeps accelerate's own."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert training.make_accelerator(options()).mixed_precision == "bf16"


def test_a_run_takes_accelerates_mixed_precision_into_its_config(workdir, tmp_path, monkeypatch):
    """train_sft.py under ACCELERATE_MIXED_PRECISION=bf16 trains with bf16 autocast and saves bf16: true."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    out = tmp_path / "out"
    train_sft.main(["--model", str(workdir / "model"), "--dataset", str(workdir / "sft.jsonl"), "--output_dir",
                    str(out), "--max_steps", "1", "--disable_tqdm"])  # fmt: skip
    assert parse_config(SFTConfig, ["--config", str(out / "config.yaml")]).bf16


# ----------------------------------------------------------------------------------------------------------------
# 3. Metrics file and trackers


class FakeWandb(types.ModuleType):
    """Just enough of wandb: login (with or without `prompt`, as newer / older versions), init, a run that logs."""

    def __init__(self, logged_in: bool, has_prompt: bool = True):
        super().__init__("wandb")
        self.logged_in, self.calls, self.logged = logged_in, [], []
        if has_prompt:
            self.login = self._login
        else:
            self.login = lambda key=None, relogin=None, verify=False: self.logged_in
            self.api = types.SimpleNamespace(api_key="k" * 40 if logged_in else None)

    def _login(self, key=None, relogin=None, verify=True, prompt=True):
        self.calls.append(dict(prompt=prompt, verify=verify))
        return self.logged_in

    def init(self, **kwargs):
        logged = self.logged
        return types.SimpleNamespace(log=lambda values, step: logged.append((step, values)), finish=lambda: None)


def test_wandb_is_checked_before_anything_heavy(monkeypatch):
    """--report_to wandb is refused at once when wandb is not installed, or has no login and does not log offline;
    login is asked without a prompt and without contacting the server. WANDB_MODE=offline/disabled needs no login.
    Older wandb (no `prompt`): its own key lookup. --report_to tensorboard without tensorboard is refused too."""
    cfg = options("--report_to", "wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    wandb = FakeWandb(logged_in=False)
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    with pytest.raises(UserError, match=r"wandb login.*WANDB_MODE=offline"):
        check_trackers(cfg, {})
    assert wandb.calls == [dict(prompt=False, verify=False)]
    for mode in ("offline", "disabled"):
        check_trackers(cfg, {"WANDB_MODE": mode})
    assert len(wandb.calls) == 1
    monkeypatch.setitem(sys.modules, "wandb", FakeWandb(logged_in=True))
    check_trackers(cfg, {})
    monkeypatch.setitem(sys.modules, "wandb", FakeWandb(logged_in=False, has_prompt=False))
    with pytest.raises(UserError, match="wandb login"):
        check_trackers(cfg, {})
    monkeypatch.setitem(sys.modules, "wandb", FakeWandb(logged_in=True, has_prompt=False))
    check_trackers(cfg, {})
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(UserError, match="pip install wandb"):
        check_trackers(cfg, {"WANDB_MODE": "offline"})
    check_trackers(options(), {})  # no tracker asked for: nothing imported
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(UserError, match="pip install tensorboard"):
        check_trackers(options("--report_to", "tensorboard"), {})


def test_a_run_without_wandb_login_stops_before_reading_its_data(workdir, tmp_path, monkeypatch):
    """The scripts check the tracker in their options section: refused before the tokenizer loads, nothing written."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setitem(sys.modules, "wandb", FakeWandb(logged_in=False))
    monkeypatch.setattr(train_sft, "load_tokenizer", lambda cfg: pytest.fail("the tokenizer was loaded"))
    out = tmp_path / "out"
    with pytest.raises(UserError, match="wandb login"):
        train_sft.main(["--model", str(workdir / "model"), "--dataset", str(workdir / "sft.jsonl"), "--output_dir",
                        str(out), "--report_to", "wandb"])  # fmt: skip
    assert not out.exists()


def test_metrics_file_is_written_alongside_wandb(workdir, tmp_path, monkeypatch):
    """--report_to wandb adds wandb to metrics.jsonl (what the plot and the curve diagnosis read): both get every
    record, at the same steps. --report_to none keeps the file."""
    wandb = FakeWandb(logged_in=True)
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    out = tmp_path / "out"
    train_sft.main(["--model", str(workdir / "model"), "--dataset", str(workdir / "sft.jsonl"), "--output_dir",
                    str(out), "--max_steps", "3", "--logging_steps", "1", "--report_to", "wandb", "--disable_tqdm"])
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [step for step, _ in wandb.logged] == [1, 2, 3]
    assert [r["loss"] for r in records] == [values["train/loss"] for _, values in wandb.logged]
    assert parse_config(DPOConfig, ["--report_to", "none"]).report_to == ["jsonl"]


# ----------------------------------------------------------------------------------------------------------------
# 4. Option names and --help


@pytest.mark.parametrize("trl, ours", [("model_name_or_path", "model"), ("dataset_name", "dataset"),
                                       ("use_peft", "use_lora"), ("torch_dtype", "dtype"),
                                       ("max_seq_length", "max_length")])  # fmt: skip
def test_trl_names_are_answered_with_nanodpos(trl, ours, tmp_path):
    """On the command line (--name value and --name=value) and in a YAML config."""
    for argv in ([f"--{trl}", "x"], [f"--{trl}=x"]):
        with pytest.raises(UserError, match=f"unknown option --{trl}: did you mean --{ours}\\?"):
            parse_config(SFTConfig, argv)
    (tmp_path / "run.yaml").write_text(f"{trl}: x\n")
    with pytest.raises(UserError, match=f"run.yaml: unknown option '{trl}': did you mean '{ours}'\\?"):
        parse_config(SFTConfig, ["--config", str(tmp_path / "run.yaml")])


def test_unknown_options_get_the_closest_name(tmp_path):
    """Any other unknown option: the closest option name (difflib), or a pointer to --help; a stray word: how options
    and --config are written; TRL options nanodpo has no use for: why."""
    with pytest.raises(UserError, match=r"unknown option --learnig_rate: did you mean --learning_rate\?"):
        parse_config(DPOConfig, ["--learnig_rate", "1e-6"])
    with pytest.raises(UserError, match=r"unknown option --zzz \(see --help"):
        parse_config(DPOConfig, ["--zzz"])
    with pytest.raises(UserError, match="unexpected argument 'run.yaml'.*after --config"):
        parse_config(DPOConfig, ["run.yaml"])
    with pytest.raises(UserError, match="--deepspeed: TRL's, not needed.*accelerate launch --config_file"):
        parse_config(DPOConfig, ["--deepspeed", "ds.json"])
    (tmp_path / "run.yaml").write_text("betta: 0.1\n")
    with pytest.raises(UserError, match=r"unknown option 'betta': did you mean 'beta'\?"):
        parse_config(DPOConfig, ["--config", str(tmp_path / "run.yaml")])


def test_the_trl_hints_are_the_readme_table():
    """Every TRL name in README.md's table is a nanodpo option or gets a hint, and every hint is in the table."""
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("## Flags from TRL")[1].split("\n## ")[0]
    names = set()  # from each row's first cell: `--name ...`, `name=...`, or a first `name` alone
    for cell in re.findall(r"^\| (.+?) \| .+ \|$", section, re.MULTILINE):
        for i, span in enumerate(re.findall(r"`([^`]+)`", cell)):
            name = re.match(r"--([a-z]\w*)|([a-z]\w*)=", span) or (i == 0 and re.fullmatch(r"([a-z]\w*)", span))
            if name:
                names.add(name.group(name.lastindex))
    options_ = {name for cls in CLASSES.values() for name in cls.__dataclass_fields__}
    hinted = set(TRL_NAMES) | set(TRL_NOT_NEEDED)
    assert {"model_name_or_path", "use_peft", "torch_dtype", "max_seq_length", "deepspeed"} <= names
    assert names - options_ <= hinted, names - options_ - hinted
    assert hinted <= names, hinted - names
    assert set(TRL_NAMES.values()) <= options_


def test_help_shows_the_allowed_values():
    """--help writes every option with a fixed set as {a,b,c} (argparse's spelling), e.g. --dtype."""
    for cls in CLASSES.values():
        text = build_arg_parser(cls).format_help()
        for name, field in cls.__dataclass_fields__.items():
            choices = field.metadata.get("choices")
            if choices:
                assert f"--{name} " + "{" + ",".join(choices) + "}" in text or \
                    f"--{name} [" + "{" + ",".join(choices) + "}" in text, name  # fmt: skip
    assert "--dtype {auto,float32,bfloat16,float16}" in build_arg_parser(DPOConfig).format_help()
