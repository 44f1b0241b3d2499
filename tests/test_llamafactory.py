"""LLaMA-Factory's dataset formats (nanodpo/llamafactory.py) train exactly as the same rows in TRL's format.

Rows written here in LLaMA-Factory's layouts, Chinese text included, against the same rows written by hand in TRL's
format, all rendered by Qwen2.5's real chat template (which renders `tools` and `tool_calls`):
  * DPO pairs (sharegpt with a system message or column, function_call / observation turns, a function call as the
    chosen answer, tools; OpenAI-style messages; alpaca with input, system and history): nanodpo's token ids equal
    those of the TRL rows, which equal DPOTrainer's;
  * KTO rows (messages + label, conversations + kto_tag, alpaca + kto_tag, a function call as the completion): the
    same, against KTOTrainer;
  * SFT (glaive-style tool use, two calls in one turn, alpaca with history): the same input ids and loss masks; the
    trained text is spelled out (function calls trained, observations not). Against SFTTrainer(assistant_only_loss),
    which swaps in TRL's qwen2_5_training template, the masks differ by exactly the two newlines per assistant turn
    that template also trains (after `<|im_start|>assistant` and after `<|im_end|>`);
  * train_dpo.py (sigmoid and kto) and train_sft.py with `--dataset_info` log the same numbers on the LLaMA-Factory
    files (custom column names and role tags included) as on the TRL files;
  * bad rows, templates that cannot render tools and bad dataset_info entries are one-line UserErrors.
"""

import json
import os
from pathlib import Path

import pytest
import trl
from datasets import Dataset

import train_dpo
import train_sft
from nanodpo.config import DPOConfig, SFTConfig
from nanodpo.dpo_data import load_preference_data, load_unpaired_data
from nanodpo.errors import UserError
from nanodpo.sft_data import load_sft_data
from nanodpo.tracking import read_metrics
from tests import tiny

# Qwen2.5-Instruct's chat template, verbatim (test_qwen25_template_is_the_real_one checks it against TRL's copy).
QWEN25_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""  # noqa: E501


def qwen_tokenizer():
    tokenizer = tiny.make_tokenizer()
    tokenizer.chat_template = QWEN25_TEMPLATE
    return tokenizer


TOK = qwen_tokenizer()

# ----------------------------------------------------------------------------------------------------------------
# The rows: LLaMA-Factory's layouts and, by hand, the same rows in TRL's format.

