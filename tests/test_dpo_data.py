"""nanodpo/dpo_data.py against TRL 1.16: the same token ids (`DPOTrainer.train_dataset`) and the same batches
(`DataCollatorForPreference`) for every row format and every test tokenizer (BOS added or not, merges across the
boundary), with and without max_length truncation; plus the nanodpo
extension --max_prompt_length, and one clear UserError (file, row, field) for each kind of bad row."""

import tempfile

import datasets
import pytest
import torch
from trl import DPOConfig as TRLDPOConfig
from trl import DPOTrainer
from trl.data_utils import extract_prompt as trl_extract_prompt
from trl.data_utils import maybe_extract_prompt as trl_maybe_extract_prompt

from nanodpo.config import DPOConfig
from nanodpo.data import Row
from nanodpo.dpo_batch import PreferenceCollator
from nanodpo.dpo_data import build_examples, extract_prompt, load_preference_data
from nanodpo.errors import UserError
from tests import tiny

TOK = tiny.make_tokenizer()
EOS = TOK.eos_token
MAX_LENGTH = 24  # short enough that some prompts fill it (dropped) and many sequences are truncated


def msg(role, content):
    return {"role": role, "content": content}


LONG = "The reference model stays frozen while the policy learns to prefer the chosen completion. "

ROWS = {
    "explicit": tiny.preference_rows(10, "explicit")
    + [
        # BPE merges across the prompt/completion boundary: the prompt's last tokens change when tokenized whole
        {"prompt": "Human: What is the capital of Fr", "chosen": "ance? Paris.", "rejected": "ance? Whatever."},
        {"prompt": "What is 2 + 2? ", "chosen": "4", "rejected": "5, whatever"},
        {"prompt": "今天天", "chosen": "气很好", "rejected": "气怎么样？"},
        {"prompt": "", "chosen": "No prompt at all.", "rejected": "Nothing" + EOS},  # eos already there: kept once
        {"prompt": LONG * 2, "chosen": " Yes.", "rejected": " No."},  # prompt alone > MAX_LENGTH: dropped
    ],
    "conversational": tiny.preference_rows(10, "conversational")
    + [
        {
            "prompt": [msg("system", "Please answer politely."), msg("user", "Name a fruit.")],
            "chosen": [msg("assistant", "An apple, thank you for asking!")],
            "rejected": [msg("assistant", "Whatever.")],
        },
        {
            "prompt": [msg("system", LONG), msg("user", "What is 2 + 2?")],  # dropped with keep_start
            "chosen": [msg("assistant", "4")],
            "rejected": [msg("assistant", "5")],
        },
    ],
    "implicit": tiny.preference_rows(10, "implicit")  # Anthropic-HH style "\n\nHuman: ...\n\nAssistant: ..."
    + [
        {"chosen": "Hello there", "rejected": "Hello there, friend"},  # prefix: no `break`, idx = min_len - 1
        {"chosen": "Same answer.", "rejected": "Same answer."},  # equal: the last character is the completion
        {"chosen": "Yes ", "rejected": "No"},  # first characters differ and chosen ends in " ": idx = -1
        {"chosen": f"\n\nHuman: {LONG}\n\nAssistant: Sure.", "rejected": f"\n\nHuman: {LONG}\n\nAssistant: No."},
    ],
    "implicit_conversational": [
        {
            "chosen": [msg("user", q), msg("assistant", a)],
            "rejected": [msg("user", q), msg("assistant", b)],
        }
        for q, a, b in [
            ("What color is the sky?", "It is blue.", "It is green."),
            ("今天天气怎么样？", "阳光明媚。", "不知道。"),
            ("Name a fruit.", "An apple.", "Figure it out."),
        ]
    ]
    + [
        {  # multi-turn with a system message
            "chosen": [msg("system", "Be kind."), msg("user", "Hi!"), msg("assistant", "Hello!"),
                       msg("user", "What is 2 + 2?"), msg("assistant", "4, happy to help.")],
            "rejected": [msg("system", "Be kind."), msg("user", "Hi!"), msg("assistant", "Hello!"),
                         msg("user", "What is 2 + 2?"), msg("assistant", "Whatever.")],
        },
        {  # chosen is a prefix of rejected: the prompt is all but the last shared message
            "chosen": [msg("user", "Hi!"), msg("assistant", "Hello!")],
            "rejected": [msg("user", "Hi!"), msg("assistant", "Hello!"), msg("user", "Bye."), msg("assistant", "Ok.")],
        },
        {  # a long shared system message: dropped with keep_start
            "chosen": [msg("system", LONG), msg("user", "Hi!"), msg("assistant", "Hello!")],
            "rejected": [msg("system", LONG), msg("user", "Hi!"), msg("assistant", "Go away.")],
        },
    ],
}
FORMATS = list(ROWS)
TRUNCATIONS = [(None, "keep_start"), (MAX_LENGTH, "keep_start"), (MAX_LENGTH, "keep_end")]
IDS = ("prompt_ids", "chosen_ids", "rejected_ids")

