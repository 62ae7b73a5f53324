"""Baselines that the RMT rule is held against at equal size: the comparison arms of the quality benchmark.

RMT-KD makes two choices at a site: how many directions to keep (the width, from the Marchenko–Pastur fit) and, at a
non-linear site, which channels realise them (pivoted QR on the kept eigenvectors, `projection.select_channels`).
Whether either choice earns its keep is a question of evidence, not taste (DESIGN §1, §8), so these functions give
the simpler answers a reviewer would ask about, each isolating one choice:

- which channels, at a given width (every rule is followed by the same least-squares refit of the reader,
  `cut_channels`, so arms at equal widths differ only in the channels they keep):
  - `magnitude_channels`: the largest ‖writer row‖₂ · ‖reader column‖₂, the usual data-free magnitude pruning;
  - `variance_channels`: the largest diagonal of the calibration second moment, the channels that carry the most
    energy on their own ("plain PCA variance" without a rotation);
  - `random_channels`: a seeded uniform draw, the floor any informed rule must beat. A random *rotation* cannot be
    folded through the GELU, so the random arm keeps random coordinates;
- which width: `explained_variance_width`, the 90%-explained-variance rule of PCA, the classic way to size a
  projection without a noise model;
- another axis altogether: `drop_layers`, DistilBERT-style depth reduction (keep every other layer), a stock model
  of fewer layers at a similar parameter count.

`benchmarks/quality.py` runs them on all-MiniLM-L6-v2 and Rotten Tomatoes; they are library code so that the
benchmark and the tests use one implementation, next to the cuts they are compared with. They are not used by
`RMTKDCompressor`.

Example:

```python
>>> from optimum_rmtkd.baselines import cut_channels, magnitude_channels
>>> keep = magnitude_channels(model.get_submodule(site.writers[0]), model.get_submodule(site.readers[0]), 128)
>>> cut_channels(model, site, keep, stats[site.captures[0].key].second_moment(), ridge=1e-4)
```
"""
from __future__ import annotations

import copy
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .adapters import Site, get_adapter
from .projection import (
    refit_reader_weight,
    set_submodule,
    slice_linear_inputs,
    slice_linear_outputs,
    top_channels,
    variance_channels,
)


def _check_width(width: int, dim: int) -> None:
    if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or not 1 <= width <= dim:
        raise ValueError(f"`width` must be an integer in [1, {dim}], got {width!r}.")


def magnitude_channels(writer: nn.Linear, reader: nn.Linear, width: int) -> torch.Tensor:
    """Magnitude baseline: keep the channels with the largest product of the writer's row norm and the reader's
    column norm.

    Channel i is produced by row i of the writer and consumed by column i of the reader; the product of their L2
    norms is the usual data-free magnitude score of a whole channel (biases are left out). It exists to ask whether
    the calibration data and the eigenvectors are needed to choose channels at all (DESIGN §8: at the paper's widths
    it lost 17 points to QR before distillation, and tied after).

    Args:
        writer (`nn.Linear`): the layer that produces the site's channels (its output features).
        reader (`nn.Linear`): the layer that consumes them (its input features).
        width (`int`): channels to keep, in [1, d].

    Returns:
        `torch.Tensor`: the `width` kept channel indices, ascending (`keep`); ties go to the lower index.
    """
    if writer.out_features != reader.in_features:
        raise ValueError(
            f"`writer` produces {writer.out_features} channels but `reader` reads {reader.in_features}; pass the "
            "two sides of one site."
        )
    scores = writer.weight.detach().norm(dim=1) * reader.weight.detach().norm(dim=0)
    return top_channels(scores, width)


def random_channels(dim: int, width: int, seed: int) -> torch.Tensor:
    """Random baseline: keep `width` of `dim` channels drawn uniformly without replacement.

    The floor every informed choice must beat; with the least-squares refit of the reader it shows how much of a
    one-shot cut's quality the refit alone recovers.

    Args:
        dim (`int`): d, the site's width (>= 1).
        width (`int`): channels to keep, in [1, d].
        seed (`int`): the draw's seed; the same seed gives the same channels.

    Returns:
        `torch.Tensor`: the `width` kept channel indices, ascending (`keep`).
    """
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise ValueError(f"`dim` must be a positive integer, got {dim!r}.")
    _check_width(width, dim)
    generator = torch.Generator().manual_seed(int(seed))
    return torch.sort(torch.randperm(dim, generator=generator)[:width]).values


