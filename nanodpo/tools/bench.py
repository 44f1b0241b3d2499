"""Benchmark: nanodpo side by side with TRL 1.16 (a benchmark, not a test).

    python -m nanodpo.tools.bench dpo            # train_dpo.py vs trl.DPOTrainer (+ nanodpo with precomputed reference)
    python -m nanodpo.tools.bench sft            # train_sft.py vs trl.SFTTrainer
    python -m nanodpo.tools.bench pt             # train_pt.py  vs a plain Hugging Face forward/backward/AdamW loop
    python -m nanodpo.tools.bench dpo --quick    # a smoke run: smaller model and lengths, one repetition
    python -m nanodpo.tools.bench demo           # the offline demo's pipeline, each stage timed (nanodpo/demo/bench.py)
    python -m nanodpo.tools.bench dpo --model PATH [--use_lora]   # a real model: a local folder or a .gguf file

Same model for both: by default Qwen2 architecture with Qwen2.5's real vocabulary size (151,936 — the LM head is
where most of the time and memory of a small model go), random init, fp32 weights (with bf16 autocast on GPU): on a
CPU a small hidden size and a few layers; on a CUDA GPU Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads, 2
key/value heads, MLP 4,864, tied embeddings), 8 pairs a step, about 2 minutes in all on an H200. `--model PATH` runs
a real pretrained model instead (a GGUF file is dequantized once, by nanodpo's own loading, into an fp32 safetensors
folder in the work directory that every run then reads); `--use_lora` trains a LoRA adapter (r 16, alpha 32, all
linear layers) in every implementation, the plain step included.

Same data: synthetic multi-turn conversations with a realistic length mix (prompts of 50-600 tokens over 1-3 rounds,
completions of 20-400; tokenizer: the demo's byte-level BPE); same batch, steps, optimizer (AdamW) and schedule;
sequential data order, so both train on the same pairs in the same order.

Every run is its own process (`python -m nanodpo.tools.bench --worker ...`): peak memory is that process's own peak
RSS (CUDA: peak allocated), and no run inherits another's allocator state. Runs alternate (nanodpo, TRL, TRL,
nanodpo, ...) over several repetitions; medians are reported. The first optimizer step of every run is warm-up and is
not timed; on a GPU every timestamp is taken after `torch.cuda.synchronize()`. Printed per implementation: real
(non-padding) tokens/s — the tokens of the sequences as TRL counts them, prompt included once per sequence —,
optimizer steps/s, peak memory, MFU (on a known GPU, or with --peak_tflops; `model_flops`), the ratios nanodpo/TRL,
and the final logged metrics of both (they must agree: the same training, only faster). Peak memory is also given
above its floor: what the training state must hold whatever the implementation — weights, gradients and AdamW's two
moments of the trained parameters, the frozen reference copy where there is one — plus, on CPU, the RSS of a process
that has only imported the libraries the implementations use between them (torch, transformers, peft, trl, nanodpo;
measured, the same for all): what is left is activations, logits, temporaries and whatever an implementation imports
beyond the others.

For DPO it also prints the cost of one DPO step relative to a plain training step over the same real tokens
("plain": one HF forward+backward with labels=input_ids over the 2B sequences, padding-free, plus the AdamW update).
A DPO step needs the policy's forward+backward and the reference's forward: ≈ 1.33 plain steps with an online
reference, ≈ 1.0 with precomputed reference log-probs — less when only completion tokens go through the LM head and
each prompt is computed once.
"""

import argparse
import json
import math
import os
import random
import resource
import runpy
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from nanodpo import tracking
from nanodpo.config import DPOConfig, PTConfig, SFTConfig, parse_config
from nanodpo.demo import TOKENIZER_DIR
from nanodpo.demo.bench import main as demo_main
from nanodpo.dpo_batch import PreferenceCollator
from nanodpo.dpo_data import load_preference_data
from nanodpo.errors import exit_on_user_error
from nanodpo.fast.dpo_packing import sequences_of, shared_unit
from nanodpo.model import check_model_source, load_pretrained, load_tokenizer
from nanodpo.packing import Document, PackedRow, _make_row, collate_packed, pack_documents
from nanodpo.pt_data import load_documents
from nanodpo.repo import ROOT, repo_path
from nanodpo.sft_data import load_sft_data

