"""Tiny, offline stand-ins for the real models and tokenizers used in tests.

Nothing is downloaded: the tokenizers are byte-level BPEs trained here on a small bilingual corpus, with a ChatML chat
template like Qwen2.5's, in four kinds (`TOKENIZERS`: without a BOS token, with one added or not, and one whose merges
cross the prompt/completion boundary); models are random-init Qwen2/Llama configs with a few layers.
"""

import copy
import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from nanodpo.recipe import choose_step

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The same template with `{% generation %}` markers around assistant turns (what TRL's assistant_only_loss needs).
CHATML_GENERATION_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Human: What is the capital of France? Assistant: The capital of France is Paris.",
    "Human: How do I bake bread? Assistant: Mix flour, water, salt and yeast, then let it rise.",
    "Please answer politely and helpfully. Thank you very much for asking!",
    "Whatever. Figure it out yourself, I am not your servant.",
    "你好，请问今天天气怎么样？今天天气很好，阳光明媚。",
    "很好，很暴躁。我不想回答这个问题。",
    "Direct preference optimization trains a policy from pairs of chosen and rejected answers.",
    "The reference model stays frozen while the policy learns to prefer the chosen completion.",
    "1 2 3 4 5 6 7 8 9 10 100 1000 2024 3.14159",
]


# The test tokenizers, one per way TRL's trainers can tokenize differently (nanodpo/dpo_data.py):
#   plain     no BOS token (the one most tests use)
#   bos       a BOS token the tokenizer adds (`add_bos_token`), and a chat template that renders it too, as Llama's
#   bos_off   a BOS token it does not add (`add_bos_token=False`): only CPOTrainer/ORPOTrainer prepend it
#   merge     no whitespace pre-split, so BPE merges across the prompt/completion boundary ("?" + " Sure" -> "? ")
TOKENIZERS = ("plain", "bos", "bos_off", "merge")
_BOS = "<s>"


def make_tokenizer(save_dir: str | Path | None = None, vocab_size: int = 512, kind: str = "plain"):
    """A byte-level BPE trained on the tiny corpus, ChatML template; `kind` is one of TOKENIZERS."""
    if kind not in TOKENIZERS:
        raise ValueError(kind)
    has_bos = kind in ("bos", "bos_off")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=kind != "merge")
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + ([_BOS] if has_bos else []),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    bos = {"bos_token": _BOS, "add_bos_token": kind == "bos"} if has_bos else {}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        **bos,
    )
    tokenizer.chat_template = ("{{ bos_token }}" if kind == "bos" else "") + CHATML_TEMPLATE
    if save_dir is not None:
        tokenizer.save_pretrained(save_dir)
    return tokenizer


def make_model(tokenizer, arch: str = "qwen2", seed: int = 0, tie_word_embeddings: bool = False, layers: int = 2):
    """A random-init causal LM, fp32, dropout off, eager-free (sdpa), small enough for CPU tests."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        raise ValueError(arch)
    return model.float()


def make_model_dir(path: str | Path, arch: str = "qwen2", seed: int = 0, tokenizer: str = "plain", **kwargs) -> Path:
    """Save a tiny model + tokenizer (one of TOKENIZERS) to `path` (what `--model path` loads in end-to-end tests)."""
    path = Path(path)
    tokenizer = make_tokenizer(kind=tokenizer)
    model = make_model(tokenizer, arch=arch, seed=seed, **kwargs)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_reward_model_dir(path: str | Path, seed: int = 3) -> Path:
    """A random-init Qwen2 sequence classifier (one output: a reward model) with a tokenizer of its own: another
    vocabulary and another chat template than make_tokenizer's."""
    from transformers import Qwen2ForSequenceClassification

    path = Path(path)
    tokenizer = make_tokenizer(vocab_size=300)
    tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    Qwen2ForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    path = Path(path)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def preference_rows(n: int = 16, kind: str = "explicit") -> list[dict]:
    """Deterministic preference rows in TRL's formats: 'explicit', 'conversational', 'implicit'."""
    polite = ["Sure, happy to help: {}.", "Of course! {} Thank you for asking.", "Gladly. The answer is {}."]
    rude = ["Whatever, {}.", "Figure it out. {}", "Not my problem: {}"]
    questions = [
        ("What is the capital of France?", "Paris"),
        ("How do I bake bread?", "mix flour, water and yeast"),
        ("今天天气怎么样？", "阳光明媚"),
        ("What is 2 + 2?", "4"),
        ("Name a fruit.", "an apple"),
        ("What colour is the sky?", "blue"),
    ]
    rows = []
    for i in range(n):
        q, a = questions[i % len(questions)]
        chosen = polite[i % len(polite)].format(a)
        rejected = rude[(i + 1) % len(rude)].format(a) + " " * (i % 2) + "ok" * (i % 3)
        if kind == "explicit":
            rows.append({"prompt": q, "chosen": " " + chosen, "rejected": " " + rejected})
        elif kind == "conversational":
            prompt = [{"role": "user", "content": q}]
            if i % 2:  # multi-turn: a previous exchange, sometimes with a system message
                prompt = [
                    {"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": "Hello!"},
                    {"role": "assistant", "content": "Hi, how can I help?"},
                ] + prompt
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                }
            )
        elif kind == "implicit":
            head = f"\n\nHuman: {q}\n\nAssistant:"
            rows.append({"chosen": head + " " + chosen, "rejected": head + " " + rejected})
        else:
            raise ValueError(kind)
    return rows


