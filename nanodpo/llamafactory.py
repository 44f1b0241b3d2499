"""LLaMA-Factory's datasets, read as they are: each row becomes the same row in TRL's format, then trains as one.

LLaMA-Factory (github.com/hiyouga/LLaMA-Factory, data/README.md) writes rows in two formats and registers them in a
`dataset_info.json`:

    alpaca     {"instruction": "...", "input": "..." (optional), "output": "...", "system": "...",
                "history": [["earlier question", "earlier answer"], ...]}
               pair: "chosen" and "rejected" strings instead of "output"; KTO: "output" and "kto_tag" true/false
    sharegpt   {"conversations": [{"from": "system" | "human" | "gpt" | "function_call" | "observation",
                                   "value": "..."}, ...], "system": "...", "tools": "[{...}, ...]"}
               pair: the conversation ends with a human (or observation) turn; "chosen" and "rejected" are ONE
               message each, {"from": "gpt", "value": "..."}
               KTO: the last message is the completion, with "kto_tag" (or "label") true/false

The TRL row each becomes (nanodpo then tokenizes it exactly as TRL does):

    alpaca     prompt = [system] + the history's turns + user(instruction + "\\n" + input)   (LLaMA-Factory's join)
    sharegpt   human -> user, gpt -> assistant, observation -> tool, system -> system,
               function_call '{"name": "f", "arguments": {...}}' (or a JSON list of such calls) -> an assistant
               message with "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {...}}}];
               a `system` column becomes the first message when the conversation has none
    tools      a list of function definitions, or a JSON string of one; each bare definition {"name",
               "description", "parameters"} is wrapped as {"type": "function", "function": ...}, as LLaMA-Factory
               shows tools to Qwen's template; passed to the chat template as `tools=` (what TRL does)

    pair       {"prompt": [...], "chosen": [one message], "rejected": [one message], "tools": [...]}
    KTO        {"prompt": [...], "completion": [the last message], "label": true | false, "tools": [...]}
    SFT        {"messages": [...], "tools": [...]}

Without `--dataset_info` rows are recognised by these default column names (`recognise`); besides them a sharegpt
row may use "messages" with {"role", "content"} keys (LLaMA-Factory's OpenAI-style layout), and "label" may stand for
"kto_tag". With `--dataset_info dataset_info.json`, each `--dataset NAME` is an entry of that file (`read_registry`):
its file (or hub id), formatting, ranking, column names and role tags are read as LLaMA-Factory reads them.

An empty system prompt is no system message, so the chat template's default applies (as in LLaMA-Factory).
"""

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from nanodpo.errors import UserError

# sharegpt role names -> the role of the TRL message ("function_call" becomes an assistant turn with tool_calls)
ROLES = {
    "system": "system", "user": "user", "assistant": "assistant",
    "human": "user", "gpt": "assistant", "tool": "tool", "observation": "tool", "function_call": "function_call",
}  # fmt: skip


@dataclass(frozen=True)
class DatasetInfo:
    """How to read a dataset's rows: one `dataset_info.json` entry, or the default layout of a recognised row.

    Column fields hold the row's column name for each part (None: not used), as LLaMA-Factory's `columns`;
    `roles` maps the sharegpt role names to ROLES' values (LLaMA-Factory's `tags`); `role_key`/`content_key` None
    means "from"/"value" or "role"/"content", whichever the message has.
    """

    name: str = "recognised by its columns"
    formatting: str = "sharegpt"  # or "alpaca"
    ranking: bool = False
    # alpaca columns
    prompt: str | None = "instruction"
    query: str | None = "input"
    response: str | None = "output"
    history: str | None = None
    # sharegpt column
    messages: str | None = "conversations"
    # both
    system: str | None = None
    tools: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    kto_tag: str | None = None
    # sharegpt tags
    role_key: str | None = None
    content_key: str | None = None
    roles: dict[str, str] = field(default_factory=lambda: dict(ROLES))
    # where the rows come from (entries of a dataset_info.json)
    source: str | None = None
    split: str | None = None
    subset: str | None = None


