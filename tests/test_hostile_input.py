"""Hostile input, over all three scripts: every bad file, row, config or flag combination is refused before any
training with one sentence naming the file/row/field/flag — and nothing is written to --output_dir — or is handled
by a documented policy (over-long text is truncated; a tokenizer without a pad token pads with EOS).

The scripts' `main()` runs in-process here (fast); tests/test_train_*_errors-style subprocess tests elsewhere check
the exit status 2 and the absence of a traceback."""

import json
from pathlib import Path

import pytest

import train_dpo
import train_pt
import train_sft
from nanodpo.errors import UserError
from tests import tiny

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
SCRIPTS = {"dpo": train_dpo, "sft": train_sft, "pt": train_pt}
GOOD_ROW = {
    "dpo": {"prompt": "Hi?", "chosen": " Hello!", "rejected": " Go away."},
    "sft": {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello!"}]},
    "pt": {"text": "Once upon a time."},
}
FIELD = {"dpo": "chosen", "sft": "messages", "pt": "text"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny.make_model_dir(tmp_path_factory.mktemp("hostile") / "model")


def refuse(kind: str, model_dir: Path, tmp_path: Path, data: Path | str, *extra: str) -> str:
    out = tmp_path / "out"
    argv = ["--model", str(model_dir), "--dataset", str(data), "--output_dir", str(out), "--max_steps", "1",
            "--max_length", "32", "--disable_tqdm", *extra]  # fmt: skip
    with pytest.raises(UserError) as err:
        SCRIPTS[kind].main(argv)
    assert not out.exists(), "a refused run must leave nothing in output_dir"
    message = str(err.value)
    assert "\n" not in message.strip() or len(message) < 600, message
    return message


def write_lines(path: Path, lines: list[str | bytes]) -> Path:
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    return path


@pytest.mark.parametrize("kind", SCRIPTS)
def test_malformed_json_line(kind, model_dir, tmp_path):
    data = write_lines(tmp_path / "d.jsonl", [json.dumps(GOOD_ROW[kind]), '{"text": "unterminated'])
    message = refuse(kind, model_dir, tmp_path, data)
    assert "d.jsonl" in message and "2" in message


@pytest.mark.parametrize("kind", SCRIPTS)
@pytest.mark.parametrize("bad", [None, 42, "", ["not", "text"]], ids=["null", "number", "empty", "list"])
def test_wrong_type_null_or_empty_field(kind, bad, model_dir, tmp_path):
    row = dict(GOOD_ROW[kind])
    row[FIELD[kind]] = bad
    data = write_lines(tmp_path / "d.jsonl", [json.dumps(GOOD_ROW[kind]), json.dumps(row)])
    message = refuse(kind, model_dir, tmp_path, data)
    assert "d.jsonl, row 2" in message and FIELD[kind] in message


@pytest.mark.parametrize("kind", SCRIPTS)
def test_invalid_utf8(kind, model_dir, tmp_path):
    data = write_lines(tmp_path / "d.jsonl", [json.dumps(GOOD_ROW[kind]), b'{"text": "caf\xe9 \xff"}'])
    message = refuse(kind, model_dir, tmp_path, data)
    assert "d.jsonl" in message and "UTF-8" in message


@pytest.mark.parametrize("kind", SCRIPTS)
def test_empty_file(kind, model_dir, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    assert "empty.jsonl" in refuse(kind, model_dir, tmp_path, tmp_path / "empty.jsonl")


@pytest.mark.parametrize("kind", SCRIPTS)
def test_directory_that_is_not_a_dataset(kind, model_dir, tmp_path):
    folder = tmp_path / "notdata"
    folder.mkdir()
    (folder / "readme.md").write_text("hello")
    assert "notdata" in refuse(kind, model_dir, tmp_path, folder)


@pytest.mark.parametrize("kind", SCRIPTS)
def test_missing_split(kind, model_dir, tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list([GOOD_ROW[kind]] * 2)}).save_to_disk(tmp_path / "saved")
    message = refuse(kind, model_dir, tmp_path, tmp_path / "saved", "--dataset_split", "validation")
    assert "validation" in message and "train" in message


@pytest.mark.parametrize("kind", SCRIPTS)
@pytest.mark.parametrize(
    "yaml_text, needle", [("lerning_rate: 1e-5\n", "lerning_rate"), ("max_steps: many\n", "max_steps")]
)
def test_bad_yaml_config(kind, yaml_text, needle, model_dir, tmp_path):
    data = write_lines(tmp_path / "d.jsonl", [json.dumps(GOOD_ROW[kind])])
    (tmp_path / "run.yaml").write_text(yaml_text)
    message = refuse(kind, model_dir, tmp_path, data, "--config", str(tmp_path / "run.yaml"))
    assert needle in message and "run.yaml" in message


@pytest.mark.parametrize("kind", SCRIPTS)
@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--load_in_4bit"], "--use_lora"),
        (["--fp16"], "--fp16"),
        (["--bf16", "--fp16"], "exclusive"),
        (["--attn_implementation", "flash_attention_2"], "flash_attention_2"),
        (["--optim", "lion"], "--optim"),
    ],
)
def test_contradictory_or_unsupported_flags(kind, flags, needle, model_dir, tmp_path):
    data = write_lines(tmp_path / "d.jsonl", [json.dumps(GOOD_ROW[kind])])
    assert needle in refuse(kind, model_dir, tmp_path, data, *flags)


