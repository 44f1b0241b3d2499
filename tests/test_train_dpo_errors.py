"""A refused run: one clear sentence naming the file/row/field/flag, exit status 2, no traceback, and nothing
written to --output_dir."""

import subprocess
import sys
from pathlib import Path

import pytest

from tests import tiny

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny.make_model_dir(tmp_path_factory.mktemp("m") / "model")


def run_script(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train_dpo.py"), *args], capture_output=True, text=True, cwd=ROOT, timeout=300
    )


def refused(tmp_path, model_dir, rows_or_text, extra=(), filename="data.jsonl"):
    data = tmp_path / filename
    if isinstance(rows_or_text, str):
        data.write_text(rows_or_text)
    else:
        tiny.write_jsonl(data, rows_or_text)
    out = tmp_path / "out"
    result = run_script(["--model", str(model_dir), "--dataset", str(data), "--output_dir", str(out), *extra])
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert not out.exists(), "a refused run must not write to output_dir"
    return result.stderr


def test_missing_column(tmp_path, model_dir):
    err = refused(tmp_path, model_dir, [{"prompt": "hi", "chosen": "a"}])
    assert "data.jsonl" in err and "rejected" in err


def test_null_value(tmp_path, model_dir):
    rows = tiny.preference_rows(3)
    rows[1]["chosen"] = None
    err = refused(tmp_path, model_dir, rows)
    assert "data.jsonl" in err and "row 2" in err and "chosen" in err


def test_empty_completion(tmp_path, model_dir):
    rows = tiny.preference_rows(3)
    rows[2]["rejected"] = ""
    err = refused(tmp_path, model_dir, rows)
    assert "row 3" in err and "rejected" in err


def test_unknown_role(tmp_path, model_dir):
    rows = tiny.preference_rows(2, "conversational")
    rows[0]["prompt"][0]["role"] = "wizard"
    err = refused(tmp_path, model_dir, rows)
    assert "row 1" in err and "wizard" in err


def test_malformed_json_line(tmp_path, model_dir):
    err = refused(tmp_path, model_dir, '{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": oops}\n')
    assert "data.jsonl" in err and "2" in err


def test_unknown_loss_type(tmp_path, model_dir):
    err = refused(tmp_path, model_dir, tiny.preference_rows(2), extra=["--loss_type", "sigmoidd"])
    assert "loss_type" in err and "sigmoidd" in err


def test_incompatible_options(tmp_path, model_dir):
    err = refused(tmp_path, model_dir, tiny.preference_rows(2), extra=["--loss_type", "exo_pair"])
    assert "label_smoothing" in err
    err = refused(tmp_path, model_dir, tiny.preference_rows(2), extra=["--load_in_4bit"])
    assert "--use_lora" in err


def test_prompt_leaving_no_room_drops_every_row(tmp_path, model_dir):
    rows = [{"prompt": "word " * 100, "chosen": " a", "rejected": " b"}]
    err = refused(tmp_path, model_dir, rows, extra=["--max_length", "16"])
    assert "max_length" in err


def test_conversational_data_without_chat_template(tmp_path):
    model_dir = tiny.make_model_dir(tmp_path / "model")
    config = model_dir / "tokenizer_config.json"
    import json

    tok_config = json.loads(config.read_text())
    tok_config.pop("chat_template", None)
    config.write_text(json.dumps(tok_config))
    for extra in model_dir.glob("chat_template.*"):
        extra.unlink()
    err = refused(tmp_path, model_dir, tiny.preference_rows(2, "conversational"))
    assert "chat template" in err