_trl_cache: dict = {}


TOKENIZERS = {kind: tiny.make_tokenizer(kind=kind) for kind in tiny.TOKENIZERS}  # BOS added or not, merges


def trl_prepare(rows: list[dict], max_length, truncation_mode, key=None, tokenizer=TOK):
    """TRL's examples (prompt/chosen/rejected ids after its filter) and its collator, from a real DPOTrainer."""
    if key is not None and key in _trl_cache:
        return _trl_cache[key]
    with tempfile.TemporaryDirectory() as tmp:
        args = TRLDPOConfig(
            output_dir=tmp,
            report_to="none",
            bf16=False,
            gradient_checkpointing=False,
            max_length=max_length,
            truncation_mode=truncation_mode,
        )
        trainer = DPOTrainer(
            model=tiny.make_model(tokenizer),
            ref_model=tiny.make_model(tokenizer),  # (with none, TRL reloads the policy from its hub path: none here)
            args=args,
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=tokenizer,
        )
    result = ([{k: ex[k] for k in IDS} for ex in trainer.train_dataset], trainer.data_collator)
    if key is not None:
        _trl_cache[key] = result
    return result


@pytest.fixture(scope="module")
def trl_examples():
    """One DPOTrainer per (format, max_length, truncation_mode, tokenizer), shared by the tests of this module."""

    def prepare(name, max_length, mode, kind="plain"):
        return trl_prepare(ROWS[name], max_length, mode, (name, max_length, mode, kind), TOKENIZERS[kind])

    return prepare


def nanodpo_prepare(tmp_path, rows, tokenizer=TOK, **cfg_kwargs):
    path = tiny.write_jsonl(tmp_path / "data.jsonl", rows)
    cfg = DPOConfig(dataset=[str(path)], **cfg_kwargs)
    examples = load_preference_data(cfg, tokenizer)
    return examples


def ids_only(examples):
    return [{k: ex[k] for k in IDS} for ex in examples]


# ----------------------------------------------------------------------------------------------------------------
# Token ids and batches equal TRL's


@pytest.mark.parametrize("kind", tiny.TOKENIZERS)
@pytest.mark.parametrize("max_length,mode", TRUNCATIONS)
@pytest.mark.parametrize("name", FORMATS)
def test_token_ids_match_trl(tmp_path, capsys, trl_examples, name, max_length, mode, kind):
    theirs, _ = trl_examples(name, max_length, mode, kind)
    ours = nanodpo_prepare(tmp_path, ROWS[name], TOKENIZERS[kind], max_length=max_length, truncation_mode=mode)
    assert ids_only(ours) == theirs
    if kind == "bos" and "conversational" not in name:  # the tokenizer's BOS (conversations: the template's)
        assert all(ex["prompt_ids"][0] == TOKENIZERS[kind].bos_token_id for ex in ours)
    dropped = len(ROWS[name]) - len(theirs)
    assert (dropped > 0) == (max_length is not None and mode == "keep_start")  # the long-prompt rows
    summary = capsys.readouterr().out
    assert f"{len(ROWS[name])} rows read" in summary and f"{dropped} dropped" in summary
    assert f"{len(theirs)} kept" in summary


