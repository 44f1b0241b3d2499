"""Preference data: formats, prompt extraction and tokenization — the same token ids as TRL 1.16.

    examples = load_preference_data(cfg, tokenizer)            # [{"prompt_ids", "chosen_ids", "rejected_ids"}, ...]
    batch = PreferenceCollator(tokenizer.pad_token_id, cfg.max_length, cfg.truncation_mode)(examples[:4])
                                                                 # nanodpo/dpo_batch.py: the [chosen; rejected] batch

Row formats (TRL's; every row needs `chosen` and `rejected`):

    explicit prompt    {"prompt": "What is 2+2?", "chosen": " 4.", "rejected": " 5."}
    conversational     {"prompt": [{"role": "user", "content": "What is 2+2?"}],
                        "chosen": [{"role": "assistant", "content": "4."}], "rejected": [...]}
    implicit prompt    {"chosen": "\\n\\nHuman: What is 2+2?\\n\\nAssistant: 4.", "rejected": "...Assistant: 5."}
                       (or full conversations as lists of messages): the prompt is the shared beginning.

and LLaMA-Factory's, converted first to the conversational row above (nanodpo/llamafactory.py):

    sharegpt           {"conversations": [{"from": "human", "value": "What is 2+2?"}],
                        "chosen": {"from": "gpt", "value": "4."}, "rejected": {"from": "gpt", "value": "5."}}
    alpaca             {"instruction": "What is 2+2?", "input": "", "chosen": "4.", "rejected": "5."}

A `tools` column (a list of function definitions, or a JSON string of one) is passed to the chat template as
`tools=`, as TRL does; messages may carry OpenAI-style `tool_calls`, and tool results have the role `tool`.

Per row, in order (TRL's `DPOTrainer._prepare_dataset`, checked token for token in tests/test_dpo_data.py):

1. Validate (before any training): chosen/rejected present, strings or non-empty lists of messages of the same
   kind; messages are dicts with a known role and string content. Errors name file, row and field.
2. Prompt: the `prompt` column, unless it is missing — or (TRL's `maybe_extract_prompt` rule) it is a string while
   chosen is a conversation, or the reverse, as in datasets whose `chosen` repeats the prompt as a full transcript.
   Then the prompt is extracted from chosen/rejected by `extract_prompt` (TRL's function, quirks included).
3. String rows: the eos token is appended as text to chosen and rejected, unless already there.
4. Tokenize prompt, prompt+chosen and prompt+rejected whole: `tokenizer(text)` for strings, the chat template for
   conversations (the prompt alone with `add_generation_prompt=True`).
5. The completion starts where the prompt's ids and the full sequence's ids first differ (see `split_completion`).
6. nanodpo extension (not in TRL 1.16): `--max_prompt_length N` keeps the LAST N prompt tokens.
7. With `--max_length` and `truncation_mode=keep_start`, a row whose prompt alone has >= max_length tokens is
   dropped (truncation would leave no completion token). Sequences are truncated later, in `PreferenceCollator`.

Unpaired rows (KTO, `--loss_type kto`; TRL's KTOTrainer format), loaded by `load_unpaired_data`:

    {"prompt": "What is 2+2?", "completion": " 4.", "label": true}        label: true = desirable (thumbs up)
    {"prompt": [{"role": "user", ...}], "completion": [{"role": "assistant", ...}], "label": false}
    {"messages": [{"role": "user", ...}, {"role": "assistant", ...}], "label": true}   LLaMA-Factory's: the last
                       message is the completion (or "conversations" from/value, "kto_tag"; or alpaca + "kto_tag")

With `--unpair_preference_data`, preference rows are read instead, each giving a desirable row (its chosen) and an
undesirable one (its rejected), in the order of TRL's `unpair_preference_dataset` (per block of 1000 pairs: the
chosen rows, then the rejected rows). Tokenization is the same as for pairs (steps 3-7, the completion split per row),
KTOTrainer's; each row then gets its mismatched completion for KTO's reference point (`add_kl_completions`).

simpo, cpo and orpo pairs are tokenized as TRL's CPOTrainer and ORPOTrainer do instead (`build_cpo_examples`: BOS
and EOS added as ids, the completion cut to fit --max_length; the table above that function says where they differ).

Roles allowed in messages: system, developer, user, assistant, tool. Anything else (a typo like "assitant", or a
model-specific role) is refused up front rather than rendered wrongly or failing mid-run inside a chat template.
"""