RECOGNISED = DatasetInfo()  # any role name of ROLES, keys from/value or role/content


# ----------------------------------------------------------------------------------------------------------------
# Recognising a row's layout (no --dataset_info).


def recognise(data: dict) -> DatasetInfo | None:
    """The LLaMA-Factory layout of a preference or KTO row, from its columns; None for TRL's own formats.

    sharegpt: `chosen`/`rejected` given as one message (a dict); or a `conversations` column; or `messages` with a
    KTO label and no prompt. alpaca: an `instruction` column. A `prompt` or `completion` column means TRL's format.
    """
    if isinstance(data.get("chosen"), dict) or isinstance(data.get("rejected"), dict):
        return default_layout(data, "sharegpt")
    if "prompt" in data or "completion" in data:
        return None
    if "conversations" in data or ("messages" in data and ("label" in data or "kto_tag" in data)):
        return default_layout(data, "sharegpt")
    if "instruction" in data:
        return default_layout(data, "alpaca")
    return None


def default_layout(data: dict, formatting: str) -> DatasetInfo:
    """LLaMA-Factory's default column names, plus the optional ones this row has (system, tools, history)."""
    return DatasetInfo(
        formatting=formatting,
        ranking="chosen" in data or "rejected" in data,
        messages="messages" if "messages" in data and "conversations" not in data else "conversations",
        history="history",
        system="system",
        tools="tools",
        chosen="chosen",
        rejected="rejected",
        kto_tag="kto_tag" if "kto_tag" in data else "label",
    )


def layout(row) -> DatasetInfo | None:
    """A Row's layout: its --dataset_info entry, or the one its columns show (None: TRL's format)."""
    return row.dataset_info if row.dataset_info is not None else recognise(row.data)


# ----------------------------------------------------------------------------------------------------------------
# Rows -> TRL rows.


def trl_row(row, task: str) -> dict:
    """The row's data in TRL's format for `task` "pair", "unpaired" or "sft": converted when the row is in a
    LLaMA-Factory layout, else the row's own data."""
    info = layout(row)
    return row.data if info is None else convert(row.data, row.where(), info, task)


def convert(data: dict, where: str, info: DatasetInfo, task: str) -> dict:
    """One LLaMA-Factory row -> TRL's row for `task` (see the module docstring). `where` ("file, row N") starts
    every error, with the row's own column names."""
    registered = info.source is not None  # an entry of --dataset_info, not recognised from the row's columns
    entry = f"dataset '{info.name}' in dataset_info.json"
    if task == "sft" and info.ranking:
        raise UserError(f"{where}: a preference pair ('{info.chosen}', '{info.rejected}'); train it with train_dpo.py")
    if task == "pair" and not info.ranking:
        if registered:
            raise UserError(f"{where}: {entry} is not a preference dataset (its entry has no \"ranking\": true)")
        if info.kto_tag in data:
            raise UserError(
                f"{where}: a KTO row (a '{info.kto_tag}' label, no 'chosen'/'rejected'); train it with --loss_type kto"
            )
    if task == "unpaired" and info.ranking:
        raise UserError(
            f"{where}: a preference pair ('{info.chosen}', '{info.rejected}'), but --loss_type kto reads unpaired "
            "rows; add --unpair_preference_data to use each pair as one desirable and one undesirable row"
        )
    if task == "unpaired" and info.kto_tag is None:
        raise UserError(f"{where}: {entry} has no KTO label: its \"columns\" name no \"kto_tag\"")
    if info.formatting == "sharegpt":
        trl = sharegpt_row(data, where, info, task)
    else:
        trl = alpaca_row(data, where, info, task)
    tools = parse_tools(data.get(info.tools) if info.tools else None, where, info.tools, wrap=True)
    return trl if tools is None else {**trl, "tools": tools}


