"""Benchmark: nanodpo side by side with TRL 1.16 (a benchmark, not a test).

    python -m nanodpo.bench dpo            # train_dpo.py vs trl.DPOTrainer (+ nanodpo with precomputed reference)
    python -m nanodpo.bench sft            # train_sft.py vs trl.SFTTrainer
    python -m nanodpo.bench pt             # train_pt.py  vs a plain Hugging Face forward/backward/AdamW loop
    python -m nanodpo.bench dpo --quick    # a smoke run: smaller model and lengths, one repetition

Same model for both: Qwen2 architecture with Qwen2.5's real vocabulary size (151,936 — the LM head is where most of
the time and memory of a small model go), a small hidden size and a few layers, random init, fp32 (bf16 on GPU).
Same data: synthetic multi-turn conversations with a realistic length mix (prompts of 50-600 tokens over 1-3 rounds,
completions of 20-400; tokenizer: the demo's byte-level BPE); same batch, steps, optimizer (AdamW) and schedule;
sequential data order, so both train on the same pairs in the same order.

Every run is its own process (`python -m nanodpo.bench --worker ...`): peak memory is that process's own peak RSS
(CUDA: peak allocated), and no run inherits another's allocator state. Runs alternate (nanodpo, TRL, TRL, nanodpo,
...) over several repetitions; medians are reported. The first optimizer step of every run is warm-up and is not
timed. Printed per implementation: real (non-padding) tokens/s — the tokens of the sequences as TRL counts them,
prompt included once per sequence —, optimizer steps/s, peak memory, the ratios nanodpo/TRL, and the final logged
metrics of both (they must agree: the same training, only faster).

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
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "tokenizer"
VOCAB_SIZE = 151_936  # Qwen2.5

SIZES = {
    # hidden, layers, heads, kv heads, MLP width; pairs (or rows) per micro-batch; steps; repetitions; length scale
    "default": dict(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=512, batch=2, steps=3, reps=3, scale=1.0),
    "quick": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=256, batch=2, steps=3, reps=1, scale=0.25),
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
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

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
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    Qwen2ForCausalLM(config).float().save_pretrained(path)
    tokenizer.save_pretrained(path)


def word_pieces() -> list[str]:
    """Vocabulary pieces that decode to plain letters (so random text re-tokenizes to about as many tokens)."""
    from transformers import AutoTokenizer

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


def peak_memory_mb() -> float:
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def hyperparameters(task: str, spec: dict) -> dict:
    import torch

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


def run_nanodpo(task: str, spec: dict, precompute: bool = False) -> tuple[list[float], list[dict]]:
    """train_{task}.py's main(), with the time of every logged step recorded."""
    sys.path.insert(0, str(ROOT))
    from nanodpo import tracking

    times, records = [], []
    original = tracking.Tracker.log

    def timed_log(self, metrics, step):
        if "loss" in metrics:
            times.append((time.perf_counter(), time.process_time()))
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
    if task == "pt":
        options["packing_strategy"] = "bfd"
    argv = [item for key, value in options.items() for item in (f"--{key}", str(value))]
    module = __import__(f"train_{task}")
    module.main(argv)
    return times, records


def run_trl(task: str, spec: dict) -> tuple[list[float], list[dict]]:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    times = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            times.append((time.perf_counter(), time.process_time()))

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    dataset = load_dataset("json", data_files=spec["data"], split="train")
    hp = hyperparameters(task, spec)
    common = dict(
        output_dir=spec["out"], report_to="none", save_strategy="no", disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(), gradient_checkpointing=False, **hp,
    )  # fmt: skip
    if task == "dpo":
        from trl import DPOConfig, DPOTrainer

        trainer = DPOTrainer(model=model, args=DPOConfig(**common), train_dataset=dataset, processing_class=tokenizer)
    else:
        from trl import SFTConfig, SFTTrainer

        trainer = SFTTrainer(model=model, args=SFTConfig(**common), train_dataset=dataset, processing_class=tokenizer)
    trainer.add_callback(StepTimes())
    trainer.train()
    return times, [r for r in trainer.state.log_history if "loss" in r]