from dataclasses import dataclass
from typing import Any

from nanodpo.data import Row, load_split_rows
from nanodpo.dpo_batch import common_prefix_length
from nanodpo.errors import UserError
from nanodpo.llamafactory import check_tools_rendered, row_tools, trl_row

ALLOWED_ROLES = ("system", "developer", "user", "assistant", "tool")


# ----------------------------------------------------------------------------------------------------------------
# Loading: rows -> validated, tokenized examples.


def load_preference_data(cfg, tokenizer, split: str = "train", build=None) -> list[dict] | None:
    """Tokenized preference examples for `split` "train" or "eval"; None when no evaluation data is configured.

    Which rows: see `nanodpo.data.load_split_rows`. `build`: `build_examples` (DPOTrainer's tokenization, the
    default) or `build_cpo_examples` (CPOTrainer's and ORPOTrainer's: simpo, cpo, orpo), chosen at setup.
    Each example: {"prompt_ids", "chosen_ids", "rejected_ids": list[int], "origin": "file, row N"}.
    """
    rows = load_split_rows(cfg, split)
    if rows is None:
        return None
    examples, stats = (build or build_examples)(
        rows,
        tokenizer,
        max_length=cfg.max_length,
        truncation_mode=getattr(cfg, "truncation_mode", "keep_start"),
        max_prompt_length=getattr(cfg, "max_prompt_length", None),
    )
    print(f"preference data ({split}): {stats.summary()}")
    identical = count_identical_pairs(examples)
    if identical:
        print(
            f"notice: {identical} of {len(examples)} {split} pairs have the same chosen and rejected completion "
            f"(e.g. {next(ex['origin'] for ex in examples if ex['chosen_ids'] == ex['rejected_ids'])}): a loss on "
            "the chosen - rejected difference (sigmoid, ipo, hinge, simpo, cpo, orpo, ...) gets zero gradient from "
            "them, yet they count in each batch's mean"
        )
    return examples


def count_identical_pairs(examples: list[dict]) -> int:
    """Pairs whose chosen and rejected token ids are equal: a loss on their difference sees 0 there."""
    return sum(ex["chosen_ids"] == ex["rejected_ids"] for ex in examples)


@dataclass
class Stats:
    read: int = 0
    extracted: int = 0  # rows whose prompt came from the shared beginning of chosen/rejected
    prompt_cut: int = 0  # rows whose prompt was cut to --max_prompt_length
    dropped: int = 0  # rows whose prompt alone fills --max_length (keep_start)
    max_length: int | None = None
    first_dropped: str | None = None  # where the first dropped row is, for the error when none is left

    def fit_prompt(self, row, prompt_ids: list[int], truncation_mode: str, max_prompt_length: int | None):
        """The prompt ids as trained (cut to --max_prompt_length, keeping the end: the latest turns), or None when
        the row is dropped: TRL's filter, since keep_start truncation would cut every completion token of a prompt
        that alone reaches --max_length, leaving no learning signal. (keep_end keeps the end of each sequence, so the
        completion survives and nothing is dropped.)"""
        if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
            prompt_ids = prompt_ids[len(prompt_ids) - max_prompt_length :]
            self.prompt_cut += 1
        if self.max_length is not None and truncation_mode == "keep_start" and len(prompt_ids) >= self.max_length:
            self.dropped += 1
            self.first_dropped = self.first_dropped or f"{row.where('prompt')} has {len(prompt_ids)} tokens"
            return None
        return prompt_ids

    def check_some_kept(self) -> None:
        if self.dropped == self.read:
            raise UserError(
                f"all {self.read} rows were dropped: each prompt alone has >= --max_length {self.max_length} tokens "
                f"(e.g. {self.first_dropped}); raise --max_length, set --max_prompt_length, or use --truncation_mode "
                "keep_end"
            )

    def summary(self) -> str:
        text = f"{self.read} rows read"
        if self.extracted:
            text += f", prompt extracted from chosen/rejected in {self.extracted}"
        if self.prompt_cut:
            text += f", prompt cut to --max_prompt_length in {self.prompt_cut}"
        text += f", {self.dropped} dropped"
        if self.dropped:
            text += f" (prompt alone has >= --max_length {self.max_length} tokens)"
        return text + f", {self.read - self.dropped} kept"


