"""SFT data: recognise a row's format, check it, tokenize it, and mark which tokens the loss trains on.

Formats, detected from the row's keys (first match wins; other keys such as `id` or `source` are ignored):

    messages            {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": "..."}, ...]}
                        (assistant messages may carry OpenAI-style "tool_calls"; "tool" messages are their results)
    sharegpt            {"conversations": [{"from": "system"|"human"|"gpt"|"function_call"|"observation",
                                            "value": "..."}, ...], "system": ..., "tools": ...}   (LLaMA-Factory)
    prompt_completion   {"prompt": "...", "completion": "..."}, or both as message lists
    alpaca              {"instruction": "...", "input": "..." (optional), "output": "...", "system": ...,
                         "history": [["earlier question", "earlier answer"], ...]}                 (LLaMA-Factory)
    text                {"text": "..."}

A `tools` column (a list of function definitions, or a JSON string of one) is passed to the chat template as
`tools=`, as TRL does. With `--dataset_info`, a row's format and column names are those of its LLaMA-Factory entry.

`normalize_sft_row` turns every row into one of three shapes (`SFTExample`), checking it on the way; any problem is a
`UserError` naming the row and the field ("data.jsonl, row 12, field 'messages[3].role': unknown role 'bot' ..."):

    conversation   messages, sharegpt, alpaca  -> TRL messages (sharegpt and alpaca as nanodpo/llamafactory.py
                   converts them: human -> user, gpt -> assistant, observation -> tool, function_call -> assistant
                   with tool_calls; alpaca: the history's turns, then user = instruction + "\\n" + input)
    prompt/completion                          -> kept as is (two strings, or two message lists)
    text                                       -> kept as is

What the loss trains on (`tokenize_sft_example` returns a `Document`: input_ids and a 0/1 loss_mask):

    conversation       every assistant turn, in every round of a multi-turn chat: its content AND its end-of-turn
                       token (`<|im_end|>`), but not the turn header (`<|im_start|>assistant\\n`) nor the whitespace
                       the template writes after the end-of-turn token. Equal to TRL's `assistant_only_loss=True`
                       with a `{% generation %}...{% endgeneration %}` template around `content + '<|im_end|>'`.
                       Function calls are assistant turns (trained); tool results are not.
    prompt/completion  the completion only (TRL's `completion_only_loss`): everything after the tokens of the prompt
                       (string data: the completion gets EOS appended, as TRL does).
    text               every token (EOS appended, as TRL does).
    train_on_prompt=True turns the mask off: every token is trained on.

How assistant turns are found, WHILE RENDERING (no `{% generation %}` markers needed, no token patterns searched):
for the assistant message i, render (\\n written as ⏎)

    before  = messages[:i] + generation prompt   "...user⏎Hi<|im_end|>⏎<|im_start|>assistant⏎"
    through = messages[:i+1]                     "...user⏎Hi<|im_end|>⏎<|im_start|>assistant⏎Hello!<|im_end|>⏎"
                                                                                             ^^^^^^^^^^^^^^^^ trained

The turn's text starts where `before` and `through` part (just after the header) and ends at the end of `through`
with trailing whitespace removed (just after `<|im_end|>`). These character spans of the whole rendered conversation
become token spans through the fast tokenizer's offsets (`char_to_token`, as transformers does for generation
markers). It needs a template that renders a conversation's beginning the same way as the whole conversation
(`through` must be a prefix of the full render); templates that rewrite earlier turns (e.g. ones that drop past
reasoning) are refused with a clear error.

Chat templates: the tokenizer's own, or `--chat_template chatml` (built-in plain ChatML, for tokenizers that have
`<|im_start|>`/`<|im_end|>` but no template, or whose own adds more, as Qwen2.5's default system prompt), or a path to
a Jinja file.

End of turn and EOS: a base model's tokenizer often ends turns with one token and sequences with another (Qwen2.5
base: ChatML's `<|im_end|>`, EOS `<|endoftext|>`). A model trained on conversations learns to close its turn with the
template's token, so `use_end_of_turn_as_eos` saves that token as the EOS (tokenizer and generation_config), or
generation would run on to the token limit. `--eos_token` chooses the EOS explicitly instead (TRL's `eos_token`: it
is also the EOS appended to text rows and string completions).

max_length (`prepare_sft_documents`): a longer example is truncated keeping its start (TRL's default
`truncation_mode="keep_start"`); if no trained token is left it is dropped (as TRL does). Both are counted in
`SFTDataStats`.
"""

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError

from nanodpo.data import load_split_rows
from nanodpo.dpo_batch import common_prefix_length
from nanodpo.errors import UserError, say_once
from nanodpo.llamafactory import (
    DatasetInfo,
    check_tools_rendered,
    convert,
    convert_messages,
    default_layout,
    kind,
    parse_tools,
    text_field,
)
from nanodpo.packing import Document

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# format name -> the keys that identify it, tried in this order
FORMATS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}
FORMAT_HELP = (
    "'messages' (role/content), 'conversations' (ShareGPT from/value), 'prompt' + 'completion', "
    "'instruction' + 'output' (alpaca, optional 'input'), or 'text'"
)


@dataclass
class SFTExample:
    """A checked SFT row in one of three shapes: `messages`, or `prompt` + `completion`, or `text`."""

    format: str  # the source format detected: a key of FORMATS
    messages: list[dict] | None = None  # TRL messages: role system/user/assistant/tool, content, maybe tool_calls
    prompt: str | list[dict] | None = None
    completion: str | list[dict] | None = None
    text: str | None = None
    tools: list[dict] | None = None  # passed to the chat template as tools=


# ---------------------------------------------------------------- normalising rows


def detect_format(row: Any, where: str) -> str:
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected an object with the fields of an SFT example, got {kind(row)}")
    for name, keys in FORMATS.items():
        if all(key in row for key in keys):
            return name
    hint = ""
    if "chosen" in row or "rejected" in row:
        hint = " (this looks like preference data: train it with train_dpo.py)"
    elif "prompt" in row:
        hint = " ('prompt' needs a 'completion')"
    elif "instruction" in row:
        hint = " ('instruction' needs an 'output')"
    raise UserError(f"{where}: unknown SFT format, found fields {sorted(row)}{hint}; expected {FORMAT_HELP}")


def _check_conversation(messages: list[dict[str, str]], where: str, name: str) -> list[dict[str, str]]:
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise UserError(f"{where}, field '{name}': no assistant turn to train on (roles: {', '.join(roles)})")
    if roles[0] == "assistant":
        raise UserError(f"{where}, field '{name}[0]': the conversation starts with an assistant turn (no prompt)")
    return messages


def normalize_sft_row(row: dict, where: str, info: DatasetInfo | None = None) -> SFTExample:
    """Detect the row's format and check it; `where` ("data.jsonl, row 12") starts every error message. `info` is
    the row's --dataset_info entry: its formatting and column names then decide how the row is read."""
    fmt = info.formatting if info is not None and isinstance(row, dict) else detect_format(row, where)
    if fmt in ("sharegpt", "alpaca"):  # LLaMA-Factory's formats
        info = info or default_layout(row, fmt)
        trl = convert(row, where, info, "sft")
        name = info.messages if fmt == "sharegpt" else info.prompt
        return SFTExample(fmt, messages=_check_conversation(trl["messages"], where, name), tools=trl.get("tools"))
    if fmt == "text":
        return SFTExample(fmt, text=text_field(row["text"], where, "text", nonempty=True))
    tools = parse_tools(row.get("tools"), where, "tools", wrap=False)
    if fmt == "messages":
        messages = _check_conversation(convert_messages(row["messages"], where, "messages"), where, "messages")
        return SFTExample(fmt, messages=messages, tools=tools)
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, list) and isinstance(completion, list):
        prompt = convert_messages(prompt, where, "prompt")
        completion = convert_messages(completion, where, "completion")
        if "assistant" not in [m["role"] for m in completion]:
            raise UserError(f"{where}, field 'completion': no assistant turn to train on")
        return SFTExample(fmt, prompt=prompt, completion=completion, tools=tools)
    if isinstance(prompt, str) and isinstance(completion, str):
        text_field(prompt, where, "prompt", nonempty=True)
        text_field(completion, where, "completion", nonempty=True)
        return SFTExample(fmt, prompt=prompt, completion=completion)
    raise UserError(
        f"{where}, fields 'prompt' and 'completion': expected two strings or two message lists, "
        f"got {kind(prompt)} and {kind(completion)}"
    )