WEATHER = {
    "name": "get_weather",
    "description": "查询城市今天的天气 (today's weather in a city)",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
TIME = {
    "name": "get_time",
    "description": "The local time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
LF_TOOLS = json.dumps([WEATHER, TIME], ensure_ascii=False)  # LLaMA-Factory: bare definitions, as a JSON string
TRL_TOOLS = json.dumps([{"type": "function", "function": tool} for tool in (WEATHER, TIME)], ensure_ascii=False)


def s(role, value):  # a sharegpt message
    return {"from": role, "value": value}


def m(role, content):  # a TRL message
    return {"role": role, "content": content}


def lf_call(*cities):  # a function_call turn's value: one call, or a JSON list of calls
    calls = [{"name": "get_weather", "arguments": {"city": city}} for city in cities]
    return json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)


def trl_call(*cities):  # the same call(s) as an OpenAI-style assistant message
    calls = [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": c}}} for c in cities]
    return {"role": "assistant", "content": "", "tool_calls": calls}


PARIS = '{"temperature": 21, "sky": "clear"}'
LF_PAIRS = [
    {  # sharegpt, Chinese, a system first message, two rounds
        "conversations": [s("system", "你是一个乐于助人的助手。"), s("human", "你好"),
                          s("gpt", "你好！有什么可以帮你？"), s("human", "今天天气怎么样？")],
        "chosen": s("gpt", "今天天气很好，阳光明媚。"), "rejected": s("gpt", "不知道。"),
    },
    {  # a system column, a function call and its observation in the prompt, tools as a JSON string
        "conversations": [s("human", "What is the weather in Paris?"), s("function_call", lf_call("Paris")),
                          s("observation", PARIS)],
        "chosen": s("gpt", "It is 21 degrees and clear in Paris."), "rejected": s("gpt", "Whatever."),
        "system": "Please answer politely.", "tools": LF_TOOLS,
    },
    {  # the chosen answer is a function call; tools as a list
        "conversations": [s("human", "北京天气怎么样？")],
        "chosen": s("function_call", lf_call("北京")), "rejected": s("gpt", "我不知道。"), "tools": [WEATHER, TIME],
    },
]  # fmt: skip
LF_OPENAI_PAIRS = [  # LLaMA-Factory's OpenAI-style layout: role/content messages, chosen/rejected one message each
    {"messages": [m("user", "Name a fruit.")], "chosen": m("assistant", "An apple, thank you for asking!"),
     "rejected": m("assistant", "Figure it out.")},
]  # fmt: skip
LF_ALPACA_PAIRS = [
    {"instruction": "把这句话翻译成英文", "input": "今天天气很好", "chosen": "The weather is nice today.",
     "rejected": "Today weather good.", "system": "You are a translator.", "history": [["你好", "你好！"]]},
    {"instruction": "What is 2 + 2?", "input": "", "chosen": "4, happy to help.", "rejected": "5."},
]  # fmt: skip
TRL_PAIRS = [
    {"prompt": [m("system", "你是一个乐于助人的助手。"), m("user", "你好"), m("assistant", "你好！有什么可以帮你？"),
                m("user", "今天天气怎么样？")],
     "chosen": [m("assistant", "今天天气很好，阳光明媚。")], "rejected": [m("assistant", "不知道。")]},
    {"prompt": [m("system", "Please answer politely."), m("user", "What is the weather in Paris?"), trl_call("Paris"),
                m("tool", PARIS)],
     "chosen": [m("assistant", "It is 21 degrees and clear in Paris.")], "rejected": [m("assistant", "Whatever.")],
     "tools": TRL_TOOLS},
    {"prompt": [m("user", "北京天气怎么样？")], "chosen": [trl_call("北京")],
     "rejected": [m("assistant", "我不知道。")], "tools": TRL_TOOLS},
    {"prompt": [m("user", "Name a fruit.")], "chosen": [m("assistant", "An apple, thank you for asking!")],
     "rejected": [m("assistant", "Figure it out.")]},
    {"prompt": [m("system", "You are a translator."), m("user", "你好"), m("assistant", "你好！"),
                m("user", "把这句话翻译成英文\n今天天气很好")],  # LLaMA-Factory's "instruction\ninput"
     "chosen": [m("assistant", "The weather is nice today.")], "rejected": [m("assistant", "Today weather good.")]},
    {"prompt": [m("user", "What is 2 + 2?")], "chosen": [m("assistant", "4, happy to help.")],
     "rejected": [m("assistant", "5.")]},
]  # fmt: skip

LF_KTO = [
    {"messages": [m("user", "What is the capital of France?"), m("assistant", "The capital of France is Paris.")],
     "label": True},  # LLaMA-Factory's kto_en_demo layout
    {"conversations": [s("human", "今天天气怎么样？"), s("gpt", "不知道。")], "kto_tag": False,
     "system": "请用中文回答。"},
    {"instruction": "Name a fruit.", "input": "", "output": "Figure it out yourself.", "kto_tag": False},
    {"conversations": [s("human", "北京天气怎么样？"), s("function_call", lf_call("北京"))], "kto_tag": True,
     "tools": LF_TOOLS},
]  # fmt: skip
TRL_KTO = [
    {"prompt": [m("user", "What is the capital of France?")],
     "completion": [m("assistant", "The capital of France is Paris.")], "label": True},
    {"prompt": [m("system", "请用中文回答。"), m("user", "今天天气怎么样？")],
     "completion": [m("assistant", "不知道。")], "label": False},
    {"prompt": [m("user", "Name a fruit.")], "completion": [m("assistant", "Figure it out yourself.")], "label": False},
    {"prompt": [m("user", "北京天气怎么样？")], "completion": [trl_call("北京")], "label": True, "tools": TRL_TOOLS},
]  # fmt: skip

WEATHER_BEIJING = '{"天气": "晴", "温度": 25}'
LF_SFT = [
    {  # glaive-style: a function call, its observation, then the answer
        "conversations": [s("human", "我在北京，今天天气怎么样？"), s("function_call", lf_call("北京")),
                          s("observation", WEATHER_BEIJING), s("gpt", "北京今天晴，25 度。")],
        "tools": LF_TOOLS,
    },
    {  # two calls in one turn (a JSON list), a system column, two rounds
        "conversations": [s("human", "Paris or London: which is warmer?"),
                          s("function_call", lf_call("Paris", "London")),
                          s("observation", "[21, 17]"), s("gpt", "Paris is warmer today."),
                          s("human", "Thank you very much!"), s("gpt", "You are welcome.")],
        "system": "Be brief.", "tools": LF_TOOLS,
    },
    {"instruction": "把这句话翻译成英文", "input": "今天天气很好", "output": "The weather is nice today.",
     "system": "你是翻译。", "history": [["你好", "你好！有什么可以帮你？"]]},
]  # fmt: skip
TRL_SFT = [
    {"messages": [m("user", "我在北京，今天天气怎么样？"), trl_call("北京"), m("tool", WEATHER_BEIJING),
                  m("assistant", "北京今天晴，25 度。")], "tools": TRL_TOOLS},
    {"messages": [m("system", "Be brief."), m("user", "Paris or London: which is warmer?"), trl_call("Paris", "London"),
                  m("tool", "[21, 17]"), m("assistant", "Paris is warmer today."), m("user", "Thank you very much!"),
                  m("assistant", "You are welcome.")], "tools": TRL_TOOLS},
    {"messages": [m("system", "你是翻译。"), m("user", "你好"), m("assistant", "你好！有什么可以帮你？"),
                  m("user", "把这句话翻译成英文\n今天天气很好"), m("assistant", "The weather is nice today.")]},
]  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Helpers


def write_json(path: Path, rows) -> Path:
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def ids(examples, keys):
    return [tuple(ex[k] for k in keys) for ex in examples]


def drawn(tokenizer, input_ids, mask) -> str:
    """The sequence with its trained tokens in ⟦ ⟧ (runs decoded whole, so Chinese characters stay readable)."""
    out, run, flag = "", [], None
    for token, keep in list(zip(input_ids, mask)) + [(None, None)]:
        if keep != flag and run:
            text = tokenizer.decode(run)
            out += f"⟦{text}⟧" if flag else text
            run = []
        run.append(token)
        flag = keep
    return out


def trained_runs(tokenizer, input_ids, mask) -> list[str]:
    return [part.split("⟧")[0] for part in drawn(tokenizer, input_ids, mask).split("⟦")[1:]]


def trl_trainer(kind: str, rows: list[dict], tokenizer, tmp_path: Path, **config):
    """A TRL 1.16 trainer over `rows` (its prepared train_dataset is what is compared)."""
    common = dict(output_dir=str(tmp_path / f"trl_{kind}"), report_to="none", bf16=False, use_cpu=True, **config)
    columns = {key: None for row in rows for key in row}  # from_list takes its columns from the first row only
    dataset = Dataset.from_list([{**columns, **row} for row in rows])
    if kind == "sft":
        args = trl.SFTConfig(assistant_only_loss=True, max_length=None, **common)
        return trl.SFTTrainer(model=tiny.make_model(tokenizer), args=args, train_dataset=dataset,
                              processing_class=tokenizer)  # fmt: skip
    trainer_class, config_class = {"dpo": (trl.DPOTrainer, trl.DPOConfig), "kto": (trl.KTOTrainer, trl.KTOConfig)}[kind]
    args = config_class(gradient_checkpointing=False, max_length=None, **common)
    return trainer_class(model=tiny.make_model(tokenizer), ref_model=tiny.make_model(tokenizer), args=args,
                         train_dataset=dataset, processing_class=tokenizer)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Token ids: LLaMA-Factory rows == TRL rows (nanodpo) == TRL's trainers


def test_qwen25_template_is_the_real_one():
    shipped = Path(os.path.dirname(trl.__file__)) / "chat_templates" / "qwen2_5.jinja"
    assert QWEN25_TEMPLATE == shipped.read_text(encoding="utf-8")


def test_preference_pairs_equal_their_trl_rows_and_dpo_trainer(tmp_path, capsys):
    lf = write_json(tmp_path / "lf.json", LF_PAIRS + LF_OPENAI_PAIRS + LF_ALPACA_PAIRS)
    ours = load_preference_data(DPOConfig(dataset=[str(lf)], max_length=None), TOK)
    converted = load_preference_data(DPOConfig(dataset=[str(tiny.write_jsonl(tmp_path / "trl.jsonl", TRL_PAIRS))],
                                               max_length=None), TOK)  # fmt: skip
    keys = ("prompt_ids", "chosen_ids", "rejected_ids")
    for i, (a, b) in enumerate(zip(ours, converted)):
        assert ids([a], keys) == ids([b], keys), f"row {i + 1}:\n{TOK.decode(a['prompt_ids'] + a['chosen_ids'])}"
    assert len(ours) == len(converted) == len(TRL_PAIRS)
    theirs = trl_trainer("dpo", TRL_PAIRS, TOK, tmp_path).train_dataset
    assert ids(converted, keys) == [tuple(row[k] for k in keys) for row in theirs]

    # not vacuous: the tools and the function calls are rendered, and a function call is a chosen answer
    assert '{"type": "function", "function": {"name": "get_weather"' in TOK.decode(ours[1]["prompt_ids"])
    assert '<tool_response>\n{"temperature": 21' in TOK.decode(ours[1]["prompt_ids"])
    assert TOK.decode(ours[2]["chosen_ids"]) == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call><|im_end|>\n'
    )
    assert "6 rows read" in capsys.readouterr().out


def test_kto_rows_equal_their_trl_rows_and_kto_trainer(tmp_path):
    lf = write_json(tmp_path / "lf.json", LF_KTO)
    ours = load_unpaired_data(DPOConfig(dataset=[str(lf)], max_length=None, loss_type=["kto"]), TOK)
    trl_file = tiny.write_jsonl(tmp_path / "trl.jsonl", TRL_KTO)
    converted = load_unpaired_data(DPOConfig(dataset=[str(trl_file)], max_length=None, loss_type=["kto"]), TOK)
    keys = ("prompt_ids", "completion_ids", "label")
    assert ids(ours, keys) == ids(converted, keys)
    theirs = trl_trainer("kto", TRL_KTO, TOK, tmp_path).train_dataset
    assert ids(converted, keys) == [tuple(row[k] for k in keys) for row in theirs]
    assert [ex["label"] for ex in ours] == [True, False, False, True]
    assert TOK.decode(ours[3]["completion_ids"]).startswith("<tool_call>\n")


def test_sft_rows_equal_their_trl_rows(tmp_path):
    lf = write_json(tmp_path / "lf.json", LF_SFT)
    ours = load_sft_data(SFTConfig(dataset=[str(lf)], max_length=None), TOK)
    trl_file = tiny.write_jsonl(tmp_path / "trl.jsonl", TRL_SFT)
    converted = load_sft_data(SFTConfig(dataset=[str(trl_file)], max_length=None), TOK)
    for i, (a, b) in enumerate(zip(ours, converted)):
        assert a.input_ids == b.input_ids, f"row {i + 1}:\n{TOK.decode(a.input_ids)}\n---\n{TOK.decode(b.input_ids)}"
        assert a.loss_mask == b.loss_mask, (
            f"row {i + 1}, trained tokens in ⟦ ⟧:\nLLaMA-Factory row: {drawn(TOK, a.input_ids, a.loss_mask)}\n"
            f"TRL row: {drawn(TOK, b.input_ids, b.loss_mask)}"
        )
    assert len(ours) == len(converted) == 3

    # what is trained: each assistant turn, function calls included, with its <|im_end|>; never the observations
    runs = [trained_runs(TOK, doc.input_ids, doc.loss_mask) for doc in ours]
    picture = "\n\n".join(drawn(TOK, doc.input_ids, doc.loss_mask) for doc in ours)
    assert runs[0] == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call><|im_end|>',
        "北京今天晴，25 度。<|im_end|>",
    ], picture
    assert runs[1] == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "London"}}\n</tool_call><|im_end|>',
        "Paris is warmer today.<|im_end|>",
        "You are welcome.<|im_end|>",
    ], picture
    assert runs[2] == ["你好！有什么可以帮你？<|im_end|>", "The weather is nice today.<|im_end|>"], picture
    assert '"type": "function"' in TOK.decode(ours[0].input_ids) and "<tool_response>" in TOK.decode(ours[0].input_ids)