def build_examples(
    rows: list[Row],
    tokenizer,
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
    max_prompt_length: int | None = None,
) -> tuple[list[dict], Stats]:
    """Validate and tokenize every row (all rows are checked before any is used); returns (examples, stats)."""
    if not rows:
        raise UserError("the preference dataset has no rows")
    if truncation_mode not in ("keep_start", "keep_end"):
        raise UserError(f"--truncation_mode {truncation_mode!r} is not one of: keep_start, keep_end")
    stats = Stats(read=len(rows), max_length=max_length)
    prepared = [prepare_row(row) for row in rows]  # validation of the whole dataset first

    examples = []
    for row, (prompt, chosen, rejected, extracted) in zip(rows, prepared):
        stats.extracted += extracted
        prompt_ids, chosen_ids, rejected_ids = tokenize_row(row, tokenizer, prompt, chosen, rejected)
        prompt_ids = stats.fit_prompt(row, prompt_ids, truncation_mode, max_prompt_length)
        if prompt_ids is None:
            continue
        examples.append(
            {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids, "origin": row.where()}
        )
    stats.check_some_kept()
    return examples, stats


# ----------------------------------------------------------------------------------------------------------------
# Validation and prompt extraction (text level).


def prepare_row(row: Row) -> tuple[Any, Any, Any, bool]:
    """Check one row; return (prompt, chosen, rejected, prompt_was_extracted) as text or messages. A row in one of
    LLaMA-Factory's layouts is converted to TRL's conversational row first."""
    data = trl_row(row, "pair")
    chat_template_kwargs(row)  # its tools and template options are checked now too, before any row is tokenized
    for name in ("chosen", "rejected"):
        if name not in data:
            columns = ", ".join(map(repr, data)) or "none"
            raise UserError(
                f"{row.where(name)}: missing; preference rows need 'chosen' and 'rejected' (this row has: {columns})"
            )
    for name in ("image", "images"):
        if data.get(name) is not None:
            raise UserError(f"{row.where(name)}: images are not supported (nanodpo trains text-only models)")
    fields = ("prompt", "chosen", "rejected") if "prompt" in data else ("chosen", "rejected")
    for name in fields:
        check_value(row, name, data[name])
    chosen, rejected = data["chosen"], data["rejected"]
    if isinstance(chosen, str) != isinstance(rejected, str):
        kinds = {True: "a string", False: "a list of messages"}
        raise UserError(
            f"{row.where('rejected')}: is {kinds[isinstance(rejected, str)]} but 'chosen' is "
            f"{kinds[isinstance(chosen, str)]}; both must be the same kind"
        )

    # TRL's `maybe_extract_prompt`: a prompt column counts only if it is of the same kind as chosen.
    prompt = data.get("prompt")
    extracted = prompt is None or isinstance(prompt, str) != isinstance(chosen, str)
    if extracted:
        prompt, chosen, rejected = extract_prompt(chosen, rejected)
    return prompt, chosen, rejected, extracted


