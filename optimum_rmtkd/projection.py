"""Weight surgery: fold rotations, pick channels, refit readers, and slice layers keeping device and dtype.

transformers 5 dropped head pruning and its `prune_linear_layer` returns float32 for a bf16 layer, so the slicing
helpers here build every new layer with the old layer's device and dtype and copy under `no_grad`.

Everything here is generic: it knows layer types (Linear, Conv2d, Embedding, LayerNorm, BatchNorm2d), never an
architecture. The three table helpers at the end (`slice_writer`, `slice_norm`, `refit_and_slice_reader`) are what
a site's writer, norm and reader tables are walked with (`optimum_rmtkd.adapters.base.Adapter.cut_site`).
"""
from __future__ import annotations

import copy
from typing import Sequence

import numpy as np
import scipy.linalg
import torch
from torch import nn

from .layers import RotatedLayerNorm


def select_channels(eigenvectors: torch.Tensor, width: int) -> torch.Tensor:
    """Choose `width` coordinates that best span the top `width` eigenvectors (pivoted QR on Pᵀ).

    Args:
        eigenvectors (`torch.Tensor`): `(dim, r)` eigenvectors as columns, strongest first (r ≥ width).
        width (`int`): number of coordinates (channels) to keep.

    Returns:
        `torch.LongTensor`: the kept coordinates, sorted ascending (`keep`).
    """
    dim = eigenvectors.shape[0]
    if not 1 <= width <= dim:
        raise ValueError(f"`width` must be in [1, {dim}], got {width}.")
    if width == dim:
        return torch.arange(dim)
    basis = eigenvectors[:, :width].detach().cpu().double().numpy()
    # Column pivoting on P (width × dim) orders coordinates by how much new span of the kept subspace they add.
    _, _, pivots = scipy.linalg.qr(basis.T, mode="economic", pivoting=True)
    return torch.from_numpy(np.sort(pivots[:width])).long()


def top_channels(scores: torch.Tensor, width: int) -> torch.Tensor:
    """The `width` indices of the largest scores (ties broken by the lower index), sorted ascending (`keep`)."""
    if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or not 1 <= width <= scores.numel():
        raise ValueError(f"`width` must be an integer in [1, {scores.numel()}], got {width!r}.")
    order = torch.argsort(scores.detach().to(torch.float64).cpu(), descending=True, stable=True)
    return torch.sort(order[:width]).values


def variance_channels(second_moment: torch.Tensor, width: int) -> torch.Tensor:
    """Keep the channels with the largest diagonal of the calibration second moment E[x xᵀ].

    It uses the same data as `select_channels` but looks at each channel alone, ignoring the correlations the kept
    eigenvectors capture (`RMTKDConfig.channel_selection="variance"`).

    Args:
        second_moment (`torch.Tensor`): the d × d calibration second moment (or covariance) of the site.
        width (`int`): channels to keep, in [1, d].

    Returns:
        `torch.Tensor`: the `width` kept channel indices, ascending (`keep`); ties go to the lower index.
    """
    if second_moment.ndim != 2 or second_moment.shape[0] != second_moment.shape[1]:
        raise ValueError(f"`second_moment` must be a square matrix, got shape {tuple(second_moment.shape)}.")
    return top_channels(torch.diagonal(second_moment), width)


def refit_reader_weight(
    weight: torch.Tensor, second_moment: torch.Tensor, keep: torch.Tensor, ridge: float = 1e-4
) -> torch.Tensor:
    """Least-squares refit of a reader when only the `keep` inputs survive: W ← W Σ[:, S] (Σ[S, S] + εI)⁻¹.

    This is the W' minimising E‖W x − W' x_S‖² under the calibration second moment Σ (DESIGN §2(b)); the ridge ε is
    `ridge` times the mean diagonal of Σ[S, S] and keeps the solve stable on near-collinear channels. When every
    input is kept the weight is returned unchanged (the reduction is then exact).
    """
    dim = weight.shape[1]
    if keep.numel() == dim:
        return weight[:, keep].clone()
    sigma = second_moment.to(torch.float64).cpu()
    sigma_ss = sigma[keep][:, keep]
    eps = ridge * float(torch.diagonal(sigma_ss).mean().clamp_min(1e-12))
    gram = sigma_ss + eps * torch.eye(keep.numel(), dtype=torch.float64)
    cross = sigma[:, keep]  # (dim, k)
    # W' = W Σ[:,S] G⁻¹  <=>  G W'ᵀ = (W Σ[:,S])ᵀ, G symmetric positive definite.
    rhs = (weight.detach().to(torch.float64).cpu() @ cross).T
    solution = torch.linalg.solve(gram, rhs).T
    return solution.to(dtype=weight.dtype, device=weight.device)


