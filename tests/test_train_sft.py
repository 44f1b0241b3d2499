"""train_sft.py end to end: equal to TRL 1.16's SFTTrainer, a step's loss is the token mean of the whole step, what
is trained on (assistant turns, completions, --train_on_prompt), LoRA, and refused runs.

1. Parity with TRL: the same tiny model directory, data (24 conversations, most multi-turn with a system message),
   seed and hyperparameters — fp32, constant LR, no dropout, sequential data order, batch 2 × accumulation 2,
   max_length set, logging every step, 10 optimizer steps. TRL reads the conversations with a chat template carrying
   `{% generation %}` markers and `assistant_only_loss=True`; nanodpo reads them with the plain ChatML template and
   finds the assistant turns itself — the same rendered text, token ids and targets (see tests/test_sft_data.py).
   Compared at every step: loss, grad_norm, entropy, mean_token_accuracy (per micro-batch, averaged over the step, in
   both) and num_tokens (cumulative tokens seen, padding excluded, prompts included: TRL sums the attention mask, or
   the flattened length when padding-free). Tolerances: step 1 (same weights) 1e-5 relative; AdamW 3e-3 afterwards
   (Adam's first updates amplify fp32 rounding); SGD 1e-4. Measured on CPU: below 1e-6 everywhere.

   Packed runs: TRL packs best-fit-decreasing (within `datasets.map` chunks of 1000 rows) into padding-free rows —
   position ids restarting per document, no attention mask; train_sft.py packs the whole set at once with the same
   algorithm and tie-breaking, and feeds the rows under sdpa with a 4D block-causal mask. With fewer than 1000 rows
   the rows and their order are identical (asserted against TRL's prepared dataset), so each optimizer step covers
   the same documents in both; 9 rows also make every epoch end with a one-row step, handled alike. A packed run
   with --train_on_prompt (TRL: assistant_only_loss=False) checks that the first token of each packed document is
   not a target (with assistant-only loss it never is one anyway).

   Runs alternate in one process: accelerate keeps GradientState (the accumulation steps `backward` divides by) in a
   process-wide singleton, so it is reset before each trainer is built (`reset_accelerate`).
2. Batch 2 × accumulation 4 gives the loss, grad norm and weights of batch 8 × accumulation 1 (micro-batches of one-
   token vs long answers, where a mean of micro-batch means is 6% off the token mean).
3. Logged one-step losses equal transformers' own causal-LM loss over the intended targets.
4. Bad data: exit status 2, one `error:` line naming file, row and field, no traceback, nothing in output_dir.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_sft
from nanodpo.errors import UserError
from nanodpo.tracking import read_metrics
from tests import tiny

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

ROOT = Path(__file__).resolve().parents[1]
STEPS = 10
UNPACKED_MAX_LENGTH = 128  # a few conversations are longer: truncated (keeping the start) in both
PACKED_MAX_LENGTH = 256


def msg(role, content):
    return {"role": role, "content": content}


SYSTEMS = ["You are a helpful assistant.", "Be rude.", "请用中文回答。"]
EXCHANGES = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How do I bake bread?", "Mix flour, water, salt and yeast, then let it rise."),
    ("你好，请问今天天气怎么样？", "今天天气很好，阳光明媚。"),
    ("Name a fruit.", "An apple."),
    ("What is 2 + 2?", "4"),
    ("Tell me about preference optimization.",
     "Direct preference optimization trains a policy from pairs of chosen and rejected answers. The reference model "
     "stays frozen while the policy learns to prefer the chosen completion."),
    ("Thank you very much!", "Whatever."),
    ("Count for me.", "1 2 3 4 5 6 7 8 9 10 100 1000"),
]  # fmt: skip


def conversations(n: int = 24) -> list[dict]:
    """n multi-turn `messages` rows: 1-3 rounds, a system message in two rows of three, answers short and long."""
    rows = []
    for i in range(n):
        messages = [msg("system", SYSTEMS[i % 3])] if i % 3 else []
        for r in range(1 + i % 3):
            question, answer = EXCHANGES[(i + 3 * r) % len(EXCHANGES)]
            messages += [msg("user", question), msg("assistant", answer)]
        rows.append({"messages": messages})
    return rows


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft_e2e")
    tiny.make_model_dir(root / "model", seed=0)
    tiny.write_jsonl(root / "train.jsonl", conversations(24))
    return root


def to_argv(options: dict) -> list[str]:
    argv = []
    for key, value in options.items():
        argv += [f"--{key}", *map(str, value if isinstance(value, list) else [value])]
    return argv


def nanodpo_args(workdir: Path, out: Path, **overrides) -> list[str]:
    options = {
        "model": str(workdir / "model"),
        "dataset": str(workdir / "train.jsonl"),
        "output_dir": str(out),
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "max_steps": STEPS,
        "learning_rate": 1e-3,
        "lr_scheduler_type": "constant",
        "logging_steps": 1,
        "train_sampling_strategy": "sequential",
        "max_length": UNPACKED_MAX_LENGTH,
        "seed": 0,
        "report_to": "jsonl",
        "disable_tqdm": True,
    }
    options.update(overrides)
    return to_argv(options)


def run_nanodpo(workdir: Path, out: Path, **overrides) -> list[dict]:
    reset_accelerate()
    train_sft.main(nanodpo_args(workdir, out, **overrides))
    return [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def reset_accelerate():
    """accelerate keeps its state in process-wide singletons, GradientState (the accumulation steps `backward`
    divides by) among them: a trainer built before another's Accelerator would backpropagate with its settings.
    Called before every run, as runs alternate within a test (conftest's fixture resets only between tests)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def make_trl_trainer(
    workdir: Path, out: Path, optim="adamw_torch", learning_rate=1e-3, packing=False, assistant_only_loss=True
):
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    reset_accelerate()
    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    # nanodpo's template with TRL's {% generation %} markers (and, for the `bos` tokenizer, its BOS first)
    tokenizer.chat_template = tokenizer.chat_template.replace(tiny.CHATML_TEMPLATE, tiny.CHATML_GENERATION_TEMPLATE)
    model = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=torch.float32)
    dataset = load_dataset("json", data_files=str(workdir / "train.jsonl"), split="train")
    args = SFTConfig(
        output_dir=str(out),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=STEPS,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        logging_steps=1,
        train_sampling_strategy="sequential",
        max_length=PACKED_MAX_LENGTH if packing else UNPACKED_MAX_LENGTH,
        packing=packing,
        assistant_only_loss=assistant_only_loss,
        seed=0,
        report_to="none",
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        save_strategy="no",
        optim=optim,
        disable_tqdm=True,
    )
    return SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)