def check_value(row: Row, name: str, value: Any) -> None:
    """A prompt/chosen/rejected value: a string, or a list of {role, content} messages (non-empty)."""
    where = row.where(name)
    if value is None:
        raise UserError(f"{where}: is null (expected a string or a list of messages)")
    if isinstance(value, str):
        if value == "" and name != "prompt":
            raise UserError(f"{where}: is an empty string (a completion needs at least one character)")
        return
    if not isinstance(value, list):
        raise UserError(f"{where}: expected a string or a list of messages, got {type(value).__name__}")
    if not value:
        raise UserError(f"{where}: is an empty list of messages")
    for i, message in enumerate(value):
        at = f"{where}, message {i}"
        if not isinstance(message, dict):
            raise UserError(f"{at}: expected a dict {{'role': ..., 'content': ...}}, got {type(message).__name__}")
        for key in ("role", "content"):
            if key not in message and not (key == "content" and message.get("tool_calls")):
                raise UserError(f"{at}: missing '{key}' (this message has: {', '.join(map(repr, message)) or 'none'})")
        role, content = message["role"], message.get("content")
        if role not in ALLOWED_ROLES:
            raise UserError(f"{at}: unknown role {role!r} (allowed: {', '.join(ALLOWED_ROLES)})")
        if not isinstance(content, str) and not (content is None and message.get("tool_calls")):
            raise UserError(f"{at}: 'content' must be a string, got {type(content).__name__}")


def extract_prompt(chosen, rejected):
    """TRL's `extract_prompt`: the shared beginning of chosen and rejected is the prompt; (prompt, chosen, rejected).

    Strings are compared character by character, conversations message by message. Reproduced exactly, quirks
    included (nanodpo's token ids must equal TRL's):
    - "remove space before": at the first differing position, if the previous character is a space, the space goes
      to the completions ("...Assistant: Sure" -> prompt "...Assistant:", chosen " Sure").
    - When the first characters already differ, `idx - 1` is -1, so the LAST character of chosen is tested: if chosen
      ends with a space, idx becomes -1 and the "prompt" is all of chosen but its last character.
    - When one is a prefix of the other (or they are equal), the loop ends without `break` and Python leaves idx at
      its last value, min_len - 1: the last shared character (or message) goes to the completions.
    """
    idx = 0  # TRL's loop has no start value (an empty input would fail there); inputs are checked non-empty
    for idx in range(min(len(chosen), len(rejected))):
        if chosen[idx] != rejected[idx]:
            if chosen[idx - 1] == " ":  # remove space before the prompt
                idx -= 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


# ----------------------------------------------------------------------------------------------------------------
# Tokenization (token level).


def tokenize_row(row: Row, tokenizer, prompt, chosen, rejected) -> tuple[list[int], list[int], list[int]]:
    """Token ids of (prompt, chosen completion, rejected completion), exactly as TRL 1.16 computes them."""
    if isinstance(chosen, list):  # conversational: the chat template renders the messages
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(
                f"{row.where('chosen')}: conversational data (lists of messages) needs a chat template, and this "
                "tokenizer has none; pass one with --chat_template (a Jinja file or string), or use string data"
            )
        kwargs = chat_template_kwargs(row)
        prompt_ids = apply_template(row, tokenizer, prompt, add_generation_prompt=True, **kwargs)
        prompt_chosen_ids = apply_template(row, tokenizer, prompt + chosen, **kwargs)
        prompt_rejected_ids = apply_template(row, tokenizer, prompt + rejected, **kwargs)
    else:  # plain text: TRL appends the eos token as text, unless the completion already ends with it
        eos = tokenizer.eos_token
        if eos is not None:  # (TRL would fail on a tokenizer without an eos token; nanodpo appends nothing)
            chosen = chosen if chosen.endswith(eos) else chosen + eos
            rejected = rejected if rejected.endswith(eos) else rejected + eos
        prompt_ids = tokenizer(text=prompt)["input_ids"]
        prompt_chosen_ids = tokenizer(text=prompt + chosen)["input_ids"]
        prompt_rejected_ids = tokenizer(text=prompt + rejected)["input_ids"]
    return split_completion(prompt_ids, prompt_chosen_ids, prompt_rejected_ids)