def test_sft_masks_against_sft_trainer(tmp_path):
    """TRL swaps in its qwen2_5_training template, whose {% generation %} block starts right after
    `<|im_start|>assistant` and ends after `<|im_end|>\\n`: it also trains those two newlines of each assistant turn,
    which nanodpo leaves out (its turn starts after the generation prompt and ends at `<|im_end|>`). Everything else
    is equal."""
    converted = load_sft_data(SFTConfig(dataset=[str(tiny.write_jsonl(tmp_path / "t.jsonl", TRL_SFT))],
                                        max_length=None), TOK)  # fmt: skip
    theirs = trl_trainer("sft", TRL_SFT, TOK, tmp_path).train_dataset
    for i, (doc, row) in enumerate(zip(converted, theirs)):
        assert doc.input_ids == row["input_ids"], f"row {i + 1}"
        trl_mask = [int(label != -100) for label in row["labels"]]
        text = TOK.decode(doc.input_ids)
        encoding = TOK(text, add_special_tokens=False)
        newlines = set()
        start = text.find("<|im_start|>assistant")
        while start != -1:
            newlines.add(encoding.char_to_token(start + len("<|im_start|>assistant")))
            end = text.index("<|im_end|>", start) + len("<|im_end|>")
            newlines.add(encoding.char_to_token(end))
            start = text.find("<|im_start|>assistant", end)
        expected = [0 if t in newlines else keep for t, keep in enumerate(trl_mask)]
        assert all(TOK.decode([doc.input_ids[t]]) == "\n" for t in newlines)
        assert doc.loss_mask == expected, (
            f"row {i + 1}, trained in ⟦ ⟧:\nnanodpo: {drawn(TOK, doc.input_ids, doc.loss_mask)}\n"
            f"TRL:     {drawn(TOK, doc.input_ids, trl_mask)}"
        )


