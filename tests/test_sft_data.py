"""SFT data: formats normalise, bad rows are UserErrors naming row and field, and the token ids and loss masks equal
TRL 1.16's (`assistant_only_loss` with `{% generation %}` markers, while nanodpo renders the plain template), on every
test tokenizer (tests/tiny.py: without a BOS token, with one added or not, merging across boundaries)."""

import pytest
from datasets import Dataset
from tiny import CHATML_GENERATION_TEMPLATE, CHATML_TEMPLATE, TOKENIZERS, make_model, make_tokenizer
from trl import SFTConfig, SFTTrainer

from nanodpo.errors import UserError
from nanodpo.packing import IGNORE_INDEX
from nanodpo.sft_data import (
    CHATML_TEMPLATE as BUILTIN_CHATML,
)
from nanodpo.sft_data import (
    SFTExample,
    normalize_sft_row,
    prepare_sft_documents,
    resolve_chat_template,
    tokenize_sft_example,
)

WHERE = "data.jsonl, row 3"


def msg(role, content):
    return {"role": role, "content": content}


CONVERSATIONS = [
    [msg("user", "What is the capital of France?"), msg("assistant", "The capital of France is Paris.")],
    [  # multi-turn, system message, every assistant turn trained
        msg("system", "You are a helpful assistant."),
        msg("user", "Hello!"),
        msg("assistant", "Hi, how can I help?"),
        msg("user", "How do I bake bread?"),
        msg("assistant", "Mix flour, water, salt and yeast, then let it rise."),
        msg("user", "Thank you very much!"),
        msg("assistant", "Whatever."),
    ],
    [  # multi-byte characters; whitespace inside and around the content
        msg("system", "请用中文回答。"),
        msg("user", "你好，请问今天天气怎么样？"),
        msg("assistant", "  今天天气很好，阳光明媚。\n\n"),
    ],
    [  # ends with a user turn (nothing after it is trained); two assistant turns in a row
        msg("user", "1 2 3"),
        msg("assistant", "4 5 6"),
        msg("assistant", "7 8 9 10"),
        msg("user", "100"),
    ],
    [msg("system", "Be rude."), msg("user", "Name a fruit."), msg("assistant", "Figure it out yourself.")],
]

# A second template family (Llama-3 style: header, trimmed content, end-of-turn token, nothing after it)
LLAMA3_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA3_GENERATION_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(params=TOKENIZERS)
def kind(request):
    """Each test tokenizer (tests/tiny.py): without a BOS token, with one added or not, merging across boundaries."""
    return request.param


def with_bos(kind: str, template: str) -> str:
    """The template, rendering the BOS token first for the tokenizer that adds one (as Llama's templates do)."""
    return ("{{ bos_token }}" if kind == "bos" else "") + template


def trl_examples(rows, chat_template, tmp_path, kind="plain", **config):
    """(input_ids, labels) of TRL 1.16's prepared train_dataset (its mask columns are consumed into `labels`)."""
    tokenizer = make_tokenizer(kind=kind)
    tokenizer.chat_template = chat_template
    args = SFTConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, **config)
    trainer = SFTTrainer(
        model=make_model(tokenizer), args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
    )
    dataset = trainer.train_dataset
    assert {"input_ids", "labels"} <= set(dataset.column_names)
    assert "assistant_masks" not in dataset.column_names and "completion_mask" not in dataset.column_names
    return [(row["input_ids"], row["labels"]) for row in dataset]


def ours(rows, tokenizer, **kwargs):
    documents, stats = prepare_sft_documents(rows, tokenizer, source="data.jsonl", **kwargs)
    return [(d.input_ids, d.labels()) for d in documents], stats


# ---------------------------------------------------------------- equal to TRL