@pytest.mark.parametrize("kind", SCRIPTS)
@pytest.mark.parametrize(
    "flag, needle",
    [
        ("--learning_rate=-1", "--learning_rate must be >= 0, got -1.0"),
        ("--learning_rate=nan", "--learning_rate must be a finite number, got nan"),
        ("--per_device_train_batch_size=0", "--per_device_train_batch_size must be >= 1, got 0"),
        ("--warmup_ratio=2", "--warmup_ratio must be in [0, 1], got 2.0"),
    ],
)
def test_numbers_out_of_range(kind, flag, needle, model_dir, tmp_path):
    """Refused when parsed, before any data or model is read (tests/test_config.py checks every numeric option)."""
    assert refuse(kind, model_dir, tmp_path, tmp_path / "no-data-needed.jsonl", flag) == needle


def test_streaming_needs_max_steps(model_dir, tmp_path):
    data = write_lines(tmp_path / "d.jsonl", [json.dumps(GOOD_ROW["pt"])])
    assert "--max_steps" in refuse("pt", model_dir, tmp_path, data, "--streaming", "--max_steps", "-1")


def test_huge_strings_are_truncated_not_fatal(model_dir, tmp_path):
    """Policy: over-long text is cut to --max_length (PT splits documents into pieces), counted, never a crash."""
    from nanodpo.config import DPOConfig, SFTConfig, parse_config
    from nanodpo.dpo_data import load_preference_data
    from nanodpo.model import load_tokenizer
    from nanodpo.sft_data import load_sft_data

    huge = "word " * 50_000
    write_lines(tmp_path / "dpo.jsonl", [json.dumps({"prompt": "Q?", "chosen": huge, "rejected": " no"})])
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": huge}]
    write_lines(tmp_path / "sft.jsonl", [json.dumps({"messages": messages})])
    common = ["--model", str(model_dir), "--max_length", "64"]
    cfg = parse_config(DPOConfig, [*common, "--dataset", str(tmp_path / "dpo.jsonl")])
    tokenizer = load_tokenizer(cfg)
    [example] = load_preference_data(cfg, tokenizer)
    assert len(example["chosen_ids"]) > 64  # the collator truncates to max_length, as TRL does
    cfg = parse_config(SFTConfig, [*common, "--dataset", str(tmp_path / "sft.jsonl")])
    [doc] = load_sft_data(cfg, tokenizer)
    assert len(doc.input_ids) == 64


def test_tokenizer_without_pad_token_pads_with_eos(tmp_path):
    model_dir = tiny.make_model_dir(tmp_path / "model")
    no_pad = tiny.make_tokenizer()
    no_pad.pad_token = None
    no_pad.save_pretrained(model_dir)
    from nanodpo.config import DPOConfig, parse_config
    from nanodpo.model import load_tokenizer

    tokenizer = load_tokenizer(parse_config(DPOConfig, ["--model", str(model_dir)]))
    assert tokenizer.pad_token == tokenizer.eos_token
    # SFT's --eos_token first, then the fallback: the pad is the new EOS, as TRL's SFTTrainer sets them.
    from nanodpo.config import SFTConfig

    tokenizer = load_tokenizer(parse_config(SFTConfig, ["--model", str(model_dir), "--eos_token", "<|im_start|>"]))
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_start|>"


def test_paths_in_configs_are_not_expanded_beyond_home(tmp_path, monkeypatch):
    """`$VAR` and `$(cmd)` in a path are literal text, never expanded or executed; only `~` is."""
    from nanodpo.data import load_rows

    monkeypatch.setenv("NANODPO_SECRET_DIR", str(tmp_path))
    with pytest.raises(UserError, match=r"\$NANODPO_SECRET_DIR"):
        load_rows(["$NANODPO_SECRET_DIR/d.jsonl"])
    with pytest.raises(UserError):
        load_rows(["$(touch pwned)/d.jsonl"])
    assert not Path("pwned").exists()


def test_wandb_key_never_reaches_the_logged_config(tmp_path, monkeypatch):
    from nanodpo.config import DPOConfig, config_to_dict, parse_config

    monkeypatch.setenv("WANDB_API_KEY", "secret-key-123")
    logged = json.dumps(config_to_dict(parse_config(DPOConfig, ["--report_to", "wandb"])))
    assert "secret-key-123" not in logged