def sharegpt_row(data: dict, where: str, info: DatasetInfo, task: str) -> dict:
    messages = conversation(data, where, info)
    if task == "sft":
        return {"messages": messages}
    if task == "pair":
        last = messages[-1]["role"]
        if last not in ("user", "tool"):
            raise UserError(
                f"{where}, field '{info.messages}': a preference conversation ends with the turn that 'chosen' and "
                f"'rejected' answer (a user or observation turn); this one ends with a '{last}' turn"
            )
        chosen, rejected = (answer(data, where, info, name) for name in (info.chosen, info.rejected))
        return {"prompt": messages, "chosen": [chosen], "rejected": [rejected]}
    label = kto_label(data, where, info)
    *prompt, completion = messages
    if completion["role"] != "assistant":
        raise UserError(
            f"{where}, field '{info.messages}[{len(data[info.messages]) - 1}]': a KTO row's last message is its "
            f"completion, an assistant answer or function call; this one is a '{completion['role']}' turn"
        )
    if not [m for m in prompt if m["role"] != "system"]:
        raise UserError(f"{where}, field '{info.messages}': no prompt before the completion (the last message)")
    return {"prompt": prompt, "completion": [completion], "label": label}


def alpaca_row(data: dict, where: str, info: DatasetInfo, task: str) -> dict:
    prompt = system_message(data, where, info)
    for i, pair in enumerate(column(data, where, info.history, optional=True) or []):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise UserError(
                f"{where}, field '{info.history}[{i}]': expected a pair [question, answer] of strings, got {pair!r:.80}"
            )
        prompt += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    query = []  # LLaMA-Factory's user turn: "instruction\ninput", leaving out an empty part
    for name, optional in ((info.prompt, False), (info.query, True)):
        value = column(data, where, name, optional) if name else None
        if value is not None and text_field(value, where, name):
            query.append(value)
    if not "\n".join(query).strip():
        raise UserError(f"{where}, field '{info.prompt}': empty text (the user's instruction)")
    prompt.append({"role": "user", "content": "\n".join(query)})

    def reply(name: str) -> dict:
        return {"role": "assistant", "content": text_field(column(data, where, name), where, name, nonempty=True)}

    if task == "pair":
        return {"prompt": prompt, "chosen": [reply(info.chosen)], "rejected": [reply(info.rejected)]}
    if task == "sft":
        return {"messages": prompt + [reply(info.response)]}
    return {"prompt": prompt, "completion": [reply(info.response)], "label": kto_label(data, where, info)}


def column(data: dict, where: str, name: str | None, optional: bool = False) -> Any:
    """The row's value of column `name`; a missing required column is a UserError listing the row's columns."""
    if name is None or name not in data:
        if optional:
            return None
        found = ", ".join(map(repr, data)) or "none"
        raise UserError(f"{where}, field '{name}': missing (this row has: {found})")
    return data[name]