# ---------------------------------------------------------------- chat templates and tokenizing


def resolve_chat_template(tokenizer, chat_template: str | None) -> str | None:
    """The template text for --chat_template: None (the tokenizer's own), "chatml", a Jinja file, or template text.

    Returns None to mean "the tokenizer's own". A missing template is reported when a conversation needs one.
    """
    if chat_template is None:
        return None
    if chat_template == "chatml":
        vocab = tokenizer.get_vocab()
        missing = [tok for tok in ("<|im_start|>", "<|im_end|>") if tok not in vocab]
        if missing:
            raise UserError(
                f"--chat_template chatml: the tokenizer has no {' or '.join(missing)} token; use a tokenizer that has "
                "them (Qwen's do) or pass a Jinja template file written for this tokenizer"
            )
        return CHATML_TEMPLATE
    if "{%" in chat_template or "{{" in chat_template:
        return chat_template
    path = Path(chat_template)
    if not path.is_file():
        raise UserError(f"--chat_template {chat_template}: not 'chatml' and no such file")
    return path.read_text(encoding="utf-8")


def set_eos_token(tokenizer, token: str, flag: str = "--eos_token") -> None:
    """Make `token` the tokenizer's EOS (it must be one token of its vocabulary)."""
    if token not in tokenizer.get_vocab():
        raise UserError(f"{flag} {token!r}: not a token of this tokenizer (name one token, e.g. <|im_end|>)")
    tokenizer.eos_token = token


def end_of_turn_token(tokenizer) -> str | None:
    """The token the tokenizer's chat template closes an assistant turn with (ChatML `<|im_end|>`, Llama 3
    `<|eot_id|>`): what follows the content of a rendered assistant turn, if that is one token. None otherwise, or
    without a template."""
    if not tokenizer.chat_template:
        return None
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    render = _renderer(tokenizer, None, "the chat template", None)
    try:
        [(start, end)] = assistant_char_spans(messages, render, "the chat template")
    except (UserError, ValueError):  # a template that cannot render this exchange has no end-of-turn token to find
        return None
    turn = render(messages, False)[start:end]
    tail = turn[turn.rfind("Hello") + len("Hello") :].strip()
    return tail if tail in tokenizer.get_vocab() else None


def use_end_of_turn_as_eos(tokenizer, documents: list[Document]) -> bool:
    """After training on `documents`: if they teach the model to emit the chat template's end-of-turn token and it
    is not the EOS, make it the EOS (saved with the tokenizer; see the module docstring) and say so. True if changed."""
    token = end_of_turn_token(tokenizer)
    if token is None or token == tokenizer.eos_token:
        return False
    token_id = tokenizer.convert_tokens_to_ids(token)
    if not any(_trains(doc, token_id) for doc in documents):
        return False
    say_once(
        f"the chat template ends a turn with {token}, the tokenizer's EOS is {tokenizer.eos_token}: the model is "
        f"saved with EOS {token} (tokenizer and generation_config), so generation stops at the end of its turn "
        "(--eos_token chooses another)"
    )
    tokenizer.eos_token = token
    return True


def _trains(doc: Document, token_id: int) -> bool:
    """Whether the loss of `doc` covers the token `token_id` somewhere."""
    return token_id in doc.input_ids and any(m for t, m in zip(doc.input_ids, doc.loss_mask) if t == token_id)


