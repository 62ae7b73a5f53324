"""Modules the registered per-layer format adds to stock models.

`RotatedLayerNorm` is a LayerNorm seen through a change of basis of its input and output (DESIGN §8). A post-LN
encoder's residual stream passes through a LayerNorm after every sublayer, and LayerNorm is not rotation-equivariant
(its mean runs along the all-ones direction of the original basis, its γ is per coordinate), so a residual stream
rotated onto its leading k directions cannot keep stock LayerNorms. With C = I − 11ᵀ/d the centring matrix of the
original width d, LN(u) = diag(γ)·C·u / √(uᵀCu/d + ε) + β, and for u = P_inᵀ·z (z in the k-dimensional input basis,
P_in with orthonormal rows) the output in the basis P_out is

    P_out·LN(P_inᵀ z) = A z / √((‖z‖² − (c·z)²/d) / d + ε) + b,   A = P_out diag(γ) C P_inᵀ,   c = P_in 1,   b = P_out β,

since P_in C P_inᵀ = I − c cᵀ/d. It is exact for every z, so the cut is exact when nothing is cut, and costs one k×k
matrix and a k-vector per LayerNorm.
"""
from __future__ import annotations

import torch
from torch import nn


class RotatedLayerNorm(nn.Module):
    """`y = A z / √((‖z‖² − (c·z)² / d) / d + eps) + bias`: a LayerNorm of width d = `normalized_dim` read and written
    in rotated bases of `in_features` and `out_features` coordinates.

    `weight` (A, out × in) and `bias` are trained like a LayerNorm's γ and β; `centre` (c, the all-ones direction of
    the original basis seen in the input basis) is a geometric fact of the rotation, stored but not trained.

    Args:
        in_features (`int`): width of the rotated input.
        out_features (`int`): width of the rotated output.
        normalized_dim (`int`): the width d of the LayerNorm this module stands for.
        eps (`float`): the LayerNorm's ε.
    """

    def __init__(
        self, in_features: int, out_features: int, normalized_dim: int, eps: float = 1e-12, device=None, dtype=None
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.normalized_dim, self.eps = int(normalized_dim), float(eps)
        self.weight = nn.Parameter(torch.eye(out_features, in_features, **factory))
        self.centre = nn.Parameter(torch.zeros(in_features, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, **factory))

    @classmethod
    @torch.no_grad()
    def from_layer_norm(cls, norm: nn.LayerNorm) -> "RotatedLayerNorm":
        """The same function as `norm` in the identity basis: A = diag(γ)·C, c = 1, b = β."""
        (dim,) = norm.normalized_shape
        reference = norm.weight if norm.elementwise_affine else torch.empty(0)
        new = cls(dim, dim, dim, norm.eps, device=reference.device, dtype=reference.dtype)
        gamma = norm.weight.detach().double().cpu() if norm.elementwise_affine else torch.ones(dim, dtype=torch.float64)
        new.weight.copy_(gamma[:, None] * (torch.eye(dim, dtype=torch.float64) - 1.0 / dim))
        new.centre.fill_(1.0)
        if norm.elementwise_affine and norm.bias is not None:
            new.bias.copy_(norm.bias)
        return new

    @torch.no_grad()
    def projected(self, p_in: torch.Tensor, p_out: torch.Tensor) -> "RotatedLayerNorm":
        """A copy reading `p_in @ z` and writing `p_out @ y` instead (P: k × current width, orthonormal rows):
        A ← P_out A P_inᵀ, c ← P_in c, b ← P_out b."""
        reference = self.weight
        p_in = p_in.to(device=reference.device, dtype=torch.float64)
        p_out = p_out.to(device=reference.device, dtype=torch.float64)
        new = type(self)(
            p_in.shape[0], p_out.shape[0], self.normalized_dim, self.eps, device=reference.device, dtype=reference.dtype
        )
        new.weight.copy_(p_out @ self.weight.double() @ p_in.T)
        new.centre.copy_(p_in @ self.centre.double())
        new.bias.copy_(p_out @ self.bias.double())
        return new

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # (‖z‖² − (c·z)²/d) / d is the variance of the original-width vector z stands for (its squared norm minus
        # its squared mean times d, over d).
        squared = (hidden_states * hidden_states).sum(-1, keepdim=True)
        mean = (hidden_states @ self.centre).unsqueeze(-1) / self.normalized_dim
        variance = squared / self.normalized_dim - mean * mean
        return hidden_states @ self.weight.T * torch.rsqrt(variance + self.eps) + self.bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"normalized_dim={self.normalized_dim}, eps={self.eps}"
        )
