"""Loading rows of data from local files, `save_to_disk` folders and hub datasets (shared by PT, SFT and DPO).

    rows = load_rows(["data/prefs.jsonl"], "train", max_samples=1000)
    rows[0].data            # {"prompt": ..., "chosen": ..., "rejected": ...}
    rows[0].where("chosen") # "data/prefs.jsonl, row 1, field 'chosen'"  (for error messages)

Every row remembers where it came from, so a bad value deep in a file is reported as
`prefs.jsonl, row 12, field 'chosen': ...` before training starts, not as a traceback mid-run.

What a source (one `--dataset` value) can be:

    file.jsonl / .jsonl.gz   one JSON object per line (blank lines skipped; row N is line N of the file)
    file.json / .json.gz     a list of objects; or {"data": [...]}; or {"train": [...], "test": [...]} (named
                             splits); a .json file holding one object per line is read as JSON Lines
    file.parquet             any parquet file (read with pyarrow)
    file.csv                 a header line, then one row per line; every value is a string
    file.txt                 one row per non-empty line, as {"text": line} (pretraining corpora; row N = line N)
    folder/                  a `datasets.save_to_disk` folder (Dataset or DatasetDict), or else every supported
                             file directly inside the folder (sorted by name; sub-folders are not searched)
    data/*.jsonl             a glob: every match, sorted by name
    owner/name               anything else that is not a local path: a hub dataset, through
                             `datasets.load_dataset(owner/name, config_name, split=split)`

Splits: `split` is a name or several joined by '+' ("train+test"). A plain file or folder of files has one split,
used whatever name is asked for (rows are not repeated for "train+test"). Sources with named splits (a DatasetDict
folder, a JSON file of {split: [...]}, a hub dataset) must have every requested split, or a UserError lists the ones
they do have. HF slicing syntax ("train[:10%]") works for hub ids only.

Pickles are never loaded (unpickling runs arbitrary code): convert them to jsonl or parquet.
"""

import csv
import glob
import gzip
import io
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Sampler

from nanodpo.errors import UserError
from nanodpo.llamafactory import DatasetInfo, read_registry

FILE_FORMATS = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".csv", ".txt")
PICKLE_SUFFIXES = (".pkl", ".pickle", ".pck", ".pt", ".pth", ".bin", ".npy", ".npz", ".joblib")


@dataclass
class Row:
    """One row of data and where it came from: `source` (file path or hub id) and its 1-based row `number`.

    In line-based files (jsonl, txt) the row number is the line number, as your editor shows it (blank lines are
    skipped but counted); elsewhere it is the n-th row (of a JSON list, of a CSV after its header line, of a
    parquet/arrow/hub table). `split` is the split name
    for sources that have named splits (DatasetDict folder, {split: [...]} JSON, hub) and None for single-split files.
    `dataset_info` is set for rows of a dataset named in a LLaMA-Factory dataset_info.json (`--dataset_info`).
    """

    data: dict[str, Any]
    source: str
    number: int
    split: str | None = None
    dataset_info: DatasetInfo | None = None  # its --dataset_info entry: how to read a LLaMA-Factory row

    def where(self, field: str | None = None) -> str:
        """'data.jsonl, row 12' or, with a field, "data.jsonl, row 12, field 'chosen'"."""
        text = f"{self.source}, row {self.number}"
        return f"{text}, field '{field}'" if field is not None else text


def load_rows(
    sources: list[str] | str,
    split: str = "train",
    *,
    config_name: str | None = None,
    max_samples: int | None = None,
    flag: str = "--dataset",
) -> list[Row]:
    """Rows of every source in order (the first `max_samples` of them, if set), each tagged with its origin.

    `flag` only names the option in error messages ("--dataset", "--eval_dataset").
    """
    if isinstance(sources, (str, Path)):
        sources = [sources]
    sources = [str(source) for source in sources]  # Path objects welcome
    if not sources:
        raise UserError(f"{flag}: no data given (a file, folder, glob or hub id)")
    if max_samples is not None and max_samples < 1:
        raise UserError(f"{flag}: the number of samples to keep must be at least 1, got {max_samples}")
    parts = [part.strip() for part in split.split("+")]
    if not all(parts):
        raise UserError(f"{flag}: bad split {split!r} (expected e.g. 'train' or 'train+test')")

    # A generator all the way down: with max_samples, large line-based files are read only as far as needed.
    return list(islice(iter_rows(sources, split, config_name=config_name, flag=flag), max_samples))


