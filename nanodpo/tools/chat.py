"""Talk to a trained model: an interactive chat, one-shot answers, and two models side by side.

Usage
-----
    python -m nanodpo.tools.chat --model out/demo/dpo                         # interactive chat
    python -m nanodpo.tools.chat --model out/demo/dpo --system "You are a grumpy assistant."
    python -m nanodpo.tools.chat --model out/demo/dpo --prompt "What is the capital of France?"   # one answer
    python -m nanodpo.tools.chat --model out/demo/dpo --compare out/demo/sft --prompt "Hi" --prompt "你好"
    python -m nanodpo.tools.chat --model out/lora_run --base Qwen/Qwen2.5-0.5B-Instruct   # a LoRA adapter

--model is a model folder (a full or merged model: config.json + weights), a LoRA adapter folder
(adapter_config.json: its base model is loaded first — the one named in the adapter, or --base), or a hub id.
The tokenizer comes from the same folder (or the base's, for an adapter saved without one).

In the interactive chat, type a message and press Enter. The conversation is remembered (the oldest turns are dropped
when it no longer fits the model's context). Commands:
    /system TEXT    set the system prompt and start a new conversation   (/system - removes it)
    /system         show the system prompt
    /clear          start a new conversation
    /quit           leave (or Ctrl-D)
With --compare, every message is answered by both models, one after the other, each labelled.

Generation: the prompt is rendered with the tokenizer's chat template (--chat_template chatml to use ChatML instead),
then tokens are produced one at a time until the end-of-sequence token or --max_new_tokens. Greedy by default
(always the most likely token, so the same question gives the same answer); --temperature > 0 samples, with
--top_p nucleus filtering, reproducibly with --seed. QLoRA adapters load on a full-precision base here (merging
to a plain model: python -m nanodpo.tools.merge).

From Python (the demo uses these):
    from nanodpo.tools.chat import load_for_chat, generate_answer
    model, tokenizer = load_for_chat("out/demo/dpo")
    generate_answer(model, tokenizer, [{"role": "user", "content": "Hi"}], max_new_tokens=64)
"""

import argparse
import json
import re
import sys
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging

from nanodpo.errors import UserError, exit_on_user_error
from nanodpo.generation import new_kv_cache
from nanodpo.sft_data import resolve_chat_template

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# ----------------------------------------------------------------------------------------------------------------
# 1. Loading: a full model, or a LoRA adapter on its base


def _load_tokenizer(path: str):
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load a tokenizer from '{path}': {err}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_model(path: str, dtype: str, what: str):
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    except (OSError, ValueError) as err:
        if not Path(path).exists():
            raise UserError(f"{what} '{path}' is neither a local folder nor a model on the hub ({err})") from None
        raise UserError(f"cannot load {what} '{path}': {err}") from None


def _could_be_hub_id(path: str) -> bool:
    return re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path) is not None and not path.startswith(".")


