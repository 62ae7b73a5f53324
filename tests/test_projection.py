import pytest
import torch
from torch import nn

from optimum_rmtkd.projection import (
    refit_reader_weight,
    rotate_linear_inputs,
    rotate_linear_outputs,
    select_channels,
    slice_layer_norm,
    slice_linear_inputs,
    slice_linear_outputs,
)


def test_select_channels_recovers_the_support_of_a_coordinate_subspace():
    dim, keep = 12, torch.tensor([1, 4, 9])
    basis = torch.zeros(dim, 3, dtype=torch.float64)
    basis[keep, torch.arange(3)] = 1.0
    rotation, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    assert select_channels(basis @ rotation, 3).tolist() == keep.tolist()


def test_select_channels_full_width_and_bounds():
    vectors = torch.eye(5, dtype=torch.float64)
    assert select_channels(vectors, 5).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"`width` must be in \[1, 5\], got 0."):
        select_channels(vectors, 0)


def test_refit_is_exact_when_dropped_inputs_are_linear_in_kept_ones():
    g = torch.Generator().manual_seed(1)
    kept = torch.randn(500, 4, dtype=torch.float64, generator=g)
    x = torch.cat([kept, kept @ torch.randn(4, 2, dtype=torch.float64, generator=g)], dim=1)  # 6 inputs, rank 4
    sigma = x.T @ x / x.shape[0]
    weight = torch.randn(3, 6, dtype=torch.float64, generator=g)
    refit = refit_reader_weight(weight, sigma, torch.arange(4), ridge=1e-12)
    # The dropped columns are exact linear combinations, so the least-squares refit reproduces W x (up to the ridge).
    torch.testing.assert_close(kept @ refit.T, x @ weight.T, rtol=1e-6, atol=1e-6)


def test_refit_at_full_width_returns_the_weight():
    weight = torch.randn(3, 6)
    torch.testing.assert_close(refit_reader_weight(weight, torch.eye(6), torch.arange(6)), weight)


def test_rotation_round_trip_is_exact_at_full_width():
    torch.manual_seed(0)
    writer, reader = nn.Linear(5, 8).double(), nn.Linear(8, 3).double()
    q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    x = torch.randn(10, 5, dtype=torch.float64)
    folded = rotate_linear_inputs(reader, q)(rotate_linear_outputs(writer, q)(x))
    torch.testing.assert_close(folded, reader(writer(x)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slicing_keeps_dtype_and_shapes(dtype):
    linear, norm = nn.Linear(6, 9).to(dtype), nn.LayerNorm(9).to(dtype)
    keep = torch.tensor([0, 2, 5, 7])
    out = slice_linear_outputs(linear, keep)
    inp = slice_linear_inputs(nn.Linear(9, 3).to(dtype), keep)
    ln = slice_layer_norm(norm, keep)
    assert (out.weight.dtype, inp.weight.dtype, ln.weight.dtype) == (dtype, dtype, dtype)
    assert tuple(out.weight.shape) == (4, 6) and tuple(inp.weight.shape) == (3, 4) and tuple(ln.weight.shape) == (4,)
    torch.testing.assert_close(out.weight, linear.weight[keep])
