"""Tasks the compressor handles: which Auto class loads the model, and how examples become model inputs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import datasets
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from .data import tokenize_text_dataset


@dataclass(frozen=True)
class TaskSpec:
    """How one task loads and feeds its models.

    Attributes:
        auto_model: the `AutoModelFor*` class for the task.
        load_preprocessor: `(model_name_or_path, **hub_kwargs) -> tokenizer or image processor`.
        preprocess: `(dataset, preprocessor, columns, max_length, label_to_id, name) -> Dataset` of model inputs
            plus `labels` (`columns` holds the user's column names: `text`, `text_pair`, `image`, `label`).
        collator: `preprocessor -> collate_fn` for a `DataLoader`.
        input_column: the key of `columns` that names the input column (checked before any work).
    """

    auto_model: Any
    load_preprocessor: Callable[..., Any]
    preprocess: Callable[..., datasets.Dataset]
    collator: Callable[[Any], Callable]
    input_column: str


def _preprocess_text(dataset, tokenizer, columns: Dict[str, Optional[str]], max_length: int, label_to_id, name: str):
    return tokenize_text_dataset(
        dataset, tokenizer, text_column=columns["text"], text_pair_column=columns.get("text_pair"),
        label_column=columns.get("label"), max_length=max_length, label_to_id=label_to_id, name=name,
    )


TASKS: Dict[str, TaskSpec] = {
    "text-classification": TaskSpec(
        auto_model=AutoModelForSequenceClassification,
        load_preprocessor=AutoTokenizer.from_pretrained,
        preprocess=_preprocess_text,
        collator=DataCollatorWithPadding,
        input_column="text",
    ),
}


def get_task(task: str) -> TaskSpec:
    if task not in TASKS:
        raise ValueError(f"`task` must be one of {', '.join(map(repr, sorted(TASKS)))}, got {task!r}.")
    return TASKS[task]