@pytest.mark.parametrize("kind", tiny.TOKENIZERS)
@pytest.mark.parametrize("max_length,mode", TRUNCATIONS)
@pytest.mark.parametrize("name", FORMATS)
def test_collator_matches_trl(trl_examples, name, max_length, mode, kind):
    examples, trl_collator = trl_examples(name, max_length, mode, kind)
    assert (trl_collator.max_length, trl_collator.truncation_mode) == (max_length, mode)
    ours = PreferenceCollator(TOKENIZERS[kind].pad_token_id, max_length=max_length, truncation_mode=mode)
    for pad_to in (None, 8):
        trl_collator.pad_to_multiple_of = ours.pad_to_multiple_of = pad_to
        for start in range(0, len(examples), 4):
            batch = [dict(ex) for ex in examples[start : start + 4]]
            if start == 0:  # precomputed reference log-probs ride along
                for i, ex in enumerate(batch):
                    ex["ref_chosen_logps"], ex["ref_rejected_logps"] = -1.5 * i, -2.25 * i
            expected, got = trl_collator(batch), ours(batch)
            assert expected.keys() == got.keys()
            for key in expected:
                assert got[key].dtype == expected[key].dtype, key
                assert torch.equal(got[key], expected[key]), key
    if max_length is not None:  # truncation really happened somewhere
        assert any(len(ex["prompt_ids"]) + len(ex["chosen_ids"]) > max_length for ex in examples)


def test_bpe_merge_across_the_boundary_is_exercised(tmp_path, capsys):
    """The tokenized prompt is not a prefix of the tokenized prompt+completion: the completion starts earlier."""
    merged = []
    for row in ROWS["explicit"]:
        prompt_ids = TOK(row["prompt"])["input_ids"]
        full_ids = TOK(row["prompt"] + row["chosen"] + EOS)["input_ids"]
        if full_ids[: len(prompt_ids)] != prompt_ids:
            merged.append(row["prompt"])
    assert {"Human: What is the capital of Fr", "What is 2 + 2? ", "今天天"} <= set(merged)
    ours = nanodpo_prepare(tmp_path, ROWS["explicit"], max_length=None)
    row = ROWS["explicit"][10]  # "... capital of Fr" + "ance? Paris."
    # " F", "r" alone, but " France" whole: the prompt keeps "... of", the completion starts with " France"
    assert TOK.decode(ours[10]["prompt_ids"]) == "Human: What is the capital of"
    assert TOK.decode(ours[10]["chosen_ids"]) == " France? Paris." + EOS
    assert TOK.decode(ours[10]["prompt_ids"] + ours[10]["chosen_ids"]) == row["prompt"] + row["chosen"] + EOS


def test_extract_prompt_matches_trl_function():
    cases = [(r["chosen"], r["rejected"]) for r in ROWS["implicit"] + ROWS["implicit_conversational"]]
    cases += [("abc", "abd"), ("a b", "a c"), ("x", "y"), ("ab ", "cd"), ("same", "same"), ("ab", "abcd")]
    for chosen, rejected in cases:
        expected = trl_extract_prompt({"chosen": chosen, "rejected": rejected})
        assert extract_prompt(chosen, rejected) == (expected["prompt"], expected["chosen"], expected["rejected"])
    # the quirks, spelled out
    assert extract_prompt("\n\nHuman: Hi\n\nAssistant: Sure", "\n\nHuman: Hi\n\nAssistant: No") == (
        "\n\nHuman: Hi\n\nAssistant:", " Sure", " No")  # the space before the answer goes to the completions
    assert extract_prompt("Hello there", "Hello there, friend") == ("Hello ther", "e", "e, friend")
    assert extract_prompt("Yes ", "No") == ("Yes", " ", "o")


@pytest.mark.parametrize("direction", ["string prompt, conversational chosen", "conversational prompt, string chosen"])
def test_prompt_column_of_the_other_kind_is_ignored(tmp_path, direction):
    """TRL's `maybe_extract_prompt`: a prompt column of another kind than chosen is replaced by the extracted one."""
    if direction.startswith("string"):
        rows = [{"prompt": row["chosen"][-2]["content"], **row} for row in ROWS["implicit_conversational"]]
    else:
        rows = [{"prompt": [msg("user", "ignored")], **row} for row in ROWS["implicit"]]
    extracted = [trl_maybe_extract_prompt(row) for row in rows]
    assert all(set(row) == {"prompt", "chosen", "rejected"} for row in extracted)
    theirs, _ = trl_prepare(extracted, None, "keep_start")
    assert ids_only(nanodpo_prepare(tmp_path, rows, max_length=None)) == theirs