def adapter_base(adapter_dir: str | Path, base: str | None = None) -> str:
    """The base model of a LoRA adapter folder: `base` if given, else the one named in its adapter_config.json."""
    config_path = Path(adapter_dir) / "adapter_config.json"
    if not config_path.is_file():
        raise UserError(f"{adapter_dir}: not a LoRA adapter folder (no adapter_config.json)")
    if base:
        return base
    name = json.loads(config_path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not name:
        raise UserError(f"{config_path} names no base model (base_model_name_or_path): pass --base PATH")
    if not Path(name).exists() and not _could_be_hub_id(name):
        raise UserError(f"the base model '{name}' named in {config_path} does not exist here: pass --base PATH")
    return name


def load_for_chat(path: str | Path, base: str | None = None, dtype: str = "auto", device: str | None = None):
    """(model, tokenizer) ready to generate, in eval mode.

    `path` is a model folder, a LoRA adapter folder (its base is loaded, then the adapter on top with
    `PeftModel.from_pretrained`; `base` overrides the base named in adapter_config.json) or a hub id.
    dtype: "auto" (as saved), "float32", "bfloat16", "float16". device: default cuda if available, else cpu.
    """
    path = str(path)
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    folder = Path(path)
    if not folder.exists() and not _could_be_hub_id(path):
        raise UserError(f"{path}: no such folder")
    if folder.is_dir() and (folder / "adapter_config.json").is_file():
        base_name = adapter_base(folder, base)
        base_model = _load_model(base_name, dtype, "the base model")
        # Imported here: the training scripts import this module (the demo's evaluation), and peft pulls in
        # bitsandbytes, ~180 MB of RSS and seconds of start-up that a run without an adapter never uses.
        from peft import PeftModel

        model = PeftModel.from_pretrained(base_model, path)
        has_tokenizer = any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
        tokenizer = _load_tokenizer(path if has_tokenizer else base_name)
    elif folder.is_dir() and not (folder / "config.json").is_file():
        raise UserError(f"{path}: neither a model (config.json) nor a LoRA adapter (adapter_config.json) folder")
    else:
        model = _load_model(path, dtype, "the model")
        tokenizer = _load_tokenizer(path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    model.eval()
    return model, tokenizer


# ----------------------------------------------------------------------------------------------------------------
# 2. Generation: render the chat template, then one forward pass per new token (what `model.generate` does inside)


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The conversation as the model sees it: chat template with the assistant's turn opened at the end."""
    if not tokenizer.chat_template:
        raise UserError(
            "the tokenizer has no chat template, so it cannot format a conversation (is this a pretrained-only "
            "model? chat with the SFT or DPO output, or pass --chat_template chatml)"
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def stop_token_ids(model, tokenizer) -> set[int]:
    """Generation stops at the tokenizer's EOS and at any EOS the model's generation_config lists (Qwen has two)."""
    ids = set()
    for value in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return ids


def next_token(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> int:
    """Pick the next token from the last position's logits: greedy (temperature 0), or sample from the
    temperature-scaled distribution restricted to the smallest set of tokens whose probability reaches top_p."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep a token if the tokens ranked before it have not yet reached top_p (the top token is always kept).
        keep = (sorted_probs.cumsum(-1) - sorted_probs) < top_p
        keep[0] = True
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate_tokens(
    model,
    tokenizer,
    messages: list[dict],
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> list[int]:
    """The ids of the answer (without the prompt and without the EOS that ended it)."""
    device = next(model.parameters()).device
    prompt_ids = tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False, return_tensors="pt")
    input_ids = prompt_ids.input_ids.to(device)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    stops = stop_token_ids(model, tokenizer)
    max_positions = getattr(model.config, "max_position_embeddings", None) or float("inf")
    length = input_ids.shape[1]
    answer: list[int] = []
    kv_cache = new_kv_cache(model)  # keys/values of every token so far, so each step only runs the newest token
    for _ in range(max_new_tokens):
        if length >= max_positions:
            break
        out = model(input_ids=input_ids, use_cache=True, **kv_cache)
        token = next_token(out.logits[0, -1], temperature, top_p, generator)
        if token in stops:
            break
        answer.append(token)
        input_ids = torch.tensor([[token]], device=device)
        length += 1
    return answer


def generate_answer(
    model,
    tokenizer,
    messages: list[dict],
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> str:
    """The model's reply to `messages` ([{"role": "system"|"user"|"assistant", "content": ...}, ...]) as text.

    Greedy when temperature is 0; sampled otherwise (with `seed`, the same answer every time)."""
    ids = generate_tokens(model, tokenizer, messages, max_new_tokens, temperature, top_p, seed)
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


# ----------------------------------------------------------------------------------------------------------------
# 3. Conversations


class Chat:
    """One model's side of a conversation: the system prompt and the turns so far."""

    def __init__(self, label: str, model, tokenizer, args):
        self.label, self.model, self.tokenizer, self.args = label, model, tokenizer, args
        self.system: str | None = args.system
        self.turns: list[dict] = []

    def messages(self, user_text: str) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.turns + [{"role": "user", "content": user_text}]

    def fit(self, user_text: str) -> list[dict]:
        """The messages to send, dropping the oldest exchanges while prompt + answer would not fit the context."""
        limit = getattr(self.model.config, "max_position_embeddings", None)
        messages = self.messages(user_text)
        while limit and self.turns:
            prompt = render_prompt(self.tokenizer, messages)
            if len(self.tokenizer(prompt, add_special_tokens=False).input_ids) + self.args.max_new_tokens <= limit:
                break
            self.turns = self.turns[2:]  # one user message and its answer
            messages = self.messages(user_text)
        return messages

    def reply(self, user_text: str, remember: bool = True) -> str:
        a = self.args
        answer = generate_answer(
            self.model, self.tokenizer, self.fit(user_text), a.max_new_tokens, a.temperature, a.top_p, a.seed
        )
        if remember:
            self.turns += [{"role": "user", "content": user_text}, {"role": "assistant", "content": answer}]
        return answer


def print_answers(chats: list[Chat], user_text: str, remember: bool, out=None) -> None:
    """One model: the answer alone. Several: each answer under its model's label."""
    out = out or sys.stdout
    if len(chats) == 1:
        print(chats[0].reply(user_text, remember), file=out, flush=True)
        return
    for chat in chats:
        answer = chat.reply(user_text, remember)
        print(f"[{chat.label}]\n{answer}", file=out, flush=True)
    print(file=out)


HELP = "commands: /system TEXT (new system prompt), /system - (none), /system (show), /clear, /quit"


def _read_line(stdin, out) -> str | None:
    """One line of input after a "user> " prompt; None at end of input. At a terminal, `input()` with readline gives
    line editing (arrow keys, and backspace over Chinese characters)."""
    if stdin is sys.stdin and out is sys.stdout and stdin.isatty():
        try:
            import readline  # noqa: F401  (installs line editing for input())
        except ImportError:
            pass
        try:
            return input("user> ")
        except EOFError:
            return None
    print("user> ", end="", file=out, flush=True)
    return stdin.readline() or None


def repl(chats: list[Chat], stdin=None, out=None) -> None:
    """The interactive loop (reads stdin line by line, so it can also be fed from a file or a pipe)."""
    stdin, out = stdin or sys.stdin, out or sys.stdout
    labels = " vs ".join(chat.label for chat in chats)
    print(f"chatting with {labels}. {HELP}", file=out)
    if chats[0].system:
        print(f"system: {chats[0].system}", file=out)
    try:
        _loop(chats, stdin, out)
    except KeyboardInterrupt:  # Ctrl-C, also in the middle of an answer: leave quietly
        print(file=out)


def _loop(chats: list[Chat], stdin, out) -> None:
    while True:
        line = _read_line(stdin, out)
        if line is None:  # EOF (Ctrl-D)
            print(file=out)
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return
        if text == "/clear":
            for chat in chats:
                chat.turns = []
            print("(new conversation)", file=out)
        elif text == "/system":
            print(f"system: {chats[0].system or '(none)'}", file=out)
        elif text.startswith("/system "):
            system = text[len("/system ") :].strip()
            for chat in chats:
                chat.system = None if system == "-" else system
                chat.turns = []
            print(f"system: {chats[0].system or '(none)'} (new conversation)", file=out)
        elif text.startswith("/"):
            print(HELP, file=out)
        else:
            print_answers(chats, text, remember=True, out=out)


# ----------------------------------------------------------------------------------------------------------------
# 4. Command line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m nanodpo.tools.chat", description="Chat with a trained model.")
    p.add_argument("--model", required=True, help="model folder, LoRA adapter folder, or hub id")
    p.add_argument("--base", default=None, help="base model of a LoRA adapter (default: the one it names)")
    p.add_argument("--compare", default=None, help="a second model (folder/adapter/hub id) to answer side by side")
    p.add_argument("--compare_base", default=None, help="base model of --compare, if it is a LoRA adapter")
    p.add_argument("--prompt", action="append", default=None, help="answer this and exit (repeatable)")
    p.add_argument("--system", default=None, help="system prompt (default: none)")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling: keep the top tokens up to this mass")
    p.add_argument("--seed", type=int, default=None, help="makes sampled answers reproducible")
    p.add_argument("--dtype", default="auto", choices=list(DTYPES))
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--chat_template", default=None, help="'chatml', a Jinja file, or template text")
    args = p.parse_args(argv)
    if args.max_new_tokens <= 0:
        raise UserError(f"--max_new_tokens must be positive, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise UserError(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top_p must be in (0, 1], got {args.top_p}")
    return args


def _load(path: str, base: str | None, args):
    model, tokenizer = load_for_chat(path, base=base, dtype=args.dtype, device=args.device)
    if args.chat_template:
        tokenizer.chat_template = resolve_chat_template(tokenizer, args.chat_template)
    return model, tokenizer


def _quiet() -> None:
    """A chat shows answers only: no weight-loading progress bars, no library deprecation notices."""
    logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


def main(argv=None, stdin=None, out=None) -> None:
    stdin, out = stdin or sys.stdin, out or sys.stdout
    args = parse_args(argv)
    _quiet()
    chats = [Chat(args.model, *_load(args.model, args.base, args), args)]
    if args.compare:
        chats.append(Chat(args.compare, *_load(args.compare, args.compare_base, args), args))
    if args.prompt:
        for prompt in args.prompt:
            if len(chats) > 1 or len(args.prompt) > 1:
                print(f">>> {prompt}", file=out)
            print_answers(chats, prompt, remember=False, out=out)
    else:
        repl(chats, stdin, out)


if __name__ == "__main__":
    exit_on_user_error(main)