def run_trl(trainer) -> list[dict]:
    trainer.train()
    return [r for r in trainer.state.log_history if "loss" in r]


def compare(ours: list[dict], theirs: list[dict], rtol: float, first_step_rtol: float = 1e-5) -> dict[str, float]:
    """Every logged step: loss, grad norm and entropy within `rtol` relative (step 1: `first_step_rtol`), token
    accuracy within 0.01 absolute (room for an argmax flip), cumulative num_tokens equal. Returns the worst gaps."""
    assert len(ours) == len(theirs) == STEPS
    worst = {}
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a["step"] == b["step"] == i + 1
        # TRL counts the attention mask (padding-free: the flattened length): every token but padding, prompts too.
        assert a["num_tokens"] == b["num_tokens"], f"step {i + 1}: num_tokens {a['num_tokens']} vs {b['num_tokens']}"
        for key in ["loss", "grad_norm", "entropy", "mean_token_accuracy"]:
            if key == "mean_token_accuracy":
                gap, tol = abs(a[key] - b[key]), 0.01
            else:
                gap, tol = abs(a[key] - b[key]) / abs(b[key]), first_step_rtol if i == 0 else rtol
            worst[key] = max(worst.get(key, 0.0), gap)
            assert gap <= tol, f"step {i + 1} {key}: nanodpo {a[key]} vs TRL {b[key]} (gap {gap:.1e})"
    assert ours[-1]["mean_token_accuracy"] > 0.05  # (it starts at 0: the comparison above is not 0 == 0 throughout)
    print("max difference to TRL (relative; accuracy absolute):", {k: f"{v:.1e}" for k, v in worst.items()})
    return worst