@pytest.mark.parametrize(
    "plain, with_markers",
    [(CHATML_TEMPLATE, CHATML_GENERATION_TEMPLATE), (LLAMA3_TEMPLATE, LLAMA3_GENERATION_TEMPLATE)],
    ids=["chatml", "llama3"],
)
def test_assistant_masks_equal_trl(kind, tmp_path, plain, with_markers):
    rows = [{"messages": c} for c in CONVERSATIONS]
    expected = trl_examples(rows, with_bos(kind, with_markers), tmp_path, kind, assistant_only_loss=True,
                            max_length=None)  # fmt: skip
    tokenizer = make_tokenizer(kind=kind)
    tokenizer.chat_template = with_bos(kind, plain)  # no {% generation %} markers: nanodpo renders prefixes
    got, stats = ours(rows, tokenizer)
    assert got == expected
    assert stats.truncated == 0 and stats.dropped == 0 and stats.documents == len(rows)


def test_assistant_mask_content_and_end_of_turn(tokenizer):
    tokenizer.chat_template = CHATML_TEMPLATE
    doc = tokenize_sft_example(normalize_sft_row({"messages": CONVERSATIONS[1]}, WHERE), tokenizer, WHERE)
    trained, run = [], []
    for tok, keep in zip(doc.input_ids + [None], doc.loss_mask + [0]):
        if keep:
            run.append(tok)
        elif run:
            trained.append(tokenizer.decode(run))
            run = []
    assert trained == [
        "Hi, how can I help?<|im_end|>",
        "Mix flour, water, salt and yeast, then let it rise.<|im_end|>",
        "Whatever.<|im_end|>",
    ]