def assert_curves_close(ours: list[dict], theirs: list[dict], keys, steps: int, rtol: float,
                        first_step_rtol: float = 1e-5, present_only: bool = False) -> dict:  # fmt: skip
    """nanodpo's logged records against TRL's log_history, step by step: every key in `keys` (and grad_norm at step 1)
    within first_step_rtol at step 1 and rtol later. Returns the largest relative differences ("step 1", "curve").
    present_only: compare only the keys TRL logged at that step (KTO logs rewards/chosen only for steps that had a
    desirable row); otherwise every key must be there.

    A difference is compared relative to what it is the difference of: fp32 rounding of rewards/margins is relative
    to |rewards/chosen| + |rewards/rejected|, of log_odds_chosen (≈ ℓ_w - ℓ_l for ℓ << 0) to |logps/chosen| +
    |logps/rejected|."""
    assert len(ours) == len(theirs) == steps
    worst = {"step 1": 0.0, "curve": 0.0}
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a["step"] == b["step"] == i + 1
        for key in [k for k in keys if k in b or not present_only] + (["grad_norm"] if i == 0 else []):
            rel = relative_difference(a, b, key)
            where = "step 1" if i == 0 else "curve"
            worst[where] = max(worst[where], rel)
            tol = first_step_rtol if i == 0 else rtol
            assert rel <= tol, f"step {i + 1} {key}: nanodpo {a[key]} vs TRL {b[key]} (relative {rel:.1e})"
    return worst


def relative_difference(ours: dict, theirs: dict, key: str, prefix: str = "") -> float:
    """|ours - theirs| of metric `key`, relative to what it is the difference of (see `assert_curves_close`)."""
    a, b = ours[prefix + key], theirs[prefix + key]
    scale = max(abs(b), 1e-2)
    if key == "rewards/margins":
        scale = max(scale, abs(theirs[prefix + "rewards/chosen"]) + abs(theirs[prefix + "rewards/rejected"]))
    if key == "log_odds_chosen":
        scale = max(scale, abs(theirs[prefix + "logps/chosen"]) + abs(theirs[prefix + "logps/rejected"]))
    return abs(a - b) / scale


def assert_same_step(policy, loss, metrics: dict, ref_loss, ref_metrics: dict, ref_grads: dict, label: str,
                     metric_atol: float) -> None:  # fmt: skip
    """One micro-batch in another batch layout against the padded reference: the loss (relative 1e-5), every metric
    but padding_fraction (relative 1e-5, absolute metric_atol) and every parameter's gradient."""
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5), label
    for name, value in ref_metrics.items():
        if name != "padding_fraction":
            assert metrics[name] == pytest.approx(value, rel=1e-5, abs=metric_atol), (label, name)
    for name, param in policy.named_parameters():
        torch.testing.assert_close(param.grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=f"{label} {name}")


def dpo_forward(policy, reference, batch: dict, cfg, accelerator=None):
    """One micro-batch of train_dpo.py's step for `cfg` (its callables chosen by nanodpo/recipe.py as in a run), in
    the layout `batch` was collated in: (out, the policy's TokenStats, the step's metrics of it)."""
    if "packed_input_ids" not in batch:
        cfg = copy.copy(cfg)
        cfg.batch_layout = "padded"
    step = choose_step(cfg, reference, accelerator)
    out, stats = step.forward(policy, batch)
    return out, stats, step.metrics(out, stats)