def split_completion(prompt_ids, prompt_chosen_ids, prompt_rejected_ids):
    """Cut prompt+chosen and prompt+rejected where the completion starts; returns (prompt, chosen, rejected) ids.

    The tokenized prompt is not always a prefix of the tokenized prompt+completion:
    - BPE merges across the boundary: "... capital of Fr" + "ance" tokenizes as [.., " Fr"] alone but [.., " France"]
      whole, and a prompt ending in a space ("2 + 2? " + "4": [.., "?", " "] vs [.., "?", " 4"]) likewise.
    - Chat templates may render the prompt alone (with the generation prompt) differently from the prompt followed
      by an answer (e.g. an empty thinking block that only the generation prompt has).
    So the completion starts at the first token where the prompt's ids and the full sequence's ids differ — the
    shorter of the two common prefixes, so chosen and rejected share one prompt. The prompt's diverging tail is left
    out: the model is trained on the sequences as they are really tokenized whole.
    """
    prompt_len = min(
        common_prefix_length(prompt_ids, prompt_chosen_ids), common_prefix_length(prompt_ids, prompt_rejected_ids)
    )
    return prompt_ids[:prompt_len], prompt_chosen_ids[prompt_len:], prompt_rejected_ids[prompt_len:]


def chat_template_kwargs(row: Row) -> dict:
    """TRL passes the row's `tools` (a list, or a JSON string) and `chat_template_kwargs` to the chat template."""
    tools = row_tools(row)
    extra = row.data.get("chat_template_kwargs") or {}
    if not isinstance(extra, dict):
        raise UserError(f"{row.where('chat_template_kwargs')}: expected a mapping, got {type(extra).__name__}")
    return {"tools": tools, **extra}


def apply_template(row: Row, tokenizer, messages: list[dict], **kwargs) -> list[int]:
    import jinja2

    def render(messages, tools):
        return tokenizer.apply_chat_template(messages, tokenize=False, **{**kwargs, "tools": tools})

    try:
        encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
        check_tools_rendered(render, messages, kwargs.get("tools"), row.where())
    except (jinja2.TemplateError, TypeError) as err:  # e.g. refused system messages or role order; null content
        raise UserError(f"{row.where('chosen')}: the chat template failed on this row's messages ({err})") from None
    return list(encoded["input_ids"])


# ----------------------------------------------------------------------------------------------------------------
# simpo, cpo, orpo: CPOTrainer's and ORPOTrainer's tokenization (trl/experimental/cpo/cpo_trainer.py and
# trl/experimental/orpo/orpo_trainer.py: `maybe_apply_chat_template` mapped over the data, then `tokenize_row` with
# `build_tokenized_answer`; the two trainers share this code). Where it differs from DPOTrainer's (above):
#
#   DPOTrainer, KTOTrainer                              CPOTrainer, ORPOTrainer
#   tokenizer(text): a BOS token only where the         tokenizer(text, add_special_tokens=False); then bos_token_id
#     tokenizer adds one                                  is prepended whenever the tokenizer has one, unless first
#   the eos token appended as text to string            eos_token_id appended as an id to every completion (a
#     completions, unless they end with it                rendered conversation too), unless already its last token
#   conversations tokenized by the chat template        rendered to text first; a prompt ending with an assistant
#     (the prompt with the generation prompt)             message is continued (continue_final_message)
#   the completion starts where the prompt's ids and    it starts after the prompt's ids, or one token earlier when
#     the whole sequence's first differ, one prompt       the prompt's last token merged; chosen and rejected each
#     for both                                            keep their own prompt (they may differ in that token)
#   sequences cut to --max_length by the collator       the completion cut to --max_length minus its prompt's length


