"""nanodpo/data.py: every file format loads the same rows, splits and max_samples work, the hub path calls
`datasets.load_dataset` with the right arguments, and bad inputs are UserErrors naming the file (and row)."""

import csv
import gzip
import json
import pickle

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanodpo.data import Row, load_rows
from nanodpo.errors import UserError
from tests import tiny

CONV = tiny.preference_rows(6, "conversational")  # nested lists of messages
EXPLICIT = tiny.preference_rows(6, "explicit")  # flat strings (what CSV can hold)


def data_of(rows: list[Row]) -> list[dict]:
    return [row.data for row in rows]


def write_json(path, value):
    path.write_text(json.dumps(value, ensure_ascii=False), encoding="utf-8")
    return path


def write_csv(path, rows):
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Formats


@pytest.mark.parametrize("suffix", ["jsonl", "jsonl.gz", "json", "json.gz", "json-data", "json-as-lines", "parquet"])
def test_formats_load_the_same_rows(tmp_path, suffix):
    if suffix == "jsonl":
        path = tiny.write_jsonl(tmp_path / "d.jsonl", CONV)
    elif suffix == "jsonl.gz":
        path = tmp_path / "d.jsonl.gz"
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in CONV)
    elif suffix == "json":
        path = write_json(tmp_path / "d.json", CONV)
    elif suffix == "json.gz":
        path = tmp_path / "d.json.gz"
        with gzip.open(path, "wt", encoding="utf-8") as f:
            json.dump(CONV, f)
    elif suffix == "json-data":
        path = write_json(tmp_path / "d.json", {"version": 1, "data": CONV})
    elif suffix == "json-as-lines":  # JSON Lines under a .json name, as many hub datasets have it
        path = tiny.write_jsonl(tmp_path / "d.json", CONV)
    else:
        path = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist(CONV), path)
    rows = load_rows([str(path)], "train")
    assert data_of(rows) == CONV
    assert [row.number for row in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[2].where("chosen") == f"{path}, row 3, field 'chosen'"
    # a plain file has a single split: any requested name gives its rows, once
    assert data_of(load_rows([str(path)], "test")) == CONV
    assert data_of(load_rows([str(path)], "train+test")) == CONV


def test_csv_and_txt(tmp_path):
    path = write_csv(tmp_path / "d.csv", EXPLICIT)
    assert data_of(load_rows([str(path)], "train")) == EXPLICIT
    txt = tmp_path / "corpus.txt"
    txt.write_text("first line\n\nsecond line\r\nthird\n", encoding="utf-8")
    rows = load_rows(txt)  # a single source, as a Path, works too
    assert data_of(rows) == [{"text": "first line"}, {"text": "second line"}, {"text": "third"}]
    assert [row.number for row in rows] == [1, 3, 4]  # the line numbers (the blank line is skipped)


def test_jsonl_rows_are_numbered_by_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(EXPLICIT[0]) + "\n\n" + json.dumps(EXPLICIT[1]) + "\n", encoding="utf-8")
    assert [row.number for row in load_rows([str(path)])] == [1, 3]


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    single = tmp_path / "single"
    datasets.Dataset.from_list(CONV).save_to_disk(str(single))
    assert data_of(load_rows([str(single)], "anything")) == CONV

    both = tmp_path / "dict"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(CONV[:4]), "test": datasets.Dataset.from_list(CONV[4:])}
    ).save_to_disk(str(both))
    assert data_of(load_rows([str(both)], "train")) == CONV[:4]
    test_rows = load_rows([str(both)], "test")
    assert data_of(test_rows) == CONV[4:]
    assert test_rows[0].where() == f"{both} [test], row 1" and test_rows[0].split == "test"
    assert data_of(load_rows([str(both)], "train+test")) == CONV
    with pytest.raises(UserError) as err:
        load_rows([str(both)], "validation")
    assert "validation" in str(err.value) and "train" in str(err.value) and "test" in str(err.value)


def test_json_with_named_splits(tmp_path):
    path = write_json(tmp_path / "splits.json", {"train": CONV[:4], "test": CONV[4:]})
    assert data_of(load_rows([str(path)], "test")) == CONV[4:]
    assert data_of(load_rows([str(path)], "train+test")) == CONV
    with pytest.raises(UserError, match="splits.json.*no split 'dev'.*train, test"):
        load_rows([str(path)], "dev")