VOCAB_SIZE = 151_936  # Qwen2.5

SIZES = {
    # hidden, layers, heads, kv heads, MLP width; pairs (or rows) per micro-batch; steps; repetitions; length scale
    "default": dict(hidden=64, layers=4, heads=4, kv_heads=2, intermediate=256, batch=2, steps=3, reps=3, scale=1.0),
    "quick": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=256, batch=2, steps=3, reps=1, scale=0.25),
    # a CUDA GPU: Qwen2.5-0.5B's shape (its config, random weights)
    "gpu": dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, batch=8, steps=6, reps=1, scale=1.0,
                tied=True),  # fmt: skip
}
IMPLEMENTATIONS = {"dpo": ["nanodpo", "trl"], "sft": ["nanodpo", "trl"], "pt": ["nanodpo", "hf"]}
COMPARED = {
    "dpo": ["loss", "logps/chosen", "logps/rejected", "rewards/margins", "grad_norm"],
    "sft": ["loss", "grad_norm", "entropy", "mean_token_accuracy"],
    "pt": ["loss", "grad_norm"],
}


# ----------------------------------------------------------------------------------------------------------------
# Model and data (written once to a work directory; every worker reads the same files).


def make_model_dir(path: Path, size: dict) -> None:
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=size["hidden"],
        intermediate_size=size["intermediate"],
        num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"],
        num_key_value_heads=size["kv_heads"],
        max_position_embeddings=4096,
        tie_word_embeddings=size.get("tied", False),
        rms_norm_eps=1e-6,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # (0.5B random weights: seconds on a GPU)
        model = Qwen2ForCausalLM(config).float()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def word_pieces() -> list[str]:
    """Vocabulary pieces that decode to plain letters (so random text re-tokenizes to about as many tokens)."""

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    pieces = [tokenizer.decode([i]) for i in range(len(tokenizer))]
    return sorted({p for p in pieces if len(p) >= 2 and p.replace(" ", "").isascii() and p.strip().isalpha()})


def log_uniform(rng: random.Random, low: float, high: float) -> int:
    return int(round(math.exp(rng.uniform(math.log(low), math.log(high)))))


