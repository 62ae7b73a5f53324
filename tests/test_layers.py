"""`RotatedLayerNorm`: the exact fold of a LayerNorm through rotations of its input and output (DESIGN §8)."""
import pytest
import torch
from torch import nn

from optimum_rmtkd.layers import RotatedLayerNorm
from optimum_rmtkd.projection import project_norm, slice_norm


@pytest.fixture
def layer_norm():
    torch.manual_seed(0)
    norm = nn.LayerNorm(12, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    return norm


def _orthonormal_rows(k, d, seed):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q[:, :k].T.contiguous()


def test_identity_basis_is_the_layer_norm(layer_norm):
    x = torch.randn(5, 7, 12, dtype=torch.float64)
    torch.testing.assert_close(RotatedLayerNorm.from_layer_norm(layer_norm)(x), layer_norm(x), rtol=1e-12, atol=1e-12)


def test_rotated_bases_fold_exactly(layer_norm):
    # Full rotations: P_out·LN(P_inᵀ z) for every z. Kept subspaces: the same for z whose vector lies in the span.
    p_in, p_out = _orthonormal_rows(12, 12, 1), _orthonormal_rows(12, 12, 2)
    z = torch.randn(9, 12, dtype=torch.float64)
    folded = project_norm(layer_norm, p_in, p_out)
    torch.testing.assert_close(folded(z), layer_norm(z @ p_in) @ p_out.T, rtol=1e-12, atol=1e-12)
    p_in, p_out = _orthonormal_rows(5, 12, 3), _orthonormal_rows(4, 12, 4)
    narrow = project_norm(layer_norm, p_in, p_out)
    assert (narrow.in_features, narrow.out_features, narrow.normalized_dim) == (5, 4, 12)
    assert tuple(narrow.weight.shape) == (4, 5) and tuple(narrow.centre.shape) == (5,)
    z = torch.randn(9, 5, dtype=torch.float64)
    torch.testing.assert_close(narrow(z), layer_norm(z @ p_in) @ p_out.T, rtol=1e-12, atol=1e-12)
    # A second cut composes with the first: fold the narrow one again through a rotation of its own bases.
    q_in, q_out = _orthonormal_rows(3, 5, 5), _orthonormal_rows(2, 4, 6)
    twice = project_norm(narrow, q_in, q_out)
    z = torch.randn(9, 3, dtype=torch.float64)
    torch.testing.assert_close(twice(z), narrow(z @ q_in) @ q_out.T, rtol=1e-12, atol=1e-12)


def test_slicing_a_rotated_norm_keeps_its_coordinates(layer_norm):
    rotated = project_norm(layer_norm, _orthonormal_rows(6, 12, 7), _orthonormal_rows(6, 12, 8))
    keep = torch.tensor([0, 2, 5])
    sliced = slice_norm(rotated, keep)
    z = torch.zeros(4, 6, dtype=torch.float64)
    z[:, keep] = torch.randn(4, 3, dtype=torch.float64)
    torch.testing.assert_close(sliced(z[:, keep]), rotated(z)[:, keep], rtol=1e-12, atol=1e-12)


def test_only_layer_norms_fold():
    with pytest.raises(TypeError, match="Only a LayerNorm can be folded through a rotation, got BatchNorm1d"):
        project_norm(nn.BatchNorm1d(4), torch.eye(4), torch.eye(4))


def test_centre_is_not_trained(layer_norm):
    rotated = RotatedLayerNorm.from_layer_norm(layer_norm)
    assert {name for name, p in rotated.named_parameters() if p.requires_grad} == {"weight", "bias"}
    assert set(rotated.state_dict()) == {"weight", "centre", "bias"}


def test_rescaled_slice_corrects_the_spread_over_kept_coordinates():
    # Tokens x = c·1 + v (v fixed, c per token; LayerNorm ignores c): a LayerNorm over the kept coordinates alone sees
    # another σ and mean than the full one, in a ratio that does not vary from token to token, so the corrected γ, β
    # give back the full-width output on the kept coordinates exactly; the plain slice does not.
    from optimum_rmtkd.projection import slice_layer_norm_rescaled

    torch.manual_seed(0)
    norm = nn.LayerNorm(6, eps=0.0).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    v = torch.tensor([3.0, -2.0, 4.0, 0.5, -0.5, 0.1], dtype=torch.float64)
    x = torch.randn(5, 1, dtype=torch.float64) + v
    keep = torch.tensor([0, 1, 2])
    moment, mean = x.T @ x / len(x), x.mean(0)
    rescaled = slice_layer_norm_rescaled(norm, keep, moment, mean)
    plain = slice_norm(norm, keep)
    full = norm(x)[:, keep]
    assert (rescaled(x[:, keep]) - full).abs().max() < (plain(x[:, keep]) - full).abs().max()
    torch.testing.assert_close(rescaled(x[:, keep]), full, rtol=1e-9, atol=1e-9)
    # Every coordinate kept: the plain slice, exact.
    everything = slice_layer_norm_rescaled(norm, torch.arange(6), moment, mean)
    torch.testing.assert_close(everything(x), norm(x), rtol=0, atol=0)