def _renderer(tokenizer, chat_template: str | None, where: str, tools: list | None) -> Callable[[list, bool], str]:
    if chat_template is None and not tokenizer.chat_template:
        raise UserError(
            f"{where}: conversational data needs a chat template and the tokenizer has none; "
            "pass --chat_template chatml (or a Jinja template file)"
        )

    def render(messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(
                messages, chat_template=chat_template, tokenize=False, add_generation_prompt=add_generation_prompt,
                tools=tools,
            )  # fmt: skip
        except (TemplateError, TypeError) as err:  # TypeError: e.g. a template adding a null content to a string
            raise UserError(f"{where}: the chat template refused this conversation: {err}") from None

    return render


def _check_tools(tokenizer, chat_template: str | None, where: str, messages: list[dict], tools: list | None) -> None:
    """A clear error when the template drops the conversation's tools or function calls (`check_tools_rendered`)."""

    def render(messages: list[dict], tools: list | None) -> str:
        return _renderer(tokenizer, chat_template, where, tools)(messages, False)

    check_tools_rendered(render, messages, tools, where)


def assistant_char_spans(messages: list[dict[str, str]], render, where: str) -> list[tuple[int, int]]:
    """[start, end) character spans, in the render of the whole conversation, of each assistant turn's trained text
    (content + end-of-turn token), found by rendering the conversation prefix by prefix (see the module docstring)."""
    full = render(messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:i], True)  # ... ends with the assistant header
        through = render(messages[: i + 1], False)  # ... ends with this assistant turn
        if not full.startswith(through):
            raise UserError(
                f"{where}: the chat template renders the first {i + 1} messages differently from the start of the "
                "whole conversation, so the assistant turns cannot be located; use a template that renders earlier "
                "turns unchanged, or --train_on_prompt"
            )
        start = common_prefix_length(before, through)  # the turn starts where the header ends
        end = len(through.rstrip())  # ... and ends at its end-of-turn token, before the template's trailing newline
        if end > start:
            spans.append((start, end))
    return spans


def _char_spans_to_mask(encoding, spans: list[tuple[int, int]], length: int) -> list[int]:
    """Tokens from the one holding a span's first character to the one holding its last (as transformers does)."""
    mask = [0] * length
    for start, end in spans:
        first = next((t for c in range(start, end) if (t := encoding.char_to_token(c)) is not None), None)
        last = next((t for c in range(end - 1, start - 1, -1) if (t := encoding.char_to_token(c)) is not None), None)
        if first is not None:  # (a span of characters no token holds, if a normalizer removed them all)
            mask[first : last + 1] = [1] * (last + 1 - first)
    return mask


def tokenize_sft_example(
    example: SFTExample,
    tokenizer,
    where: str,
    chat_template: str | None = None,
    train_on_prompt: bool = False,
) -> Document:
    """Token ids and loss mask of one example (see the module docstring). `chat_template` is template text (from
    `resolve_chat_template`) or None for the tokenizer's own."""
    if example.messages is not None:
        render = _renderer(tokenizer, chat_template, where, example.tools)
        _check_tools(tokenizer, chat_template, where, example.messages, example.tools)
        text = render(example.messages, False)
        encoding = tokenizer(text, add_special_tokens=False)  # what apply_chat_template(tokenize=True) does
        ids = encoding["input_ids"]
        if train_on_prompt:
            return Document(ids, [1] * len(ids))
        if not tokenizer.is_fast:
            raise UserError("assistant-only loss needs a fast tokenizer (character offsets); or use --train_on_prompt")
        spans = assistant_char_spans(example.messages, render, where)
        return Document(ids, _char_spans_to_mask(encoding, spans, len(ids)))

    if example.prompt is not None:
        if isinstance(example.prompt, list):  # conversational: the prompt ends with the assistant header
            render = _renderer(tokenizer, chat_template, where, example.tools)
            _check_tools(tokenizer, chat_template, where, example.prompt + example.completion, example.tools)
            prompt_ids = tokenizer(render(example.prompt, True), add_special_tokens=False)["input_ids"]
            ids = tokenizer(render(example.prompt + example.completion, False), add_special_tokens=False)["input_ids"]
        else:  # strings, tokenized as TRL does (special tokens such as BOS added), EOS appended to the completion
            completion, eos = example.completion, tokenizer.eos_token or ""
            if not completion.endswith(eos):
                completion += eos
            prompt_ids = tokenizer(example.prompt)["input_ids"]
            ids = tokenizer(example.prompt + completion)["input_ids"]
        # The completion starts where the two tokenizations part: a token merged across the boundary counts as
        # completion (TRL's `common_prefix_length`).
        n_prompt = 0 if train_on_prompt else common_prefix_length(prompt_ids, ids)
        return Document(ids, [0] * n_prompt + [1] * (len(ids) - n_prompt))

    text, eos = example.text, tokenizer.eos_token or ""
    if not text.endswith(eos):
        text += eos
    ids = tokenizer(text)["input_ids"]
    return Document(ids, [1] * len(ids))