# ----------------------------------------------------------------------------------------------------------------
# --dataset_info, end to end: the scripts log the same numbers on the LLaMA-Factory files as on the TRL files


REGISTRY = {
    "dpo_zh_demo": {"file_name": "dpo_sharegpt.json", "ranking": True, "formatting": "sharegpt",
                    "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected",
                                "system": "system", "tools": "tools"}},
    "orca_style": {"file_name": "pairs_alpaca.jsonl", "ranking": True,
                   "columns": {"prompt": "question", "query": "context", "chosen": "better", "rejected": "worse",
                               "system": "sys", "history": "turns"}},
    "kto_en_demo": {"file_name": "kto.json", "formatting": "sharegpt",
                    "columns": {"messages": "messages", "kto_tag": "label"},
                    "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                             "assistant_tag": "assistant", "function_tag": "tool_call", "observation_tag": "tool"}},
    "glaive_toolcall_zh_demo": {"file_name": "glaive.json", "formatting": "sharegpt",
                                "columns": {"messages": "conversations", "tools": "tools", "system": "system"}},
    "alpaca_zh_demo": {"file_name": "sub/alpaca.json",
                       "columns": {"prompt": "instruction", "query": "input", "response": "output",
                                   "system": "system", "history": "history"}},
}  # fmt: skip


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("llamafactory")
    tiny.make_model_dir(root / "model")
    (root / "qwen2_5.jinja").write_text(QWEN25_TEMPLATE, encoding="utf-8")
    data = root / "data"
    (data / "sub").mkdir(parents=True)
    write_json(data / "dataset_info.json", REGISTRY)
    write_json(data / "dpo_sharegpt.json", LF_PAIRS)
    renamed = [{"question": r["instruction"], "context": r["input"], "better": r["chosen"], "worse": r["rejected"],
                **({"sys": r["system"], "turns": r["history"]} if "system" in r else {})} for r in LF_ALPACA_PAIRS]
    tiny.write_jsonl(data / "pairs_alpaca.jsonl", renamed)
    def kto_call(city, label):  # custom tags: the function call's role is "tool_call"
        return {"messages": [m("user", "北京天气怎么样？"), m("tool_call", lf_call(city))], "label": label}

    kto = [{"messages": [m("user", "你好"), m("assistant", "你好！有什么可以帮你？")], "label": True},
           kto_call("北京", True), kto_call("上海", False)]  # fmt: skip
    write_json(data / "kto.json", LF_KTO[:1] + kto)
    write_json(data / "glaive.json", LF_SFT[:2])
    write_json(data / "sub" / "alpaca.json", LF_SFT[2:])
    trl_kto = [{"prompt": [m("user", "你好")], "completion": [m("assistant", "你好！有什么可以帮你？")], "label": True},
               {"prompt": [m("user", "北京天气怎么样？")], "completion": [trl_call("北京")], "label": True},
               {"prompt": [m("user", "北京天气怎么样？")], "completion": [trl_call("上海")], "label": False}]
    tiny.write_jsonl(root / "trl_kto.jsonl", TRL_KTO[:1] + trl_kto)
    tiny.write_jsonl(root / "trl_pairs.jsonl", TRL_PAIRS[:3] + TRL_PAIRS[4:])
    tiny.write_jsonl(root / "trl_sft.jsonl", TRL_SFT)
    return root


