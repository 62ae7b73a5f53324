"""Sites, capture points and the adapter registry: what an architecture exposes to RMT-KD.

Vocabulary (as in Torch-Pruning): a *site* is one hidden dimension; its *writers* are the weights that produce it
and its *readers* the weights that consume it. Each adapter states these as an explicit table, never a traced graph,
and the cut walks the tables (`cut_site`): keep k channels of the site's pooled spectrum, slice every writer and norm
to them, refit every reader on the second moment of its own input. An adapter adds by hand only what is not a table
walk (a transformer's attention heads between Q/K/V and the attention output, its task head's own width).

Adapters edit modules and `model.config` only. Turning a model into its registered per-layer type is
`optimum_rmtkd.modeling`'s job (`as_registered_type`), which imports adapters, never the reverse.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple, Type

import torch
from torch import nn

from ..covariance import merged
from ..projection import (
    refit_and_slice_reader,
    select_channels,
    set_submodule,
    slice_norm,
    slice_writer,
    variance_channels,
)

if TYPE_CHECKING:
    from ..configuration import RMTKDConfig
    from ..covariance import SecondMomentAccumulator


@dataclass(frozen=True)
class CapturePoint:
    """Where calibration reads activations: the input or output of the module at a state-dict path.

    `layout` says how to turn the tensor into samples: `sequence` (batch, tokens, dim) with the padding mask,
    `vector` (batch, dim), or `image` (batch, channels, height, width) where every spatial position is a sample.
    """

    module: str
    side: str = "output"
    layout: str = "sequence"

    @property
    def key(self) -> str:
        return f"{self.module}:{self.side}"


@dataclass(frozen=True)
class LayerwiseLayout:
    """Where a model's repeated layers are (`layers`: the path of their `ModuleList`) and the modules applied after
    them, in order (`tail`, e.g. a final norm whose output a site reads): what calibration one layer at a time
    needs (`Adapter.layerwise_layout`)."""

    layers: str
    tail: Tuple[str, ...] = ()


@dataclass(frozen=True)
class Site:
    """One reducible width of a model.

    Attributes:
        name: the site's name, the state-dict path of the block that owns it.
        kind: `hidden`, `ffn` or `channels` (the `RMTKDConfig.sites` vocabulary).
        dim: current width.
        config_field: the config attribute that stores the width (stock output is possible only through it).
        layer: the layer index for per-layer sites, `None` for shared ones.
        path: `linear` (rotation folds exactly) or `nonlinear` (channel selection + least-squares refit).
        captures: where the samples of its spectrum come from (pooled when several).
        writers / readers / norms: the modules whose weights produce, consume, or normalise the dimension.
        reader_inputs: for each reader (same order), the capture point whose second moment is that reader's input:
            its least-squares refit is fitted there (a task head reading the pooled [CLS] vector is refitted on that
            vector's second moment, not on every token's).
        extra_captures: further statistics the adapter's own steps need (attention heads, a task head's width).
    """

    name: str
    kind: str
    dim: int
    config_field: str
    layer: Optional[int]
    path: str
    captures: Tuple[CapturePoint, ...]
    writers: Tuple[str, ...] = ()
    readers: Tuple[str, ...] = ()
    norms: Tuple[str, ...] = ()
    reader_inputs: Tuple[CapturePoint, ...] = ()
    extra_captures: Tuple[CapturePoint, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if len(self.reader_inputs) != len(self.readers):
            raise ValueError(
                f"Site {self.name!r} has {len(self.readers)} reader(s) but {len(self.reader_inputs)} `reader_inputs`; "
                "give one capture point per reader, in the same order."
            )


class Adapter(ABC):
    """How RMT-KD reads and edits one family of architectures."""

    #: `config.model_type` values handled by this adapter.
    model_types: Tuple[str, ...] = ()
    #: Endings of the model class names the site tables describe (`ForSequenceClassification`): the tables name the
    #: task head's modules (a classifier's pooler, a language model's `lm_head`), so another head is not covered.
    architectures: Tuple[str, ...] = ()

    def covers(self, model: nn.Module) -> bool:
        """Whether the site tables describe `model`'s class (stock or registered `RMTKD<stock class>`)."""
        return type(model).__name__.endswith(self.architectures)

    @abstractmethod
    def sites(self, model: nn.Module) -> List[Site]:
        """Every reducible site of `model`, in the order stages visit them within a kind."""

    def required_captures(self, sites: Sequence[Site]) -> List[CapturePoint]:
        """Every capture point calibration must fill before `reduce(sites)` (spectra and refit statistics)."""
        seen: Dict[str, CapturePoint] = {}
        for site in sites:
            for point in site.captures + site.reader_inputs + site.extra_captures:
                seen.setdefault(point.key, point)
        return list(seen.values())

    def layerwise_layout(self, model: nn.Module) -> Optional[LayerwiseLayout]:
        """The model's repeated layers and the modules after them, for calibration one layer at a time
        (`RMTKDConfig.layerwise_calibration`); `None` when the architecture does not support it."""
        return None

    def heads_constraint(self, model: nn.Module, site: Site) -> Optional[int]:
        """A divisor the site's width must keep (attention heads for a transformer's hidden width), else `None`."""
        return None

    def kept_width(self, model: nn.Module, site: Site, rank: int, config: "RMTKDConfig") -> int:
        """The width a site is cut to when its spectrum keeps `rank` directions: at least `config.min_width`,
        rounded up to `config.width_multiple` (and the heads constraint), never above the site's width."""
        from ..rmt import round_width

        rank = min(max(rank, config.min_width), site.dim)
        return round_width(rank, site.dim, config.width_multiple, num_heads=self.heads_constraint(model, site))

    def stock_groups(self, model: nn.Module, sites: Sequence[Site]) -> List[List[Site]]:
        """Split one kind's sites into the groups the stock format cuts together, one compressor stage each.

        The default is a single group: a transformer keeps each kind's width in one config field shared by every
        layer. An architecture whose config holds one width per group of layers (ResNet's `hidden_sizes`, one per
        stage) returns a group per field, so each is cut and distilled in its own stage.
        """
        return [list(sites)]

    def stages(self, model: nn.Module, config: "RMTKDConfig") -> List[List[Site]]:
        """The sites `compress` cuts together, in stage order: for each kind of `config.sites`, the stock groups
        (sites sharing a config field), or one site at a time in the per-layer format (the hidden width, shared by
        every layer, stays one group)."""
        sites = self.sites(model)
        groups: List[List[Site]] = []
        for kind in config.sites:
            of_kind = [site for site in sites if site.kind == kind]
            if not of_kind:
                continue
            if config.output_format == "per-layer" and kind != "hidden":
                groups.extend([site] for site in of_kind)
            else:
                groups.extend(self.stock_groups(model, of_kind))
        if not groups:
            raise ValueError(
                f"`sites={list(config.sites)}` selects no site of {type(model).__name__}; its site kinds are "
                f"{', '.join(sorted({s.kind for s in sites}))}."
            )
        return groups

    def expressible_widths(
        self, model: nn.Module, sites: Sequence[Site], widths: Dict[str, int], output_format: str
    ) -> Dict[str, int]:
        """The widths to cut `sites` to, from the width each site's spectrum asks for (`widths`), such that the saved
        format can hold them; never narrower than asked, so no site loses a kept direction.

        The default: the stock format stores one width for every layer in one config field, so all sites take the
        widest; the per-layer format stores any width.
        """
        if output_format == "stock":
            uniform = max(widths.values())
            return {name: uniform for name in widths}
        return dict(widths)

    def joint_widths(self, model: nn.Module, sites: Sequence[Site], widths: Dict[str, int]) -> Dict[str, int]:
        """Widths of several stages decided together (a size target's allocation) as the model can hold them when all
        are cut; the default changes nothing, since each stage's `expressible_widths` already made them valid."""
        return dict(widths)

    @abstractmethod
    def reduce(
        self,
        model: nn.Module,
        sites: Sequence[Site],
        widths: Dict[str, int],
        stats: Dict[str, "SecondMomentAccumulator"],
        config: "RMTKDConfig",
    ) -> nn.Module:
        """Cut every site in `sites` to `widths[site.name]`, update `model.config`, and return the model.

        In the per-layer format the widths go to `model.config.per_layer_config`; the model keeps its class (the
        caller turns it into the registered type, `optimum_rmtkd.modeling.per_layer.as_registered_type`). The returned
        model may be a new object of the same class (`rebuild`) when modules cache sizes derived from the config, e.g.
        an attention module's head size; always use the return value."""

    def parameters_after_cut(
        self,
        model: nn.Module,
        sites: Sequence[Site],
        widths: Dict[str, int],
        stats: Optional[Dict[str, "SecondMomentAccumulator"]] = None,
        config: Optional["RMTKDConfig"] = None,
    ) -> Optional[int]:
        """The parameter count `reduce(model, sites, widths, stats, config)` would leave, without cutting (`config`:
        the defaults when `None`); `None` when the adapter cannot tell before cutting. The compressor skips a stage
        whose cut would not shrink the model (a cut that unties a shared head can grow it), and a size target is
        met by predicting the count of candidate widths (`optimum_rmtkd.widths.allocate_widths`)."""
        return None

    @abstractmethod
    def resize_per_layer(self, model: nn.Module) -> None:
        """Give the modules of a freshly built model the shapes its config's `per_layer_config` records (weights are
        loaded afterwards). Idempotent: a layer already at its width is left at it."""

    # --- the table walk ----------------------------------------------------------------------------------------
    @staticmethod
    def site_channels(
        site: Site, width: int, stats: Dict[str, "SecondMomentAccumulator"], config: "RMTKDConfig"
    ) -> torch.Tensor:
        """The `width` channels a site keeps (`keep`): `choose_channels` on its statistics pooled over its capture
        points."""
        return choose_channels(merged([stats[point.key] for point in site.captures]), width, config)

    @staticmethod
    def refit_readers(
        model: nn.Module, site: Site, keep: torch.Tensor, stats: Dict[str, "SecondMomentAccumulator"], ridge: float
    ) -> None:
        """Refit every reader of `site` on the second moment of its own input (`site.reader_inputs`) and slice its
        inputs to `keep`."""
        for path, point in zip(site.readers, site.reader_inputs):
            sigma = stats[point.key].second_moment()
            set_submodule(model, path, refit_and_slice_reader(model.get_submodule(path), keep, sigma, ridge))

    @staticmethod
    def slice_writers(model: nn.Module, site: Site, keep: torch.Tensor) -> None:
        """Slice every writer and every norm of `site` to the `keep` channels."""
        for path in site.writers:
            set_submodule(model, path, slice_writer(model.get_submodule(path), keep))
        for path in site.norms:
            set_submodule(model, path, slice_norm(model.get_submodule(path), keep))

    def cut_site(
        self, model: nn.Module, site: Site, width: int, stats: Dict[str, "SecondMomentAccumulator"],
        config: "RMTKDConfig",
    ) -> torch.Tensor:
        """Cut a site that is nothing but its tables to `width` channels (DESIGN §2(b)); returns `keep`."""
        keep = self.site_channels(site, width, stats, config)
        self.slice_writers(model, site, keep)
        self.refit_readers(model, site, keep, stats, config.ridge)
        return keep


