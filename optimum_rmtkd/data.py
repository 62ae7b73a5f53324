"""Datasets in: `datasets.Dataset` objects or anything `datasets.load_dataset` reads (the tasks preprocess them)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import datasets
from transformers.utils import logging

logger = logging.get_logger(__name__)

DatasetLike = Union[datasets.Dataset, str, os.PathLike]
_FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def load_split(source: DatasetLike, split: str = "train", **load_kwargs: Any) -> datasets.Dataset:
    """A `datasets.Dataset` from a Dataset, a local csv/json/parquet file, a local folder, or a Hub dataset id.

    Local files go through `load_dataset("<builder>", data_files=...)`; other strings through
    `load_dataset(source, split=split)`, which for a Hub id needs network access.
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
    path = Path(source)
    if path.is_file():
        builder = _FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"Cannot read dataset file {str(path)!r}: supported extensions are {', '.join(sorted(_FILE_BUILDERS))}."
            )
        extra = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
        return datasets.load_dataset(builder, data_files=str(path), split="train", **extra, **load_kwargs)
    return datasets.load_dataset(str(source), split=split, **load_kwargs)


def check_columns(dataset: datasets.Dataset, columns: Sequence[Optional[str]], name: str) -> None:
    """Raise a `ValueError` naming the missing column and the ones that exist, or when `dataset` is empty."""
    if len(dataset) == 0:
        raise ValueError(f"`{name}` is empty; pass a dataset with at least one example.")
    for column in columns:
        if column is not None and column not in dataset.column_names:
            raise ValueError(
                f"`{name}` has no column {column!r}; its columns are {', '.join(dataset.column_names)}. "
                "Pass the right `text_column`/`image_column`/`label_column` (`--text-column`/`--image-column`/"
                "`--label-column` on the command line)."
            )


def calibration_subset(dataset: datasets.Dataset, fraction: float, cap: int, seed: int) -> datasets.Dataset:
    """The paper's calibration set: a random `fraction` of the training split, at most `cap` examples."""
    size = max(2, min(cap, int(round(len(dataset) * fraction))))
    size = min(size, len(dataset))
    return dataset.shuffle(seed=seed).select(range(size))
