"""Tasks the compressor handles: which Auto class loads the model, and how examples become model inputs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import datasets
import numpy as np
import torch
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
)

from .data import check_columns, tokenize_text_dataset


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


def processor_channels(processor) -> int:
    """The channel count an image processor normalises to: the length of its `image_mean`, else 3 (RGB).

    The preprocessing sees the processor, not the model, so the processor's normalisation is what says how many
    channels the model takes; a model with `num_channels=1` needs a processor with a one-value `image_mean`.
    """
    mean = getattr(processor, "image_mean", None)
    return len(mean) if isinstance(mean, (list, tuple)) else 3


def to_channels_last(image: Any, channels: int, column: str) -> np.ndarray:
    """One image (PIL image, numpy array or nested list; 2-D grey, HWC or CHW) as an HWC array with `channels`.

    Grey images are replicated to every channel; a PIL image is converted to grey or RGB by PIL itself.
    """
    if hasattr(image, "convert") and hasattr(image, "mode"):  # a PIL image
        image = image.convert("L" if channels == 1 else "RGB")
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    elif array.ndim == 3 and array.shape[-1] not in (1, channels) and array.shape[0] in (1, channels):
        array = np.moveaxis(array, 0, -1)
    if array.ndim != 3 or array.shape[-1] not in (1, channels):
        raise ValueError(
            f"The `{column}` column must hold PIL images or 2-D/3-D arrays with 1 or {channels} channels, got an "
            f"array of shape {array.shape}."
        )
    if array.shape[-1] != channels:
        array = np.repeat(array, channels, axis=-1)
    return array


def preprocess_image_dataset(
    dataset: datasets.Dataset,
    processor,
    *,
    image_column: str,
    label_column: Optional[str],
    label_to_id: Optional[Dict[Any, int]] = None,
    name: str = "dataset",
) -> datasets.Dataset:
    """Run the image processor over `dataset` and keep `pixel_values` (a float32 Array3D) and `labels`.

    A `map`, not a lazy transform: the compressor reads the result through `with_format("torch")`, which replaces
    any transform. Every processed image must come out with the same shape (the processor resizes or crops).
    """
    check_columns(dataset, [image_column, label_column], name)
    channels = processor_channels(processor)

    def encode(batch: Dict[str, List[Any]]) -> Dict[str, Any]:
        images = [to_channels_last(image, channels, image_column) for image in batch[image_column]]
        pixel_values = processor(images=images, return_tensors="np", input_data_format="channels_last")
        encoded = {"pixel_values": np.asarray(pixel_values["pixel_values"], dtype=np.float32)}
        if label_column is not None:
            labels = batch[label_column]
            encoded["labels"] = [label_to_id[v] for v in labels] if label_to_id else [int(v) for v in labels]
        return encoded

    shape = encode(dataset[:1])["pixel_values"].shape[1:]
    features = {"pixel_values": datasets.Array3D(shape=tuple(shape), dtype="float32")}
    if label_column is not None:
        features["labels"] = datasets.Value("int64")
    return dataset.map(
        encode, batched=True, remove_columns=dataset.column_names, features=datasets.Features(features),
        desc=f"Preprocessing {name}",
    )


def _preprocess_image(dataset, processor, columns: Dict[str, Optional[str]], max_length: int, label_to_id, name: str):
    return preprocess_image_dataset(
        dataset, processor, image_column=columns["image"], label_column=columns.get("label"),
        label_to_id=label_to_id, name=name,
    )


class ImageClassificationCollator:
    """Stack `pixel_values` (and `labels` when present) of preprocessed examples into a batch."""

    def __init__(self, processor=None) -> None:
        self.processor = processor

    def __call__(self, features: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        batch = {"pixel_values": torch.stack([torch.as_tensor(f["pixel_values"]) for f in features])}
        if "labels" in features[0]:
            batch["labels"] = torch.tensor([int(f["labels"]) for f in features], dtype=torch.long)
        return batch


TASKS: Dict[str, TaskSpec] = {
    "text-classification": TaskSpec(
        auto_model=AutoModelForSequenceClassification,
        load_preprocessor=AutoTokenizer.from_pretrained,
        preprocess=_preprocess_text,
        collator=DataCollatorWithPadding,
        input_column="text",
    ),
    "image-classification": TaskSpec(
        auto_model=AutoModelForImageClassification,
        load_preprocessor=AutoImageProcessor.from_pretrained,
        preprocess=_preprocess_image,
        collator=ImageClassificationCollator,
        input_column="image",
    ),
}


def get_task(task: str) -> TaskSpec:
    if task not in TASKS:
        raise ValueError(f"`task` must be one of {', '.join(map(repr, sorted(TASKS)))}, got {task!r}.")
    return TASKS[task]
