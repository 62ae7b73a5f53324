"""What sequence and image classification share: class labels, the distillation loss, argmax accuracy.

Labels are matched to the model's own `label2id` when its config names its classes, so class ids never flip
between the data and a fine-tuned head; otherwise integer labels are class ids, and other values (names, or integers
outside `0..num_labels-1`) are numbered in sorted order, said in the log and written into the saved config.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import datasets
import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import logging

from ..data import check_columns
from .base import Columns, Metrics, PreparedData, Task, check_finite_metrics, kl_teacher_student

logger = logging.get_logger(__name__)

_DEFAULT_LABEL = re.compile(r"LABEL_\d+")


def accuracy(predictions: List[int], references: List[int]) -> Dict[str, float]:
    """Accuracy computed locally (`evaluate.load("accuracy")` fetches its script from the Hub)."""
    if not references:
        raise ValueError("Cannot compute a metric on an empty evaluation set.")
    correct = sum(int(p == r) for p, r in zip(predictions, references))
    return {"accuracy": correct / len(references)}


def resolve_metric(metric) -> Callable[[List[int], List[int]], float]:
    """Accept `None` (accuracy), an `evaluate.EvaluationModule`, or a callable `(predictions, references)`.

    Whatever it returns (a number or a dict of numbers), the first value is the metric the stop rules watch.
    """
    if metric is None:
        metric = accuracy
    compute = getattr(metric, "compute", None)
    if compute is None and not callable(metric):
        raise TypeError(
            f"`metric` must be an `evaluate.EvaluationModule` or a callable (predictions, references), got "
            f"{type(metric).__name__}."
        )

    def score(predictions: List[int], references: List[int]) -> float:
        result = compute(predictions=predictions, references=references) if compute else metric(predictions, references)
        if isinstance(result, dict):
            result = next(iter(result.values()))
        return float(result)

    return score


def _named_classes(model_config) -> Optional[Dict[str, int]]:
    """The model's `label2id` when it names its classes (not transformers' placeholder `LABEL_<i>`)."""
    label2id = getattr(model_config, "label2id", None) or {}
    if not label2id or all(_DEFAULT_LABEL.fullmatch(str(name)) for name in label2id):
        return None
    return {str(name): int(index) for name, index in label2id.items()}


def label_keys(dataset: datasets.Dataset, column: str, name: str) -> List[Any]:
    """Each row's label as a class name (`ClassLabel` features give their names) or an integer, refusing missing
    labels, fractional numbers and a mix of names and numbers."""
    feature = dataset.features[column]
    raw = dataset[column]
    if isinstance(feature, datasets.ClassLabel):
        if any(v is None or v < 0 for v in raw):
            raise ValueError(f"`{name}` has rows without a class in column {column!r}; drop them first.")
        return [feature.names[v] for v in raw]
    keys: List[Any] = []
    for value in raw:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            raise ValueError(
                f"`{name}` has a missing label (None or NaN) in column {column!r}; drop or fill those rows first."
            )
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError(
                    f"`{name}` has the label {value!r} in column {column!r}; classification needs class ids (0, 1, …) "
                    "or class names."
                )
            value = int(value)
        keys.append(int(value) if isinstance(value, bool) else value)
    kinds = {type(key).__name__ for key in keys}
    if len(kinds) > 1 or kinds - {"int", "str"}:
        raise ValueError(
            f"`{name}`'s labels in column {column!r} mix types ({', '.join(sorted(kinds))}); use class ids "
            "(0, 1, …) or class names, not both."
        )
    return keys


class LabelMap:
    """Data label → class id, fixed on the training split and checked on every other split.

    `to_id` is `None` when the labels are the class ids themselves; `id2label` is set when the run named the
    classes (and so writes them into the saved config).
    """

    def __init__(self, to_id: Optional[Dict[Any, int]], id2label: Optional[Dict[int, str]] = None):
        self.to_id = to_id
        self.id2label = id2label

    @classmethod
    def fit(cls, keys: Sequence[Any], model_config, name: str) -> "LabelMap":
        values = sorted(set(keys), key=lambda v: (isinstance(v, str), v))
        named = _named_classes(model_config)
        if named is not None and all(str(v) in named for v in values):
            return cls({v: named[str(v)] for v in values})
        if all(isinstance(v, int) for v in values) and values[0] >= 0:
            return cls(None)
        if named is not None:
            raise ValueError(
                f"`{name}` has labels {[v for v in values if str(v) not in named][:5]} that are not among the model's "
                f"classes ({', '.join(named)}); fix the labels, or load the model with a new head (`num_labels`)."
            )
        to_id = {value: index for index, value in enumerate(values)}
        logger.warning(
            "The labels of `%s` are not class ids; numbering them in sorted order: %s. The mapping is saved as "
            "`label2id` in the compressed model's config.", name,
            ", ".join(f"{value!r} -> {index}" for value, index in to_id.items()),
        )
        return cls(to_id, {index: str(value) for value, index in to_id.items()})

    @classmethod
    def from_class_label(cls, feature: datasets.ClassLabel, model_config) -> "LabelMap":
        """A `ClassLabel` column: its own ids, unless the model names the same classes with other ids."""
        named = _named_classes(model_config)
        if named is not None and all(n in named for n in feature.names):
            return cls({n: named[n] for n in feature.names})
        return cls({n: i for i, n in enumerate(feature.names)}, None if named else dict(enumerate(feature.names)))

    def encode(self, keys: Sequence[Any], name: str, num_labels: int) -> List[int]:
        """The class ids of `keys`, checked against the mapping and the model's `num_labels`."""
        if self.to_id is None:
            if any(isinstance(k, str) or k < 0 for k in keys):
                raise ValueError(f"`{name}` has class names or negative ids but the training labels are class ids.")
            ids = list(keys)
        else:
            unknown = sorted({repr(k) for k in keys if k not in self.to_id})
            if unknown:
                raise ValueError(
                    f"`{name}` has labels {', '.join(unknown[:5])} that the training data's classes "
                    f"({', '.join(map(repr, self.to_id))}) do not include; fix the labels."
                )
            ids = [self.to_id[k] for k in keys]
        largest = max(ids)
        if largest >= num_labels:
            raise ValueError(
                f"`{name}` has class id {largest} but the model has `num_labels={num_labels}`; for a model whose head "
                f"is new pass `num_labels={largest + 1}` to `RMTKDCompressor.from_pretrained` (`--num-labels "
                f"{largest + 1}`), else fix the labels."
            )
        return ids

    def config_updates(self) -> Dict[str, Any]:
        """`id2label`/`label2id` for the saved config when the run named the classes."""
        if self.id2label is None:
            return {}
        return {"id2label": dict(self.id2label), "label2id": {name: i for i, name in self.id2label.items()}}