def iter_rows(sources: list[str], split: str = "train", *, config_name: str | None = None, flag: str = "--dataset"):
    """Rows of every source in order, read lazily (jsonl, txt and csv line by line): streaming for big corpora."""
    parts = [part.strip() for part in split.split("+")]
    for source in sources:
        yield from _load_source(str(source), split, parts, config_name, flag)


def load_split_rows(cfg, split: str = "train") -> list[Row] | None:
    """The rows a script trains ("train") or evaluates ("eval") on; None when no evaluation data is configured.

    train: `--dataset` at `--dataset_split`, first `--max_samples` rows.
    eval:  `--eval_dataset` at `--eval_split` (default "test"; any name works for plain files), or else
           `--eval_split` of `--dataset`; first `--max_eval_samples` rows. `--dataset_config` applies to both.
    With `--dataset_info` (SFT and DPO), the sources are names of its entries (see `load_registered_rows`).
    """
    if split == "train":
        sources, split_name, max_samples, flag = cfg.dataset, cfg.dataset_split, cfg.max_samples, "--dataset"
    elif split == "eval":
        if cfg.eval_dataset:
            sources, split_name, flag = cfg.eval_dataset, cfg.eval_split or "test", "--eval_dataset"
        elif cfg.eval_split:
            sources, split_name, flag = cfg.dataset, cfg.eval_split, "--dataset"
        else:
            return None
        max_samples = cfg.max_eval_samples
    else:
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")

    if getattr(cfg, "dataset_info", None):
        keep_entry_split = split == "train" or bool(cfg.eval_dataset)  # --eval_split X of --dataset asks for X
        rows = load_registered_rows(cfg.dataset_info, sources, split_name, cfg.dataset_config, max_samples, flag,
                                    keep_entry_split)  # fmt: skip
    else:
        rows = load_rows(sources, split_name, config_name=cfg.dataset_config, max_samples=max_samples, flag=flag)
    if split == "eval" and not cfg.eval_dataset and all(row.split is None for row in rows):
        print(
            f"warning: {' '.join(sources)} has a single split, so --eval_split {split_name!r} evaluates on the "
            "training rows; give held-out data with --eval_dataset"
        )
    return rows


def load_registered_rows(
    dataset_info: str,
    names: list[str],
    split: str,
    config_name: str | None,
    max_samples: int | None,
    flag: str,
    keep_entry_split: bool = True,
) -> list[Row]:
    """Rows of the datasets `names` registered in a LLaMA-Factory dataset_info.json, each tagged with its entry.

    An entry's `file_name` (relative to the folder of dataset_info.json) or `hf_hub_url` is the source; its `split`
    (if it has one and `keep_entry_split`) replaces `split`, its `subset` the hub configuration.
    """
    rows: list[Row] = []
    for info in read_registry(dataset_info, names, flag):
        if max_samples is not None and len(rows) == max_samples:
            break
        remaining = None if max_samples is None else max_samples - len(rows)
        entry_split = info.split if info.split and keep_entry_split else split
        config = info.subset or config_name
        for row in load_rows(info.source, entry_split, config_name=config, max_samples=remaining, flag=flag):
            row.dataset_info = info
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Sources: glob, local path or hub id.


