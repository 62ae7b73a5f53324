"""ResNet (transformers' `ResNetForImageClassification`, basic and bottleneck blocks): channel sites.

Paths: `S = resnet.encoder.stages.{s}`, `B = S.layers.{b}` (its block ordinal `i` counts blocks over all stages) and
`B.layer.{j}`, a conv → BatchNorm → ReLU unit (basic blocks have 2 units, 3×3 and 3×3; bottleneck blocks 3, 1×1
reduce, 3×3 and 1×1 expand; the last unit has no ReLU: the residual sum and its ReLU follow).

| site | config field | writers (output channels, with their BatchNorms) | readers (input channels) | kind |
|---|---|---|---|---|
| `resnet.embedder` stem, only when stage 0 projects its input | `embedding_size` | `resnet.embedder.embedder.convolution` | `stages.0.layers.0.layer.0.convolution`, `stages.0.layers.0.shortcut.convolution` | nonlinear |
| `S` residual width of stage s | `hidden_sizes[s]` (and `embedding_size` when stage 0 adds the stem output unprojected) | every `B.layer.{last}.convolution`, `S.layers.0.shortcut.convolution` (the stem conv when tied) | `B.layer.0.convolution` of every later block of the stage, the next stage's `layers.0.layer.0.convolution` and `layers.0.shortcut.convolution`, or `classifier.1` | nonlinear |
| `B.layer.{j}` inner width of block i (j = 0, or 0 and 1 for a bottleneck) | stock: none of its own (basic: `hidden_sizes[s]`, bottleneck: `hidden_sizes[s] // 4`); per-layer: `per_layer_config[i]["inner_sizes"][j]` | `B.layer.{j}.convolution` | `B.layer.{j+1}.convolution` | nonlinear |

Every site has a BatchNorm and a ReLU (after the residual sum, or after the stem's max-pool, which works channel by
channel) between writer and reader, so a rotation cannot be folded: each keeps k channels (pivoted QR on the kept
eigenvectors, `select_channels`), slices its writers and their BatchNorms (affine parameters and running statistics)
and refits its readers by least squares: every site is nothing but its tables (`Adapter.cut_site`). Samples are every
spatial position of every image, captured where the readers read them (after BatchNorm and ReLU); a stage's residual
channels are the same coordinates at every block of the stage (identity shortcuts add them channel by channel), so the
outputs of all its blocks pool into one spectrum.

The refit is W ← W Σ[:, S] (Σ[S, S] + εI)⁻¹ with Σ the channel second moment at the reader's own input (the site's
`reader_inputs`). It is the exact least-squares refit for 1×1 convolutions and the classifier. A k×k convolution gets
the same formula on every kernel tap (`optimum_rmtkd.projection.refit_conv_weight`): each dropped channel is replaced
by its least-squares prediction from the kept channels at the same position, which is optimal position by position
but not jointly over the taps (that needs the C·k²-wide second moment of image patches). Every step is exact when
nothing is cut.

The stock format holds one width per stage: `hidden_sizes[s]` fixes the residual width and also the inner widths
(equal in a basic block; a quarter in a bottleneck, whose `reduction=4` is not a config field). So the stock format
cuts a stage's residual and inner sites together (`stock_groups`) to widths that keep that rule
(`expressible_widths`); per-block inner widths need the registered `rmtkd_resnet` type, which stores them in
transformers' `per_layer_config` shape keyed by block ordinal. That format counts layers with `num_hidden_layers`,
which `ResNetConfig` lacks: in the per-layer format the adapter sets it to the number of residual blocks
(`sum(depths)`, which the registered config derives), then records every block's inner widths. Both formats build
blocks with the stock classes, which give a block a shortcut projection exactly when its input and output widths
differ or it strides, so a cut that would make stage 0's width equal to the stem's (where that block has a
projection) keeps one more channel.
"""
from __future__ import annotations

import copy

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn
from transformers.utils import logging