# ---------------------------------------------------------------- a whole data set


@dataclass
class SFTDataStats:
    rows: int = 0  # rows read
    truncated: int = 0  # longer than max_length: cut, keeping the start
    dropped: int = 0  # no trained token left after truncation: skipped
    documents: int = 0  # examples kept
    tokens: int = 0  # tokens in the kept examples
    loss_tokens: int = 0  # ... of which the loss trains on
    formats: Counter = field(default_factory=Counter)  # rows per detected format

    def summary(self) -> str:
        formats = ", ".join(f"{n} {name}" for name, n in sorted(self.formats.items()))
        return (
            f"{self.rows} rows ({formats}): {self.documents} examples, {self.tokens} tokens, "
            f"{self.loss_tokens} trained; {self.truncated} truncated to max_length, {self.dropped} dropped "
            "(no trained token left)"
        )


def prepare_sft_documents(
    rows: Iterable[dict],
    tokenizer,
    source: str = "data",
    max_length: int | None = None,
    chat_template: str | None = None,
    train_on_prompt: bool = False,
) -> tuple[list[Document], SFTDataStats]:
    """Normalise, tokenize and truncate every row. Errors name "{source}, row {n}" with n counted from 1.

    chat_template: the --chat_template value (None, "chatml", a file path), resolved here.
    max_length: longer examples are truncated keeping the start, and dropped if no trained token is left.
    """
    template = resolve_chat_template(tokenizer, chat_template)
    located = ((f"{source}, row {n}", row, None) for n, row in enumerate(rows, start=1))
    return _tokenize_rows(located, tokenizer, max_length, template, train_on_prompt)


def _tokenize_rows(
    located_rows, tokenizer, max_length, template, train_on_prompt
) -> tuple[list[Document], SFTDataStats]:
    """(where, row, its dataset_info entry or None) -> documents truncated to max_length (keeping the start),
    dropped when nothing is trained."""
    stats = SFTDataStats()
    documents = []
    for where, row, info in located_rows:
        example = normalize_sft_row(row, where, info)
        doc = tokenize_sft_example(example, tokenizer, where, template, train_on_prompt)
        stats.rows += 1
        stats.formats[example.format] += 1
        if max_length is not None and len(doc.input_ids) > max_length:
            doc = Document(doc.input_ids[:max_length], doc.loss_mask[:max_length])
            stats.truncated += 1
        if not any(doc.loss_mask):
            stats.dropped += 1
            continue
        documents.append(doc)
        stats.documents += 1
        stats.tokens += len(doc.input_ids)
        stats.loss_tokens += sum(doc.loss_mask)
    return documents, stats


def load_sft_data(cfg, tokenizer, split: str = "train") -> list[Document] | None:
    """Tokenized SFT documents for `split` "train" or "eval" (rows chosen by `nanodpo.data.load_split_rows`);
    None when no evaluation data is configured. Prints a one-line summary; bad rows raise `UserError`."""
    rows = load_split_rows(cfg, split)
    if rows is None:
        return None
    located = ((row.where(), row.data, row.dataset_info) for row in rows)
    documents, stats = _tokenize_rows(located, tokenizer, cfg.max_length, None, cfg.train_on_prompt)
    print(f"sft data ({split}): {stats.summary()}")
    if not documents:
        raise UserError(f"sft data ({split}): no example left to train on ({stats.summary()})")
    return documents