def build_cpo_examples(
    rows: list[Row],
    tokenizer,
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
    max_prompt_length: int | None = None,
) -> tuple[list[dict], Stats]:
    """`build_examples` with CPOTrainer's tokenization. A row whose prompt alone reaches --max_length is dropped
    (TRL keeps it with no completion token left, where simpo's and orpo's average log-prob is 0/0). The prompt is
    never cut: TRL's CPO and ORPO trainers have no --truncation_mode keep_end and no --max_prompt_length."""
    if not rows:
        raise UserError("the preference dataset has no rows")
    if truncation_mode != "keep_start" or max_prompt_length is not None:
        raise UserError("--truncation_mode keep_end and --max_prompt_length do not apply to simpo, cpo and orpo: "
                        "as TRL's CPOTrainer and ORPOTrainer, they keep the prompt whole and cut the completion")
    stats = Stats(read=len(rows), max_length=max_length)
    prepared = [prepare_row(row) for row in rows]  # validation of the whole dataset first
    examples = []
    for row, (prompt, chosen, rejected, extracted) in zip(rows, prepared):
        stats.extracted += extracted
        if isinstance(chosen, list):
            prompt, chosen, rejected = render_pair(row, tokenizer, prompt, chosen, rejected)
        example = cpo_tokenize_pair(row, tokenizer, prompt, chosen, rejected, max_length)
        longest_prompt = max(example["prompt_ids"], example.get("rejected_prompt_ids", []), key=len)
        if stats.fit_prompt(row, longest_prompt, "keep_start", None) is not None:
            examples.append({**example, "origin": row.where()})
    stats.check_some_kept()
    return examples, stats


def render_pair(row: Row, tokenizer, prompt: list, chosen: list, rejected: list) -> tuple[str, str, str]:
    """TRL's `apply_chat_template` on a conversational pair: (prompt, chosen, rejected) as text. The prompt is
    rendered with the generation prompt (or, ending with an assistant message, continued), then cut to what it
    shares with the rendered prompt+chosen and prompt+rejected; each completion is the rest of its rendering.
    nanodpo passes the row's `tools` to the template, as DPOTrainer and KTOTrainer do (CPOTrainer and ORPOTrainer
    render without them)."""
    kwargs = chat_template_kwargs(row)
    last_role = prompt[-1]["role"] if prompt else None
    if last_role in ("user", "tool"):
        generation = {"add_generation_prompt": True}
    elif last_role == "assistant":
        generation = {"continue_final_message": True}
    else:
        raise UserError(
            f"{row.where('prompt')}: the prompt ends with {'no message' if last_role is None else repr(last_role)}; "
            "for simpo, cpo and orpo it must end with a user, tool or assistant message (TRL's rule)"
        )
    prompt_text = render_template(row, tokenizer, prompt, **generation, **kwargs)
    texts = [render_template(row, tokenizer, prompt + answer, **kwargs) for answer in (chosen, rejected)]
    for text in texts:  # e.g. a template that inserts a token only after the generation prompt
        prompt_text = prompt_text[: common_prefix_length(prompt_text, text)]
    return prompt_text, texts[0][len(prompt_text) :], texts[1][len(prompt_text) :]


def render_template(row: Row, tokenizer, messages: list[dict], **kwargs) -> str:
    """The chat template's text for `messages`, a template failure as a UserError naming the row."""
    import jinja2

    def render(messages, tools):
        return tokenizer.apply_chat_template(messages, tokenize=False, **{**kwargs, "tools": tools})

    try:
        text = render(messages, kwargs.get("tools"))
        check_tools_rendered(render, messages, kwargs.get("tools"), row.where())
    except (jinja2.TemplateError, TypeError, ValueError) as err:  # e.g. role order; nothing to continue
        raise UserError(f"{row.where('chosen')}: the chat template failed on this row's messages ({err})") from None
    return text