from ..configuration import RMTKDConfig
from ..projection import set_submodule
from .base import Adapter, CapturePoint, Site, per_layer_widths, register_adapter

logger = logging.get_logger(__name__)

STAGES = "resnet.encoder.stages"
STEM = "resnet.embedder"  # its output (after the max-pool) is what stage 0 reads
STEM_UNIT = "resnet.embedder.embedder"
CLASSIFIER = "classifier.1"
INNER_FIELD = "inner_sizes"
# `ResNetBottleNeckLayer(reduction=4)`: the stock inner width of a bottleneck is `hidden_sizes[s] // 4`.
BOTTLENECK_REDUCTION = 4


@dataclass(frozen=True)
class _Block:
    """One residual block: its path, stage, ordinal over all stages, number of conv units and whether it projects."""

    path: str
    stage: int
    index: int
    units: int
    projected: bool

    def unit(self, j: int) -> str:
        return f"{self.path}.layer.{j}"


def _blocks(model: nn.Module) -> List[_Block]:
    blocks = []
    for stage, depth in enumerate(model.config.depths):
        for b in range(depth):
            path = f"{STAGES}.{stage}.layers.{b}"
            module = model.get_submodule(path)
            blocks.append(
                _Block(path, stage, len(blocks), len(module.layer), not isinstance(module.shortcut, nn.Identity))
            )
    return blocks


def _conv(model: nn.Module, unit: str) -> nn.Conv2d:
    return model.get_submodule(f"{unit}.convolution")


def _input(path: str, module: nn.Module) -> CapturePoint:
    """Where a reader's input is captured: a feature map for a convolution, pooled vectors for the classifier."""
    return CapturePoint(path, side="input", layout="vector" if isinstance(module, nn.Linear) else "image")


def _site_stage(site: Site) -> Optional[int]:
    """The stage whose `hidden_sizes` entry governs a site in the stock format (`None` for the stem)."""
    if site.name == STEM:
        return None
    return int(site.name[len(STAGES) + 1 :].split(".")[0])


def _is_stage_site(site: Site) -> bool:
    return site.name.rpartition(".")[0] == STAGES


def _inner_ratio(config) -> int:
    """Stock residual width over stock inner width: 1 in a basic block, `reduction` (4) in a bottleneck."""
    return BOTTLENECK_REDUCTION if config.layer_type == "bottleneck" else 1