# ---------------------------------------------------------------- 1. equal to TRL's SFTTrainer


OPTIMIZERS = [  # (optim, learning rate, tolerance from step 2 on)
    pytest.param("adamw_torch", 1e-3, 3e-3, id="adamw"),
    pytest.param("sgd", 0.5, 1e-4, id="sgd"),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "optim, lr, rtol, tokenizer_kind",
    [*(pytest.param(*p.values, "plain", id=p.id) for p in OPTIMIZERS),
     pytest.param("adamw_torch", 1e-3, 3e-3, "bos", id="adamw-bos")],
)  # fmt: skip
def test_unpacked_curve_matches_trl(workdir, tmp_path, optim, lr, rtol, tokenizer_kind):
    """Also with a tokenizer that has a BOS token, rendered by both chat templates (as Llama's)."""
    if tokenizer_kind != "plain":
        workdir = tmp_path / "workdir"
        tiny.make_model_dir(workdir / "model", seed=0, tokenizer=tokenizer_kind)
        tiny.write_jsonl(workdir / "train.jsonl", conversations(24))
    ours = run_nanodpo(workdir, tmp_path / "nano", optim=optim, learning_rate=lr)
    theirs = run_trl(make_trl_trainer(workdir, tmp_path / "trl", optim=optim, learning_rate=lr))
    compare(ours, theirs, rtol)
    assert ours[-1]["loss"] < ours[0]["loss"] - 0.5  # it trained
    assert (tmp_path / "nano" / "model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "optim, lr, rtol, train_on_prompt",
    [
        *(pytest.param(*p.values, False, id=p.id) for p in OPTIMIZERS),
        pytest.param("sgd", 0.5, 1e-4, True, id="sgd-all-tokens"),
    ],
)
def test_packed_curve_matches_trl(workdir, tmp_path, optim, lr, rtol, train_on_prompt):
    """(With --train_on_prompt / TRL's assistant_only_loss=False every token is a target, except the first of each
    packed document: nothing in the row may predict it.)"""
    from nanodpo.config import SFTConfig, parse_config
    from nanodpo.model import load_tokenizer
    from nanodpo.packing import pack_documents
    from nanodpo.sft_data import load_sft_data

    overrides = {"packing": "true", "max_length": PACKED_MAX_LENGTH, "optim": optim, "learning_rate": lr,
                 "train_on_prompt": train_on_prompt}  # fmt: skip
    ours = run_nanodpo(workdir, tmp_path / "nano", **overrides)
    trainer = make_trl_trainer(
        workdir, tmp_path / "trl", optim=optim, learning_rate=lr, packing=True, assistant_only_loss=not train_on_prompt
    )
    # The same packed rows, in the same order, as train_sft.py makes them: each step covers the same documents.
    cfg = parse_config(SFTConfig, nanodpo_args(workdir, tmp_path / "unused", **overrides))
    rows = pack_documents(load_sft_data(cfg, load_tokenizer(cfg)), cfg.max_length)
    trl_rows = trainer.train_dataset
    assert len(rows) == len(trl_rows) and len(rows) % 4 == 1  # an epoch ends with a step of a single row
    assert [r.input_ids for r in rows] == trl_rows["input_ids"]
    assert [r.seq_lens for r in rows] == trl_rows["seq_lengths"]
    theirs = run_trl(trainer)
    compare(ours, theirs, rtol)
    assert ours[-1]["loss"] < ours[0]["loss"] - 0.5


# ---------------------------------------------------------------- 2. the loss of a step is its token mean