def test_folder_of_files_glob_and_several_sources(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    tiny.write_jsonl(folder / "a.jsonl", CONV[:2])
    pq.write_table(pa.Table.from_pylist(CONV[2:4]), folder / "b.parquet")
    write_json(folder / "c.json", CONV[4:])
    (folder / "README.md").write_text("# not data\n")  # other files are ignored
    assert data_of(load_rows([str(folder)], "train")) == CONV
    glob_rows = load_rows([str(folder / "*.json*")], "train")  # a.jsonl and c.json, sorted
    assert data_of(glob_rows) == CONV[:2] + CONV[4:]
    assert glob_rows[2].where() == f"{folder / 'c.json'}, row 1"
    two = load_rows([str(folder / "c.json"), str(folder / "a.jsonl")], "train")
    assert data_of(two) == CONV[4:] + CONV[:2]


def test_max_samples_takes_the_first_rows_across_sources(tmp_path):
    a = tiny.write_jsonl(tmp_path / "a.jsonl", CONV[:3])
    b = tiny.write_jsonl(tmp_path / "b.jsonl", CONV[3:])
    assert data_of(load_rows([str(a), str(b)], "train", max_samples=4)) == CONV[:4]
    assert data_of(load_rows([str(a)], "train", max_samples=100)) == CONV[:3]
    # only what is needed is read: a broken line after the first N rows does not matter
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(CONV[0]) + "\n{not json\n", encoding="utf-8")
    assert len(load_rows([str(broken)], "train", max_samples=1)) == 1
    with pytest.raises(UserError, match="at least 1"):
        load_rows([str(a)], "train", max_samples=0)


def test_hub_id_calls_load_dataset(monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split, kwargs))
        return datasets.Dataset.from_list(CONV)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows = load_rows(["trl-lib/ultrafeedback_binarized"], "train+test", config_name="default", max_samples=5)
    assert calls == [("trl-lib/ultrafeedback_binarized", "default", "train+test", {})]
    assert data_of(rows) == CONV[:5]
    assert rows[1].where("chosen") == "trl-lib/ultrafeedback_binarized [train+test], row 2, field 'chosen'"
    assert rows[0].split == "train+test"

    load_rows(["imdb"], "test")
    assert calls[-1] == ("imdb", None, "test", {})


def test_hub_failure_is_a_user_error(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match="--eval_dataset owner/name.*hub.*no network"):
        load_rows(["owner/name"], "test", flag="--eval_dataset")


# ----------------------------------------------------------------------------------------------------------------
# Bad inputs


def raises(sources, *needles, split="train"):
    with pytest.raises(UserError) as err:
        load_rows([str(s) for s in sources], split)
    message = str(err.value)
    for needle in needles:
        assert needle in message, message
    return message


def test_malformed_json_line_names_file_and_row(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(EXPLICIT[0]) + "\n" + json.dumps(EXPLICIT[1]) + '\n{"prompt": "x",\n', encoding="utf-8")
    raises([path], "data.jsonl", "row 3", "not valid JSON")
    path.write_text(json.dumps(EXPLICIT[0]) + "\n[1, 2]\n", encoding="utf-8")
    raises([path], "data.jsonl", "row 2", "JSON object")


def test_malformed_json_file_names_the_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n {"a": 1},\n {"a": 2,}\n]\n', encoding="utf-8")
    raises([path], "data.json", "line 3", "not valid JSON")
    write_json(path, [{"a": 1}, "oops"])
    raises([path], "data.json", "row 2", "JSON object")
    write_json(path, 42)
    raises([path], "data.json", "list of objects")
    write_json(path, {"name": "x"})
    raises([path], "data.json", "no list")


def test_invalid_utf8_is_named(tmp_path):
    good = json.dumps(EXPLICIT[0]).encode()
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_bytes(good + b"\n" + b'{"prompt": "caf\xe9"}\n')
    raises([jsonl], "data.jsonl", "row 2", "UTF-8")
    for name in ("data.json", "data.csv", "data.txt"):
        path = tmp_path / name
        path.write_bytes(b'[{"text": "ok"},\n{"text": "caf\xe9"}]' if name.endswith("json") else b"text\nok\ncaf\xe9\n")
        raises([path], name, "UTF-8", "line 2" if name.endswith("json") else "line 3")


@pytest.mark.parametrize("name", ["data.jsonl", "data.json", "data.csv", "data.txt", "data.jsonl.gz", "data.parquet"])
def test_empty_file(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".gz"):
        with gzip.open(path, "wb"):
            pass
    elif name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist([], schema=pa.schema([("text", pa.string())])), path)
    elif name == "data.json":
        path.write_text("[]")
    elif name == "data.csv":
        path.write_text("prompt,chosen,rejected\n")
    else:
        path.write_text("\n\n")
    raises([path], name, "empty")


def test_bad_paths(tmp_path):
    raises([tmp_path / "missing.jsonl"], "missing.jsonl", "no such file")
    raises(["./nope/data"], "./nope/data", "no such file")
    raises([tmp_path / "*.parquet"], "matches no files")
    empty_dir = tmp_path / "not_a_dataset"
    empty_dir.mkdir()
    (empty_dir / "notes.md").write_text("hello")
    raises([empty_dir], "not_a_dataset", "not a dataset")
    with pytest.raises(UserError, match="--dataset: no data given"):
        load_rows([], "train")


def test_pickles_and_unknown_types_are_refused(tmp_path):
    path = tmp_path / "data.pkl"
    path.write_bytes(pickle.dumps(EXPLICIT))
    raises([path], "data.pkl", "pickle")
    other = tmp_path / "data.xml"
    other.write_text("<rows/>")
    raises([other], "data.xml", "unsupported file type")


def test_csv_row_with_too_many_values(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("prompt,chosen,rejected\na,b,c\nd,e,f,g\n", encoding="utf-8")
    raises([path], "data.csv", "row 2", "more values")
