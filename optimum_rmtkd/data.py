"""Datasets in: `datasets.Dataset` objects or anything `datasets.load_dataset` reads (the tasks preprocess them).

A local file is checked before and while it is read, so that what a user meets is one sentence with the fix, never a
`datasets` traceback or a 20-second Hub lookup: a path that does not exist, an unknown extension, an empty, binary or
broken file, a CSV with another delimiter, and a file with a header but no rows.
"""
from __future__ import annotations

import contextlib
import logging as std_logging
import os
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import datasets
from transformers.utils import logging

logger = logging.get_logger(__name__)

DatasetLike = Union[datasets.Dataset, str, os.PathLike]
_FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
SUPPORTED_SUFFIXES = tuple(_FILE_BUILDERS)
# Extensions of data files: a string ending in one of them names a local file, never a Hub dataset id (Hub ids are
# `name` or `namespace/name`, and may hold dots, as in `bigcode/the-stack-v1.2`).
_DATA_FILE_SUFFIXES = frozenset(SUPPORTED_SUFFIXES) | {
    ".txt", ".text", ".tab", ".ndjson", ".xlsx", ".xls", ".ods", ".xml", ".html", ".arrow", ".feather", ".orc",
    ".avro", ".pkl", ".pickle", ".npy", ".npz", ".h5", ".hdf5", ".zip", ".gz", ".bz2", ".xz", ".zst", ".tar", ".tgz",
    ".yaml", ".yml", ".db", ".sqlite", ".dat", ".data",
}
# Delimiters a CSV/TSV file may really use when its header reads as one column.
# Bytes of a text file checked for binary content before it is parsed.
_TEXT_CHECK_BYTES = 65536
_DELIMITERS = {",": "comma", ";": "semicolon", "\t": "tab", "|": "pipe"}


def looks_like_path(source: str) -> bool:
    """Whether a string that names no existing file or folder was meant as a local path rather than a Hub dataset id:
    it starts with `.`, `/` or `~`, has more than one `/`, ends in a data-file extension, or is no valid repo id."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if source.startswith((".", "/", "~")) or "\\" in source or os.path.isabs(source) or source.count("/") > 1:
        return True
    if Path(source).suffix.lower() in _DATA_FILE_SUFFIXES:
        return True
    try:
        validate_repo_id(source)
    except HFValidationError:
        return True
    return False


def check_data_source(source: Union[str, os.PathLike], name: str = "dataset") -> Optional[Path]:
    """Check a dataset given as a string or path before anything reads it; return it as a `Path` when it is a local
    file, `None` for a local folder or a Hub id.

    A path-like string that does not exist is refused at once (`datasets` would look it up on the Hub, which takes
    seconds and ends in an unrelated error), and so is an existing file whose extension no builder reads.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return None
    if path.is_file():
        if path.suffix.lower() not in _FILE_BUILDERS:
            raise ValueError(
                f"`{name}` {str(source)!r} has the extension {path.suffix or '(none)'!r}, which is not read; save it "
                f"as one of {', '.join(SUPPORTED_SUFFIXES)}."
            )
        return path
    if looks_like_path(str(source)):
        raise ValueError(
            f"`{name}` {str(source)!r} does not exist; pass an existing {'/'.join(s[1:] for s in SUPPORTED_SUFFIXES)} "
            "file, a dataset folder or a Hub dataset id."
        )
    return None


def load_split(
    source: DatasetLike, split: str = "train", name: str = "dataset", **load_kwargs: Any
) -> datasets.Dataset:
    """A `datasets.Dataset` from a Dataset, a local csv/tsv/json/jsonl/parquet file, a local folder or a Hub id.

    Local files go through `load_dataset("<builder>", data_files=...)`; other strings through
    `load_dataset(source, split=split)`, which for a Hub id needs network access. A local file that cannot be read,
    reads as one column whose name holds another delimiter, or has no rows is a `ValueError` naming `name` (the
    argument or flag the data came from), the file and the fix.
    """
    if isinstance(source, datasets.Dataset):
        return source
    if isinstance(source, datasets.DatasetDict):
        if split not in source:
            raise ValueError(f"The DatasetDict has no split {split!r}; available splits are {', '.join(source)}.")
        return source[split]
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"A dataset must be a `datasets.Dataset`, a file path or a dataset id, got {type(source).__name__}."
        )
    path = check_data_source(source, name)
    if path is None:
        return datasets.load_dataset(str(source), split=split, **load_kwargs)
    return _load_file(path, str(source), name, **load_kwargs)


def _load_file(path: Path, shown: str, name: str, **load_kwargs: Any) -> datasets.Dataset:
    suffix = path.suffix.lower()
    builder = _FILE_BUILDERS[suffix]
    kind = {".csv": "CSV", ".tsv": "TSV", ".json": "JSON", ".jsonl": "JSON Lines", ".parquet": "Parquet"}[suffix]
    if path.stat().st_size == 0:
        raise ValueError(f"`{name}` {shown!r} is empty (0 bytes); pass a {kind} file with at least one example.")
    if builder != "parquet":
        head = _check_text(path, shown, name, kind)
        start = head.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
        if builder == "json" and start and start not in b"{[":
            # `datasets` needs objects; a bare `null` even crashes its JSON reader (a segmentation fault).
            raise ValueError(
                f"`{name}` {shown!r} does not hold JSON objects (it starts with {start.decode(errors='replace')!r}); "
                "pass a JSON list of objects, or JSON Lines (one object per line, .jsonl)."
            )
    extra = {"delimiter": "\t"} if suffix == ".tsv" else {}
    try:
        with _datasets_errors_held():
            dataset = datasets.load_dataset(builder, data_files=str(path), split="train", **extra, **load_kwargs)
    except Exception as error:  # datasets wraps the parser's error (pandas, pyarrow, json) in its own
        raise ValueError(_read_error(error, shown, name, kind)) from error
    if builder == "csv":
        _check_delimiter(dataset, shown, name, suffix)
    if len(dataset) == 0:
        raise ValueError(_no_rows_message(shown, name, kind))
    return dataset