def kind(value: Any) -> str:
    """How an error names a JSON value's type: "a string", "an object", "null", ..."""
    names = {dict: "an object", list: "a list", str: "a string", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def text_field(value: Any, where: str, name: str, nonempty: bool = False) -> str:
    if not isinstance(value, str):
        raise UserError(f"{where}, field '{name}': expected a string, got {kind(value)}")
    if nonempty and not value.strip():
        raise UserError(f"{where}, field '{name}': empty text")
    return value


def system_message(data: dict, where: str, info: DatasetInfo) -> list[dict]:
    """[the system message] from the `system` column, or [] when there is none or it is empty."""
    value = column(data, where, info.system, optional=True)
    return [{"role": "system", "content": text_field(value, where, info.system)}] if value else []


def kto_label(data: dict, where: str, info: DatasetInfo) -> bool:
    label = column(data, where, info.kto_tag)
    if not isinstance(label, bool):
        raise UserError(
            f"{where}, field '{info.kto_tag}': expected true (desirable) or false (undesirable), got {label!r}"
        )
    return label


# ----------------------------------------------------------------------------------------------------------------
# Messages.


def conversation(data: dict, where: str, info: DatasetInfo) -> list[dict]:
    """The sharegpt column as TRL messages; a `system` column becomes the first message if there is none."""
    messages = convert_messages(column(data, where, info.messages), where, info.messages, info)
    if messages and messages[0]["role"] == "system":
        return messages if messages[0]["content"] else messages[1:]  # an empty system prompt: the template's default
    return system_message(data, where, info) + messages


def convert_messages(value: Any, where: str, name: str, info: DatasetInfo = RECOGNISED) -> list[dict]:
    """Check a list of messages and return them as TRL messages {"role", "content"} (plus "tool_calls" for
    function calls). Keys "from"/"value" or "role"/"content" (or the entry's tags); role names mapped by
    `info.roles`; a message in role/content form keeps its other keys (e.g. "tool_call_id"), as TRL passes them
    to the chat template. Content must be non-empty text, except in function calls and tool results."""
    if not isinstance(value, list) or not value:
        what = "an empty list" if value == [] else kind(value)
        raise UserError(f"{where}, field '{name}': expected a non-empty list of messages, got {what}")
    return [convert_message(message, where, f"{name}[{i}]", info) for i, message in enumerate(value)]


def convert_message(message: Any, where: str, at: str, info: DatasetInfo) -> dict:
    if not isinstance(message, dict):
        raise UserError(f"{where}, field '{at}': expected a message object, got {kind(message)}")
    sharegpt = "from" in message or "value" in message
    role_key = info.role_key or ("from" if sharegpt else "role")
    content_key = info.content_key or ("value" if sharegpt else "content")
    tool_calls = message.get("tool_calls")
    for key in (role_key, content_key):
        if key not in message and not (key == content_key and tool_calls):
            raise UserError(f"{where}, field '{at}': no '{key}' (found fields {sorted(message)})")
    name = message[role_key]
    role = info.roles.get(name) if isinstance(name, str) else None
    if role is None:
        raise UserError(
            f"{where}, field '{at}.{role_key}': unknown role {name!r} (expected one of {', '.join(info.roles)})"
        )
    content = message.get(content_key)
    if role == "function_call":
        return {"role": "assistant", "content": "", "tool_calls": function_calls(content, where, f"{at}.{content_key}")}
    if tool_calls is not None:
        check_tool_calls(tool_calls, where, f"{at}.tool_calls")
        if content is not None:
            text_field(content, where, f"{at}.{content_key}")
    else:  # a tool may return nothing; an empty system prompt means the template's default
        text_field(content, where, f"{at}.{content_key}", nonempty=role not in ("tool", "system"))
    converted = {} if sharegpt else {k: v for k, v in message.items() if k not in (role_key, content_key)}
    converted["role"] = role
    if content_key in message:
        converted["content"] = content
    if tool_calls is not None:
        converted["tool_calls"] = tool_calls
    return converted


def function_calls(value: Any, where: str, at: str) -> list[dict]:
    """A function_call turn's value, '{"name": ..., "arguments": {...}}' or a JSON list of such calls, as
    OpenAI-style tool_calls."""
    calls = value
    if isinstance(value, str):
        try:
            calls = json.loads(value)
        except json.JSONDecodeError as err:
            raise UserError(
                f"{where}, field '{at}': not valid JSON ({err.msg}); a function call is "
                '{"name": "...", "arguments": {...}}'
            ) from None
    for call in calls if isinstance(calls, list) else [calls]:
        if not (isinstance(call, dict) and isinstance(call.get("name"), str) and "arguments" in call):
            raise UserError(f"{where}, field '{at}': expected {{\"name\": ..., \"arguments\": ...}}, got {call!r:.80}")
    calls = calls if isinstance(calls, list) else [calls]
    return [{"type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls]


def check_tool_calls(tool_calls: Any, where: str, at: str) -> None:
    """OpenAI-style tool_calls: a non-empty list of {"type": "function", "function": {"name", "arguments"}}
    (or the bare {"name", "arguments"}), passed to the chat template unchanged."""
    if not isinstance(tool_calls, list) or not tool_calls:
        raise UserError(f"{where}, field '{at}': expected a non-empty list of tool calls, got {tool_calls!r:.80}")
    for i, call in enumerate(tool_calls):
        function = call.get("function", call) if isinstance(call, dict) else None
        if not (isinstance(function, dict) and isinstance(function.get("name"), str)):
            raise UserError(
                f"{where}, field '{at}[{i}]': expected {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                f"\"arguments\": ...}}}}, got {call!r:.80}"
            )


def answer(data: dict, where: str, info: DatasetInfo, name: str) -> dict:
    """A sharegpt pair's chosen or rejected message (one message, an answer or a function call)."""
    value = data.get(name)
    if name not in data or value is None:
        found = ", ".join(map(repr, data)) or "none"
        raise UserError(
            f"{where}, field '{name}': missing; a sharegpt preference row needs '{info.chosen}' and '{info.rejected}', "
            f"one message each (this row has: {found})"
        )
    if not isinstance(value, dict):
        raise UserError(
            f"{where}, field '{name}': expected one message {{\"from\": \"gpt\", \"value\": ...}}, got "
            f"{kind(value)}"
        )
    message = convert_message(value, where, name, info)
    if message["role"] != "assistant":
        raise UserError(f"{where}, field '{name}': the answer must be a gpt (assistant) message or a function call")
    return message


# ----------------------------------------------------------------------------------------------------------------
# Tools.


def parse_tools(value: Any, where: str, name: str | None, wrap: bool) -> list | None:
    """A tools column: a list of tool definitions or a JSON string of one (None or "" for no tools). With `wrap`
    (LLaMA-Factory rows), each bare function definition becomes {"type": "function", "function": ...}."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise UserError(f"{where}, field '{name}': not valid JSON ({err.msg})") from None
    if not isinstance(value, list) or not all(isinstance(tool, dict) for tool in value):
        raise UserError(
            f"{where}, field '{name}': expected a list of tool definitions (or a JSON string of one), got "
            f"{value!r:.80}"
        )
    if wrap:
        value = [tool if tool.get("type") == "function" else {"type": "function", "function": tool} for tool in value]
    return value


def row_tools(row) -> list | None:
    """The tools a Row passes to the chat template: TRL's `tools` column as it is, or a LLaMA-Factory row's tools
    (each bare function definition wrapped)."""
    info = layout(row)
    name = "tools" if info is None else info.tools
    value = row.data.get(name) if name else None
    return parse_tools(value, row.where(), name, wrap=info is not None)


def has_tool_calls(messages: list[dict]) -> bool:
    return any(isinstance(m, dict) and m.get("tool_calls") for m in messages)


def check_tools_rendered(render, messages: list[dict], tools: list | None, where: str) -> None:
    """A clear error when the chat template drops this row's tools or function calls: `render(messages, tools)`
    gives the same text without them. (Templates without tool support ignore `tools=` and `tool_calls` silently.)"""
    hint = "use a chat template that renders them (Qwen2.5's does), with --chat_template"
    if tools and render(messages, tools) == render(messages, None):
        raise UserError(f"{where}: this row has tools, but the chat template does not render `tools=`; {hint}")
    if has_tool_calls(messages):
        plain = [{k: v for k, v in m.items() if k != "tool_calls"} for m in messages]
        if render(messages, tools) == render(plain, tools):
            raise UserError(
                f"{where}: this row has function calls (tool_calls), but the chat template does not render them; "
                f"{hint}"
            )


# ----------------------------------------------------------------------------------------------------------------
# dataset_info.json


ENTRY_KEYS = {"file_name", "hf_hub_url", "formatting", "ranking", "subset", "split", "columns", "tags"}
COLUMN_KEYS = {"prompt", "query", "response", "history", "messages", "system", "tools", "chosen", "rejected", "kto_tag"}
DEFAULT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}  # fmt: skip
UNSUPPORTED = {  # keys LLaMA-Factory knows that nanodpo does not follow, and why
    "ms_hub_url": "ModelScope is not reachable from nanodpo; download the data and give its 'file_name'",
    "om_hub_url": "Modelers is not reachable from nanodpo; download the data and give its 'file_name'",
    "script_url": "dataset loading scripts are not run; convert the data to json/jsonl/parquet and give 'file_name'",
    "cloud_file_name": "cloud storage is not read; download the file and give its 'file_name'",
    "folder": "hub sub-folders are not supported; download the data and give its 'file_name'",
    "num_samples": "LLaMA-Factory samples rows at random; take the first N rows with --max_samples instead",
    "images": "nanodpo trains text-only models",
    "videos": "nanodpo trains text-only models",
    "audios": "nanodpo trains text-only models",
}


def read_registry(path: str, names: list[str], flag: str = "--dataset") -> list[DatasetInfo]:
    """The entries `names` of a LLaMA-Factory dataset_info.json, checked (unknown keys refused by name).

    A name may list several, comma-separated ("a,b"), as LLaMA-Factory's --dataset does. `file_name` is relative to
    the folder of dataset_info.json (a file, a folder or a glob); `hf_hub_url` is a hub dataset id.
    """
    file = Path(path).expanduser()
    try:
        registry = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"--dataset_info {path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"--dataset_info {path}: not a readable JSON file ({err})") from None
    if not isinstance(registry, dict):
        raise UserError(f"--dataset_info {path}: expected an object {{name: entry}}, got {kind(registry)}")
    infos = []
    for name in [part.strip() for given in names for part in given.split(",") if part.strip()]:
        if name not in registry:
            known = ", ".join(list(registry)[:20]) + (", ..." if len(registry) > 20 else "")
            raise UserError(f"{flag} {name}: no such dataset in {path} (it has: {known or 'none'})")
        infos.append(registry_entry(name, registry[name], file.parent, f"{path}, dataset '{name}'"))
    return infos


def registry_entry(name: str, entry: Any, folder: Path, where: str) -> DatasetInfo:
    if not isinstance(entry, dict):
        raise UserError(f"{where}: expected an object, got {kind(entry)}")
    mirrors = ("ms_hub_url", "om_hub_url") if "hf_hub_url" in entry else ()  # LLaMA-Factory's default is the HF hub
    check_keys({k: v for k, v in entry.items() if k not in mirrors}, ENTRY_KEYS, where)
    columns = entry.get("columns", {})
    tags = entry.get("tags", {})
    for key, value, known in (("columns", columns, COLUMN_KEYS), ("tags", tags, set(DEFAULT_TAGS))):
        if not isinstance(value, dict):
            raise UserError(f"{where}, '{key}': expected an object, got {kind(value)}")
        check_keys(value, known, f"{where}, '{key}'")
        for k, v in value.items():
            if v is not None and not isinstance(v, str):
                raise UserError(f"{where}, '{key}.{k}': expected a string, got {v!r}")

    if "hf_hub_url" in entry:
        source = entry["hf_hub_url"]
    elif "file_name" in entry:
        source = str(folder / entry["file_name"])
    else:
        raise UserError(f"{where}: no 'file_name' (nor 'hf_hub_url'): where are its rows?")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt"):
        raise UserError(f"{where}, 'formatting': {formatting!r} is not one of: alpaca, sharegpt")
    ranking = entry.get("ranking", False)
    if not isinstance(ranking, bool):
        raise UserError(f"{where}, 'ranking': expected true or false, got {ranking!r}")

    tag = {**DEFAULT_TAGS, **tags}
    roles = {tag["user_tag"]: "user", tag["assistant_tag"]: "assistant", tag["observation_tag"]: "tool",
             tag["function_tag"]: "function_call", tag["system_tag"]: "system"}  # fmt: skip
    info = DatasetInfo(
        name=name,
        formatting=formatting,
        ranking=ranking,
        history=None,
        chosen="chosen" if ranking else None,
        rejected="rejected" if ranking else None,
        role_key=tag["role_tag"],
        content_key=tag["content_tag"],
        roles={k: v for k, v in roles.items() if k is not None},
        source=source,
        split=entry.get("split"),
        subset=entry.get("subset"),
    )
    return replace(info, **columns)


def check_keys(mapping: dict, known: set[str], where: str) -> None:
    for key in mapping:
        if key in UNSUPPORTED:
            raise UserError(f"{where}: '{key}' is not supported ({UNSUPPORTED[key]})")
        if key not in known:
            raise UserError(f"{where}: unknown key '{key}' (known: {', '.join(sorted(known))})")