def refit_projected_reader(
    linear: nn.Linear, projection: torch.Tensor, second_moment: torch.Tensor, ridge: float = 1e-4
) -> nn.Linear:
    """A copy of a reader whose input is now P x (P: k × dim, orthonormal rows), refitted by least squares on the
    second moment Σ of x: W ← W Σ Pᵀ (P Σ Pᵀ + εI)⁻¹, the W' minimising E‖W x − W' P x‖².

    `refit_reader_weight` is the case of P a selection of coordinates. When the rows of P are eigenvectors of Σ this
    is W Pᵀ (also what a square P gives); a basis shared by several readers (a residual stream's) differs from each one's own eigenvectors, and
    the refit recovers what each reader can predict of the dropped directions from the kept ones.
    """
    p = projection.to(torch.float64).cpu()
    if p.shape[0] == p.shape[1]:  # a rotation keeping every direction: exact, W Pᵀ (the ridge would perturb it)
        return rotate_linear_inputs(linear, p)
    sigma = second_moment.to(torch.float64).cpu()
    gram = p @ sigma @ p.T
    eps = ridge * float(torch.diagonal(gram).mean().clamp_min(1e-12))
    gram = gram + eps * torch.eye(p.shape[0], dtype=torch.float64)
    rhs = (linear.weight.detach().to(torch.float64).cpu() @ sigma @ p.T).T
    weight = torch.linalg.solve(gram, rhs).T
    return slice_linear_inputs(linear, torch.arange(p.shape[0]), weight.to(linear.weight.dtype))


def refit_conv_weight(
    weight: torch.Tensor, second_moment: torch.Tensor, keep: torch.Tensor, ridge: float = 1e-4
) -> torch.Tensor:
    """`refit_reader_weight` applied to every kernel tap of a conv weight `(out, in, kh, kw)`; returns `(out, k, kh, kw)`.

    Exact least squares for a 1×1 convolution. For k×k, each dropped input channel is replaced by its least-squares
    prediction from the kept channels at the same position: optimal position by position, not jointly over the taps
    (that would need the C·k²-wide second moment of image patches).
    """
    out_channels, in_channels, kh, kw = weight.shape
    taps = weight.permute(0, 2, 3, 1).reshape(out_channels * kh * kw, in_channels)
    refit = refit_reader_weight(taps, second_moment, keep, ridge)
    return refit.reshape(out_channels, kh, kw, keep.numel()).permute(0, 3, 1, 2).contiguous()


