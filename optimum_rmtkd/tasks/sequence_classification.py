"""`text-classification`: a sequence classifier (`AutoModelForSequenceClassification`) on one text or a text pair."""
from __future__ import annotations

import inspect
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import datasets
import numpy as np
from torch import nn

from .base import Columns, random_token_inputs
from .classification import ClassificationTask


def _texts(values: Sequence[Any], column: str, name: str) -> List[str]:
    """The texts of a batch; a missing one (None or NaN) would be trained as the string "None": refuse it."""
    for value in values:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            raise ValueError(
                f"`{name}` has a missing text (None or NaN) in column {column!r}; drop or fill those rows first."
            )
    return [str(value) for value in values]


def tokenize_texts(dataset: datasets.Dataset, tokenizer, *, text_column: str, text_pair_column: Optional[str] = None,
                   max_length: int = 128, name: str = "dataset") -> datasets.Dataset:
    """Tokenise (truncating to `max_length`; padding is left to the collator) and drop every other column."""

    def encode(batch: Dict[str, List[Any]]) -> Dict[str, Any]:
        texts = _texts(batch[text_column], text_column, name)
        pairs = _texts(batch[text_pair_column], text_pair_column, name) if text_pair_column else None
        return tokenizer(texts, pairs, truncation=True, max_length=max_length)

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc=f"Tokenizing {name}")


class SequenceClassificationTask(ClassificationTask):
    name = "text-classification"
    title = "Text Classification"
    auto_model_name = "AutoModelForSequenceClassification"
    architecture_suffixes = ("ForSequenceClassification",)
    input_columns = ("text", "text_pair")
    sample_units = ("tokens", "cls", "mean")
    preprocessor_class = "AutoTokenizer"
    preprocessor_files = ("tokenizer.json", "tokenizer_config.json")

    def load_preprocessor(self, name_or_path, **kwargs: Any):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name_or_path, **kwargs)

    def preprocess(self, dataset, preprocessor, columns: Columns, max_length: int, name: str) -> datasets.Dataset:
        return tokenize_texts(dataset, preprocessor, text_column=columns.text, text_pair_column=columns.text_pair,
                              max_length=max_length, name=name)

    def collator(self, preprocessor):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(preprocessor)

    # --- export ---------------------------------------------------------------------------------------------
    def onnx_input_names(self, model: nn.Module) -> Tuple[str, ...]:
        """`token_type_ids` is an input only when the model takes it and has more than one segment type
        (`type_vocab_size > 1`): RoBERTa's single type makes it a constant, and optimum's RoBERTa export omits it."""
        parameters = inspect.signature(model.forward).parameters
        names = ["input_ids"]
        if "attention_mask" in parameters:
            names.append("attention_mask")
        if "token_type_ids" in parameters and getattr(model.config, "type_vocab_size", 1) > 1:
            names.append("token_type_ids")
        return tuple(names)

    def dummy_inputs(self, config, input_names, batch_size: int, size: int, *, with_padding: bool,
                     rng: np.random.Generator) -> Dict[str, np.ndarray]:
        """Padded random token ids (`random_token_inputs`); `token_type_ids` marks the second half of each row as
        segment 1."""
        inputs = random_token_inputs(config, batch_size, size, with_padding=with_padding, rng=rng)
        if "token_type_ids" in input_names:
            inputs["token_type_ids"] = np.broadcast_to(np.arange(size) >= size // 2, (batch_size, size)).astype(np.int64)
        return {name: inputs[name] for name in input_names}

    def dynamic_axes(self, input_names):
        return {name: {0: "batch_size", 1: "sequence_length"} for name in input_names}

    def max_size(self, config) -> Optional[int]:
        """`max_position_embeddings`: longer inputs index past the position table."""
        return getattr(config, "max_position_embeddings", None)

    def onnx_input_example(self) -> str:
        return 'inputs = preprocessor(["An example sentence."], return_tensors="np")'