class ClassificationTask(Task):
    """A task whose model maps one input to `num_labels` logits, trained with cross-entropy, scored by argmax."""

    head_prefixes: Tuple[str, ...] = ("classifier", "pre_classifier", "pooler", "fc")

    def head_is_new(self, model: nn.Module, missing_keys: Sequence[str]) -> bool:
        return any(key.split(".")[0] in self.head_prefixes for key in missing_keys)

    def prepare(self, splits, preprocessor, model_config, columns: Columns, max_length: int) -> PreparedData:
        """Check the inputs and labels of every split, map labels to class ids (fixed on the first split), and
        preprocess; an unlabelled split (calibration data without labels) gets inputs only."""
        label = columns.label
        first_name, first = next(iter(splits.items()))
        check_columns(first, [columns.get(column) for column in self.input_columns] + [label], first_name)
        feature = first.features[label]
        if isinstance(feature, datasets.ClassLabel):
            labels = LabelMap.from_class_label(feature, model_config)
        else:
            labels = LabelMap.fit(label_keys(first, label, first_name), model_config, first_name)
        num_labels = int(model_config.num_labels)
        prepared: Dict[str, Optional[datasets.Dataset]] = {}
        for name, dataset in splits.items():
            if dataset is None:
                prepared[name] = None
                continue
            ids = None
            if label in dataset.column_names:
                ids = labels.encode(label_keys(dataset, label, name), name, num_labels)
                dataset = dataset.remove_columns(label)
            prepared[name] = self.inputs(dataset, preprocessor, columns, max_length, name)
            if ids is not None:
                prepared[name] = prepared[name].add_column("labels", ids)
        return PreparedData(prepared, labels.config_updates())

    def loss(self, student_out, teacher_out, batch, alpha: float, temperature: float) -> torch.Tensor:
        """α·CE(labels, student) + (1 − α)·T²·KL(softmax(teacher/T) ‖ softmax(student/T)) over the batch."""
        ce = F.cross_entropy(student_out.logits.float(), batch["labels"])
        if teacher_out is None or alpha == 1.0:
            return ce
        return alpha * ce + (1.0 - alpha) * kl_teacher_student(student_out.logits, teacher_out.logits, temperature)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataloader, accelerator, metric=None) -> Metrics:
        """Argmax predictions gathered across processes (`gather_for_metrics` drops the padding duplicates)."""
        score = resolve_metric(metric)
        was_training = model.training
        model.eval()
        predictions: List[int] = []
        references: List[int] = []
        for batch in dataloader:
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            labels = batch.pop("labels")
            logits = model(**batch).logits
            preds, refs = accelerator.gather_for_metrics((logits.argmax(dim=-1), labels))
            predictions.extend(preds.tolist())
            references.extend(refs.tolist())
        model.train(was_training)
        return check_finite_metrics({self.metric_label(metric): score(predictions, references)}, self.name)

    def metric_label(self, metric=None) -> str:
        if metric is None:
            return self.metric_name
        return getattr(metric, "name", None) or getattr(metric, "__name__", None) or type(metric).__name__