def test_sharegpt_equals_trl_messages(tokenizer, tmp_path):
    """ShareGPT rows (Infinity-Instruct style, extra fields ignored) give the tokens of the same conversation."""
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    rows = [
        {"id": str(i), "source": "x", "conversations": [{"from": names[m["role"]], "value": m["content"]} for m in c]}
        for i, c in enumerate(CONVERSATIONS)
    ]
    expected = trl_examples(
        [{"messages": c} for c in CONVERSATIONS], CHATML_GENERATION_TEMPLATE, tmp_path, assistant_only_loss=True
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    got, stats = ours(rows, tokenizer)
    assert got == expected and stats.formats == {"sharegpt": len(rows)}


def test_prompt_completion_strings_equal_trl(kind, tmp_path):
    rows = [  # " Paris" etc. can merge across the boundary: TRL's common-prefix rule decides
        {"prompt": "Human: What is the capital of France? Assistant:", "completion": " The capital is Paris."},
        {"prompt": "Human: How do I bake bread? Assistant: Mix", "completion": " flour, water, salt and yeast."},
        {"prompt": "1 2 3 4", "completion": " 5 6 7 8 9 10<|im_end|>"},  # EOS already there: not doubled
        {"prompt": "很好，", "completion": "很暴躁。"},
    ]
    expected = trl_examples(rows, CHATML_TEMPLATE, tmp_path, kind, max_length=None)
    tokenizer = make_tokenizer(kind=kind)
    got, _ = ours(rows, tokenizer)
    assert got == expected
    assert all(labels[-1] == tokenizer.eos_token_id for _, labels in got)
    if kind == "bos":
        assert all(ids[0] == tokenizer.bos_token_id for ids, _ in got)


def test_prompt_completion_conversational_equal_trl(kind, tmp_path):
    rows = [{"prompt": c[:-1], "completion": c[-1:]} for c in CONVERSATIONS if c[-1]["role"] == "assistant"]
    expected = trl_examples(rows, with_bos(kind, CHATML_TEMPLATE), tmp_path, kind, max_length=None)
    tokenizer = make_tokenizer(kind=kind)
    tokenizer.chat_template = with_bos(kind, CHATML_TEMPLATE)
    got, _ = ours(rows, tokenizer)
    assert got == expected  # completion_only_loss: the completion, its <|im_end|> and TRL's trailing newline


def test_text_equals_trl(kind, tmp_path):
    rows = [{"text": "The quick brown fox jumps over the lazy dog."}, {"text": "你好<|im_end|>"}]
    expected = trl_examples(rows, CHATML_TEMPLATE, tmp_path, kind, max_length=None)
    tokenizer = make_tokenizer(kind=kind)
    got, _ = ours(rows, tokenizer)
    assert got == expected
    assert all(ids == labels and ids[-1] == tokenizer.eos_token_id for ids, labels in got)


def test_max_length_truncates_keeping_start_and_drops_like_trl(tokenizer, tmp_path):
    rows = [{"messages": c} for c in CONVERSATIONS] + [
        {"messages": [msg("system", "Please answer politely. " * 4), msg("user", "Hi"), msg("assistant", "Hi")]}
    ]  # tokens: 28, 116, 60, 38, 50, 55; first trained token at 18, 38, 46, 14, 39, 51
    expected = trl_examples(rows, CHATML_GENERATION_TEMPLATE, tmp_path, assistant_only_loss=True, max_length=40)
    tokenizer.chat_template = CHATML_TEMPLATE
    got, stats = ours(rows, tokenizer, max_length=40)
    assert got == expected
    assert all(len(ids) <= 40 for ids, _ in got)
    # 4 longer than 40 (116, 60, 50, 55); of those, 2 keep no trained token (first at 46 and 51) and are dropped
    assert (stats.rows, stats.truncated, stats.dropped, stats.documents) == (6, 4, 2, 4)
    assert stats.loss_tokens == sum(lab != IGNORE_INDEX for _, labels in got for lab in labels)
    assert "dropped" in stats.summary()


def test_train_on_prompt_trains_every_token(tokenizer):
    tokenizer.chat_template = CHATML_TEMPLATE
    for row in ({"messages": CONVERSATIONS[1]}, {"prompt": "Hi", "completion": " there"}):
        doc = tokenize_sft_example(normalize_sft_row(row, WHERE), tokenizer, WHERE, train_on_prompt=True)
        assert doc.loss_mask == [1] * len(doc.input_ids)


# ---------------------------------------------------------------- chat templates


def test_builtin_chatml_and_template_file(tokenizer, tmp_path):
    tokenizer.chat_template = CHATML_TEMPLATE
    reference, _ = ours([{"messages": c} for c in CONVERSATIONS], tokenizer)
    bare = make_tokenizer()
    bare.chat_template = None
    assert BUILTIN_CHATML == CHATML_TEMPLATE
    with pytest.raises(UserError, match=r"data.jsonl, row 1: .*has none.*--chat_template chatml"):
        ours([{"messages": CONVERSATIONS[0]}], bare)
    assert ours([{"messages": c} for c in CONVERSATIONS], bare, chat_template="chatml")[0] == reference
    path = tmp_path / "chatml.jinja"
    path.write_text(CHATML_TEMPLATE)
    assert ours([{"messages": c} for c in CONVERSATIONS], bare, chat_template=str(path))[0] == reference
    with pytest.raises(UserError, match="no such file"):
        resolve_chat_template(bare, str(tmp_path / "missing.jinja"))
    assert ours([{"text": "no template needed"}], bare)[1].documents == 1


class VocabOnly:
    """Stands in for a tokenizer without ChatML tokens (e.g. Llama's): resolve_chat_template reads only the vocab."""

    def get_vocab(self):
        return {"<|begin_of_text|>": 0, "<|eot_id|>": 1}


def test_chatml_needs_its_tokens():
    with pytest.raises(UserError, match=r"--chat_template chatml: the tokenizer has no <\|im_start\|> or <\|im_end\|>"):
        resolve_chat_template(VocabOnly(), "chatml")
    assert resolve_chat_template(make_tokenizer(), "chatml") == CHATML_TEMPLATE


def test_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    # renders the LAST message differently, so a prefix of the conversation is not rendered as its start
    last_gets_a_bang = "message['content'] + ('!' if loop.last else '')"
    tokenizer.chat_template = CHATML_TEMPLATE.replace("message['content']", last_gets_a_bang)
    with pytest.raises(UserError, match="row 3: the chat template renders the first 3 messages differently"):
        tokenize_sft_example(normalize_sft_row({"messages": CONVERSATIONS[1]}, WHERE), tokenizer, WHERE)


def test_generation_prompt_the_conversation_drops(tokenizer):
    """Like Gemma 4's empty thought block: the generation prompt adds text that the rendered turn does not have. The
    turn starts where prompt-with-header and conversation-through-the-turn part (TRL's common-prefix rule)."""
    header = "{{ '<|im_start|>assistant\n' }}{% endif %}"
    assert header in CHATML_TEMPLATE
    thinking = "{{ '<|im_start|>assistant\n<think></think>' }}{% endif %}"
    tokenizer.chat_template = CHATML_TEMPLATE.replace(header, thinking)
    prompt = tokenizer.apply_chat_template(CONVERSATIONS[0][:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("assistant\n<think></think>")
    doc = tokenize_sft_example(normalize_sft_row({"messages": CONVERSATIONS[1]}, WHERE), tokenizer, WHERE)
    trained = tokenizer.decode([t for t, keep in zip(doc.input_ids, doc.loss_mask) if keep])
    turns = ["Hi, how can I help?", "Mix flour, water, salt and yeast, then let it rise.", "Whatever."]
    assert trained == "".join(turn + "<|im_end|>" for turn in turns)


def test_template_errors_are_user_errors(tokenizer):
    tokenizer.chat_template = "{{ raise_exception('Conversation roles must alternate') }}"
    with pytest.raises(UserError, match="row 3: the chat template refused this conversation: Conversation roles"):
        tokenize_sft_example(normalize_sft_row({"messages": CONVERSATIONS[0]}, WHERE), tokenizer, WHERE)


# ---------------------------------------------------------------- formats


def test_formats_normalise():
    conv = [msg("system", "S"), msg("user", "U"), msg("assistant", "A")]
    assert normalize_sft_row({"messages": conv, "id": 7}, WHERE) == SFTExample("messages", messages=conv)
    sharegpt = [{"from": "system", "value": "S"}, {"from": "human", "value": "U"}, {"from": "gpt", "value": "A"}]
    assert normalize_sft_row({"conversations": sharegpt, "label": {}}, WHERE) == SFTExample("sharegpt", messages=conv)
    assert normalize_sft_row({"prompt": "P", "completion": "C"}, WHERE) == SFTExample(
        "prompt_completion", prompt="P", completion="C"
    )
    assert normalize_sft_row({"prompt": conv[:2], "completion": conv[2:]}, WHERE) == SFTExample(
        "prompt_completion", prompt=conv[:2], completion=conv[2:]
    )
    assert normalize_sft_row({"instruction": "Add.", "input": "2 + 2", "output": "4"}, WHERE) == SFTExample(
        "alpaca", messages=[msg("user", "Add.\n2 + 2"), msg("assistant", "4")]  # LLaMA-Factory's "instruction\ninput"
    )
    for empty_input in ({"input": ""}, {}, {"input": None}):
        row = {"instruction": "Name a fruit.", "output": "An apple.", **empty_input}
        assert normalize_sft_row(row, WHERE).messages == [msg("user", "Name a fruit."), msg("assistant", "An apple.")]
    row = {"instruction": "I", "output": "O", "system": "S"}
    assert normalize_sft_row(row, WHERE).messages == [msg("system", "S"), msg("user", "I"), msg("assistant", "O")]
    assert normalize_sft_row({"text": "T", "meta": 1}, WHERE) == SFTExample("text", text="T")
    # several formats' keys: the first in FORMATS order wins
    assert normalize_sft_row({"messages": conv, "text": "T"}, WHERE).format == "messages"


BAD_ROWS = [
    ({"question": "q", "answer": "a"}, r"row 3: unknown SFT format, found fields \['answer', 'question'\]"),
    ({"prompt": "p", "chosen": "c", "rejected": "r"}, r"row 3: unknown SFT format.*preference data"),
    ({"prompt": "p"}, r"row 3: unknown SFT format.*'prompt' needs a 'completion'"),
    (["not", "an", "object"], r"row 3: expected an object"),
    ({"messages": "hello"}, r"row 3, field 'messages': expected a non-empty list of messages, got a string"),
    ({"messages": []}, r"row 3, field 'messages': expected a non-empty list of messages, got an empty list"),
    ({"messages": ["hi"]}, r"row 3, field 'messages\[0\]': expected a message object, got a string"),
    ({"messages": [{"content": "hi"}]}, r"row 3, field 'messages\[0\]': no 'role' \(found fields \['content'\]\)"),
    ({"messages": [{"role": ["user"], "content": "hi"}]}, r"field 'messages\[0\].role': unknown role \['user'\]"),
    ({"messages": [msg("user", "q"), msg("bot", "r")]}, r"row 3, field 'messages\[1\].role': unknown role 'bot'"),
    ({"messages": [msg("user", "q"), msg("assistant", "")]}, r"row 3, field 'messages\[1\].content': empty text"),
    ({"messages": [msg("user", "q"), msg("assistant", " \n")]}, r"field 'messages\[1\].content': empty text"),
    ({"messages": [msg("user", "q"), msg("assistant", None)]}, r"'messages\[1\].content': expected a string, got null"),
    ({"messages": [msg("user", [{"type": "text"}])]}, r"'messages\[0\].content': expected a string, got a list"),
    ({"messages": [msg("system", "s"), msg("user", "q")]}, r"row 3, field 'messages': no assistant turn.*sys"),
    ({"messages": [msg("assistant", "a"), msg("user", "q")]}, r"'messages\[0\]': the conversation starts with an"),
    (
        {"conversations": [{"from": "human", "value": "q"}, {"from": "bing", "value": "a"}]},
        r"row 3, field 'conversations\[1\].from': unknown role 'bing' \(expected one of system, user, assistant, human",
    ),
    ({"conversations": [{"from": "human"}]}, r"field 'conversations\[0\]': no 'value'"),
    ({"prompt": "p", "completion": 3}, r"fields 'prompt' and 'completion': expected two strings or two message lists"),
    ({"prompt": [msg("user", "q")], "completion": "a"}, r"two strings or two message lists, got a list and a string"),
    ({"prompt": [msg("user", "q")], "completion": [msg("user", "a")]}, r"field 'completion': no assistant turn"),
    ({"prompt": "", "completion": "c"}, r"field 'prompt': empty text"),
    ({"instruction": "", "output": "o"}, r"field 'instruction': empty text"),
    ({"instruction": "i", "input": 5, "output": "o"}, r"field 'input': expected a string, got int"),
    ({"text": ""}, r"row 3, field 'text': empty text"),
    ({"text": {"a": 1}}, r"row 3, field 'text': expected a string, got an object"),
]


@pytest.mark.parametrize("row, message", BAD_ROWS, ids=[str(i) for i in range(len(BAD_ROWS))])
def test_bad_rows_are_user_errors(row, message):
    with pytest.raises(UserError, match=message) as err:
        normalize_sft_row(row, WHERE)
    assert str(err.value).startswith("data.jsonl, row 3")


def test_errors_count_rows_from_one(tokenizer):
    rows = [{"text": "fine"}, {"text": "fine"}, {"txt": "oops"}]
    with pytest.raises(UserError, match=r"^train.jsonl, row 3: unknown SFT format"):
        prepare_sft_documents(rows, tokenizer, source="train.jsonl")