def run(script, workdir: Path, out: str, *args) -> list[dict]:
    argv = ["--model", str(workdir / "model"), "--chat_template", str(workdir / "qwen2_5.jinja"),
            "--output_dir", str(workdir / out), "--max_steps", "2", "--per_device_train_batch_size", "2",
            "--logging_steps", "1", "--train_sampling_strategy", "sequential", "--max_length", "512",
            "--learning_rate", "1e-3", "--report_to", "jsonl", "--disable_tqdm", "true", *args]  # fmt: skip
    script.main(argv)
    return read_metrics(workdir / out / "metrics.jsonl")


@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize(
    "script, names, trl_file, extra",
    [
        (train_dpo, "dpo_zh_demo orca_style", "trl_pairs.jsonl", []),
        (train_dpo, "kto_en_demo", "trl_kto.jsonl", ["--loss_type", "kto"]),
        (train_sft, "glaive_toolcall_zh_demo,alpaca_zh_demo", "trl_sft.jsonl", []),  # LLaMA-Factory's comma form
    ],
    ids=["dpo", "kto", "sft"],
)
def test_scripts_train_registered_datasets_as_their_trl_rows(workdir, script, names, trl_file, extra):
    info = str(workdir / "data" / "dataset_info.json")
    ours = run(script, workdir, f"lf_{trl_file}", "--dataset_info", info, "--dataset", *names.split(" "), *extra)
    theirs = run(script, workdir, f"trl_{trl_file}", "--dataset", str(workdir / trl_file), *extra)
    assert len(ours) == len(theirs) >= 2 and "loss" in ours[0]
    assert ours == theirs


