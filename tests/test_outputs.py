"""What a run leaves behind, and what installing nanodpo gives: a chat model that stops at the end of its turn (EOS
aligned with the chat template), a model card in every output folder, and a package that says what it lacks."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

import train_sft
from nanodpo.errors import UserError
from tests import tiny

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
ROOT = Path(__file__).resolve().parents[1]
ANSWER = "Paris is the capital of France."


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A base model as Qwen2.5's ships: ChatML tokens in the vocabulary, but EOS <|endoftext|> (and no template)."""
    root = tmp_path_factory.mktemp("outputs")
    tokenizer = tiny.make_tokenizer()
    tokenizer.eos_token = "<|endoftext|>"
    tokenizer.chat_template = None
    model = tiny.make_model(tokenizer, seed=1)
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    chat = {"messages": [{"role": "user", "content": "What is the capital of France?"},
                         {"role": "assistant", "content": ANSWER}]}  # fmt: skip
    tiny.write_jsonl(root / "chats.jsonl", [chat] * 8)
    tiny.write_jsonl(root / "text.jsonl", [{"text": "The quick brown fox jumps over the lazy dog."}] * 8)
    return root


def sft(base: Path, out: Path, *extra: str, data: str = "chats.jsonl") -> None:
    train_sft.main(["--model", str(base / "base"), "--dataset", str(base / data), "--output_dir", str(out),
                    "--chat_template", "chatml", "--max_steps", "30", "--learning_rate", "1e-2",
                    "--lr_scheduler_type", "constant", "--per_device_train_batch_size", "4", "--max_length", "64",
                    "--disable_tqdm", "--logging_steps", "10", *extra])  # fmt: skip


def greedy(model, tokenizer, max_new_tokens: int = 40, **kwargs) -> list[int]:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, **kwargs)
    return out[0, ids.shape[1] :].tolist()


def test_sft_of_a_base_model_saves_the_end_of_turn_token_as_eos(base, tmp_path, capsys, monkeypatch):
    """SFT with --chat_template chatml on a base whose EOS is <|endoftext|>: the saved tokenizer, config.json and
    generation_config say <|im_end|>, and generate() stops right after the answer it learned."""
    from nanodpo import errors

    monkeypatch.setattr(errors, "_said_once", set())  # the notice is printed once per process
    out = tmp_path / "sft"
    sft(base, out)
    assert "ends a turn with <|im_end|>, the tokenizer's EOS is <|endoftext|>" in capsys.readouterr().out
    tokenizer = AutoTokenizer.from_pretrained(out)
    im_end, endoftext = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert tokenizer.eos_token == "<|im_end|>"
    assert GenerationConfig.from_pretrained(out).eos_token_id == [im_end, endoftext]  # the base's EOS stays one too
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.eos_token_id == im_end
    generated = greedy(model, tokenizer)
    assert tokenizer.decode(generated) == ANSWER + "<|im_end|>"  # stopped at the end of its turn
    # The base's generation settings alone (EOS <|endoftext|>) would not have stopped there.
    assert len(greedy(model, tokenizer, eos_token_id=endoftext)) > len(generated)


def test_lora_sft_keeps_the_eos_with_the_adapter_and_the_merge(base, tmp_path):
    from nanodpo.tools.merge import merge_adapter

    out = tmp_path / "lora"
    sft(base, out, "--use_lora", "--lora_r", "4", "--max_steps", "2")
    im_end = AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("<|im_end|>")
    assert AutoTokenizer.from_pretrained(out).eos_token == "<|im_end|>"
    assert GenerationConfig.from_pretrained(out).eos_token_id[0] == im_end
    merged = merge_adapter(out, tmp_path / "merged")
    assert GenerationConfig.from_pretrained(merged).eos_token_id[0] == im_end
    assert AutoModelForCausalLM.from_pretrained(merged).config.eos_token_id == im_end


def test_text_sft_keeps_the_eos_and_eos_token_chooses_one(base, tmp_path):
    """Text rows never teach the end-of-turn token: the EOS stays. --eos_token (TRL's) is appended to text rows and
    saved; a token the tokenizer lacks is refused."""
    out = tmp_path / "text"
    sft(base, out, "--max_steps", "1", data="text.jsonl")
    assert AutoTokenizer.from_pretrained(out).eos_token == "<|endoftext|>"

    from nanodpo.config import SFTConfig, parse_config
    from nanodpo.model import load_tokenizer
    from nanodpo.sft_data import load_sft_data, set_eos_token

    cfg = parse_config(SFTConfig, ["--model", str(base / "base"), "--dataset", str(base / "text.jsonl")])
    tokenizer = load_tokenizer(cfg)
    set_eos_token(tokenizer, "<|im_end|>")
    assert load_sft_data(cfg, tokenizer)[0].input_ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    out = tmp_path / "chosen"
    sft(base, out, "--max_steps", "1", "--eos_token", "<|im_end|>", data="text.jsonl")
    assert AutoTokenizer.from_pretrained(out).eos_token == "<|im_end|>"
    assert AutoModelForCausalLM.from_pretrained(out).generation_config.eos_token_id[0] == tokenizer.eos_token_id
    with pytest.raises(UserError, match="--eos_token '<eot>': not a token of this tokenizer"):
        sft(base, tmp_path / "bad", "--eos_token", "<eot>")