def _load_source(source: str, split: str, parts: list[str], config_name: str | None, flag: str) -> Iterator[Row]:
    if any(ch in source for ch in "*?["):
        matches = sorted(glob.glob(str(Path(source).expanduser()), recursive=True))
        if not matches:
            raise UserError(f"{flag} {source}: the pattern matches no files")
        for match in matches:
            yield from _load_path(Path(match), parts, flag)
        return
    path = Path(source).expanduser()
    if path.exists():
        yield from _load_path(path, parts, flag)
    elif _looks_like_hub_id(source):
        yield from _load_hub(source, split, config_name, flag)
    else:
        raise UserError(f"{flag} {source}: no such file or folder (and not a hub dataset id like 'owner/name')")


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _looks_like_hub_id(source: str) -> bool:
    """'owner/name' or 'name' that is not a missing local file (no data-file suffix, no ./ or ~ or extra slashes)."""
    lowered = source.lower()
    if lowered.endswith(FILE_FORMATS) or lowered.endswith(PICKLE_SUFFIXES) or lowered.endswith(".arrow"):
        return False
    return bool(_HUB_ID.match(source))


def _load_hub(hub_id: str, split: str, config_name: str | None, flag: str) -> Iterator[Row]:
    import datasets  # imported here: it is slow to import and only the hub and save_to_disk paths need it

    try:
        dataset = datasets.load_dataset(hub_id, config_name, split=split)
    except Exception as err:  # no network, unknown id, gated repo, unknown config or split, ...
        raise UserError(
            f"{flag} {hub_id}: could not load it from the Hugging Face hub ({type(err).__name__}: {err})"
        ) from None
    if len(dataset) == 0:
        raise UserError(f"{flag} {hub_id}: split {split!r} has no rows")
    for i, example in enumerate(dataset):
        yield Row(dict(example), f"{hub_id} [{split}]", i + 1, split=split)


def _load_path(path: Path, parts: list[str], flag: str) -> Iterator[Row]:
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            yield from _load_saved_dataset(path, parts)
            return
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(FILE_FORMATS))
        if not files:
            raise UserError(
                f"{flag} {path}: this folder is not a dataset: no `save_to_disk` files (dataset_dict.json or "
                f"state.json) and no data files ({', '.join(FILE_FORMATS)}) directly inside it"
            )
        for file in files:
            yield from _load_file(file, parts)
    else:
        yield from _load_file(path, parts)


# ----------------------------------------------------------------------------------------------------------------
# Files.


def _load_file(path: Path, parts: list[str]) -> Iterator[Row]:
    name = path.name.lower()
    if name.endswith(PICKLE_SUFFIXES):
        raise UserError(
            f"{path}: nanodpo never loads pickled or binary tensor files (unpickling can run arbitrary code); "
            "convert the data to jsonl or parquet"
        )
    if name.endswith((".jsonl", ".jsonl.gz")):
        rows = _read_jsonl(path)
    elif name.endswith((".json", ".json.gz")):
        rows = _read_json(path, parts)
    elif name.endswith(".parquet"):
        rows = _read_parquet(path)
    elif name.endswith(".csv"):
        rows = _read_csv(path)
    elif name.endswith(".txt"):
        rows = _read_txt(path)
    else:
        raise UserError(f"{path}: unsupported file type (supported: {', '.join(FILE_FORMATS)}, save_to_disk folders)")
    empty = True
    for row in rows:
        empty = False
        yield row
    if empty:
        raise UserError(f"{path}: the file is empty (no rows)")


def _read_bytes(path: Path) -> bytes:
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
        raise UserError(f"{path}: cannot read the file ({err})") from None


