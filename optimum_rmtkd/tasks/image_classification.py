"""`image-classification`: an image classifier (`AutoModelForImageClassification`, e.g. transformers' ResNet)."""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Tuple

import datasets
import numpy as np
import torch
from torch import nn

from .base import Columns
from .classification import ClassificationTask


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


def preprocess_images(dataset: datasets.Dataset, processor, *, image_column: str,
                      name: str = "dataset") -> datasets.Dataset:
    """Run the image processor over `dataset` and keep `pixel_values` (a float32 Array3D).

    A `map`, not a lazy transform: the compressor reads the result through `with_format("torch")`, which replaces
    any transform. Every processed image must come out with the same shape (the processor resizes or crops).
    """
    channels = processor_channels(processor)

    def encode(batch: Dict[str, List[Any]]) -> Dict[str, Any]:
        images = [to_channels_last(image, channels, image_column) for image in batch[image_column]]
        pixel_values = processor(images=images, return_tensors="np", input_data_format="channels_last")
        return {"pixel_values": np.asarray(pixel_values["pixel_values"], dtype=np.float32)}

    shape = encode(dataset[:1])["pixel_values"].shape[1:]
    features = datasets.Features({"pixel_values": datasets.Array3D(shape=tuple(shape), dtype="float32")})
    return dataset.map(encode, batched=True, remove_columns=dataset.column_names, features=features,
                       desc=f"Preprocessing {name}")


class ImageClassificationCollator:
    """Stack `pixel_values` (and `labels` when present) of preprocessed examples into a batch."""

    def __call__(self, features: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        batch = {"pixel_values": torch.stack([torch.as_tensor(f["pixel_values"]) for f in features])}
        if "labels" in features[0]:
            batch["labels"] = torch.tensor([int(f["labels"]) for f in features], dtype=torch.long)
        return batch


class ImageClassificationTask(ClassificationTask):
    name = "image-classification"
    title = "Image Classification"
    auto_model_name = "AutoModelForImageClassification"
    architecture_suffixes = ("ForImageClassification",)
    input_columns = ("image",)
    sample_units = ("tokens",)  # every spatial position of every image is a sample (see calibration)
    size_name = "image_size"
    example_size = 32
    preprocessor_class = "AutoImageProcessor"
    preprocessor_files = ("preprocessor_config.json",)

    def matches(self, config: Mapping[str, Any]) -> bool:
        """A config with `num_channels` is an image model (a bare backbone such as `ResNetModel`)."""
        return config.get("num_channels") is not None

    def load_preprocessor(self, name_or_path, **kwargs: Any):
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(name_or_path, **kwargs)

    def preprocess(self, dataset, preprocessor, columns: Columns, max_length: int, name: str) -> datasets.Dataset:
        return preprocess_images(dataset, preprocessor, image_column=columns.image, name=name)

    def collator(self, preprocessor):
        return ImageClassificationCollator()

    def onnx_input_names(self, model: nn.Module) -> Tuple[str, ...]:
        return ("pixel_values",)

    def dummy_inputs(self, config, input_names, batch_size: int, size: int, *, with_padding: bool,
                     rng: np.random.Generator) -> Dict[str, np.ndarray]:
        """Standard-normal `size` × `size` images (already normalised, as a processor's output is)."""
        channels = getattr(config, "num_channels", 3)
        return {"pixel_values": rng.standard_normal((batch_size, channels, size, size)).astype(np.float32)}

    def dynamic_axes(self, input_names):
        return {"pixel_values": {0: "batch_size", 2: "height", 3: "width"}}

    def onnx_input_example(self) -> str:
        return 'inputs = preprocessor(images=[image], return_tensors="np")  # image: a PIL.Image'