def explained_variance_width(eigenvalues, fraction: float = 0.9) -> int:
    """PCA width baseline: the smallest k whose k largest eigenvalues hold at least `fraction` of their sum.

    The classic explained-variance rule, which sizes a projection without any noise model: it asks whether the
    Marchenko–Pastur fit picks better widths than a fixed share of the energy. Eigenvalues are taken in any order
    (sorted here); with the library's uncentred second moment this is the share of activation energy, with a
    covariance the classic explained variance. Turn k into a width with `widths.widths_for_ranks`, as an
    estimator's rank is.

    Args:
        eigenvalues (`array-like`): the spectrum; negative values (round-off) count as 0.
        fraction (`float`, *optional*, defaults to 0.9): the share to hold, in (0, 1].

    Returns:
        `int`: k, in [1, d].
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
        raise ValueError(f"`fraction` must be in (0, 1], got {fraction!r}.")
    values = np.sort(np.clip(np.asarray(eigenvalues, dtype=np.float64).ravel(), 0.0, None))[::-1]
    total = values.sum()
    if values.size == 0 or total <= 0:
        raise ValueError("`eigenvalues` must hold at least one positive value.")
    cumulative = np.cumsum(values) / total
    # A relative tolerance so that a share equal to `fraction` up to round-off counts as reached.
    return int(np.searchsorted(cumulative, fraction - 1e-12) + 1)


def cut_channels(model: nn.Module, site: Site, keep: torch.Tensor, second_moment: torch.Tensor, ridge: float) -> None:
    """Cut a one-writer, one-reader non-linear site to the `keep` channels, in place, as the library does it.

    The writer loses its other output rows; the reader is refitted by least squares on the calibration second moment
    (`refit_reader_weight`) and sliced. With `keep` from `select_channels` this is exactly the adapter's own FFN
    cut, so an arm differs from the RMT arm only by which channels it keeps.

    Args:
        model (`nn.Module`): the model to cut, changed in place.
        site (`Site`): a non-linear site with one writer and one reader (a transformer FFN).
        keep (`torch.Tensor`): the channel indices to keep, ascending.
        second_moment (`torch.Tensor`): the site's d × d calibration second moment, for the refit.
        ridge (`float`): the refit's ridge, relative to mean(diag Σ_SS) (`RMTKDConfig.ridge`).
    """
    if site.path != "nonlinear" or len(site.writers) != 1 or len(site.readers) != 1:
        raise ValueError(
            f"`site` must be a non-linear site with one writer and one reader (an FFN), got {site.name!r} with "
            f"{len(site.writers)} writer(s) and {len(site.readers)} reader(s)."
        )
    writer_path, reader_path = site.writers[0], site.readers[0]
    set_submodule(model, writer_path, slice_linear_outputs(model.get_submodule(writer_path), keep))
    reader = model.get_submodule(reader_path)
    weight = refit_reader_weight(reader.weight, second_moment, keep, ridge)
    set_submodule(model, reader_path, slice_linear_inputs(reader, keep, weight))


def drop_layers(model: nn.Module, keep_layers: Sequence[int]) -> nn.Module:
    """Layer-dropping baseline: a new model of the same class holding only the `keep_layers` encoder layers.

    DistilBERT's initialisation (keep every other layer, then distil) is the common way to shrink an encoder by
    depth rather than width; it answers whether cutting widths beats cutting layers at a similar size. The config's
    layer count becomes `len(keep_layers)`; embeddings, the kept layers (renumbered 0, 1, …) and the task head are
    copied. The result is a stock model: `save_pretrained` + `from_pretrained` reload it as is. Transformer encoders
    only (their adapter's `layout` names the layer list).

    Args:
        model (`transformers.PreTrainedModel`): the encoder model to copy from; not changed.
        keep_layers (`list[int]`): distinct layer indices to keep, in any order (kept in model order).

    Returns:
        `transformers.PreTrainedModel`: the shallower model, on the device and in the dtype of `model`.
    """
    layout = get_adapter(model).layout
    n_layers = int(getattr(model.config, layout.layers_field))
    keep = [int(i) for i in keep_layers]
    if not keep or len(set(keep)) != len(keep) or any(not 0 <= i < n_layers for i in keep):
        raise ValueError(
            f"`keep_layers` must be distinct layer indices in [0, {n_layers - 1}], at least one, got {list(keep_layers)}."
        )
    keep = sorted(keep)
    config = copy.deepcopy(model.config)
    setattr(config, layout.layers_field, len(keep))
    reference = next(model.parameters())
    student = type(model)(config).to(device=reference.device, dtype=reference.dtype)
    prefix = f"{layout.layers}."
    renumber = {old: new for new, old in enumerate(keep)}
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith(prefix):
            index, _, rest = name[len(prefix):].partition(".")
            if int(index) not in renumber:
                continue
            name = f"{prefix}{renumber[int(index)]}.{rest}"
        state[name] = tensor
    student.load_state_dict(state)
    student.train(model.training)
    return student