# ----------------------------------------------------------------------------------------------------------------
# Bad rows and bad entries: one clear UserError each


def load_pairs(tmp_path, rows, tokenizer=TOK):
    return load_preference_data(DPOConfig(dataset=[str(tiny.write_jsonl(tmp_path / "data.jsonl", rows))]), tokenizer)


def with_(row, **changes):
    row = {**row, **changes}
    return {k: v for k, v in row.items() if v is not DELETE}


DELETE = object()
PAIR, TOOL_PAIR, ALPACA_PAIR = LF_PAIRS[0], LF_PAIRS[1], LF_ALPACA_PAIRS[0]
BAD_PAIRS = {
    "missing chosen": (with_(PAIR, chosen=DELETE), "field 'chosen': missing; a sharegpt preference row needs"),
    "missing chosen (alpaca)": (with_(ALPACA_PAIR, chosen=DELETE), "field 'chosen': missing (this row has:"),
    "unknown role": (with_(PAIR, conversations=[s("human", "hi"), s("bot", "hello"), s("human", "?")]),
                     "field 'conversations[1].from': unknown role 'bot' (expected one of"),
    "tools not a list": (with_(TOOL_PAIR, tools=json.dumps(WEATHER)), "field 'tools': expected a list of tool defin"),
    "tools a number": (with_(TOOL_PAIR, tools=5), "field 'tools': expected a list of tool definitions"),
    "tools bad JSON": (with_(TOOL_PAIR, tools="[{"), "field 'tools': not valid JSON"),
    "function call bad JSON": (with_(PAIR, chosen=s("function_call", "get_weather(北京)")),
                               "field 'chosen.value': not valid JSON"),
    "function call without arguments": (with_(PAIR, chosen=s("function_call", '{"name": "f"}')),
                                        "field 'chosen.value': expected {\"name\": ..., \"arguments\": ...}"),
    "chosen from the user": (with_(PAIR, chosen=s("human", "hi")), "field 'chosen': the answer must be a gpt"),
    "chosen a list": (with_(PAIR, chosen=[s("gpt", "hi")]), "field 'chosen': expected one message"),
    "ends with an answer": (with_(PAIR, conversations=[s("human", "hi"), s("gpt", "hello")]),
                            "field 'conversations': a preference conversation ends with"),
    "empty turn": (with_(PAIR, conversations=[s("human", " ")]), "field 'conversations[0].value': empty text"),
    "bad history": (with_(ALPACA_PAIR, history=[["only a question"]]), "field 'history[0]': expected a pair"),
    "a KTO row": (LF_KTO[1], "a KTO row (a 'kto_tag' label, no 'chosen'/'rejected'); train it with --loss_type kto"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_PAIRS))