def cpo_tokenize_pair(row: Row, tokenizer, prompt: str, chosen: str, rejected: str, max_length: int | None) -> dict:
    """TRL's `tokenize_row` of CPOTrainer/ORPOTrainer on text: {"prompt_ids", "chosen_ids", "rejected_ids"}, plus
    "rejected_prompt_ids" when a merge at the boundary ends rejected's prompt differently from chosen's (TRL allows
    one token of difference; more is an error there and here)."""
    sides = [cpo_split_answer(row, tokenizer, prompt, answer) for answer in (chosen, rejected)]
    (chosen_prompt, _), (rejected_prompt, _) = sides
    differing = sum(a != b for a, b in zip(chosen_prompt, rejected_prompt))
    if differing > 1 or abs(len(chosen_prompt) - len(rejected_prompt)) > 1:
        raise UserError(f"{row.where('prompt')}: tokenized with chosen and with rejected, the prompt differs in more "
                        "than its last token (CPOTrainer and ORPOTrainer refuse it too)")  # fmt: skip
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    example = {}
    for name, (prompt_ids, answer_ids) in zip(("chosen", "rejected"), sides):
        if bos is not None and prompt_ids[:1] != [bos]:
            prompt_ids = [bos] + prompt_ids
        if eos is not None and answer_ids[-1:] != [eos]:
            answer_ids = answer_ids + [eos]
        if max_length is not None:
            answer_ids = answer_ids[: max(0, max_length - len(prompt_ids))]
        example[f"{name}_ids"], example[f"{name}_prompt_ids"] = answer_ids, prompt_ids
    example["prompt_ids"] = example.pop("chosen_prompt_ids")
    if example["rejected_prompt_ids"] == example["prompt_ids"]:
        del example["rejected_prompt_ids"]
    return example


