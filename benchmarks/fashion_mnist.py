"""Fashion-MNIST (Xiao, Rasul & Vollgraf 2017: 60k/10k grey 28×28 images, 10 classes, MIT) as `datasets` splits.

Sources, in `load_fashion_mnist(source=...)`:
- `None` (default): the Debian package `dataset-fashion-mnist` (`apt-get install dataset-fashion-mnist`), IDX
  files gzipped under /usr/share/datasets/fashion-mnist/ (images: 16-byte header, labels: 8-byte header).
- a local folder: read with `datasets.load_dataset("imagefolder", data_dir=...)` (`train/<class>/*.png`, `test/...`).
- a Hub dataset id (e.g. `zalando-datasets/fashion_mnist`): `datasets.load_dataset(id)`, which needs network access.

Every image is zero-padded to 32×32 (a CIFAR-shaped input) and stored as a 2-D uint8 array in the `image` column;
`label` is a `ClassLabel`. The training split is shuffled once (seed) and its tail becomes the validation split.
"""
from __future__ import annotations

import gzip
from pathlib import Path
from typing import Dict, Optional

import datasets
import numpy as np

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
SIDE = 28
PADDED_SIDE = 32


def read_idx(path: Path, header_bytes: int) -> np.ndarray:
    """The uint8 payload of a gzipped IDX file after its header (16 bytes for images, 8 for labels)."""
    with gzip.open(path, "rb") as handle:
        return np.frombuffer(handle.read(), dtype=np.uint8, offset=header_bytes)


def _debian_arrays(directory: Path) -> Dict[str, tuple]:
    missing = [name for pair in IDX_FILES.values() for name in pair if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files {', '.join(missing)} are missing from {directory}; install them with "
            "`apt-get update && apt-get install -y dataset-fashion-mnist`, or pass `--source` a local image folder "
            "or a Hub dataset id."
        )
    arrays = {}
    for split, (images_file, labels_file) in IDX_FILES.items():
        labels = read_idx(directory / labels_file, 8)
        images = read_idx(directory / images_file, 16).reshape(len(labels), SIDE, SIDE)
        arrays[split] = (images, labels)
    return arrays


def _loaded_arrays(source: str) -> Dict[str, tuple]:
    """Images and labels of an imagefolder or Hub dataset (columns `image` and `label`), as grey uint8 arrays."""
    if Path(source).is_dir():
        loaded = datasets.load_dataset("imagefolder", data_dir=source)
    else:
        loaded = datasets.load_dataset(source)
    arrays = {}
    for split in ("train", "test"):
        if split not in loaded:
            raise ValueError(f"`source` {source!r} has no {split!r} split; its splits are {', '.join(loaded)}.")
        part = loaded[split]
        images = np.stack([np.asarray(image.convert("L"), dtype=np.uint8) for image in part["image"]])
        arrays[split] = (images, _class_ids(part))
    return arrays


def _class_ids(part: datasets.Dataset) -> np.ndarray:
    """Labels as Fashion-MNIST class ids. `imagefolder` numbers its folders in sorted order, so folders named after
    the classes (`Ankle boot`, `T-shirt-top`: case and punctuation ignored) or `0`-`9` are mapped back by name."""
    labels = np.asarray(part["label"], dtype=np.int64)
    names = getattr(part.features["label"], "names", None)
    if names is None:
        return labels

    def key(name: str) -> str:
        return "".join(c for c in name.lower() if c.isalnum())

    standard = {key(name): i for i, name in enumerate(CLASSES)} | {str(i): i for i in range(len(CLASSES))}
    unknown = [name for name in names if key(name) not in standard]
    if unknown:
        raise ValueError(
            f"Class names {unknown} are neither Fashion-MNIST classes ({', '.join(CLASSES)}) nor 0-9; rename the "
            "folders."
        )
    return np.asarray([standard[key(names[label])] for label in labels], dtype=np.int64)


def pad_images(images: np.ndarray, side: int = PADDED_SIDE) -> np.ndarray:
    """Zero-pad (N, h, w) images evenly on every border to (N, side, side)."""
    n, height, width = images.shape
    if height > side or width > side:
        raise ValueError(f"Images of {height}×{width} do not fit in {side}×{side}.")
    top, left = (side - height) // 2, (side - width) // 2
    padded = np.zeros((n, side, side), dtype=images.dtype)
    padded[:, top : top + height, left : left + width] = images
    return padded


def load_fashion_mnist(
    source: Optional[str] = None,
    *,
    train_examples: Optional[int] = None,
    validation_examples: int = 5000,
    test_examples: Optional[int] = None,
    seed: int = 0,
) -> datasets.DatasetDict:
    """`train`, `validation` and `test` splits with a 32×32 uint8 `image` column and a `label` ClassLabel.

    Args:
        source (`str`, *optional*): `None` for the Debian files, else a local image folder or a Hub dataset id.
        train_examples (`int`, *optional*): keep this many training images (default: all that the validation
            split leaves, 55,000).
        validation_examples (`int`, *optional*, defaults to 5000): held out from the training split.
        test_examples (`int`, *optional*): keep the first this many test images (default: all 10,000).
        seed (`int`, *optional*, defaults to 0): the shuffle of the training split.
    """
    arrays = _debian_arrays(DEBIAN_DIR) if source is None else _loaded_arrays(source)
    train_images, train_labels = arrays["train"]
    order = np.random.default_rng(seed).permutation(len(train_labels))
    if validation_examples >= len(order):
        raise ValueError(
            f"`validation_examples` must be below the {len(order)} training images, got {validation_examples}."
        )
    validation_idx = order[len(order) - validation_examples :]
    train_idx = order[: len(order) - validation_examples][:train_examples]
    test_images, test_labels = arrays["test"]
    test_idx = np.arange(len(test_labels))[:test_examples]
    features = datasets.Features({
        "image": datasets.Array2D(shape=(PADDED_SIDE, PADDED_SIDE), dtype="uint8"),
        "label": datasets.ClassLabel(names=CLASSES),
    })

    def split(images: np.ndarray, labels: np.ndarray, idx: np.ndarray) -> datasets.Dataset:
        return datasets.Dataset.from_dict(
            {"image": pad_images(images[idx]), "label": labels[idx].astype(np.int64)}, features=features
        )

    return datasets.DatasetDict({
        "train": split(train_images, train_labels, train_idx),
        "validation": split(train_images, train_labels, validation_idx),
        "test": split(test_images, test_labels, test_idx),
    })