def _decode(path: Path, data: bytes) -> str:
    """UTF-8 text (a leading byte-order mark is dropped); a UserError names the line of the first bad byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise UserError(f"{path}, line {line}: not valid UTF-8 text (byte {err.object[err.start]:#04x})") from None


def _read_jsonl(path: Path) -> Iterator[Row]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError:
                    raise UserError(f"{path}, row {number}: not valid UTF-8 text") from None
                if line.strip():
                    yield Row(_parse_object(path, number, line), str(path), number)
    except (OSError, EOFError) as err:
        raise UserError(f"{path}: cannot read the file ({err})") from None


def _parse_object(path: Path, number: int, line: str) -> dict:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}, row {number}: not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}, row {number}: expected a JSON object {{...}}, got {type(value).__name__}")
    return value


def _read_json(path: Path, parts: list[str]) -> Iterator[Row]:
    text = _decode(path, _read_bytes(path))
    if not text.strip():
        return  # _load_file reports the empty file
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # several JSON values: JSON Lines saved with a .json name
            for number, line in enumerate(text.split("\n"), start=1):  # not splitlines(): U+2028 is valid JSON
                if line.strip():
                    yield Row(_parse_object(path, number, line), str(path), number)
            return
        raise UserError(f"{path}, line {err.lineno}: not valid JSON ({err.msg} at column {err.colno})") from None

    if isinstance(value, dict):
        if isinstance(value.get("data"), list):  # {"data": [...], ...}: a single split
            items = [(str(path), value["data"], None)]
        else:  # {"train": [...], "test": [...]}: named splits
            splits = {key: v for key, v in value.items() if isinstance(v, list)}
            if not splits:
                raise UserError(
                    f"{path}: expected a list of objects, {{\"data\": [...]}} or {{split: [...]}}; "
                    f"the top-level object has no list (keys: {', '.join(value) or 'none'})"
                )
            _check_splits(path, parts, list(splits))
            items = [(f"{path} [{part}]", splits[part], part) for part in parts]
    elif isinstance(value, list):
        items = [(str(path), value, None)]
    else:
        raise UserError(f"{path}: expected a list of objects, got a JSON {type(value).__name__}")

    for source, objects, split in items:
        for number, obj in enumerate(objects, start=1):
            if not isinstance(obj, dict):
                raise UserError(f"{source}, row {number}: expected a JSON object {{...}}, got {type(obj).__name__}")
            yield Row(obj, source, number, split=split)


def _read_parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... for a corrupt or non-parquet file
        raise UserError(f"{path}: not a readable parquet file ({err})") from None
    for number, obj in enumerate(table.to_pylist(), start=1):
        yield Row(obj, str(path), number)


def _read_csv(path: Path) -> Iterator[Row]:
    text = _decode(path, _read_bytes(path))
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # the default (128 KiB) is too small for long documents
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        for number, obj in enumerate(reader, start=1):
            if None in obj:
                raise UserError(f"{path}, row {number}: more values than the header has columns")
            yield Row(obj, str(path), number)
    except csv.Error as err:
        raise UserError(f"{path}, line {reader.line_num}: not valid CSV ({err})") from None


def _read_txt(path: Path) -> Iterator[Row]:
    text = _decode(path, _read_bytes(path))
    for number, line in enumerate(text.split("\n"), start=1):  # only \n (and \r\n) end a line
        line = line.removesuffix("\r")
        if line.strip():
            yield Row({"text": line}, str(path), number)


def _load_saved_dataset(path: Path, parts: list[str]) -> Iterator[Row]:
    """A `save_to_disk` folder: Arrow files read by `datasets.load_from_disk` (no pickles involved)."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:
        raise UserError(f"{path}: not a readable save_to_disk folder ({type(err).__name__}: {err})") from None
    if isinstance(loaded, datasets.DatasetDict):
        _check_splits(path, parts, list(loaded))
        items = [(f"{path} [{part}]", loaded[part], part) for part in parts]
    else:
        items = [(str(path), loaded, None)]
    for source, dataset, split in items:
        if len(dataset) == 0:
            raise UserError(f"{source}: the dataset is empty (no rows)")
        for number, example in enumerate(dataset, start=1):
            yield Row(dict(example), source, number, split=split)


def _check_splits(path: Path, parts: list[str], available: list[str]) -> None:
    missing = [part for part in parts if part not in available]
    if missing:
        raise UserError(
            f"{path}: no split {', '.join(map(repr, missing))}; it has: {', '.join(available)} "
            "(choose one with --dataset_split / --eval_split)"
        )


class EpochSampler(Sampler):
    """Row order for one epoch: a seeded permutation (`random`, reshuffled with seed + epoch) or file order.

    The same seed and epoch always give the same order, on every process and after a restart.
    """

    def __init__(self, num_rows: int, shuffle: bool, seed: int):
        self.num_rows = num_rows
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.num_rows))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.num_rows, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_rows


def micro_batches(step_examples: list, micro_batch_size: int) -> list[list]:
    return [step_examples[i : i + micro_batch_size] for i in range(0, len(step_examples), micro_batch_size)]


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