def step_rows(task: str, spec: dict) -> list[list]:
    """Every optimizer step's sequences as the nanodpo run sees them (token ids, truncated): for dpo, the 2B
    sequences of the step's pairs as one padding-free row (a PackedRow, one document per sequence); for pt, the
    step's packed rows; for sft, the step's documents (one per row)."""
    sys.path.insert(0, str(ROOT))
    from nanodpo.config import DPOConfig, PTConfig, SFTConfig, parse_config
    from nanodpo.model import load_tokenizer
    from nanodpo.packing import Document, _make_row, pack_documents

    batch, steps = spec["batch"], spec["steps"]
    argv = ["--model", spec["model"], "--dataset", spec["data"], "--max_length", str(spec["max_length"])]
    if task == "dpo":
        from nanodpo.dpo_data import PreferenceCollator, load_preference_data
        from nanodpo.dpo_packing import sequences_of

        cfg = parse_config(DPOConfig, argv)
        examples = load_preference_data(cfg, load_tokenizer(cfg))
        collate = PreferenceCollator(0, cfg.max_length)
        groups = [sequences_of(collate(examples[i : i + batch])) for i in range(0, batch * steps, batch)]
        return [[_make_row([(seq, seq) for seq in group])] for group in groups]
    if task == "sft":
        from nanodpo.sft_data import load_sft_data

        cfg = parse_config(SFTConfig, argv)
        docs = load_sft_data(cfg, load_tokenizer(cfg))
        cut = cfg.max_length
        return [[_make_row([(d.input_ids[:cut], d.labels()[:cut])]) for d in docs[i : i + batch]] for i in range(0, batch * steps, batch)]
    import train_pt

    cfg = parse_config(PTConfig, argv)
    docs = train_pt.load_documents(cfg, load_tokenizer(cfg), "train")
    rows = pack_documents([Document(d.input_ids) for d in docs], cfg.max_length, "bfd", cfg.packing_overflow)
    return [rows[i : i + batch] for i in range(0, batch * steps, batch)]


def run_plain(task: str, spec: dict) -> tuple[list[float], list[dict]]:
    """A plain HF training loop over the same rows: forward with labels (HF's own loss over full logits), backward,
    gradient clipping, AdamW. Packed rows get a 4D block-causal mask (sdpa): documents stay isolated."""
    import torch
    from transformers import AutoModelForCausalLM

    from nanodpo.packing import collate_packed

    steps = step_rows(task, spec)
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32, attn_implementation="sdpa")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=hyperparameters(task, spec)["learning_rate"])
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.cuda.is_available())
    if torch.cuda.is_available():
        model.cuda()
    times, records = [], []
    for step, rows in enumerate(steps, 1):
        batch = {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in collate_packed(rows, "sdpa", 0).items()}
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append((time.perf_counter(), time.process_time()))
        records.append({"step": step, "loss": loss.item(), "grad_norm": float(grad_norm)})
    return times, records


def worker(args) -> None:
    spec = json.loads(args.spec)
    start = time.perf_counter()
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


def step_tokens(task: str, spec: dict) -> list[int]:
    """Real tokens of every optimizer step (the same for every implementation: same data, same order)."""
    code = (
        "import json, sys; from nanodpo.bench import step_rows; "
        f"steps = step_rows({task!r}, json.loads(sys.argv[1])); "
        "print('BENCH_RESULT ' + json.dumps([sum(len(row) for row in rows) for rows in steps]))"
    )
    return _run([sys.executable, "-c", code, json.dumps(spec)])


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
    return _run([sys.executable, "-m", "nanodpo.bench", task, "--worker", name, "--spec", json.dumps(spec)])


def summarize(result: dict, tokens: list[int]) -> dict:
    """Timed steps: all but the first (warm-up)."""
    times = result["times"]
    timed = len(times) - 1
    seconds = times[-1][0] - times[0][0]
    cpu_seconds = times[-1][1] - times[0][1]  # this process's CPU time: less sensitive to a busy shared machine
    return {
        "tokens_per_s": sum(tokens[1 : len(times)]) / seconds,
        "steps_per_s": timed / seconds,
        "step_s": seconds / timed,
        "cpu_s_per_step": cpu_seconds / timed,
        "peak_mb": result["peak_mb"],
    }


