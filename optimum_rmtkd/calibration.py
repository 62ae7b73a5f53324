"""Stream activations at capture points into second-moment accumulators through forward hooks.

Activations are never stored: each hook folds its batch into a float64 Σ x xᵀ and is done. Under Accelerate each
process calibrates a disjoint shard (no `even_batches` padding, which would count repeated samples twice) and the
sums are all-reduced before any eigendecomposition.

Layer by layer (`layerwise=`), for models larger than memory: the calibration set is run up to the first layer
once, its inputs kept, then every layer runs over all of them before the next one starts, so each layer's weights
are needed once. With the weights offloaded through Accelerate (`device_map`/`offload_folder`, whose hooks load a
module's weights for its forward and release them after), peak memory is about one layer plus the kept
activations, not the model; the sums are the whole-model pass's, to round-off. The sums of a finished layer are
all-reduced and written to disk (`SecondMomentAccumulator.offload`) before the next layer starts: one float64 d × d
sum per site adds up to more than the weights on wide FFNs (a 7B Llama's FFN site alone is ~1 GB).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters.base import CapturePoint, LayerwiseLayout
from .covariance import SecondMomentAccumulator, reduce_accumulators
from .utils.memory import release_free_heap
from .utils.progress import progress_bars_enabled


def _samples(tensor: torch.Tensor, layout: str, mask: Optional[torch.Tensor], sample_unit: str):
    """Turn a captured tensor into (samples, mask) as `SecondMomentAccumulator.update` expects."""
    if layout == "vector":
        return tensor, None
    if layout == "image":  # (batch, channels, h, w): every spatial position of every image is a sample
        return tensor.permute(0, 2, 3, 1), None
    if sample_unit == "cls":
        return tensor[:, 0], None
    if sample_unit == "mean":
        if mask is None:
            return tensor.mean(dim=1), None
        weights = mask.to(tensor.dtype).unsqueeze(-1)
        return (tensor * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0), None
    return tensor, mask


class ActivationCollector:
    """Forward hooks on `model` that feed one accumulator per capture point while the context is open."""

    def __init__(self, model: nn.Module, points: Sequence[CapturePoint], sample_unit: str = "tokens") -> None:
        self.model = model
        self.points = list(points)
        self.sample_unit = sample_unit
        self.accumulators: Dict[str, SecondMomentAccumulator] = {}
        self.mask: Optional[torch.Tensor] = None
        self._handles = []

    def _update(self, point: CapturePoint, tensor: torch.Tensor) -> None:
        if isinstance(tensor, (tuple, list)):
            tensor = tensor[0]
        layout_dim = 1 if point.layout == "image" else -1
        if point.key not in self.accumulators:
            # Sums live beside the activations, so a multi-GPU all-reduce (NCCL) sees device tensors.
            self.accumulators[point.key] = SecondMomentAccumulator(tensor.shape[layout_dim], device=tensor.device)
        mask = self.mask if point.layout == "sequence" else None
        if mask is not None and tuple(mask.shape) != tuple(tensor.shape[:2]):
            mask = None  # a module that does not see the full (batch, tokens) grid
        samples, mask = _samples(tensor.detach(), point.layout, mask, self.sample_unit)
        self.accumulators[point.key].update(samples, mask)

    def __enter__(self) -> "ActivationCollector":
        for point in self.points:
            module = self.model.get_submodule(point.module)
            if point.side == "input":
                handle = module.register_forward_pre_hook(lambda m, args, p=point: self._update(p, args[0]))
            else:
                handle = module.register_forward_hook(lambda m, args, out, p=point: self._update(p, out))
            self._handles.append(handle)
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def process_shard(dataset, accelerator):
    """This process's contiguous, disjoint share of `dataset` (every example in exactly one shard).

    Accelerate's `even_batches` would repeat examples to even out shards, and a repeated example is counted twice
    in a covariance sum, so calibration shards by hand instead of through `accelerator.prepare`.
    """
    if accelerator is None or accelerator.num_processes == 1:
        return dataset
    return dataset.shard(accelerator.num_processes, accelerator.process_index, contiguous=True)


class _FirstLayerReached(Exception):
    """Stops a forward at the first layer once its inputs are kept."""


def _first_layer_inputs(model: nn.Module, layout: LayerwiseLayout, batches, device, collector: ActivationCollector,
                        forward_kwargs: Dict[str, Any], disable: bool) -> List[list]:
    """Run every batch up to the first layer (capture points before it see it) and keep that layer's call:
    `[hidden_states, other positional args, keyword args, padding mask]` per batch."""
    kept: List[list] = []

    def stop(module, args, kwargs):
        hidden, rest = (args[0], args[1:]) if args else (kwargs.pop("hidden_states"), ())
        kept.append([hidden, rest, kwargs, collector.mask])
        raise _FirstLayerReached

    handle = model.get_submodule(layout.layers)[0].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        for batch in tqdm(batches, desc="Calibrating (inputs of layer 0)", disable=disable, leave=False):
            inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            collector.mask = inputs.get("attention_mask")
            try:
                model(**inputs, **forward_kwargs)
            except _FirstLayerReached:
                pass
    finally:
        handle.remove()
    return kept


def _keys_inside(points: Sequence[CapturePoint], prefix: str) -> List[str]:
    """The capture keys of the points on `prefix` or a module below it."""
    return [p.key for p in points if p.module == prefix or p.module.startswith(prefix + ".")]


def _check_seen(collector: ActivationCollector, keys: Sequence[str]) -> None:
    missing = [key for key in keys if key not in collector.accumulators]
    if missing:
        raise ValueError(f"Calibration saw no activations at {', '.join(missing)}; is the calibration set empty?")


def _run_layer_by_layer(model: nn.Module, layout: LayerwiseLayout, kept: List[list], collector: ActivationCollector,
                        accelerator, offload_folder, disable: bool) -> Set[str]:
    """Each layer, then each tail module, over every kept input, its outputs becoming the next one's inputs; each
    layer's sums are all-reduced and offloaded as soon as it is done. Returns the keys already reduced."""
    layers = list(model.get_submodule(layout.layers))
    reduced: Set[str] = set()
    for index, layer in enumerate(tqdm(layers, desc="Calibrating layer by layer", disable=disable, leave=False)):
        for entry in kept:
            hidden, rest, kwargs, collector.mask = entry
            output = layer(hidden, *rest, **kwargs)
            entry[0] = output[0] if isinstance(output, (tuple, list)) else output
        keys = _keys_inside(collector.points, f"{layout.layers}.{index}")
        _check_seen(collector, keys)
        finished = {key: collector.accumulators[key] for key in keys}
        reduce_accumulators(finished, accelerator)
        for accumulator in finished.values():
            accumulator.offload(offload_folder)
        reduced.update(keys)
        release_free_heap()  # this layer's weights, outputs and sums are dead: keep the footprint at one layer
    for path in layout.tail:
        module = model.get_submodule(path)
        for entry in kept:
            collector.mask = entry[3]
            entry[0] = module(entry[0])
    return reduced