def make_rows(n: int, scale: float, seed: int = 0) -> list[dict]:
    """Conversational preference rows: a multi-turn prompt (1-3 rounds, 50-600 tokens in all), two completions of
    20-400 tokens each (lengths log-uniform, times `scale`)."""
    rng = random.Random(seed)
    words = word_pieces()

    def text(tokens: int) -> str:
        return "".join(rng.choice(words) for _ in range(max(1, tokens))).strip()

    rows = []
    for _ in range(n):
        rounds = rng.randint(1, 3)
        prompt_tokens = log_uniform(rng, 50 * scale, 600 * scale)
        turns = [max(1, prompt_tokens // (2 * rounds - 1))] * (2 * rounds - 1)
        prompt = [{"role": "system", "content": "You are a helpful assistant."}]
        for i, tokens in enumerate(turns):
            prompt.append({"role": "user" if i % 2 == 0 else "assistant", "content": text(tokens)})
        rows.append(
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": text(log_uniform(rng, 20 * scale, 400 * scale))}],
                "rejected": [{"role": "assistant", "content": text(log_uniform(rng, 20 * scale, 400 * scale))}],
            }
        )
    return rows


def write_data(workdir: Path, task: str, rows: list[dict]) -> Path:
    path = workdir / f"{task}.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            if task == "dpo":
                record = row
            elif task == "sft":  # prompt + completion (the chosen answer): loss on the completion only
                record = {"prompt": row["prompt"], "completion": row["chosen"]}
            else:  # pt: the whole conversation as one text document
                record = {"text": "\n".join(m["content"] for m in row["prompt"] + row["chosen"])}
            f.write(json.dumps(record) + "\n")
    return path


# ----------------------------------------------------------------------------------------------------------------
# Workers: one training run each, in its own process; prints one JSON line.


def timestamp() -> tuple[float, float]:
    """(wall, process CPU) seconds, once the GPU has finished the work queued so far."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter(), time.process_time()


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def hyperparameters(task: str, spec: dict) -> dict:
    gpu = torch.cuda.is_available()
    return {
        "per_device_train_batch_size": spec["batch"],
        "gradient_accumulation_steps": 1,
        "max_steps": spec["steps"],
        "learning_rate": {"dpo": 1e-5, "sft": 1e-4, "pt": 3e-4}[task],
        "lr_scheduler_type": "constant",
        "logging_steps": 1,
        "train_sampling_strategy": "sequential",
        "max_length": spec["max_length"],
        "seed": 0,
        "bf16": gpu,
    }


LORA = {"lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0}  # --use_lora: every implementation, all linear layers


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=LORA["lora_r"], lora_alpha=LORA["lora_alpha"], lora_dropout=LORA["lora_dropout"],
                      target_modules="all-linear", task_type="CAUSAL_LM")  # fmt: skip


def run_nanodpo(task: str, spec: dict, precompute: bool = False) -> tuple[list[float], list[dict]]:
    """train_{task}.py's main(), with the time of every logged step recorded."""
    times, records = [], []
    original = tracking.Tracker.log

    def timed_log(self, metrics, step):
        if "loss" in metrics:
            times.append(timestamp())
            records.append({"step": step, **metrics})
        return original(self, metrics, step)

    tracking.Tracker.log = timed_log
    options = {
        "model": spec["model"],
        "dataset": spec["data"],
        "output_dir": spec["out"],
        "report_to": "jsonl",  # (the timed Tracker.log above)
        "disable_tqdm": "true",
        **hyperparameters(task, spec),
    }
    if task == "dpo" and precompute:
        options["precompute_ref_logps"] = "true"
    if spec.get("use_lora"):
        options.update(use_lora="true", **LORA)
    if task == "pt":
        options["packing_strategy"] = "bfd"
    argv = [item for key, value in options.items() for item in (f"--{key}", str(value))]
    script = runpy.run_path(str(repo_path(f"train_{task}.py")))  # the script's definitions (not its __main__ block)
    script["main"](argv)
    return times, records


def run_trl(task: str, spec: dict) -> tuple[list[float], list[dict]]:
    # Imported here, in the TRL worker only: peak memory is each worker process's own RSS, and the Trainer stack
    # (datasets, transformers' Trainer, peft, bitsandbytes) adds ~140 MB that a nanodpo worker must not be charged.
    from datasets import load_dataset
    from transformers import TrainerCallback

    times = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            times.append(timestamp())

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    dataset = load_dataset("json", data_files=spec["data"], split="train")
    hp = hyperparameters(task, spec)
    common = dict(
        output_dir=spec["out"], report_to="none", save_strategy="no", disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(), gradient_checkpointing=False, **hp,
    )  # fmt: skip
    peft_config = lora_config() if spec.get("use_lora") else None
    # trl is imported here: it is the comparison, installed with the test extra only (pip install -e ".[test]").
    if task == "dpo":
        from trl import DPOConfig, DPOTrainer

        trainer = DPOTrainer(model=model, args=DPOConfig(**common), train_dataset=dataset, processing_class=tokenizer,
                             peft_config=peft_config)  # fmt: skip
    else:
        from trl import SFTConfig, SFTTrainer

        trainer = SFTTrainer(model=model, args=SFTConfig(**common), train_dataset=dataset, processing_class=tokenizer,
                             peft_config=peft_config)  # fmt: skip
    trainer.add_callback(StepTimes())
    trainer.train()
    return times, [r for r in trainer.state.log_history if "loss" in r]


def step_rows(task: str, spec: dict) -> list[list]:
    """Every optimizer step's sequences as the nanodpo run sees them (token ids, truncated): for dpo, the 2B
    sequences of the step's pairs as one padding-free row (a PackedRow, one document per sequence); for pt, the
    step's packed rows; for sft, the step's documents (one per row)."""
    batch, steps = spec["batch"], spec["steps"]
    argv = ["--model", spec["model"], "--dataset", spec["data"], "--max_length", str(spec["max_length"])]
    if task == "dpo":
        cfg = parse_config(DPOConfig, argv)
        examples = load_preference_data(cfg, load_tokenizer(cfg))
        collate = PreferenceCollator(0, cfg.max_length)
        steps_out = []
        for i in range(0, batch * steps, batch):
            collated = collate(examples[i : i + batch])
            masks = collated["completion_mask"].tolist()
            sequences = sequences_of(collated)
            labels = [[t if m else -100 for t, m in zip(seq, mask)] for seq, mask in zip(sequences, masks)]
            steps_out.append([_make_row(list(zip(sequences, labels)))])  # labels: the completion tokens
        return steps_out
    if task == "sft":
        cfg = parse_config(SFTConfig, argv)
        docs = load_sft_data(cfg, load_tokenizer(cfg))
        cut = cfg.max_length
        rows = [_make_row([(d.input_ids[:cut], d.labels()[:cut])]) for d in docs]
        return [rows[i : i + batch] for i in range(0, batch * steps, batch)]
    cfg = parse_config(PTConfig, argv)
    docs = load_documents(cfg, load_tokenizer(cfg), "train")
    rows = pack_documents([Document(d.input_ids) for d in docs], cfg.max_length, "bfd", cfg.packing_overflow)
    return [rows[i : i + batch] for i in range(0, batch * steps, batch)]


def run_plain(task: str, spec: dict) -> tuple[list[float], list[dict]]:
    """A plain HF training loop over the same rows: forward with labels (HF's own loss over full logits), backward,
    gradient clipping, AdamW. Packed rows get a 4D block-causal mask (sdpa): documents stay isolated."""

    steps = step_rows(task, spec)
    if task == "dpo":  # the plain step scores every token (labels = input_ids; not a document's first one)
        steps = [
            [PackedRow(r.input_ids, [-100 if p == 0 else t for t, p in zip(r.input_ids, r.position_ids)],
                       r.position_ids, r.seq_lens) for r in rows]
            for rows in steps
        ]  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32, attn_implementation="sdpa")
    if spec.get("use_lora"):
        from peft import get_peft_model

        model = get_peft_model(model, lora_config())
    model.train()
    trained = [p for p in model.parameters() if p.requires_grad]
    fused = True if torch.cuda.is_available() else None  # as nanodpo and TRL on a GPU
    optimizer = torch.optim.AdamW(trained, lr=hyperparameters(task, spec)["learning_rate"], fused=fused)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.cuda.is_available())
    if torch.cuda.is_available():
        model.cuda()
    times, records = [], []
    for step, rows in enumerate(steps, 1):
        batch = {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in collate_packed(rows, "sdpa", 0).items()}
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(timestamp())
        records.append({"step": step, "loss": loss.item(), "grad_norm": float(grad_norm)})
    return times, records