@contextlib.contextmanager
def _datasets_errors_held() -> Iterator[None]:
    """`datasets` logs a parser's failure at ERROR level before raising it; the raised error becomes the one message."""
    datasets_logger = std_logging.getLogger("datasets")
    level = datasets_logger.level
    datasets_logger.setLevel(std_logging.CRITICAL)
    try:
        yield
    finally:
        datasets_logger.setLevel(level)


def _check_text(path: Path, shown: str, name: str, kind: str) -> bytes:
    """A text format must be UTF-8 text: a binary file (NUL bytes, or bytes no UTF-8 text has) is refused before the
    parser reads it, as the parser may read it as garbage columns rather than fail. Returns the bytes read."""
    with path.open("rb") as handle:
        head = handle.read(_TEXT_CHECK_BYTES)
    nul = head.find(b"\x00")
    if nul >= 0:
        raise ValueError(_not_text_message(shown, name, kind, f"a NUL byte at offset {nul}"))
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as error:
        # A read that stops inside a multi-byte character ends in an incomplete sequence: not a fault of the file.
        if error.start < len(head) - 3 or len(head) < _TEXT_CHECK_BYTES:
            raise ValueError(_not_text_message(
                shown, name, kind, f"byte {head[error.start:error.start + 1]!r} at offset {error.start}")) from None
    return head


def _not_text_message(shown: str, name: str, kind: str, where: str) -> str:
    return (f"`{name}` {shown!r} is not UTF-8 text ({where}): is it a binary file? Pass a {kind} file saved as "
            "UTF-8.")


def _no_rows_message(shown: str, name: str, kind: str) -> str:
    header = " (only a header)" if kind in ("CSV", "TSV") else ""
    return f"`{name}` {shown!r} has no rows{header}; pass a file with at least one example."


def _read_error(error: BaseException, shown: str, name: str, kind: str) -> str:
    """The message for a file `datasets` could not read, from the innermost error it wraps."""
    cause = error
    while cause.__cause__ is not None:
        cause = cause.__cause__
    if isinstance(error, ValueError) and "corresponds to no data" in str(error):
        # The builder yields nothing (a CSV header alone, an empty JSON list), and the split is then refused.
        return _no_rows_message(shown, name, kind)
    if isinstance(cause, UnicodeDecodeError):
        return _not_text_message(shown, name, kind, f"byte {cause.object[cause.start:cause.start + 1]!r} at offset "
                                                    f"{cause.start}")
    reason = " ".join(str(cause).split()) or type(cause).__name__
    if kind.startswith("JSON"):
        return (
            f"`{name}` {shown!r} is not valid JSON ({reason}); fix it: a JSON list of objects, or JSON Lines (one "
            "object per line, .jsonl), each with the same fields."
        )
    return f"`{name}` {shown!r} could not be read as {kind} ({reason}); fix the file or write it again."


def _check_delimiter(dataset: datasets.Dataset, shown: str, name: str, suffix: str) -> None:
    """A CSV/TSV file whose header reads as one column named like `text;label` uses another delimiter."""
    if len(dataset.column_names) != 1:
        return
    column = dataset.column_names[0]
    expected = "\t" if suffix == ".tsv" else ","
    for delimiter, word in _DELIMITERS.items():
        if delimiter == expected or len([part for part in column.split(delimiter) if part.strip()]) < 2:
            continue
        fix = ("rename it to .tsv" if delimiter == "\t" else "rename it to .csv" if delimiter == "," else
               "save it with commas (.csv) or tabs (.tsv)")
        raise ValueError(
            f"`{name}` {shown!r} reads as one column {column!r}: it looks {word}-separated, but a {suffix} file is "
            f"read {_DELIMITERS[expected]}-separated; {fix}."
        )


def check_columns(dataset: datasets.Dataset, columns: Sequence[Optional[str]], name: str) -> None:
    """Raise a `ValueError` naming the missing column and the ones that exist, or when `dataset` is empty."""
    if len(dataset) == 0:
        raise ValueError(f"`{name}` is empty; pass a dataset with at least one example.")
    for column in columns:
        if column is not None and column not in dataset.column_names:
            raise ValueError(
                f"`{name}` has no column {column!r}; its columns are {', '.join(dataset.column_names)}. "
                "Pass the right `text_column`/`image_column`/`label_column`."
            )


def calibration_subset(dataset: datasets.Dataset, fraction: float, cap: int, seed: int) -> datasets.Dataset:
    """The paper's calibration set: a random `fraction` of the training split, at most `cap` examples."""
    size = max(2, min(cap, int(round(len(dataset) * fraction))))
    size = min(size, len(dataset))
    return dataset.shuffle(seed=seed).select(range(size))