def test_max_prompt_length_keeps_the_end_of_the_prompt(tmp_path, capsys):
    rows = [{"prompt": "1 2 3 4 5 6 7 8 9 10", "chosen": " yes", "rejected": " no"}]
    full = nanodpo_prepare(tmp_path, rows, max_length=None)[0]
    assert [TOK.decode([t]) for t in full["prompt_ids"]] == ["1", " 2", " 3", " 4", " 5", " 6", " 7", " 8", " 9", " 10"]
    cut = nanodpo_prepare(tmp_path, rows, max_length=None, max_prompt_length=2)[0]
    assert TOK.decode(cut["prompt_ids"]) == " 9 10"
    assert cut["prompt_ids"] == full["prompt_ids"][-2:]
    assert cut["chosen_ids"] == full["chosen_ids"] and cut["rejected_ids"] == full["rejected_ids"]
    assert "prompt cut to --max_prompt_length in 1" in capsys.readouterr().out

    # conversational: the last turns (and the generation prompt) survive; a cut prompt is no longer dropped
    conv = [ROWS["conversational"][-1]]  # long system message: dropped at MAX_LENGTH without the cut
    with pytest.raises(UserError, match="all 1 rows were dropped"):
        nanodpo_prepare(tmp_path, conv, max_length=MAX_LENGTH)
    kept = nanodpo_prepare(tmp_path, conv, max_length=MAX_LENGTH, max_prompt_length=8)[0]
    assert TOK.decode(kept["prompt_ids"]) == " 2?<|im_end|>\n<|im_start|>assistant\n"  # 8 tokens
    assert TOK.decode(kept["chosen_ids"]) == "4<|im_end|>\n"


def test_collator_docstring_example():
    examples = [
        {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
        {"prompt_ids": [7, 8], "chosen_ids": [9], "rejected_ids": [10, 11]},
    ]
    batch = PreferenceCollator(pad_token_id=0, max_length=4)(examples)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4], [7, 8, 9, 0], [1, 2, 3, 6], [7, 8, 10, 11]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]]
    assert batch["completion_mask"].tolist() == [[0, 0, 0, 1], [0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 1, 1]]
    keep_end = PreferenceCollator(pad_token_id=0, max_length=4, truncation_mode="keep_end")(examples)
    assert keep_end["input_ids"][0].tolist() == [2, 3, 4, 5]
    assert keep_end["completion_mask"][0].tolist() == [0, 0, 1, 1]


# ----------------------------------------------------------------------------------------------------------------
# load_preference_data: train / eval sources


def test_eval_data_sources(tmp_path, capsys):
    train = tiny.write_jsonl(tmp_path / "train.jsonl", ROWS["explicit"][:6])
    held_out = tiny.write_jsonl(tmp_path / "held_out.jsonl", ROWS["explicit"][6:9])
    cfg = DPOConfig(dataset=[str(train)], max_length=None)
    assert load_preference_data(cfg, TOK, split="eval") is None

    cfg.eval_dataset, cfg.max_eval_samples = [str(held_out)], 2
    evals = load_preference_data(cfg, TOK, split="eval")
    assert [ex["origin"] for ex in evals] == [f"{held_out}, row 1", f"{held_out}, row 2"]
    assert "preference data (eval): 2 rows read, 0 dropped, 2 kept" in capsys.readouterr().out

    folder = tmp_path / "dict"
    splits = {"train": ROWS["explicit"][:6], "test": ROWS["explicit"][6:9]}
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(str(folder))
    cfg = DPOConfig(dataset=[str(folder)], eval_split="test", max_length=None, max_samples=4)
    assert len(load_preference_data(cfg, TOK, split="train")) == 4
    assert len(load_preference_data(cfg, TOK, split="eval")) == 3

    cfg = DPOConfig(dataset=[str(train)], eval_split="test", max_length=None)
    capsys.readouterr()
    assert len(load_preference_data(cfg, TOK, split="eval")) == 6
    assert "evaluates on the training rows" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------