def cpo_split_answer(row: Row, tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """TRL's `build_tokenized_answer`: prompt+answer tokenized as one string (no special tokens), split after the
    prompt's own ids — or one token earlier when the prompt's last token merged with the answer's first."""
    full_ids = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if len(full_ids) < len(prompt_ids):
        raise UserError(f"{row.where('prompt')}: the prompt alone has more tokens than the prompt with its answer "
                        "(CPOTrainer and ORPOTrainer refuse it too)")  # fmt: skip
    start = len(prompt_ids) - (full_ids[: len(prompt_ids)] != prompt_ids)
    return full_ids[:start], full_ids[start:]


# ----------------------------------------------------------------------------------------------------------------
# Unpaired rows (KTO).

UNPAIR_BLOCK = 1000  # the rows `datasets.map(batched=True)` hands TRL's `_unpair_row` at a time (its default)


def load_unpaired_data(cfg, tokenizer, split: str = "train") -> list[dict] | None:
    """Tokenized unpaired examples for `split` "train" or "eval" (None when no evaluation data is configured).

    Each example: {"prompt_ids", "completion_ids", "kl_completion_ids": list[int], "label": bool, "origin": "file,
    row N"}. Every row is validated before any is tokenized; with `--unpair_preference_data` the rows are pairs (see
    the module docstring). The mismatched completions (`add_kl_completions`) are formed in blocks of
    --per_device_train_batch_size rows, for the eval rows too, as KTOTrainer forms them.
    """
    rows = load_split_rows(cfg, split)
    if rows is None:
        return None
    if not rows:
        raise UserError("the unpaired dataset has no rows")
    if getattr(cfg, "unpair_preference_data", False):
        prepared = unpair_rows(rows)
    else:
        prepared = [prepare_unpaired_row(row) for row in rows]
    examples, stats = build_unpaired_examples(
        prepared,
        tokenizer,
        max_length=cfg.max_length,
        truncation_mode=getattr(cfg, "truncation_mode", "keep_start"),
        max_prompt_length=getattr(cfg, "max_prompt_length", None),
    )
    add_kl_completions(examples, cfg.per_device_train_batch_size)
    desirable = sum(ex["label"] for ex in examples)
    print(
        f"unpaired data ({split}): {stats.summary()}; {desirable} desirable, {len(examples) - desirable} undesirable"
    )
    return examples


def prepare_unpaired_row(row: Row) -> tuple[Row, Any, Any, bool]:
    """Check one unpaired row; return (row, prompt, completion, label). A row in one of LLaMA-Factory's layouts is
    converted to TRL's first (the last message is the completion)."""
    data = trl_row(row, "unpaired")
    chat_template_kwargs(row)
    if "chosen" in data and "rejected" in data and "completion" not in data:
        raise UserError(
            f"{row.where()}: a preference pair (chosen, rejected), but --loss_type kto reads unpaired rows "
            "(prompt, completion, label); add --unpair_preference_data to use each pair as one desirable and one "
            "undesirable row"
        )
    for name in ("prompt", "completion", "label"):
        if name not in data:
            columns = ", ".join(map(repr, data)) or "none"
            raise UserError(
                f"{row.where(name)}: missing; unpaired rows need 'prompt', 'completion' and 'label' "
                f"(this row has: {columns})"
            )
    for name in ("image", "images"):
        if data.get(name) is not None:
            raise UserError(f"{row.where(name)}: images are not supported (nanodpo trains text-only models)")
    label = data["label"]
    if not isinstance(label, bool):
        raise UserError(
            f"{row.where('label')}: expected true (desirable) or false (undesirable), got {label!r} "
            f"({type(label).__name__})"
        )
    prompt, completion = data["prompt"], data["completion"]
    check_value(row, "prompt", prompt)
    check_value(row, "completion", completion)
    if isinstance(prompt, str) != isinstance(completion, str):
        kinds = {True: "a string", False: "a list of messages"}
        raise UserError(
            f"{row.where('completion')}: is {kinds[isinstance(completion, str)]} but 'prompt' is "
            f"{kinds[isinstance(prompt, str)]}; both must be the same kind"
        )
    return row, prompt, completion, label


def unpair_rows(rows: list[Row]) -> list[tuple[Row, Any, Any, bool]]:
    """Pairs -> unpaired rows, as TRL's `unpair_preference_dataset`: for each block of UNPAIR_BLOCK pairs, a
    desirable row (prompt, chosen) for each pair, then an undesirable row (prompt, rejected) for each. Rows without
    a prompt column get the prompt extracted first (`prepare_row`), as TRL's KTOTrainer does before unpairing."""
    prepared = [(row, prepare_row(row)) for row in rows]  # validation of every pair first
    unpaired = []
    for start in range(0, len(prepared), UNPAIR_BLOCK):
        block = prepared[start : start + UNPAIR_BLOCK]
        unpaired += [(row, prompt, chosen, True) for row, (prompt, chosen, _, _) in block]
        unpaired += [(row, prompt, rejected, False) for row, (prompt, _, rejected, _) in block]
    return unpaired


def build_unpaired_examples(
    prepared: list[tuple[Row, Any, Any, bool]],
    tokenizer,
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
    max_prompt_length: int | None = None,
) -> tuple[list[dict], Stats]:
    """Tokenize validated unpaired rows as TRL's KTOTrainer does: the same steps 3-7 as a pair whose two completions
    are this row's one (so the completion starts where prompt and prompt+completion ids diverge)."""
    stats = Stats(read=len(prepared), max_length=max_length)
    examples = []
    for row, prompt, completion, label in prepared:
        prompt_ids, completion_ids, _ = tokenize_row(row, tokenizer, prompt, completion, completion)
        prompt_ids = stats.fit_prompt(row, prompt_ids, truncation_mode, max_prompt_length)
        if prompt_ids is None:
            continue
        examples.append(
            {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "label": label, "origin": row.where()}
        )
    stats.check_some_kept()
    return examples, stats


def add_kl_completions(examples: list[dict], block_size: int) -> None:
    """Give each row its mismatched completion `kl_completion_ids`, as KTOTrainer's `add_kl_completion_ids` (mapped
    over the kept rows in blocks of `block_size` = per_device_train_batch_size): within each block of consecutive
    rows, row i takes row i-1's completion and the block's first row its last row's (a block of one row takes its
    own). KTO's reference point z_ref is estimated on these pairs (x_i, y_{i-1}), so they are fixed once, before any
    shuffling: a row keeps its pair whatever the data order, the batch it lands in and the number of processes."""
    for start in range(0, len(examples), block_size):
        block = examples[start : start + block_size]
        for i, example in enumerate(block):
            example["kl_completion_ids"] = block[i - 1]["completion_ids"]