def leading_directions(matrix: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` leading eigenvectors of a symmetric matrix as orthonormal rows (count × dim), in float64."""
    _, vectors = torch.linalg.eigh(matrix.to(torch.float64))
    return vectors.flip(1)[:, :count].T


def _new_linear(in_features: int, out_features: int, like: nn.Linear) -> nn.Linear:
    return nn.Linear(
        in_features, out_features, bias=like.bias is not None, device=like.weight.device, dtype=like.weight.dtype
    )


@torch.no_grad()
def slice_linear_outputs(linear: nn.Linear, keep: torch.Tensor) -> nn.Linear:
    """A copy of `linear` producing only the `keep` outputs (a writer losing channels)."""
    keep = keep.to(linear.weight.device)
    new = _new_linear(linear.in_features, keep.numel(), linear)
    new.weight.copy_(linear.weight[keep])
    if linear.bias is not None:
        new.bias.copy_(linear.bias[keep])
    return new


@torch.no_grad()
def slice_linear_inputs(linear: nn.Linear, keep: torch.Tensor, weight: torch.Tensor | None = None) -> nn.Linear:
    """A copy of `linear` reading only the `keep` inputs; `weight` (out × k) replaces the plain slice (a refit)."""
    keep = keep.to(linear.weight.device)
    new = _new_linear(keep.numel(), linear.out_features, linear)
    new.weight.copy_(linear.weight[:, keep] if weight is None else weight)
    if linear.bias is not None:
        new.bias.copy_(linear.bias)
    return new


@torch.no_grad()
def rotate_linear_outputs(linear: nn.Linear, projection: torch.Tensor) -> nn.Linear:
    """Fold P (k × out) into a writer: W ← P W, b ← P b."""
    p = projection.to(device=linear.weight.device, dtype=torch.float64)
    new = _new_linear(linear.in_features, p.shape[0], linear)
    new.weight.copy_((p @ linear.weight.double()).to(linear.weight.dtype))
    if linear.bias is not None:
        new.bias.copy_((p @ linear.bias.double()).to(linear.bias.dtype))
    return new


@torch.no_grad()
def rotate_linear_inputs(linear: nn.Linear, projection: torch.Tensor) -> nn.Linear:
    """Fold Pᵀ (in × k) into a reader: W ← W Pᵀ."""
    p = projection.to(device=linear.weight.device, dtype=torch.float64)
    new = _new_linear(p.shape[0], linear.out_features, linear)
    new.weight.copy_((linear.weight.double() @ p.T).to(linear.weight.dtype))
    if linear.bias is not None:
        new.bias.copy_(linear.bias)
    return new


@torch.no_grad()
def slice_embedding(embedding: nn.Embedding, keep: torch.Tensor) -> nn.Embedding:
    """A copy of `embedding` whose vectors keep only the `keep` coordinates."""
    keep = keep.to(embedding.weight.device)
    new = nn.Embedding(
        embedding.num_embeddings,
        keep.numel(),
        padding_idx=embedding.padding_idx,
        device=embedding.weight.device,
        dtype=embedding.weight.dtype,
    )
    new.weight.copy_(embedding.weight[:, keep])
    return new


@torch.no_grad()
def slice_layer_norm(norm: nn.LayerNorm, keep: torch.Tensor) -> nn.LayerNorm:
    """A LayerNorm over the `keep` coordinates with γ and β sliced (exact only when every coordinate is kept)."""
    keep = keep.to(norm.weight.device)
    new = nn.LayerNorm(
        keep.numel(),
        eps=norm.eps,
        elementwise_affine=norm.elementwise_affine,
        bias=norm.bias is not None,
        device=norm.weight.device,
        dtype=norm.weight.dtype,
    )
    if norm.elementwise_affine:
        new.weight.copy_(norm.weight[keep])
        if norm.bias is not None:
            new.bias.copy_(norm.bias[keep])
    return new


@torch.no_grad()
def slice_layer_norm_rescaled(
    norm: nn.LayerNorm, keep: torch.Tensor, input_moment: torch.Tensor, input_mean: torch.Tensor
) -> nn.LayerNorm:
    """`slice_layer_norm`, with γ and β corrected for normalising over the kept coordinates only.

    A LayerNorm sliced to S computes its mean μ_S and spread σ_S over S, where the model was trained with μ and σ over
    every coordinate. With σ_S ≈ c σ, c² = E[σ_S²] / E[σ²] from the input's second moment M (E[σ²] = tr(C M) / d, C the
    centring matrix), γ_S c and β_S + γ_S (E[μ_S] − E[μ]) / √E[σ²] give back the kept coordinates of the full-width
    output on average; what varies token by token stays (the stock LayerNorm cannot compute σ over dropped
    coordinates). Exact when every coordinate is kept.
    """
    dim = input_moment.shape[0]
    if keep.numel() == dim:
        return slice_layer_norm(norm, keep)
    moment = input_moment.to(torch.float64).cpu()
    mean = input_mean.to(torch.float64).cpu()
    kept_moment, kept_mean = moment[keep][:, keep], mean[keep]
    full_variance = (torch.trace(moment) - moment.sum() / dim) / dim
    kept_variance = (torch.trace(kept_moment) - kept_moment.sum() / keep.numel()) / keep.numel()
    scale = torch.sqrt(kept_variance / full_variance.clamp_min(1e-12))
    new = slice_layer_norm(norm, keep)
    if norm.elementwise_affine:
        gamma = norm.weight.detach().double().cpu()[keep]
        shift = gamma * (kept_mean.mean() - mean.mean()) / torch.sqrt(full_variance.clamp_min(1e-12))
        new.weight.copy_(gamma * scale)
        if norm.bias is not None:
            new.bias.copy_(norm.bias.detach().double().cpu()[keep] + shift)
    return new


@torch.no_grad()
def slice_conv2d(conv: nn.Conv2d, keep_out: torch.Tensor | None = None, keep_in: torch.Tensor | None = None,
                 weight: torch.Tensor | None = None) -> nn.Conv2d:
    """A copy of a (non-grouped) `conv` keeping output channels `keep_out` and input channels `keep_in`."""
    if conv.groups != 1:
        raise ValueError(f"Only `groups=1` convolutions can be sliced, got groups={conv.groups}.")
    w = conv.weight
    out_idx = torch.arange(conv.out_channels) if keep_out is None else keep_out
    in_idx = torch.arange(conv.in_channels) if keep_in is None else keep_in
    new = nn.Conv2d(
        in_idx.numel(), out_idx.numel(), conv.kernel_size, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, bias=conv.bias is not None, padding_mode=conv.padding_mode,
        device=w.device, dtype=w.dtype,
    )
    sliced = w[out_idx.to(w.device)][:, in_idx.to(w.device)] if weight is None else weight
    new.weight.copy_(sliced)
    if conv.bias is not None:
        new.bias.copy_(conv.bias[out_idx.to(w.device)])
    return new


@torch.no_grad()
def slice_batch_norm(norm: nn.BatchNorm2d, keep: torch.Tensor) -> nn.BatchNorm2d:
    """A BatchNorm over the `keep` channels, affine parameters and running statistics sliced with them."""
    keep = keep.to(norm.weight.device if norm.weight is not None else norm.running_mean.device)
    ref = norm.weight if norm.weight is not None else norm.running_mean
    new = nn.BatchNorm2d(
        keep.numel(), eps=norm.eps, momentum=norm.momentum, affine=norm.affine,
        track_running_stats=norm.track_running_stats, device=ref.device, dtype=ref.dtype,
    )
    if norm.affine:
        new.weight.copy_(norm.weight[keep])
        new.bias.copy_(norm.bias[keep])
    if norm.track_running_stats:
        new.running_mean.copy_(norm.running_mean[keep])
        new.running_var.copy_(norm.running_var[keep])
        new.num_batches_tracked.copy_(norm.num_batches_tracked)
    return new


def get_submodule(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    """Replace the submodule at the dotted state-dict `path` (e.g. `encoder.layer.0.intermediate.dense`)."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def blocks(matrix: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    """The diagonal blocks of a square matrix for consecutive groups of the given sizes (per attention head)."""
    out, start = [], 0
    for size in sizes:
        out.append(matrix[start : start + size, start : start + size])
        start += size
    return out


# --- rotations of a whole residual stream (a pre-RMSNorm decoder's hidden width) --------------------------------------
@torch.no_grad()
def rotate_embedding(embedding: nn.Embedding, projection: torch.Tensor) -> nn.Embedding:
    """A copy of `embedding` whose vectors are projected onto the rows of P (k × dim): E ← E Pᵀ (a writer of a rotated
    stream, as `rotate_linear_outputs` is for a Linear)."""
    p = projection.to(device=embedding.weight.device, dtype=torch.float64)
    new = nn.Embedding(
        embedding.num_embeddings,
        p.shape[0],
        padding_idx=embedding.padding_idx,
        device=embedding.weight.device,
        dtype=embedding.weight.dtype,
    )
    new.weight.copy_((embedding.weight.double() @ p.T).to(embedding.weight.dtype))
    return new


@torch.no_grad()
def norm_with_weight(norm: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A copy of a normalisation module (any class whose only parameter is its elementwise `weight`, e.g. an RMSNorm)
    whose weight is `weight`, of any width, in the old weight's device and dtype.

    Module attributes other than the weight (an RMSNorm's epsilon) are copied unchanged; a model that reads them from
    its config is rebuilt after the config changes (`optimum_rmtkd.adapters.base.rebuild`).
    """
    names = [name for name, _ in norm.named_parameters()]
    if names != ["weight"]:
        raise TypeError(
            f"`norm_with_weight` needs a module whose only parameter is `weight`, got {type(norm).__name__} with "
            f"parameters {names}."
        )
    old = norm.weight
    new = copy.deepcopy(norm)
    new.weight = nn.Parameter(
        weight.detach().to(device=old.device, dtype=old.dtype).clone(), requires_grad=old.requires_grad
    )
    return new


# --- the table helpers: one call per writer, norm or reader of a site ------------------------------------------------
def slice_writer(module: nn.Module, keep: torch.Tensor) -> nn.Module:
    """A copy of a writer producing only the `keep` channels: a Linear's output rows, a Conv2d's output channels, or an
    Embedding's vector coordinates."""
    if isinstance(module, nn.Linear):
        return slice_linear_outputs(module, keep)
    if isinstance(module, nn.Conv2d):
        return slice_conv2d(module, keep_out=keep)
    if isinstance(module, nn.Embedding):
        return slice_embedding(module, keep)
    raise TypeError(f"A writer must be an nn.Linear, nn.Conv2d or nn.Embedding, got {type(module).__name__}.")


def slice_norm(module: nn.Module, keep: torch.Tensor) -> nn.Module:
    """A copy of a normalisation over the `keep` channels (LayerNorm: γ, β; BatchNorm2d: also running statistics; a
    `RotatedLayerNorm`: the `keep` rows and columns of its matrices, which is exact on the kept coordinates)."""
    if isinstance(module, nn.LayerNorm):
        return slice_layer_norm(module, keep)
    if isinstance(module, nn.BatchNorm2d):
        return slice_batch_norm(module, keep)
    if isinstance(module, RotatedLayerNorm):
        selection = torch.eye(module.out_features, dtype=torch.float64)[keep.cpu()]
        return module.projected(selection, selection)
    raise TypeError(
        f"A norm must be an nn.LayerNorm, nn.BatchNorm2d or RotatedLayerNorm, got {type(module).__name__}."
    )


def project_norm(module: nn.Module, p_in: torch.Tensor, p_out: torch.Tensor) -> RotatedLayerNorm:
    """A LayerNorm (or `RotatedLayerNorm`) that reads the stream rotated by `p_in` and writes it rotated by `p_out`
    (k × width, orthonormal rows): the exact fold of `optimum_rmtkd.layers`, a `RotatedLayerNorm`."""
    if isinstance(module, nn.LayerNorm):
        module = RotatedLayerNorm.from_layer_norm(module)
    if not isinstance(module, RotatedLayerNorm):
        raise TypeError(f"Only a LayerNorm can be folded through a rotation, got {type(module).__name__}.")
    return module.projected(p_in, p_out)


def refit_and_slice_reader(
    module: nn.Module, keep: torch.Tensor, second_moment: torch.Tensor, ridge: float = 1e-4
) -> nn.Module:
    """A copy of a reader (Linear or Conv2d) reading only the `keep` inputs, its weight refitted by least squares on
    the second moment Σ of its own input (`refit_reader_weight`, or `refit_conv_weight` tap by tap)."""
    if isinstance(module, nn.Linear):
        return slice_linear_inputs(module, keep, refit_reader_weight(module.weight, second_moment, keep, ridge))
    if isinstance(module, nn.Conv2d):
        weight = refit_conv_weight(module.weight, second_moment, keep, ridge)
        return slice_conv2d(module, keep_in=keep, weight=weight)
    raise TypeError(f"A reader must be an nn.Linear or nn.Conv2d, got {type(module).__name__}.")