@torch.no_grad()
def collect_statistics(
    model: nn.Module,
    batches: Iterable[Dict[str, torch.Tensor]],
    points: Sequence[CapturePoint],
    *,
    sample_unit: str = "tokens",
    accelerator=None,
    device: Optional[torch.device] = None,
    forward_kwargs: Optional[Dict[str, Any]] = None,
    layerwise: Optional[LayerwiseLayout] = None,
    offload_folder: Union[str, os.PathLike, None] = None,
) -> Dict[str, SecondMomentAccumulator]:
    """Run `model` over `batches` (this process's shard) and return the reduced accumulators by capture key.

    `forward_kwargs` go to every forward pass beside the inputs (the task's, e.g. no key/value cache). With
    `layerwise`, the pass runs one layer at a time over the whole set (see the module docstring); capture points
    after the layers must be in `layerwise.tail`, and the sums of the points inside the layers come back offloaded
    to `offload_folder` (the system's temporary folder by default).
    """
    was_training = model.training
    model.eval()
    device = device or _input_device(model)
    collector = ActivationCollector(model, points, sample_unit)
    disable = not progress_bars_enabled(accelerator)
    reduced: Set[str] = set()
    try:
        with collector:
            if layerwise is None:
                for batch in tqdm(batches, desc="Calibrating", disable=disable, leave=False):
                    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
                    collector.mask = inputs.get("attention_mask")
                    model(**inputs, **(forward_kwargs or {}))
            else:
                kept = _first_layer_inputs(model, layerwise, batches, device, collector, forward_kwargs or {},
                                           disable)
                reduced = _run_layer_by_layer(model, layerwise, kept, collector, accelerator, offload_folder,
                                              disable)
    finally:
        model.train(was_training)
    _check_seen(collector, [p.key for p in points])
    reduce_accumulators({k: v for k, v in collector.accumulators.items() if k not in reduced}, accelerator)
    return collector.accumulators


def _input_device(model: nn.Module) -> torch.device:
    """The first parameter's device, or the CPU when it is offloaded (on the meta device): Accelerate's hooks move
    the inputs to wherever each module executes."""
    device = next(model.parameters()).device
    return torch.device("cpu") if device.type == "meta" else device


def layerwise_layout(adapter, model: nn.Module, config) -> Optional[LayerwiseLayout]:
    """The adapter's layer layout when `config.layerwise_calibration` asks for it, else `None` (whole model)."""
    if not config.layerwise_calibration:
        return None
    layout = adapter.layerwise_layout(model)
    if layout is None:
        raise ValueError(
            f"`layerwise_calibration=True` needs an adapter that names the model's layers, and the "
            f"{type(adapter).__name__} does not; calibrate the whole model (`layerwise_calibration=False`)."
        )
    return layout