def test_bad_preference_rows(tmp_path, case):
    row, needle = BAD_PAIRS[case]
    with pytest.raises(UserError) as err:
        load_pairs(tmp_path, [LF_PAIRS[0], row])
    assert str(err.value).startswith(f"{tmp_path / 'data.jsonl'}, row 2"), str(err.value)
    assert needle in str(err.value), str(err.value)


BAD_KTO = {
    "label not a bool": (with_(LF_KTO[1], kto_tag="yes"), "field 'kto_tag': expected true (desirable) or false"),
    "last turn not an answer": (with_(LF_KTO[1], conversations=[s("gpt", "hi"), s("human", "?")]),
                                "field 'conversations[1]': a KTO row's last message is its completion"),
    "no prompt": (with_(LF_KTO[1], conversations=[s("gpt", "hi")]), "no prompt before the completion"),
    "a pair": (LF_PAIRS[0], "a preference pair ('chosen', 'rejected'), but --loss_type kto reads unpaired rows"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_KTO))
def test_bad_kto_rows(tmp_path, case):
    row, needle = BAD_KTO[case]
    path = tiny.write_jsonl(tmp_path / "data.jsonl", [LF_KTO[0], row])
    with pytest.raises(UserError) as err:
        load_unpaired_data(DPOConfig(dataset=[str(path)], loss_type=["kto"]), TOK)
    assert str(err.value).startswith(f"{path}, row 2") and needle in str(err.value), str(err.value)


BAD_SFT = {
    "unknown role": ({"conversations": [s("human", "hi"), s("assistant_bot", "x")]}, "unknown role 'assistant_bot'"),
    "tools not a list": (with_(LF_SFT[0], tools={"name": "f"}), "field 'tools': expected a list of tool definitions"),
    "tools not a list (messages)": (with_(TRL_SFT[0], tools=json.dumps(WEATHER)), "field 'tools': expected a list"),
    "bad tool_calls": ({"messages": [m("user", "hi"), {"role": "assistant", "tool_calls": "f()"}]},
                       "field 'messages[1].tool_calls': expected a non-empty list of tool calls"),
    "a pair": (LF_PAIRS[0], "a preference pair"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_SFT))
def test_bad_sft_rows(tmp_path, case):
    row, needle = BAD_SFT[case]
    path = tiny.write_jsonl(tmp_path / "data.jsonl", [LF_SFT[0], row])
    with pytest.raises(UserError) as err:
        load_sft_data(SFTConfig(dataset=[str(path)]), TOK)
    assert str(err.value).startswith(f"{path}, row 2") and needle in str(err.value), str(err.value)


@pytest.mark.parametrize(
    "row, needle",
    [
        (with_(TOOL_PAIR, conversations=TOOL_PAIR["conversations"][:1]), "this row has tools, but the chat template"),
        (with_(TOOL_PAIR, tools=DELETE), "this row has function calls (tool_calls), but the chat template"),
    ],
    ids=["tools", "tool_calls"],
)
def test_a_template_without_tools_is_refused(tmp_path, row, needle):
    chatml = tiny.make_tokenizer()  # ChatML renders neither `tools=` nor tool_calls: it would drop them silently
    path = tiny.write_jsonl(tmp_path / "data.jsonl", [row])
    with pytest.raises(UserError, match="--chat_template") as err:
        load_preference_data(DPOConfig(dataset=[str(path)]), chatml)
    assert str(err.value).startswith(f"{path}, row 1") and needle in str(err.value), str(err.value)
    sft_row = with_(row, conversations=row["conversations"] + [s("gpt", "ok")], chosen=DELETE, rejected=DELETE)
    path = tiny.write_jsonl(tmp_path / "sft.jsonl", [sft_row])
    with pytest.raises(UserError, match="--chat_template") as err:
        load_sft_data(SFTConfig(dataset=[str(path)]), chatml)
    assert str(err.value).startswith(f"{path}, row 1") and needle in str(err.value), str(err.value)