def worker(args) -> None:
    spec = json.loads(args.spec)
    start = time.perf_counter()
    if args.worker == "baseline":  # the libraries imported, nothing loaded: the RSS every CPU run starts from
        import peft  # noqa: F401
        import trl  # noqa: F401

        print("BENCH_RESULT " + json.dumps({"peak_mb": peak_memory_mb()}), flush=True)
        return
    if args.worker == "nanodpo":
        times, records = run_nanodpo(args.task, spec)
    elif args.worker == "nanodpo-precomputed":
        times, records = run_nanodpo(args.task, spec, precompute=True)
    elif args.worker == "trl":
        times, records = run_trl(args.task, spec)
    else:  # "hf" (pt) or "plain" (the DPO step's yardstick)
        times, records = run_plain(args.task, spec)
    result = {"times": times, "records": records, "peak_mb": peak_memory_mb(), "total_s": time.perf_counter() - start}
    print("BENCH_RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------------------------
# The driver.


def step_tokens(task: str, spec: dict) -> dict:
    """Per optimizer step (the same for every implementation: same data, same order): real tokens, and the model
    FLOPs of the training it does (`model_flops`), for MFU."""
    code = (
        "import json, sys; from nanodpo.tools.bench import model_flops, step_rows; spec = json.loads(sys.argv[1]); "
        f"steps = step_rows({task!r}, spec); "
        "print('BENCH_RESULT ' + json.dumps({'tokens': [sum(len(row) for row in rows) for rows in steps], "
        f"'flops': model_flops({task!r}, spec, steps)}}))"
    )
    return _run([sys.executable, "-c", code, json.dumps(spec)])


def model_flops(task: str, spec: dict, steps: list[list]) -> dict[str, list[float]]:
    """Model FLOPs per step and implementation: the work of the training itself, the same for nanodpo and TRL (so
    their MFU ratio is their speed ratio); recomputation and padding are not counted.

    Weights (matmuls): 2·N·T forward, as much again for the inputs' gradients and for the weights' own when they
    are trained — 6·N·T trained, 4·N·T frozen (LoRA's base) — and 2·N·T for the reference's forward. N·T counts the
    body's parameters over the tokens it runs on (each DPO prompt once) and the LM head's (hidden × vocab) over the
    tokens it scores (DPO, SFT: completion tokens; PT: all); the input embeddings are a lookup, not counted.
    Attention (included): 4·d·L FLOPs per (query, key) pair a causal mask lets through — scores and values, d =
    heads × head size —, three times that for a trained forward + backward, once for the reference's forward."""

    config = AutoConfig.from_pretrained(spec["model"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = config.hidden_size * config.vocab_size
    body = sum(p.numel() for name, p in model.named_parameters() if not ("embed_tokens" in name or "lm_head" in name))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_pair = 4 * config.num_attention_heads * head_dim * config.num_hidden_layers
    flops: dict[str, list[float]] = {}
    trained = 4 if spec.get("use_lora") else 6  # frozen weights (LoRA): no weight-gradient matmuls
    for rows in steps:
        scored = sum(sum(1 for label in row.labels if label != -100) for row in rows)
        if task == "dpo":  # body over the unique tokens (prompt once), head over the completion tokens
            units = step_units(spec, rows)
            weights = body * sum(len(unit) for unit in units) + head * scored
            attention = per_pair * sum(attended_pairs(unit.prefix_len, unit.branches) for unit in units)
            online = {"nanodpo": True, "trl": True, "nanodpo-precomputed": False, "plain": False}
            for name, reference in online.items():
                step = trained * weights + 3 * attention + (2 * weights + attention if reference else 0)
                flops.setdefault(name, []).append(step)
        else:
            weights = body * sum(len(row) for row in rows) + head * scored
            attention = per_pair * sum(attended_pairs(n, []) for row in rows for n in row.seq_lens)
            for name in IMPLEMENTATIONS[task]:
                flops.setdefault(name, []).append(trained * weights + 3 * attention)
    return flops


def attended_pairs(prefix: int, branches: list[tuple[int, int]]) -> int:
    """(query, key) pairs of causal attention over a prefix and branches that each see the prefix and themselves (a
    prefix-shared DPO unit; a plain sequence is a prefix alone)."""
    pairs = prefix * (prefix + 1) // 2
    for start, end in branches:
        n = end - start
        pairs += n * prefix + n * (n + 1) // 2
    return pairs


def state_floor_mb(task: str, spec: dict) -> dict[str, float]:
    """Per implementation, the memory its training state needs whatever the implementation (fp32 weights): the
    weights, and for the trained parameters their gradient and AdamW's two moments (16 bytes per trained parameter
    in all), plus a frozen reference copy of the weights for DPO with an online reference and full fine-tuning (with
    LoRA the reference is the same weights, adapter off)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(spec["model"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    if spec.get("use_lora"):  # r·(in + out) per linear layer but the LM head ("all-linear")
        output = model.get_output_embeddings()
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not output]
        trained = sum(LORA["lora_r"] * (m.in_features + m.out_features) for m in linears)
    else:
        trained = params
    adapter = 4 * trained if spec.get("use_lora") else 0  # the LoRA matrices' own fp32 weights
    state = 4 * params + adapter + 12 * trained
    reference = 0 if spec.get("use_lora") else 4 * params
    names = IMPLEMENTATIONS[task] + (["nanodpo-precomputed", "plain"] if task == "dpo" else [])
    online = {"nanodpo", "trl"} if task == "dpo" else set()
    return {name: (state + (reference if name in online else 0)) / 2**20 for name in names}


def local_model(path: str, workdir: Path) -> str:
    """--model for the bench: a local folder as it is; a .gguf file loaded (dequantized to fp32) by nanodpo's own
    loading and saved once as a safetensors folder in the work directory, which every run then reads."""
    check_model_source(path)
    if not path.endswith(".gguf"):
        return path
    cfg = parse_config(DPOConfig, ["--model", path, "--dtype", "float32"])
    out = workdir / "model_from_gguf"
    load_pretrained(cfg).save_pretrained(out)
    load_tokenizer(cfg).save_pretrained(out)
    return str(out)


def step_units(spec: dict, rows: list) -> list:
    """The prefix-shared units of one DPO step (its 2B sequences are the documents of `rows[0]`)."""
    row = rows[0]
    sequences, start = [], 0
    for n in row.seq_lens:
        sequences.append(row.input_ids[start : start + n])
        start += n
    b = len(sequences) // 2
    return [shared_unit(sequences[i], sequences[b + i], i, b + i) for i in range(b)]


def _run(cmd: list[str]):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    # Idle OpenMP threads sleep instead of spinning: on a shared machine a spinning thread burns a core another
    # process needs, and timings swing several-fold. The same for every implementation (override by setting it).
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            return json.loads(line[len("BENCH_RESULT ") :])
    raise RuntimeError(f"{' '.join(cmd[:6])} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")


def run_worker(name: str, task: str, spec: dict) -> dict:
    out = Path(spec["workdir"]) / f"out_{name}"
    shutil.rmtree(out, ignore_errors=True)  # a fresh output_dir for every run
    spec = {**spec, "out": str(out)}
    return _run([sys.executable, "-m", "nanodpo.tools.bench", task, "--worker", name, "--spec", json.dumps(spec)])


def summarize(result: dict, tokens: list[int], flops: list[float], peak_tflops: float | None, floor_mb: float) -> dict:
    """Timed steps: all but the first (warm-up). floor_mb: the state's floor (with the libraries' RSS on CPU)."""
    times = result["times"]
    timed = len(times) - 1
    seconds = times[-1][0] - times[0][0]
    cpu_seconds = times[-1][1] - times[0][1]  # this process's CPU time: less sensitive to a busy shared machine
    summary = {
        "tokens_per_s": sum(tokens[1 : len(times)]) / seconds,
        "steps_per_s": timed / seconds,
        "step_s": seconds / timed,
        "cpu_s_per_step": cpu_seconds / timed,
        "peak_mb": result["peak_mb"],
        "above_floor_mb": result["peak_mb"] - floor_mb,
    }
    if peak_tflops:
        summary["mfu"] = sum(flops[1 : len(times)]) / seconds / (peak_tflops * 1e12)
    return summary


PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0, "L4": 121.0}


def default_peak_tflops() -> float | None:
    """Dense bf16 peak of the GPU, for MFU (None on CPU or an unknown GPU: pass --peak_tflops)."""

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((tflops for key, tflops in PEAK_TFLOPS.items() if key in name), None)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo"]:  # the offline demo's pipeline, timed stage by stage (nanodpo/demo/bench.py)
        return demo_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=["dpo", "sft", "pt"])
    parser.add_argument("--quick", action="store_true", help="smoke run: smaller model and lengths, one repetition")
    parser.add_argument("--reps", type=int, help="repetitions (alternating order)")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (the first is not timed)")
    parser.add_argument("--batch", type=int, help="pairs (sft: conversations, pt: rows) per step")
    parser.add_argument("--hidden", type=int, help="hidden size")
    parser.add_argument("--layers", type=int, help="number of layers")
    parser.add_argument("--max_length", type=int, default=None, help="max tokens per sequence (pt: per packed row)")
    parser.add_argument("--workdir", help="keep the model, data and outputs here (default: a temporary folder)")
    parser.add_argument("--peak_tflops", type=float, help="peak TFLOPS of the device, for MFU (GPU: known ones)")
    parser.add_argument("--model", help="a real model instead of the random one: a local folder or a .gguf file")
    parser.add_argument("--use_lora", action="store_true", help="train a LoRA adapter (r 16, all linear layers)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    repo_path(f"train_{args.task}.py")  # the script it runs, before any worker starts

    size = dict(SIZES["quick" if args.quick else "gpu" if torch.cuda.is_available() else "default"])
    for key in ("reps", "steps", "batch", "hidden", "layers"):
        if getattr(args, key) is not None:
            size[key] = getattr(args, key)
    max_length = args.max_length or (1024 if not args.quick else 512)
    task = args.task
    with tempfile.TemporaryDirectory(prefix="nanodpo_bench_") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        if args.model:
            model_path = local_model(args.model, workdir)
        else:
            make_model_dir(workdir / "model", size)
            model_path = str(workdir / "model")
        rows_needed = size["batch"] * size["steps"] * (4 if task == "pt" else 1)
        data = write_data(workdir, task, make_rows(rows_needed, size["scale"]))
        spec = {
            "workdir": str(workdir), "model": model_path, "data": str(data), "max_length": max_length,
            "use_lora": args.use_lora, **size,
        }  # fmt: skip
        os.environ["NANODPO_CACHE"] = str(workdir / "cache")
        info = step_tokens(task, spec)
        tokens, flops = info["tokens"], info["flops"]
        peak_tflops = args.peak_tflops or default_peak_tflops()

        device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
        baseline = 0.0 if torch.cuda.is_available() else run_worker("baseline", task, spec)["peak_mb"]
        floors = {name: mb + baseline for name, mb in state_floor_mb(task, spec).items()}
        if args.model:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(model_path)
            model_text = (f"{args.model} ({config.model_type}, hidden {config.hidden_size}, "
                          f"{config.num_hidden_layers} layers, vocab {config.vocab_size:,})")  # fmt: skip
        else:
            model_text = (f"Qwen2 vocab {VOCAB_SIZE:,}, hidden {size['hidden']}, {size['layers']} layers, "
                          f"{size['heads']} heads ({size['kv_heads']} key/value), MLP {size['intermediate']}"
                          f"{', tied embeddings' if size.get('tied') else ''}, random init")  # fmt: skip
        lora_text = f", LoRA r {LORA['lora_r']} all-linear" if args.use_lora else ", full fine-tuning"
        print(
            f"nanodpo bench {task}: {device} | {model_text}{lora_text} | "
            f"{size['batch']} {'pairs' if task == 'dpo' else 'rows'} per step, "
            f"{size['steps']} steps (first not timed), {size['reps']} repetitions, max_length {max_length} | "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'PASSIVE')} | real tokens per step: {tokens}",
            flush=True,
        )
        # The side runs for DPO (precomputed reference, the plain step) go once, in the first repetition.
        extras = ["nanodpo-precomputed", "plain"] if task == "dpo" else []
        names = IMPLEMENTATIONS[task] + extras
        runs: dict[str, list[dict]] = {name: [] for name in names}
        last: dict[str, list[dict]] = {}
        for rep in range(size["reps"]):
            order = names if rep == 0 else IMPLEMENTATIONS[task][:: -1 if rep % 2 else 1]
            for name in order:
                result = run_worker(name, task, spec)
                runs[name].append(summarize(result, tokens, flops[name], peak_tflops, floors[name]))
                last[name] = result["records"]
                s = runs[name][-1]
                mfu = f"  MFU {s['mfu']:.1%}" if "mfu" in s else ""
                print(
                    f"  rep {rep + 1} {name:20s} {s['tokens_per_s']:9.0f} tok/s  {s['step_s']:7.2f} s/step  "
                    f"{s['cpu_s_per_step']:7.2f} CPU s/step  peak {s['peak_mb']:8.0f} MB "
                    f"({s['above_floor_mb']:6.0f} above the floor of {floors[name]:.0f}){mfu}",
                    flush=True,
                )
        report(task, names, runs, last, floors, peak_tflops)


def report(task: str, names: list[str], runs: dict, last: dict, floors: dict, peak_tflops: float | None) -> None:
    med = {name: {k: statistics.median(r[k] for r in runs[name]) for k in runs[name][0]} for name in names}
    base = IMPLEMENTATIONS[task][1]
    memory = "peak CUDA MB" if _cuda() else "peak RSS MB"
    print(
        f"\n{'implementation':22s} {'tokens/s':>10s} {'steps/s':>9s} {'CPU s/step':>11s} {memory:>13s} "
        f"{'tokens/s ratio':>15s} {'CPU-time ratio':>15s} {'memory ratio':>13s} {'floor MB':>9s} {'above floor':>12s}"
    )
    for name in names:
        m = med[name]
        print(
            f"{name:22s} {m['tokens_per_s']:10.0f} {m['steps_per_s']:9.3f} {m['cpu_s_per_step']:11.2f} "
            f"{m['peak_mb']:13.0f} {m['tokens_per_s'] / med[base]['tokens_per_s']:14.2f}x "
            f"{med[base]['cpu_s_per_step'] / m['cpu_s_per_step']:14.2f}x {m['peak_mb'] / med[base]['peak_mb']:12.2f}x "
            f"{floors[name]:9.0f} {m['above_floor_mb']:12.0f}"
        )
    print(f"(medians over repetitions; ratios relative to {base}: tokens/s and memory ours/theirs, "
          "CPU time theirs/ours)")
    if "mfu" in med[names[0]]:
        print("MFU (model FLOPs: 6·N·T trained + 2·N·T reference, LM head over the scored tokens, attention "
              f"included; peak {peak_tflops:.0f} TFLOP/s): " + ", ".join(
            f"{name} {med[name]['mfu']:.1%}" for name in names
        ))
    if task == "dpo":
        for key, what in (("step_s", "wall time"), ("cpu_s_per_step", "CPU time")):
            plain = med["plain"][key]
            print(
                f"{'' if key != 'step_s' else chr(10)}DPO step cost relative to one plain training step over the same "
                f"real tokens ({what}): nanodpo {med['nanodpo'][key] / plain:.2f} (online reference), "
                f"{med['nanodpo-precomputed'][key] / plain:.2f} (precomputed), TRL {med['trl'][key] / plain:.2f}"
            )
    print("\nfinal logged metrics (last step):")
    ours, theirs = last["nanodpo"][-1], last[base][-1]
    worst = 0.0
    for key in COMPARED[task]:
        if key in ours and key in theirs:
            # A reward is β × a difference of two sums of hundreds of log-probs: its rounding is relative to those.
            scale = abs(theirs[key])
            if key.startswith("rewards/"):
                scale = max(scale, 0.1 * abs(theirs.get("logps/chosen", 0.0)))
            gap = abs(ours[key] - theirs[key]) / max(scale, 1e-8)
            worst = max(worst, gap)
            print(f"  {key:22s} nanodpo {ours[key]: .6g}   {base} {theirs[key]: .6g}   relative gap {gap:.1e}")
    note = "; rewards relative to β·|logps|" if task == "dpo" else ""
    # fp32 on a CPU: the same numbers to 1e-3; bf16 autocast on a GPU: to bf16's precision, 2e-2
    tolerance = 2e-2 if _cuda() else 1e-3
    print(f"  -> {'agree' if worst < tolerance else 'DISAGREE'} (largest relative gap {worst:.1e}{note}; "
          f"tolerance {tolerance:.0e})")


def _cuda() -> bool:
    return torch.cuda.is_available()


if __name__ == "__main__":
    exit_on_user_error(main)