def sharp_model_dir(path: Path) -> Path:
    """A tiny model whose output distributions are far from uniform (LM head scaled up), so that the per-token NLL
    varies a lot from token to token — with a random-init head every token costs about ln(vocab)."""
    tokenizer = tiny.make_tokenizer()
    model = tiny.make_model(tokenizer, seed=1)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def uneven_rows(n: int = 24) -> list[dict]:
    """Micro-batches of 2 alternate between two one-token answers and two long answers."""
    long_answer = EXCHANGES[5][1] + " " + EXCHANGES[1][1]
    rows = []
    for i in range(n):
        answer = long_answer if (i // 2) % 2 else "4"
        rows.append({"messages": [msg("user", EXCHANGES[i % 5][0]), msg("assistant", answer)]})
    return rows


@pytest.mark.slow
def test_accumulation_does_not_change_the_loss_or_the_update(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from nanodpo.config import SFTConfig, parse_config
    from nanodpo.logps import token_logps
    from nanodpo.model import load_tokenizer
    from nanodpo.sft_data import load_sft_data
    from nanodpo.training import collate_documents, lm_model_inputs

    model_dir = sharp_model_dir(tmp_path / "model")
    tiny.write_jsonl(tmp_path / "train.jsonl", uneven_rows(24))
    common = {
        "model": str(model_dir), "dataset": str(tmp_path / "train.jsonl"), "max_steps": 3, "optim": "sgd",
        "learning_rate": 0.1, "lr_scheduler_type": "constant", "logging_steps": 1, "max_length": 128,
        "train_sampling_strategy": "sequential", "seed": 0, "report_to": "jsonl", "disable_tqdm": True,
    }  # fmt: skip
    runs = {}
    for batch, accumulation in [(2, 4), (8, 1)]:
        out = tmp_path / f"b{batch}x{accumulation}"
        reset_accelerate()
        train_sft.main(to_argv({**common, "output_dir": out, "per_device_train_batch_size": batch,
                                "gradient_accumulation_steps": accumulation}))  # fmt: skip
        records = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
        runs[batch] = (records, load_file(out / "model.safetensors"))
    (metrics_a, weights_a), (metrics_b, weights_b) = runs[2], runs[8]
    assert [r["step"] for r in metrics_a] == [r["step"] for r in metrics_b] == [1, 2, 3]
    for a, b in zip(metrics_a, metrics_b):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5), a["step"]
        assert a["num_tokens"] == b["num_tokens"]
    initial = load_file(model_dir / "model.safetensors")
    worst_update, worst_diff = 0.0, 0.0
    for name, w in weights_a.items():
        worst_update = max(worst_update, float((w - initial[name]).abs().max()))
        worst_diff = max(worst_diff, float((w - weights_b[name]).abs().max()))
        torch.testing.assert_close(w, weights_b[name], rtol=1e-5, atol=1e-6, msg=name)
    print(f"largest weight update {worst_update:.1e}, largest difference 2x4 vs 8x1 {worst_diff:.1e}")
    assert worst_update > 1e-3

    # The test can fail: on the first step's 8 rows, the mean of the 4 micro-batch means is not the token mean.
    cfg = parse_config(SFTConfig, to_argv({**common, "output_dir": tmp_path / "unused"}))
    docs = load_sft_data(cfg, load_tokenizer(cfg))[:8]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    sums, counts = [], []
    with torch.no_grad():
        for i in range(0, 8, 2):
            stats = token_logps(model, lm_model_inputs(collate_documents(docs[i : i + 2], 0)), with_metrics=False)
            sums.append(float(-stats.logps.sum()))
            counts.append(float(stats.mask.sum()))
    token_mean = sum(sums) / sum(counts)
    mean_of_means = sum(s / c for s, c in zip(sums, counts)) / len(sums)
    assert max(counts) > 10 * min(counts)
    assert metrics_a[0]["loss"] == pytest.approx(token_mean, rel=1e-5)
    print(f"step 1: token mean {token_mean:.4f}, mean of micro-batch means {mean_of_means:.4f}")
    assert abs(mean_of_means - token_mean) > 0.05 * token_mean, (mean_of_means, token_mean)


# ---------------------------------------------------------------- 3. what is trained on; LoRA


def hf_loss(model_dir: Path, sequences: list[tuple[list[int], list[int]]]) -> float:
    """Transformers' own causal-LM loss (mean over all target tokens of the batch) for (input_ids, labels) pairs."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    length = max(len(ids) for ids, _ in sequences)
    pad = [length - len(ids) for ids, _ in sequences]
    input_ids = torch.tensor([ids + [0] * n for (ids, _), n in zip(sequences, pad)])
    attention_mask = torch.tensor([[1] * len(ids) + [0] * n for (ids, _), n in zip(sequences, pad)])
    labels = torch.tensor([lab + [-100] * n for (_, lab), n in zip(sequences, pad)])
    with torch.no_grad():
        return float(model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss)


def one_step_loss(workdir: Path, data: Path, out: Path, n_rows: int, **overrides) -> float:
    """The logged loss of a single optimizer step over the whole data set (from the initial weights)."""
    options = {"dataset": str(data), "max_steps": 1, "per_device_train_batch_size": n_rows,
               "gradient_accumulation_steps": 1, "max_length": 1024, **overrides}  # fmt: skip
    records = run_nanodpo(workdir, out, **options)
    assert len(records) == 1
    return records[0]["loss"]


def test_train_on_prompt_trains_every_token(workdir, tmp_path):
    from transformers import AutoTokenizer

    from nanodpo.config import SFTConfig, parse_config
    from nanodpo.model import load_tokenizer
    from nanodpo.sft_data import load_sft_data

    rows = conversations(24)
    argv = nanodpo_args(workdir, tmp_path / "unused", max_length=1024)
    cfg = parse_config(SFTConfig, argv)
    assistant_only = load_sft_data(cfg, load_tokenizer(cfg))
    every = load_sft_data(parse_config(SFTConfig, argv + ["--train_on_prompt", "true"]), load_tokenizer(cfg))
    assert [d.input_ids for d in every] == [d.input_ids for d in assistant_only]
    assert all(all(d.loss_mask) for d in every)
    assert sum(map(sum, (d.loss_mask for d in every))) > 2 * sum(map(sum, (d.loss_mask for d in assistant_only)))

    # The logged loss is transformers' loss with labels = input_ids (every token but the first of each row).
    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")  # (a reloaded tokenizer splits digits differently)
    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    sequences = [(ids, ids) for ids in (tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts)]
    loss = one_step_loss(workdir, workdir / "train.jsonl", tmp_path / "nano", len(rows), train_on_prompt="true")
    assert loss == pytest.approx(hf_loss(workdir / "model", sequences), rel=1e-5)


def test_prompt_completion_trains_on_the_completion_only(workdir, tmp_path):
    from transformers import AutoTokenizer

    from nanodpo.config import SFTConfig, parse_config
    from nanodpo.sft_data import load_sft_data

    rows = [{"prompt": q, "completion": " " + a} for q, a in EXCHANGES] * 2
    data = tiny.write_jsonl(tmp_path / "pc.jsonl", rows)
    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    sequences = []
    for row in rows:
        prompt_ids = tokenizer(row["prompt"])["input_ids"]
        ids = tokenizer(row["prompt"] + row["completion"] + tokenizer.eos_token)["input_ids"]
        assert ids[: len(prompt_ids)] == prompt_ids  # these prompts end on a token boundary
        sequences.append((ids, [-100] * len(prompt_ids) + ids[len(prompt_ids) :]))
    loss = one_step_loss(workdir, data, tmp_path / "nano", len(rows))
    assert loss == pytest.approx(hf_loss(workdir / "model", sequences), rel=1e-5)
    # (With a random-init model every token costs about ln(vocab), so check the targets themselves too.)
    cfg = parse_config(SFTConfig, nanodpo_args(workdir, tmp_path / "unused", dataset=str(data), max_length=1024))
    assert [(d.input_ids, d.labels()) for d in load_sft_data(cfg, tokenizer)] == sequences


def test_lora_run_saves_an_adapter(workdir, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    records = run_nanodpo(workdir, out, use_lora="true", lora_r=8, lora_alpha=16, learning_rate=1e-2, max_steps=3)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert not (out / "model.safetensors").exists()  # the adapter only, not a merged copy of the base
    adapter = load_file(out / "adapter_model.safetensors")
    lora_b = [w for name, w in adapter.items() if "lora_B" in name]
    assert lora_b and all(w.abs().max() > 0 for w in lora_b)  # B starts at zero: it trained
    base = AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, out)
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad(), model.disable_adapter():
        plain = model(input_ids=ids).logits
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
    assert not torch.allclose(plain, adapted)


# ---------------------------------------------------------------- 4. refused runs

BAD_DATA = {  # case -> (file content: rows or raw text, strings the error must contain)
    "no_assistant_turn": (
        [{"messages": [msg("user", "Hi"), msg("assistant", "Hello")]},
         {"messages": [msg("system", "Be brief."), msg("user", "Hello!")]}],
        ["data.jsonl", "row 2", "'messages'", "no assistant turn"],
    ),
    "unknown_role": (
        [{"messages": [msg("user", "Hi"), msg("wizard", "Abracadabra"), msg("assistant", "Hello")]}],
        ["data.jsonl", "row 1", "'messages[1].role'", "wizard"],
    ),
    "empty_text": (
        [{"messages": [msg("user", "Hi"), msg("assistant", "Hello")]}] * 2
        + [{"messages": [msg("user", "Hi"), msg("assistant", "   ")]}],
        ["data.jsonl", "row 3", "'messages[1].content'", "empty"],
    ),
    "unknown_format": (
        [{"question": "Hi", "answer": "Hello"}],
        ["data.jsonl", "row 1", "unknown SFT format", "question", "'messages'", "'text'"],
    ),
    "empty_file": ("", ["data.jsonl", "empty"]),
}


@pytest.fixture(scope="module")
def refusals(tmp_path_factory):
    """Every bad-data run, started at once (each pays for importing torch) and waited for."""
    root = tmp_path_factory.mktemp("sft_bad")
    model_dir = tiny.make_model_dir(root / "model")
    procs = {}
    for case, (content, _) in BAD_DATA.items():
        (root / case).mkdir()
        data = root / case / "data.jsonl"
        data.write_text(content) if isinstance(content, str) else tiny.write_jsonl(data, content)
        argv = ["--model", str(model_dir), "--dataset", str(data), "--output_dir", str(root / case / "out")]
        procs[case] = subprocess.Popen(
            [sys.executable, str(ROOT / "train_sft.py"), *argv],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )  # fmt: skip
    results = {}
    for case, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        results[case] = (proc.returncode, stderr, root / case / "out")
    return results


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_is_refused(refusals, case):
    returncode, stderr, out = refusals[case]
    assert returncode == 2, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    error = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1, stderr[-2000:]
    for needed in BAD_DATA[case][1]:
        assert needed in error[0], (needed, error[0])
    assert not out.exists(), "a refused run must not write to output_dir"


def test_packing_without_a_row_length_is_refused(tmp_path):
    """--packing packs into rows of --max_length tokens: with `--max_length none` there is no row length, which is
    said before anything loads (it used to end in a TypeError inside the packer)."""
    data = tiny.write_jsonl(tmp_path / "data.jsonl", [{"prompt": "Hi", "completion": "Hello"}])
    argv = ["--model", "nanodpo-tiny", "--dataset", str(data), "--output_dir", str(tmp_path / "out"), "--packing",
            "--max_length", "none"]  # fmt: skip
    with pytest.raises(UserError, match="--packing packs documents into rows of --max_length tokens"):
        train_sft.main(argv)
    assert not (tmp_path / "out").exists()