@register_adapter
class ResNetAdapter(Adapter):
    """Channel sites of `ResNetForImageClassification` (and of its registered per-layer type `rmtkd_resnet`)."""

    model_types = ("resnet",)
    architectures = ("ForImageClassification",)

    # --- reading the structure -------------------------------------------------------------------------------
    @staticmethod
    def _stem_tied(model: nn.Module) -> bool:
        """Whether stage 0's first block adds the stem output unprojected, tying the stem width to stage 0's."""
        return not _blocks(model)[0].projected

    def sites(self, model: nn.Module) -> List[Site]:
        """Deepest stage first, each stage's residual width before its blocks' inner widths, the stem last.

        The deep stages hold most parameters (the last stage of a ResNet-20 about three quarters) and the narrow
        early ones are the most sensitive to losing channels; since a stage that costs too much accuracy stops the
        run, going deepest first spends the accuracy budget where the parameters are. Measured on ResNet-20s
        trained on Fashion-MNIST (`benchmarks/resnet_fashion_mnist.py`): halving stage 0 (16 → 8 channels, 5% of
        the parameters) cost 1.7 to 3.5 validation points after a distillation epoch (cut first, it stopped the run
        at 0% reduction), while halving stage 2 (64 → 32) removed 55% of the parameters at no validation loss.
        """
        blocks = _blocks(model)
        n_stages = len(model.config.depths)
        tied = self._stem_tied(model)
        sites: List[Site] = []
        for stage in reversed(range(n_stages)):
            stage_blocks = [block for block in blocks if block.stage == stage]
            writers = [f"{block.unit(block.units - 1)}.convolution" for block in stage_blocks]
            norms = [f"{block.unit(block.units - 1)}.normalization" for block in stage_blocks]
            captures = [CapturePoint(block.path, layout="image") for block in stage_blocks]
            if stage_blocks[0].projected:
                writers.append(f"{stage_blocks[0].path}.shortcut.convolution")
                norms.append(f"{stage_blocks[0].path}.shortcut.normalization")
                readers = []
            else:  # only stage 0 can start unprojected (later stages stride): it reads the stem output as is
                writers.append(f"{STEM_UNIT}.convolution")
                norms.append(f"{STEM_UNIT}.normalization")
                captures.insert(0, CapturePoint(STEM, layout="image"))
                readers = [f"{stage_blocks[0].unit(0)}.convolution"]
            readers += [f"{block.unit(0)}.convolution" for block in stage_blocks[1:]]
            if stage + 1 < n_stages:
                following = next(block for block in blocks if block.stage == stage + 1)
                readers += [f"{following.unit(0)}.convolution", f"{following.path}.shortcut.convolution"]
            else:
                readers.append(CLASSIFIER)
            sites.append(
                Site(
                    name=f"{STAGES}.{stage}", kind="channels",
                    dim=_conv(model, stage_blocks[-1].unit(stage_blocks[-1].units - 1)).out_channels,
                    config_field=f"hidden_sizes[{stage}]" + (", embedding_size" if stage == 0 and tied else ""),
                    layer=None, path="nonlinear", captures=tuple(captures), writers=tuple(writers),
                    readers=tuple(readers), norms=tuple(norms),
                    reader_inputs=tuple(_input(path, model.get_submodule(path)) for path in readers),
                )
            )
            for block in stage_blocks:
                for j in range(block.units - 1):
                    reader = f"{block.unit(j + 1)}.convolution"
                    sites.append(
                        Site(
                            name=block.unit(j), kind="channels", dim=_conv(model, block.unit(j)).out_channels,
                            config_field=f"per_layer_config[{block.index}].{INNER_FIELD}[{j}]", layer=block.index,
                            path="nonlinear", captures=(CapturePoint(reader, side="input", layout="image"),),
                            writers=(f"{block.unit(j)}.convolution",), readers=(reader,),
                            norms=(f"{block.unit(j)}.normalization",),
                            reader_inputs=(CapturePoint(reader, side="input", layout="image"),),
                        )
                    )
        if not tied:
            first = blocks[0]
            readers = (f"{first.unit(0)}.convolution", f"{first.path}.shortcut.convolution")
            sites.append(
                Site(
                    name=STEM, kind="channels", dim=_conv(model, STEM_UNIT).out_channels,
                    config_field="embedding_size", layer=None, path="nonlinear",
                    captures=(CapturePoint(STEM, layout="image"),),
                    writers=(f"{STEM_UNIT}.convolution",), readers=readers, norms=(f"{STEM_UNIT}.normalization",),
                    reader_inputs=tuple(_input(path, model.get_submodule(path)) for path in readers),
                )
            )
        return sites

    # --- what the saved formats can express -------------------------------------------------------------------
    def stock_groups(self, model: nn.Module, sites: Sequence[Site]) -> List[List[Site]]:
        """One group per `hidden_sizes` entry (a stage's residual and inner sites) and one for the stem."""
        groups: Dict[Optional[int], List[Site]] = {}
        for site in sites:
            groups.setdefault(_site_stage(site), []).append(site)
        return list(groups.values())

    def expressible_widths(
        self, model: nn.Module, sites: Sequence[Site], widths: Dict[str, int], output_format: str
    ) -> Dict[str, int]:
        """Stock: per stage, the residual width is the widest asked (an inner width w asks for w, or 4w in a
        bottleneck) and the inner widths follow it. Both formats: keep stage 0's shortcut projection (see above)."""
        widths = dict(widths)
        ratio = _inner_ratio(model.config)
        if output_format == "stock":
            for group in self.stock_groups(model, sites):
                stage_site = next((site for site in group if _is_stage_site(site)), None)
                if stage_site is not None:
                    asked = [ratio * widths[site.name] for site in group if site is not stage_site]
                    widths[stage_site.name] = max([widths[stage_site.name]] + asked)
        self._keep_stage0_projection(model, sites, widths)
        if output_format == "stock":
            for site in sites:
                stage = _site_stage(site)
                if stage is not None and not _is_stage_site(site):
                    widths[site.name] = widths.get(f"{STAGES}.{stage}", model.config.hidden_sizes[stage]) // ratio
        return widths

    def joint_widths(self, model: nn.Module, sites: Sequence[Site], widths: Dict[str, int]) -> Dict[str, int]:
        """The stem and stage 0 are decided in separate stages: together they must keep stage 0's projection."""
        widths = dict(widths)
        self._keep_stage0_projection(model, sites, widths)
        return widths

    @staticmethod
    def _keep_stage0_projection(model, sites: Sequence[Site], widths: Dict[str, int]) -> None:
        """Widen by one channel a cut that would make stage 0's projected first block see equal widths at stride 1:
        the stock classes would then build it without its shortcut projection."""
        first = _blocks(model)[0]
        if not first.projected or model.config.downsample_in_first_stage:
            return
        stage0 = f"{STAGES}.0"
        current = {site.name: site.dim for site in sites}
        stem_width = widths.get(STEM, _conv(model, STEM_UNIT).out_channels)
        stage_width = widths.get(stage0, _conv(model, first.unit(first.units - 1)).out_channels)
        if stem_width != stage_width:
            return
        name = stage0 if stage0 in widths and widths[stage0] < current[stage0] else STEM
        widths[name] += 1
        logger.warning(
            "Kept %d channels instead of %d at %s: with equal stem and stage-0 widths the stock ResNet classes would "
            "drop stage 0's shortcut projection.", widths[name], widths[name] - 1, name,
        )

    def parameters_after_cut(self, model, sites, widths, stats=None, config: Optional[RMTKDConfig] = None) -> int:
        """The parameter count `reduce` would leave: the model's class built on the meta device from the widths the
        cut would record (`embedding_size`, `hidden_sizes`, and every block's inner widths in `per_layer_config`)."""
        config = config or RMTKDConfig()
        shadow = copy.deepcopy(model.config)
        cut = {site.name for site in sites}
        self._record_widths(model, shadow, sites, widths)
        if config.output_format != "stock":
            blocks = _blocks(model)
            shadow.num_hidden_layers = len(blocks)
            shadow.allow_global_per_layer_attribute_access = True
            shadow.per_layer_config = {
                block.index: {INNER_FIELD: [int(widths[block.unit(j)]) if block.unit(j) in cut else width
                                            for j, width in enumerate(self._inner_widths(model, block))]}
                for block in blocks
            }
        with torch.device("meta"):
            built = type(model)(shadow)
            self.resize_per_layer(built)
        return sum(p.numel() for p in built.parameters())

    # --- surgery ---------------------------------------------------------------------------------------------
    def reduce(self, model, sites, widths, stats, config: RMTKDConfig) -> nn.Module:
        for site in sites:
            if site.kind != "channels":
                raise ValueError(f"{type(self).__name__} has no site of kind {site.kind!r}; its kind is 'channels'.")
            self.cut_site(model, site, widths[site.name], stats, config)
        # New BatchNorms start in training mode (batch statistics): give every module the model's mode again.
        model.train(model.training)
        self._record_widths(model, model.config, sites, widths)
        self._check_shortcuts(model)
        if config.output_format == "stock":
            self._check_stock(model)
        else:
            self._record_inner_widths(model)
        return model

    def _record_widths(self, model, config, sites: Sequence[Site], widths: Dict[str, int]) -> None:
        """Write the new stem and stage widths of `model`'s cut into the fields of `config` that hold them."""
        hidden_sizes = list(config.hidden_sizes)
        for site in sites:
            if site.name == STEM:
                config.embedding_size = int(widths[site.name])
            elif _is_stage_site(site):
                stage = _site_stage(site)
                hidden_sizes[stage] = int(widths[site.name])
                if stage == 0 and self._stem_tied(model):
                    config.embedding_size = int(widths[site.name])
        config.hidden_sizes = hidden_sizes

    @staticmethod
    def _inner_widths(model, block: _Block) -> List[int]:
        return [_conv(model, block.unit(j)).out_channels for j in range(block.units - 1)]

    def _check_shortcuts(self, model) -> None:
        config = model.config
        for block in _blocks(model):
            in_width = _conv(model, block.unit(0)).in_channels
            stride = _conv(model, block.unit(0)).stride[0] * _conv(model, block.unit(1)).stride[0]
            expected = in_width != config.hidden_sizes[block.stage] or stride != 1
            if expected != block.projected:
                raise ValueError(
                    f"Block {block.path} {'has' if block.projected else 'has no'} shortcut projection but its widths "
                    f"({in_width} in, {config.hidden_sizes[block.stage]} out) make the ResNet classes build it "
                    f"{'without' if block.projected else 'with'} one; choose widths through `expressible_widths`."
                )

    def _check_stock(self, model) -> None:
        for block in _blocks(model):
            expected = model.config.hidden_sizes[block.stage] // _inner_ratio(model.config)
            actual = self._inner_widths(model, block)
            if any(width != expected for width in actual):
                raise ValueError(
                    f"The stock format needs inner width {expected} in block {block.path} (derived from "
                    f"`hidden_sizes[{block.stage}]`), got {actual}; cut the stage's sites together or use "
                    "`output_format='per-layer'`."
                )

    def _record_inner_widths(self, model) -> None:
        """Write every block's inner widths into `per_layer_config` (the per-layer format), keyed by block ordinal."""
        config, blocks = model.config, _blocks(model)
        if not hasattr(config, "num_hidden_layers"):  # a stock `ResNetConfig` (the registered one derives it)
            config.num_hidden_layers = len(blocks)
        config.allow_global_per_layer_attribute_access = True
        config.per_layer_config = {block.index: {INNER_FIELD: self._inner_widths(model, block)} for block in blocks}

    # --- registered per-layer format ----------------------------------------------------------------------------
    def resize_per_layer(self, model: nn.Module) -> None:
        per_layer = per_layer_widths(model.config)
        for block in _blocks(model):
            for j, width in enumerate(per_layer.get(block.index, {}).get(INNER_FIELD, [])):
                writer, reader = _conv(model, block.unit(j)), _conv(model, block.unit(j + 1))
                set_submodule(model, f"{block.unit(j)}.convolution", _conv_like(writer, writer.in_channels, width))
                norm = model.get_submodule(f"{block.unit(j)}.normalization")
                set_submodule(model, f"{block.unit(j)}.normalization", _batch_norm_like(norm, width))
                set_submodule(model, f"{block.unit(j + 1)}.convolution", _conv_like(reader, width, reader.out_channels))


def _conv_like(conv: nn.Conv2d, in_channels: int, out_channels: int) -> nn.Conv2d:
    """An uninitialised conv with `conv`'s hyper-parameters, device and dtype and new widths (weights load later)."""
    return nn.Conv2d(
        in_channels, out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
        groups=conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
        device=conv.weight.device, dtype=conv.weight.dtype,
    )


def _batch_norm_like(norm: nn.BatchNorm2d, channels: int) -> nn.BatchNorm2d:
    ref = norm.weight if norm.weight is not None else norm.running_mean
    return nn.BatchNorm2d(
        channels, eps=norm.eps, momentum=norm.momentum, affine=norm.affine,
        track_running_stats=norm.track_running_stats, device=ref.device, dtype=ref.dtype,
    )