# Bad rows: one UserError naming the file, the row and the field


def bad(kind, i, field, value):
    rows = tiny.preference_rows(3, kind)
    if value is DELETE:
        del rows[i][field]
    else:
        rows[i][field] = value
    return rows


DELETE = object()
BAD_CASES = {
    "missing column": (bad("explicit", 1, "rejected", DELETE), 2, "rejected", "'prompt', 'chosen'"),
    "null chosen": (bad("explicit", 1, "chosen", None), 2, "chosen", "null"),
    "null prompt": (bad("explicit", 2, "prompt", None), 3, "prompt", "null"),
    "number": (bad("explicit", 0, "chosen", 42), 1, "chosen", "got int"),
    "empty chosen": (bad("explicit", 2, "chosen", ""), 3, "chosen", "empty"),
    "empty message list": (bad("conversational", 1, "rejected", []), 2, "rejected", "empty"),
    "empty prompt list": (bad("conversational", 0, "prompt", []), 1, "prompt", "empty"),
    "message not a dict": (bad("conversational", 2, "chosen", ["hello"]), 3, "chosen", "message 0"),
    "missing role": (bad("conversational", 0, "chosen", [{"content": "hi"}]), 1, "chosen", "'role'"),
    "missing content": (bad("conversational", 0, "rejected", [{"role": "assistant"}]), 1, "rejected", "'content'"),
    "unknown role": (bad("conversational", 1, "prompt", [msg("wizard", "hi")]), 2, "prompt", "wizard"),
    "content not a string": (bad("conversational", 2, "chosen", [msg("assistant", 3)]), 3, "chosen", "string"),
    "mixed kinds": (bad("conversational", 1, "rejected", "a string"), 2, "rejected", "same kind"),
    "bad tools JSON": (bad("conversational", 0, "tools", "[{"), 1, "tools", "JSON"),
    "images": (bad("explicit", 1, "images", ["img.png"]), 2, "images", "not supported"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_rows_name_file_row_and_field(tmp_path, case):
    rows, number, field, needle = BAD_CASES[case]
    with pytest.raises(UserError) as err:
        nanodpo_prepare(tmp_path, rows)
    message = str(err.value)
    assert "data.jsonl" in message and f"row {number}," in message and f"'{field}'" in message, message
    assert needle in message, message


def test_conversational_data_needs_a_chat_template(tmp_path):
    tokenizer = tiny.make_tokenizer()
    tokenizer.chat_template = None
    path = tiny.write_jsonl(tmp_path / "data.jsonl", tiny.preference_rows(2, "conversational"))
    with pytest.raises(UserError) as err:
        load_preference_data(DPOConfig(dataset=[str(path)]), tokenizer)
    message = str(err.value)
    assert "data.jsonl, row 1" in message and "'chosen'" in message and "--chat_template" in message


def test_empty_dataset_and_all_rows_dropped(tmp_path):
    empty = tmp_path / "data.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match="data.jsonl.*empty"):
        load_preference_data(DPOConfig(dataset=[str(empty)]), TOK)
    rows = [{"prompt": LONG, "chosen": " a", "rejected": " b"}] * 2
    with pytest.raises(UserError) as err:
        nanodpo_prepare(tmp_path, rows, max_length=8)
    message = str(err.value)
    assert "all 2 rows were dropped" in message and "--max_length 8" in message
    assert "data.jsonl, row 1, field 'prompt'" in message and "--max_prompt_length" in message


def test_every_row_is_checked_before_any_is_tokenized():
    calls = []

    class CountingTokenizer:
        eos_token = EOS

        def __call__(self, text):
            calls.append(text)
            return TOK(text)

    rows = [Row(r, "data.jsonl", i + 1) for i, r in enumerate(tiny.preference_rows(3))]
    rows[2].data["chosen"] = None
    with pytest.raises(UserError, match="row 3"):
        build_examples(rows, CountingTokenizer())
    assert calls == []
