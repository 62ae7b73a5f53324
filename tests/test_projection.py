import pytest
import torch
from torch import nn

from optimum_rmtkd.projection import (
    leading_directions,
    refit_and_slice_reader,
    refit_conv_weight,
    refit_reader_weight,
    rotate_linear_inputs,
    rotate_linear_outputs,
    select_channels,
    slice_layer_norm,
    slice_linear_inputs,
    slice_linear_outputs,
    slice_norm,
    slice_writer,
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


def test_conv_refit_is_least_squares_for_one_by_one_and_tap_wise_for_three_by_three():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=g, dtype=torch.float64)
    x[:, 5] = x[:, 0] - 2 * x[:, 3]  # a dropped channel that the kept ones predict exactly
    sigma = x.T @ x / len(x)
    keep = torch.tensor([0, 1, 2, 3, 4])
    weight = torch.randn(3, 6, 3, 3, generator=g, dtype=torch.float64)
    refit = refit_conv_weight(weight, sigma, keep, ridge=0.0)
    assert refit.shape == (3, 5, 3, 3)
    # Each tap's refit folds the dropped channel's exact prediction into the kept ones.
    expected = weight[:, keep].clone()
    expected[:, 0] += weight[:, 5]
    expected[:, 3] -= 2 * weight[:, 5]
    torch.testing.assert_close(refit, expected)


def test_table_helpers_dispatch_on_the_layer_type():
    keep = torch.tensor([0, 2, 3])
    assert slice_writer(nn.Linear(4, 5), keep).weight.shape == (3, 4)
    assert slice_writer(nn.Conv2d(2, 5, 3), keep).weight.shape == (3, 2, 3, 3)
    assert slice_writer(nn.Embedding(7, 5), keep).weight.shape == (7, 3)
    assert slice_norm(nn.LayerNorm(5), keep).weight.shape == (3,)
    assert slice_norm(nn.BatchNorm2d(5), keep).running_mean.shape == (3,)
    sigma = torch.eye(5, dtype=torch.float64)
    assert refit_and_slice_reader(nn.Linear(5, 2), keep, sigma).weight.shape == (2, 3)
    assert refit_and_slice_reader(nn.Conv2d(5, 2, 3), keep, sigma).weight.shape == (2, 3, 3, 3)
    with pytest.raises(TypeError, match="A writer must be an nn.Linear, nn.Conv2d or nn.Embedding, got ReLU."):
        slice_writer(nn.ReLU(), keep)
    with pytest.raises(TypeError, match="A norm must be an nn.LayerNorm, nn.BatchNorm2d or RotatedLayerNorm, got Linear."):
        slice_norm(nn.Linear(5, 5), keep)
    with pytest.raises(TypeError, match="A reader must be an nn.Linear or nn.Conv2d, got Embedding."):
        refit_and_slice_reader(nn.Embedding(7, 5), keep, sigma)


def test_refit_and_slice_reader_is_the_least_squares_refit():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(400, 5, dtype=torch.float64, generator=g)
    sigma, keep = x.T @ x / len(x), torch.tensor([1, 3, 4])
    reader = nn.Linear(5, 2).double()
    refit = refit_and_slice_reader(reader, keep, sigma, ridge=1e-3)
    torch.testing.assert_close(refit.weight, refit_reader_weight(reader.weight, sigma, keep, ridge=1e-3))
    torch.testing.assert_close(refit.bias, reader.bias)


def test_leading_directions_are_the_top_eigenvectors_as_rows():
    matrix = torch.diag(torch.tensor([1.0, 5.0, 3.0], dtype=torch.float64))
    rows = leading_directions(matrix, 2)
    assert rows.shape == (2, 3)
    torch.testing.assert_close(rows.abs(), torch.tensor([[0.0, 1, 0], [0, 0, 1]], dtype=torch.float64))
