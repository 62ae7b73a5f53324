"""Shared fixtures: tiny saved models (odd sizes, see `_models.py`) and a small separable text task."""
from __future__ import annotations

import contextlib
import logging
import os
import random
import sys
from pathlib import Path

import datasets
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _models import NUM_LABELS, save_tiny_bert  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
datasets.disable_progress_bars()


def make_text_dataset(n: int, seed: int = 0) -> datasets.Dataset:
    """Sentences whose class is given by the letter that dominates them (learnable by a tiny model)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randrange(NUM_LABELS)
        words = [rng.choice("abc"[label] * 3 + "xyz") * rng.randint(1, 3) for _ in range(rng.randint(3, 12))]
        rows.append({"text": " ".join(words), "label": label})
    return datasets.Dataset.from_list(rows)


@pytest.fixture(scope="session")
def text_splits():
    return {"train": make_text_dataset(160, seed=0), "validation": make_text_dataset(48, seed=1)}


@pytest.fixture(scope="session", params=["bert", "roberta", "distilbert"])
def encoder_dir(request, tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("bert"), "bert")


@contextlib.contextmanager
def kept_package_logging():
    """Put the `optimum_rmtkd` logger back as it was: the CLI's `run()` gives it a handler on the stderr of the
    moment (pytest's capture) and sets its level."""
    logger = logging.getLogger("optimum_rmtkd")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    try:
        yield
    finally:
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate


@pytest.fixture
def restore_logging():
    with kept_package_logging():
        yield