BAD_ENTRIES = {
    "unknown key": ({"file_name": "a.json", "colums": {}}, "dataset 'x': unknown key 'colums' (known: columns,"),
    "unknown column": ({"file_name": "a.json", "columns": {"answer": "a"}}, "'columns': unknown key 'answer'"),
    "unknown tag": ({"file_name": "a.json", "tags": {"bot_tag": "bot"}}, "'tags': unknown key 'bot_tag'"),
    "images": ({"file_name": "a.json", "columns": {"images": "img"}}, "'images' is not supported (nanodpo trains text"),
    "modelscope only": ({"ms_hub_url": "a/b"}, "'ms_hub_url' is not supported (ModelScope"),
    "num_samples": ({"file_name": "a.json", "num_samples": 10}, "'num_samples' is not supported"),
    "no file": ({"formatting": "sharegpt"}, "dataset 'x': no 'file_name'"),
    "formatting": ({"file_name": "a.json", "formatting": "openai"}, "'formatting': 'openai' is not one of"),
    "ranking": ({"file_name": "a.json", "ranking": "yes"}, "'ranking': expected true or false"),
    "column not a string": ({"file_name": "a.json", "columns": {"prompt": 3}}, "'columns.prompt': expected a string"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_ENTRIES))
def test_bad_dataset_info_entries(tmp_path, case):
    entry, needle = BAD_ENTRIES[case]
    info = write_json(tmp_path / "dataset_info.json", {"x": entry})
    with pytest.raises(UserError) as err:
        load_sft_data(SFTConfig(dataset=["x"], dataset_info=str(info)), TOK)
    assert str(err.value).startswith(f"{info}, dataset 'x'") and needle in str(err.value), str(err.value)


@pytest.mark.parametrize(
    "entry, loader, needle",
    [
        ({"file_name": "a.json"}, load_sft_data, None),  # alpaca SFT rows: fine
        ({"file_name": "a.json"}, load_preference_data, "dataset 'a' in dataset_info.json is not a preference dataset"),
        ({"file_name": "a.json"}, load_unpaired_data, "dataset 'a' in dataset_info.json has no KTO label"),
        ({"file_name": "a.json", "ranking": True}, load_sft_data, "a preference pair ('chosen', 'rejected'); train it"),
    ],
    ids=["sft", "dpo", "kto", "pairs for sft"],
)
def test_registered_dataset_for_the_wrong_script(tmp_path, entry, loader, needle):
    write_json(tmp_path / "a.json", [{"instruction": "Hi", "output": "Hello!", "chosen": "a", "rejected": "b"}] * 2)
    info = str(write_json(tmp_path / "dataset_info.json", {"a": entry}))
    cfg = (SFTConfig if loader is load_sft_data else DPOConfig)(dataset=["a"], dataset_info=info)
    if needle is None:
        assert len(loader(cfg, TOK)) == 2
        return
    with pytest.raises(UserError) as err:
        loader(cfg, TOK)
    assert str(err.value).startswith(f"{tmp_path / 'a.json'}, row 1") and needle in str(err.value), str(err.value)


def test_dataset_info_names_and_files(tmp_path):
    info = write_json(tmp_path / "dataset_info.json", {"a": {"file_name": "a.json"}, "b": {"file_name": "nope.json"}})
    with pytest.raises(UserError, match=r"--dataset c: no such dataset in .*dataset_info.json \(it has: a, b\)"):
        load_sft_data(SFTConfig(dataset=["c"], dataset_info=str(info)), TOK)
    with pytest.raises(UserError, match=r"--dataset .*nope.json: no such file"):
        load_sft_data(SFTConfig(dataset=["b"], dataset_info=str(info)), TOK)
    with pytest.raises(UserError, match=r"--dataset_info .*missing.json: no such file"):
        load_sft_data(SFTConfig(dataset=["a"], dataset_info=str(tmp_path / "missing.json")), TOK)
    # a registered entry's columns are its own: an alpaca entry whose rows name the prompt otherwise
    write_json(tmp_path / "a.json", [{"question": "Name a fruit.", "answer": "An apple."}])
    write_json(info, {"a": {"file_name": "a.json", "columns": {"prompt": "question", "response": "answer"}}})
    docs = load_sft_data(SFTConfig(dataset=["a"], dataset_info=str(info), eval_dataset=["a"], max_eval_samples=1), TOK)
    assert trained_runs(TOK, docs[0].input_ids, docs[0].loss_mask) == ["An apple.<|im_end|>"]
    assert load_sft_data(SFTConfig(dataset=["a"], dataset_info=str(info), eval_dataset=["a"]), TOK, "eval")
