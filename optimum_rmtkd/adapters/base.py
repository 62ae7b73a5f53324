"""Sites, capture points and the adapter registry: what an architecture exposes to RMT-KD.

Vocabulary (as in Torch-Pruning): a *site* is one hidden dimension; its *writers* are the weights that produce it
and its *readers* the weights that consume it. Each adapter states these as an explicit table, never a traced graph.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple, Type

from torch import nn

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
    extra_captures: Tuple[CapturePoint, ...] = field(default=(), compare=False)


class Adapter(ABC):
    """How RMT-KD reads and edits one family of architectures."""

    #: `config.model_type` values handled by this adapter.
    model_types: Tuple[str, ...] = ()

    @abstractmethod
    def sites(self, model: nn.Module) -> List[Site]:
        """Every reducible site of `model`, in the order stages visit them within a kind."""

    def required_captures(self, sites: Sequence[Site]) -> List[CapturePoint]:
        """Every capture point calibration must fill before `reduce(sites)` (spectra and refit statistics)."""
        seen: Dict[str, CapturePoint] = {}
        for site in sites:
            for point in site.captures + site.extra_captures:
                seen.setdefault(point.key, point)
        return list(seen.values())

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

        The returned model may be a new object (rebuilt from the updated config) when modules cache sizes derived
        from the config, e.g. an attention module's head size; always use the return value."""

    @abstractmethod
    def resize_per_layer(self, model: nn.Module) -> None:
        """Give the modules of a freshly built registered per-layer model the shapes its config's
        `per_layer_config` records (weights are loaded afterwards)."""


_ADAPTERS: Dict[str, Type[Adapter]] = {}


def register_adapter(cls: Type[Adapter]) -> Type[Adapter]:
    """Class decorator adding an adapter to the registry under each of its `model_types`."""
    for model_type in cls.model_types:
        _ADAPTERS[model_type] = cls
    return cls


def supported_model_types() -> List[str]:
    return sorted(_ADAPTERS)


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
