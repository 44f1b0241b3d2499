"""Train the demo's tokenizer: a small byte-level BPE (like Qwen2's, with a ChatML chat template) on Little World.

    python -m nanodpo.demo.make_tokenizer                 # rewrites nanodpo/assets/tokenizer/ (shipped in git)
    python -m nanodpo.demo.make_tokenizer --out /tmp/tok  # somewhere else

What it builds, step by step:
1. Text: the demo's pretraining corpus and SFT conversations (seed 0, default sizes; see `world.py`).
2. Pre-tokenizer: Qwen2's regex split (words, single digits, punctuation runs, spaces; here also one piece per
   Chinese character) then byte-level: every string is a sequence of bytes, so the 256 byte tokens cover any text
   (a Chinese character is 3 bytes in UTF-8). BPE then learns merges, bytes -> characters -> words, until every
   Chinese character and English word of the corpus is a single token (or VOCAB_SIZE is reached).
3. BPE training with `tokenizers`, the three special tokens first:
   <|endoftext|> (id 0, padding), <|im_start|> (id 1), <|im_end|> (id 2, end of a turn = eos).
4. Wrapped as a `transformers.PreTrainedTokenizerFast` with a ChatML chat template like Qwen2.5's and saved with
   `save_pretrained` (tokenizer.json, tokenizer_config.json, chat_template.jinja).

Deterministic: the same text in the same order, trained single-threaded, gives byte-identical files (the tests
retrain into a temporary folder and compare with the shipped ones).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from nanodpo.demo import TOKENIZER_DIR, world

# An upper bound: Little World's text has only ~1,200 pieces worth merging (256 bytes + 3 special tokens + every
# Chinese character and every English word of the world), so BPE stops there (at about 1,200 tokens).
VOCAB_SIZE = 2048
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MODEL_MAX_LENGTH = 512

# Qwen2's pre-tokenizer split (contractions, letter runs, ONE digit at a time so numbers are read digit by digit,
# punctuation runs, newlines, spaces), with one change: every Chinese character (\p{Han}) is a piece of its own.
# Qwen2 keeps a run of Chinese characters together, so BPE learns whole phrases ("住在枫叶镇") and the same
# characters get split differently in different sentences; on a tiny corpus and a tiny model, one token per
# character is easier to learn from and to read.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|\p{Han}|[^\r\n\p{L}\p{N}]?[^\P{L}\p{Han}]+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ChatML, as Qwen2.5 renders it (without Qwen's default system prompt and tool calls):
#   <|im_start|>system\n...<|im_end|>\n<|im_start|>user\n...<|im_end|>\n<|im_start|>assistant\n...<|im_end|>\n
# {% generation %} marks the assistant's tokens for `return_assistant_tokens_mask` (it changes nothing rendered).
CHAT_TEMPLATE = """\
{%- for message in messages %}
    {%- if message['role'] == 'assistant' %}
        {{- '<|im_start|>assistant\\n' }}
        {%- generation %}
            {{- message['content'] + '<|im_end|>' }}
        {%- endgeneration %}
        {{- '\\n' }}
    {%- else %}
        {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


def training_texts(seed: int = world.DEFAULT_SEED) -> list[str]:
    """The text BPE learns from, in a fixed order: pretraining documents, then SFT conversations (role + content)."""
    texts = [doc["text"] for doc in world.pretrain_corpus(seed)]
    for conv in world.sft_conversations(seed):
        texts.append("\n".join(f"{m['role']}\n{m['content']}" for m in conv["messages"]))
    return texts


def train_tokenizer(out_dir: str | Path | None = TOKENIZER_DIR, vocab_size: int = VOCAB_SIZE):
    """Train, wrap and (if out_dir) save the tokenizer; returns the PreTrainedTokenizerFast."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # One thread: light on a shared CPU, and the same merges every run.
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        tok.train_from_iterator(training_texts(), trainer=trainer)
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="right",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(out_dir)
    return tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the nanodpo demo tokenizer (byte-level BPE + ChatML).")
    parser.add_argument("--out", default=str(TOKENIZER_DIR), help=f"output folder (default: {TOKENIZER_DIR})")
    parser.add_argument("--vocab_size", type=int, default=VOCAB_SIZE)
    args = parser.parse_args(argv)
    tokenizer = train_tokenizer(args.out, args.vocab_size)
    files = sorted(p for p in Path(args.out).iterdir() if p.is_file())
    total = sum(p.stat().st_size for p in files)
    print(f"vocab {len(tokenizer)} tokens; {len(files)} files, {total / 1024:.0f} KiB in {args.out}")
    for p in files:
        print(f"  {p.name:24s} {p.stat().st_size:8d} bytes")


if __name__ == "__main__":
    main()
