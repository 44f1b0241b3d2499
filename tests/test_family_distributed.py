"""The preference family on 2 CPU processes (gloo), in one `accelerate launch` (see tests/test_distributed.py for why
ACCELERATE_USE_CPU=1 and how the runs are made comparable: batch b × accumulation a on 2 processes covers the same
micro-batches, in the same steps, as batch b × accumulation 2a on 1 process with sequential order).

  * simpo, cpo and orpo (reference-free; orpo's NLL term scores the chosen prompts too), in the default prefix-shared
    layout: every logged value of 2 processes equals 1 process with twice the accumulation (step 1 within 1e-5,
    later 1e-3).
  * kto: z_ref is averaged over the processes' micro-batches (TRL gathers it), so 2 processes are NOT 1 process with
    twice the accumulation; they are compared with TRL's KTOTrainer on the same 2 processes instead (step 1 within
    1e-5, later 1e-3), its metrics reduced over the rows of both processes; and with --precompute_ref_logps (the
    reference scored before training, over both processes) they equal the run without it (1e-5).
"""

import json
import sys

import pytest

from nanodpo.tracking import read_metrics
from tests import tiny
from tests.test_distributed import assert_same_curve, base_env, common, free_port, run, run_one, to_argv
from tests.test_kto import COMPARED as KTO_COMPARED
from tests.test_kto import unpaired_rows

pytestmark = pytest.mark.slow

# Runs nanodpo's scripts and TRL's KTOTrainer one after the other on one process group (as test_distributed's driver).
DRIVER = """
import json, os, sys
from accelerate.state import AcceleratorState, PartialState

no_op = lambda self, group=None: None
PartialState.destroy_process_group = AcceleratorState.destroy_process_group = no_op
for kind, argv, out in json.load(open(sys.argv[1])):
    if kind == "nanodpo":
        __import__("train_dpo").main(argv)
    else:  # TRL's KTOTrainer with the same options
        import torch
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import KTOConfig, KTOTrainer

        options = json.loads(argv[0])
        rows = [json.loads(line) for line in open(options.pop("dataset"))]
        model_dir = options.pop("model")
        args = KTOConfig(output_dir=out, report_to="none", bf16=False, use_cpu=True, save_strategy="no",
                         disable_tqdm=True, loss_type="kto", **options)
        trainer = KTOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), args=args,
                             train_dataset=Dataset.from_list(rows),
                             processing_class=AutoTokenizer.from_pretrained(model_dir))
        if trainer.accelerator.is_main_process:
            print(f"TRL KTOTrainer: accumulation x {trainer.accelerator.num_processes} processes)")
        trainer.train()
        if trainer.accelerator.is_main_process:
            json.dump(trainer.state.log_history, open(os.path.join(out, "log_history.json"), "w"))
    AcceleratorState._reset_state(reset_partial_state=False)
"""


REFERENCE_FREE = ("simpo", "cpo", "orpo")


def test_reference_free_losses_and_kto_on_two_processes(tmp_path):
    tiny.make_model_dir(tmp_path / "model", seed=0)
    tiny.write_jsonl(tmp_path / "pairs.jsonl", tiny.preference_rows(16, "explicit"))
    tiny.write_jsonl(tmp_path / "rows.jsonl", unpaired_rows(16))
    pair_runs = {
        loss_type: dict(dataset=str(tmp_path / "pairs.jsonl"), loss_type=loss_type, learning_rate=1e-3, max_length=64)
        for loss_type in REFERENCE_FREE
    }
    kto = dict(dataset=str(tmp_path / "rows.jsonl"), loss_type="kto", learning_rate=1e-3, max_length=64,
               undesirable_weight=1.33)  # fmt: skip
    trl_kto = dict(
        model=str(tmp_path / "model"), dataset=str(tmp_path / "rows.jsonl"), per_device_train_batch_size=2,
        gradient_accumulation_steps=2, max_steps=4, learning_rate=1e-3, lr_scheduler_type="constant",
        logging_steps=1, train_sampling_strategy="sequential", max_length=64, seed=0, beta=0.1,
        undesirable_weight=1.33,
    )  # fmt: skip
    (tmp_path / "trl_kto").mkdir()
    plan = [
        *[("nanodpo", to_argv(common(tmp_path, tmp_path / f"{name}_two", **run_options)), "")
          for name, run_options in pair_runs.items()],  # fmt: skip
        ("nanodpo", to_argv(common(tmp_path, tmp_path / "kto_two", **kto)), ""),
        ("nanodpo", to_argv(common(tmp_path, tmp_path / "kto_two_pre", precompute_ref_logps="true", **kto)), ""),
        ("trl_kto", [json.dumps(trl_kto)], str(tmp_path / "trl_kto")),
    ]
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    (tmp_path / "driver.py").write_text(DRIVER)
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), str(tmp_path / "driver.py"), str(tmp_path / "plan.json"),
    ]  # fmt: skip
    output = run(cmd, base_env(ACCELERATE_USE_CPU="1", NANODPO_CACHE=str(tmp_path / "cache")))
    assert output.count("accumulation x 2 processes)") == len(plan)
    for name, run_options in pair_runs.items():
        assert f"loss type {name} is reference-free: no reference model is loaded" in output
        one_process = common(tmp_path, tmp_path / f"{name}_one", gradient_accumulation_steps=4, **run_options)
        run_one("train_dpo.py", one_process)
        two, one = (
            [r for r in read_metrics(tmp_path / f"{name}_{n}" / "metrics.jsonl") if "loss" in r] for n in ("two", "one")
        )
        assert len(two) == 4
        assert_same_curve(two, one, rtol=1e-3, label=name)

    ours = [r for r in read_metrics(tmp_path / "kto_two" / "metrics.jsonl") if "loss" in r]
    theirs = [r for r in json.loads((tmp_path / "trl_kto" / "log_history.json").read_text()) if "loss" in r]
    assert len(ours) == len(theirs) == 4
    worst = 0.0
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert sorted(k for k in KTO_COMPARED if k in a) == sorted(k for k in KTO_COMPARED if k in b)
        for key in [k for k in KTO_COMPARED if k in b] + (["grad_norm"] if i == 0 else []):
            scale = max(abs(b[key]), 1e-2, *((abs(b["rewards/chosen"]) + abs(b["rewards/rejected"]),)
                                             if key == "rewards/margins" else ()))  # fmt: skip
            rel = abs(a[key] - b[key]) / scale
            worst = max(worst, rel)
            assert rel <= (1e-5 if i == 0 else 1e-3), f"kto step {i + 1} {key}: {a[key]} vs TRL {b[key]}"
    print(f"kto on 2 processes: max relative difference to TRL on 2 processes {worst:.1e}")

    # --precompute_ref_logps: the reference log-probs of the rows and of their mismatched rows, scored once over both
    # processes' shards and gathered, give the run that scores them on the fly.
    precomputed = [r for r in read_metrics(tmp_path / "kto_two_pre" / "metrics.jsonl") if "loss" in r]
    assert_same_curve(precomputed, ours, rtol=1e-5, label="kto precomputed on 2 processes")