def choose_channels(statistics: "SecondMomentAccumulator", width: int, config: "RMTKDConfig") -> torch.Tensor:
    """The `width` channels of a width with these statistics that a cut keeps, by `config.channel_selection`: the
    largest second-moment diagonal (`variance`) or pivoted QR on the leading eigenvectors (`qr`); sorted ascending."""
    if config.channel_selection == "variance":
        return variance_channels(statistics.second_moment(centered=config.centered), width)
    return select_channels(statistics.eigh(centered=config.centered).eigenvectors, width)


def per_layer_widths(config) -> Dict[int, Dict[str, Any]]:
    """The `per_layer_config` of a config as a plain `{layer: {field: width}}` dict (empty when homogeneous)."""
    raw: Mapping = config.to_dict().get("per_layer_config") or {}
    return {int(layer): dict(fields) for layer, fields in raw.items()}


def rebuild(model: nn.Module, model_cls: Optional[type] = None, config=None) -> nn.Module:
    """A fresh `model_cls` (default: the model's own class) built from `config` (default: `model.config`), holding
    `model`'s weights, on its device, in its dtype and train mode.

    Needed after a cut when modules cache sizes derived from the config (an attention module's head size and score
    scale), so the in-memory model is exactly what `from_pretrained` builds from the saved folder; with another class
    it is also how `optimum_rmtkd.modeling` turns a model into its registered per-layer type. The model's adapter
    resizes the layers its config describes beyond the stock fields (`per_layer_config`, an encoder's rotated
    LayerNorms) before the weights load: a stock class builds every layer at the global width; for a registered
    class, which resizes when built, this changes nothing.
    """
    model_cls = type(model) if model_cls is None else model_cls
    config = model.config if config is None else config
    reference = next(model.parameters())
    rebuilt = model_cls(config).to(device=reference.device, dtype=reference.dtype)
    get_adapter(rebuilt).resize_per_layer(rebuilt)
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.train(model.training)
    return rebuilt


_ADAPTERS: Dict[str, Type[Adapter]] = {}


def register_adapter(cls: Type[Adapter]) -> Type[Adapter]:
    """Class decorator adding an adapter to the registry under each of its `model_types`."""
    for model_type in cls.model_types:
        _ADAPTERS[model_type] = cls
    return cls


def supported_model_types() -> List[str]:
    return sorted(_ADAPTERS)


def adapter_class_for(model_type: str) -> Optional[Type[Adapter]]:
    """The adapter class registered for a stock or registered (`rmtkd_<base>`) model type, else `None`."""
    return _ADAPTERS.get(model_type.removeprefix("rmtkd_"))


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for `model`, or a `ValueError` listing the supported architectures."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    base_type = model_type[len("rmtkd_"):] if model_type and model_type.startswith("rmtkd_") else model_type
    if base_type not in _ADAPTERS:
        raise ValueError(
            f"RMT-KD has no adapter for model type {model_type!r} ({type(model).__name__}); supported model types "
            f"are {', '.join(supported_model_types())}. To add one, write an `Adapter` subclass in "
            "`optimum_rmtkd/adapters/` and decorate it with `@register_adapter`."
        )
    return _ADAPTERS[base_type]()