def main(argv: list[str] | None = None) -> None:
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
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    size = dict(SIZES["quick" if args.quick else "default"])
    for key in ("reps", "steps", "batch", "hidden", "layers"):
        if getattr(args, key) is not None:
            size[key] = getattr(args, key)
    max_length = args.max_length or (1024 if not args.quick else 512)
    task = args.task
    with tempfile.TemporaryDirectory(prefix="nanodpo_bench_") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        make_model_dir(workdir / "model", size)
        rows_needed = size["batch"] * size["steps"] * (4 if task == "pt" else 1)
        data = write_data(workdir, task, make_rows(rows_needed, size["scale"]))
        spec = {
            "workdir": str(workdir), "model": str(workdir / "model"), "data": str(data), "max_length": max_length,
            **size,
        }  # fmt: skip
        os.environ["NANODPO_CACHE"] = str(workdir / "cache")
        tokens = step_tokens(task, spec)
        import torch

        device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
        print(
            f"nanodpo bench {task}: {device} | Qwen2 vocab {VOCAB_SIZE:,}, hidden {size['hidden']}, "
            f"{size['layers']} layers, random init | {size['batch']} {'pairs' if task == 'dpo' else 'rows'} per step, "
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
                runs[name].append(summarize(result, tokens))
                last[name] = result["records"]
                s = runs[name][-1]
                print(
                    f"  rep {rep + 1} {name:20s} {s['tokens_per_s']:9.0f} tok/s  {s['step_s']:7.2f} s/step  "
                    f"{s['cpu_s_per_step']:7.2f} CPU s/step  peak {s['peak_mb']:8.0f} MB",
                    flush=True,
                )
        report(task, names, runs, last)


def report(task: str, names: list[str], runs: dict, last: dict) -> None:
    med = {name: {k: statistics.median(r[k] for r in runs[name]) for k in runs[name][0]} for name in names}
    base = IMPLEMENTATIONS[task][1]
    memory = "peak CUDA MB" if _cuda() else "peak RSS MB"
    print(
        f"\n{'implementation':22s} {'tokens/s':>10s} {'steps/s':>9s} {'CPU s/step':>11s} {memory:>13s} "
        f"{'tokens/s ratio':>15s} {'CPU-time ratio':>15s} {'memory ratio':>13s}"
    )
    for name in names:
        m = med[name]
        print(
            f"{name:22s} {m['tokens_per_s']:10.0f} {m['steps_per_s']:9.3f} {m['cpu_s_per_step']:11.2f} "
            f"{m['peak_mb']:13.0f} {m['tokens_per_s'] / med[base]['tokens_per_s']:14.2f}x "
            f"{med[base]['cpu_s_per_step'] / m['cpu_s_per_step']:14.2f}x {m['peak_mb'] / med[base]['peak_mb']:12.2f}x"
        )
    print(f"(medians over repetitions; ratios relative to {base}: tokens/s and memory ours/theirs, CPU time theirs/ours)")
    if task == "dpo":
        plain = med["plain"]["step_s"]
        print(
            f"\nDPO step cost relative to one plain training step over the same real tokens: "
            f"nanodpo {med['nanodpo']['step_s'] / plain:.2f} (online reference), "
            f"{med['nanodpo-precomputed']['step_s'] / plain:.2f} (precomputed), TRL {med['trl']['step_s'] / plain:.2f}"
        )
    print("\nfinal logged metrics (last step):")
    ours, theirs = last["nanodpo"][-1], last[base][-1]
    for key in COMPARED[task]:
        if key in ours and key in theirs:
            gap = abs(ours[key] - theirs[key]) / max(abs(theirs[key]), 1e-8)
            print(f"  {key:22s} nanodpo {ours[key]: .6g}   {base} {theirs[key]: .6g}   relative gap {gap:.1e}")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
