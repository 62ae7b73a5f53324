"""Config and model classes for per-layer widths, derived from the stock classes of each supported family and task.

Widths are stored in transformers' heterogeneous-layer format (`per_layer_config={layer: {"intermediate_size": k}}`;
for ResNet the layers are residual blocks and the field is `inner_sizes`) so the format can become stock once
upstream modeling reads it; until then the model is built with the global widths and the listed layers are resized
(by the family's adapter) before the weights load.

One config class per family (`rmtkd_<base>`), and one model class per task: for every registered task whose Auto
class maps the family's stock config to a model class that the family's adapter covers (`Adapter.architectures`),
`RMTKD<that class>` is derived and registered with that Auto class (e.g. `RMTKDBertForSequenceClassification` with
`AutoModelForSequenceClassification`, `RMTKDResNetForImageClassification` with `AutoModelForImageClassification`).
A task added later gets its classes at the next `register_per_layer_types()` (every lookup here calls it).

This module imports the adapters (for the resize); the adapters never import it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple, Type

from torch import nn
from transformers import (
    AutoConfig,
    BertConfig,
    DistilBertConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    ResNetConfig,
    RobertaConfig,
)

from ..adapters import get_adapter
from ..adapters.base import adapter_class_for, rebuild
from ..tasks import get_task, task_names

PREFIX = "RMTKD"


def _count_blocks(config) -> int:
    return sum(config.depths)


def _check_block_count(config, value) -> None:
    """`num_hidden_layers` of a registered ResNet config is derived; a stored value (the adapter sets it on a stock
    config so transformers can check `per_layer_config`) must agree with it."""
    if value != sum(config.depths):
        raise ValueError(
            f"`num_hidden_layers` of a ResNet counts its residual blocks, sum(depths) = {sum(config.depths)}, got "
            f"{value}."
        )


@dataclass(frozen=True)
class _Base:
    """A stock family: its config class and the config attributes the registered config adds."""

    config: Type[PretrainedConfig]
    config_attributes: Dict[str, Any] = field(default_factory=dict)


_BASES: Dict[str, _Base] = {
    "bert": _Base(BertConfig),
    "roberta": _Base(RobertaConfig),
    "distilbert": _Base(DistilBertConfig),
    "llama": _Base(LlamaConfig),
    "mistral": _Base(MistralConfig),
    "qwen2": _Base(Qwen2Config),
    # The heterogeneous-layer format counts layers with `num_hidden_layers`, which ResNet lacks: its layers are the
    # residual blocks of every stage.
    "resnet": _Base(
        ResNetConfig,
        {"num_hidden_layers": property(
            _count_blocks, _check_block_count, doc="Residual blocks over all stages (`sum(depths)`)."
        )},
    ),
}


@dataclass(frozen=True)
class RegisteredType:
    """One registered per-layer model: its config and model classes, the stock model class it derives from (the
    saved model's architecture), and the Auto class of the task that loads it."""

    config: Type[PretrainedConfig]
    model: Type[PreTrainedModel]
    stock_model: Type[PreTrainedModel]
    auto_model: Any


#: `rmtkd_<base>` config classes by base model type.
PER_LAYER_CONFIGS: Dict[str, Type[PretrainedConfig]] = {}
#: Registered model classes by base model type, then by the stock architecture (class name) they derive from.
PER_LAYER_TYPES: Dict[str, Dict[str, RegisteredType]] = {}


def _make_config_class(base_type: str) -> Type[PretrainedConfig]:
    base = _BASES[base_type]
    base_config = base.config

    def config_init(self, *args, **kwargs):
        kwargs.setdefault("allow_global_per_layer_attribute_access", True)
        base_config.__init__(self, *args, **kwargs)

    return type(
        f"{PREFIX}{base_config.__name__}",
        (base_config,),
        {"model_type": f"rmtkd_{base_type}", "__init__": config_init, "__module__": __name__,
         "__doc__": f"`{base_config.__name__}` whose widths may differ per layer (`per_layer_config`).",
         **base.config_attributes},
    )


def _make_model_class(stock_model: Type[PreTrainedModel], config_cls: Type[PretrainedConfig]) -> Type[PreTrainedModel]:
    def model_init(self, config, *args, **kwargs):
        stock_model.__init__(self, config, *args, **kwargs)
        get_adapter(self).resize_per_layer(self)

    return type(
        f"{PREFIX}{stock_model.__name__}",
        (stock_model,),
        {"config_class": config_cls, "__init__": model_init, "__module__": __name__,
         "__doc__": f"`{stock_model.__name__}` with the per-layer widths of its config."},
    )


def register_per_layer_types() -> None:
    """Register every `rmtkd_<base>` config with `AutoConfig`, and for each task whose Auto class maps the stock
    config of `<base>` to a model class, `RMTKD<model class>` with that Auto class (idempotent)."""
    for base_type, base in _BASES.items():
        if base_type not in PER_LAYER_CONFIGS:
            config_cls = _make_config_class(base_type)
            AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
            PER_LAYER_CONFIGS[base_type] = config_cls
        config_cls = PER_LAYER_CONFIGS[base_type]
        registered = PER_LAYER_TYPES.setdefault(base_type, {})
        covered = adapter_class_for(base_type).architectures
        for name in task_names():
            auto_model = get_task(name).auto_model
            # `_model_mapping` is the Auto class's config → model mapping (a lazy one: `in` and `[]` take config
            # classes and import only the model module asked for), the one `from_config` reads.
            if base.config not in auto_model._model_mapping:
                continue
            stock_model = auto_model._model_mapping[base.config]
            if not stock_model.__name__.endswith(covered):  # a head the adapter's site tables do not describe
                continue
            if stock_model.__name__ in registered:
                continue
            model_cls = _make_model_class(stock_model, config_cls)
            auto_model.register(config_cls, model_cls, exist_ok=True)
            registered[stock_model.__name__] = RegisteredType(config_cls, model_cls, stock_model, auto_model)


def registered_type_for(model_type: str, architecture: Optional[str] = None) -> RegisteredType:
    """The registered per-layer type of a model type (stock `bert` or registered `rmtkd_bert`) and architecture (the
    stock class name, e.g. `BertForSequenceClassification`, or the registered one); `architecture` may be left out when
    the family has a single registered model class. A `ValueError` names what is available."""
    register_per_layer_types()
    base_type = model_type.removeprefix("rmtkd_")
    if base_type not in _BASES:
        raise ValueError(
            f"`output_format='per-layer'` is not available for model type {model_type!r}; it is for "
            f"{', '.join(sorted(_BASES))}."
        )
    registered = PER_LAYER_TYPES[base_type]
    if architecture is None:
        if len(registered) != 1:
            raise ValueError(
                f"`architecture` must be given for model type {model_type!r}, which has per-layer classes for "
                f"{', '.join(sorted(registered))}."
            )
        return next(iter(registered.values()))
    stock_name = architecture.removeprefix(PREFIX)
    if stock_name not in registered:
        raise ValueError(
            f"`output_format='per-layer'` has no class for architecture {architecture!r} of model type "
            f"{model_type!r}; it has {', '.join(sorted(registered)) or 'none'} (one per registered task whose Auto "
            f"class maps `{_BASES[base_type].config.__name__}` to a class its adapter covers)."
        )
    return registered[stock_name]


def per_layer_classes_for(
    model_type: str, architecture: Optional[str] = None
) -> Tuple[Type[PretrainedConfig], Type[PreTrainedModel]]:
    """The registered (config, model) classes for a model type and architecture (see `registered_type_for`)."""
    registered = registered_type_for(model_type, architecture)
    return registered.config, registered.model


def per_layer_auto_class_for(model_type: str, architecture: Optional[str] = None) -> Any:
    """The `AutoModelFor*` class that loads the registered per-layer type of a model type and architecture."""
    return registered_type_for(model_type, architecture).auto_model


def registered_config_dict(data: Dict[str, Any], registered: RegisteredType) -> Dict[str, Any]:
    """A config dict (`config.to_dict()` or a saved `config.json`) as the registered type's: its `model_type` and
    `architectures`, global reads of per-layer widths allowed, and without the attributes the registered config
    derives (a ResNet's `num_hidden_layers`)."""
    data = dict(data)
    for name in _BASES[registered.config.model_type.removeprefix("rmtkd_")].config_attributes:
        data.pop(name, None)
    data["model_type"] = registered.config.model_type
    data["architectures"] = [registered.model.__name__]
    data["allow_global_per_layer_attribute_access"] = True
    return data


def as_registered_type(model: nn.Module) -> PreTrainedModel:
    """`model` as its registered per-layer type (`rmtkd_<base>`, `RMTKD<its class>`), with the same weights, device,
    dtype and train mode; the model itself when it already is one.

    The per-layer format's cut leaves the stock class with the widths in `config.per_layer_config`
    (`Adapter.reduce`); this is the step after it, so the in-memory model is what `from_pretrained` builds from the
    saved folder.

    Example:

    ```python
    >>> model = adapter.reduce(model, sites, widths, stats, RMTKDConfig(output_format="per-layer"))
    >>> model = as_registered_type(model)  # e.g. RMTKDBertForSequenceClassification
    ```
    """
    registered = registered_type_for(model.config.model_type, type(model).__name__)
    if type(model) is registered.model:
        return model
    config = registered.config.from_dict(registered_config_dict(model.config.to_dict(), registered))
    return rebuild(model, registered.model, config)


def as_output_format(model: nn.Module, output_format: str) -> nn.Module:
    """The model in the class its output format saves: unchanged for `stock`, `as_registered_type` for `per-layer`."""
    return as_registered_type(model) if output_format == "per-layer" else model
