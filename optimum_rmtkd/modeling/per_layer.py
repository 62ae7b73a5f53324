"""Config and model classes for per-layer widths, derived from the stock classes of each supported family.

Widths are stored in transformers' heterogeneous-layer format (`per_layer_config={layer: {"intermediate_size": k}}`;
for ResNet the layers are residual blocks and the field is `inner_sizes`) so the format can become stock once
upstream modeling reads it; until then the model is built with the global widths and the listed layers are resized
before the weights load.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Tuple, Type

from transformers import (
    AutoConfig,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
    ResNetConfig,
    ResNetForImageClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from ..adapters import get_adapter


def _count_blocks(config) -> int:
    return sum(config.depths)


@dataclass(frozen=True)
class _Base:
    """A stock family: its config and model classes, the Auto class that loads it, and config attributes to add."""

    config: Type[PretrainedConfig]
    model: Type[PreTrainedModel]
    auto_model: Any
    config_attributes: Dict[str, Any] = field(default_factory=dict)


_BASES: Dict[str, _Base] = {
    "bert": _Base(BertConfig, BertForSequenceClassification, AutoModelForSequenceClassification),
    "roberta": _Base(RobertaConfig, RobertaForSequenceClassification, AutoModelForSequenceClassification),
    "distilbert": _Base(DistilBertConfig, DistilBertForSequenceClassification, AutoModelForSequenceClassification),
    # The heterogeneous-layer format counts layers with `num_hidden_layers`, which ResNet lacks: its layers are the
    # residual blocks of every stage.
    "resnet": _Base(
        ResNetConfig, ResNetForImageClassification, AutoModelForImageClassification,
        {"num_hidden_layers": property(_count_blocks, doc="Residual blocks over all stages (`sum(depths)`).")},
    ),
}
PER_LAYER_TYPES: Dict[str, Tuple[Type[PretrainedConfig], Type[PreTrainedModel]]] = {}


def _make_classes(base_type: str) -> Tuple[Type[PretrainedConfig], Type[PreTrainedModel]]:
    base = _BASES[base_type]
    base_config, base_model = base.config, base.model
    model_type = f"rmtkd_{base_type}"

    def config_init(self, *args, **kwargs):
        kwargs.setdefault("allow_global_per_layer_attribute_access", True)
        base_config.__init__(self, *args, **kwargs)

    config_cls = type(
        f"RMTKD{base_config.__name__}",
        (base_config,),
        {"model_type": model_type, "__init__": config_init, "__module__": __name__,
         "__doc__": f"`{base_config.__name__}` whose widths may differ per layer (`per_layer_config`).",
         **base.config_attributes},
    )

    def model_init(self, config, *args, **kwargs):
        base_model.__init__(self, config, *args, **kwargs)
        get_adapter(self).resize_per_layer(self)

    model_cls = type(
        f"RMTKD{base_model.__name__}",
        (base_model,),
        {"config_class": config_cls, "__init__": model_init, "__module__": __name__,
         "__doc__": f"`{base_model.__name__}` with the per-layer widths of its config."},
    )
    return config_cls, model_cls


def register_per_layer_types() -> None:
    """Register every `rmtkd_<base>` type with the Auto classes (idempotent)."""
    for base_type in _BASES:
        if base_type in PER_LAYER_TYPES:
            continue
        config_cls, model_cls = _make_classes(base_type)
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        _BASES[base_type].auto_model.register(config_cls, model_cls, exist_ok=True)
        PER_LAYER_TYPES[base_type] = (config_cls, model_cls)


def per_layer_classes_for(model_type: str) -> Tuple[Type[PretrainedConfig], Type[PreTrainedModel]]:
    """The registered (config, model) classes for a stock `model_type`, or a `ValueError` naming the supported ones."""
    base_type = model_type[len("rmtkd_"):] if model_type.startswith("rmtkd_") else model_type
    if base_type not in PER_LAYER_TYPES:
        raise ValueError(
            f"`output_format='per-layer'` is not available for model type {model_type!r}; it is for "
            f"{', '.join(sorted(PER_LAYER_TYPES))}."
        )
    return PER_LAYER_TYPES[base_type]


def per_layer_auto_class_for(model_type: str) -> Any:
    """The `AutoModelFor*` class that loads the registered per-layer type of a stock `model_type`."""
    per_layer_classes_for(model_type)  # the same check and message for an unsupported type
    return _BASES[model_type.removeprefix("rmtkd_")].auto_model
