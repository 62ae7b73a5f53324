import pytest
import torch

from optimum_rmtkd.covariance import SecondMomentAccumulator, merged, reduce_accumulators, samples_per_view


def _data(seed=0, n=200, d=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3, d, dtype=torch.float64) + 0.3


def test_batches_equal_concatenated_data():
    x = _data()
    acc = SecondMomentAccumulator(7)
    for chunk in x.split(33):
        acc.update(chunk.float())
    expected = (x.float().double().T @ x.float().double()) / x.shape[0]
    assert acc.n_samples == 200
    torch.testing.assert_close(acc.second_moment(), expected, rtol=1e-12, atol=1e-12)


def test_centered_is_the_covariance():
    x = _data(1)
    acc = SecondMomentAccumulator(7)
    acc.update(x)
    expected = torch.cov(x.T, correction=0)
    torch.testing.assert_close(acc.second_moment(centered=True), expected, rtol=1e-10, atol=1e-12)


def test_merge_equals_whole():
    x = _data(2)
    whole, left, right = SecondMomentAccumulator(7), SecondMomentAccumulator(7), SecondMomentAccumulator(7)
    whole.update(x)
    left.update(x[:71])
    right.update(x[71:])
    merged = left.merge(right)
    assert merged.n_samples == whole.n_samples
    torch.testing.assert_close(merged.second_moment(), whole.second_moment(), rtol=1e-12, atol=1e-12)


def test_padding_mask_excludes_positions():
    x = _data(3, n=24).reshape(2, 12, 7)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, 9:] = 0
    mask[1, 4:] = 0
    acc = SecondMomentAccumulator(7)
    acc.update(x, mask)
    kept = torch.cat([x[0, :9], x[1, :4]])
    assert acc.n_samples == 13
    torch.testing.assert_close(acc.second_moment(), kept.T @ kept / 13)


def test_eigh_descending_and_reconstructs():
    acc = SecondMomentAccumulator(7)
    acc.update(_data(4))
    eig = acc.eigh()
    assert torch.all(eig.eigenvalues[:-1] >= eig.eigenvalues[1:])
    rebuilt = eig.eigenvectors @ torch.diag(eig.eigenvalues) @ eig.eigenvectors.T
    torch.testing.assert_close(rebuilt, acc.second_moment(), rtol=1e-9, atol=1e-10)


def test_state_round_trip_for_reduction():
    src, dst = SecondMomentAccumulator(7), SecondMomentAccumulator(7)
    src.update(_data(5))
    dst.load_state(src.state())
    assert dst.n_samples == src.n_samples
    torch.testing.assert_close(dst.second_moment(), src.second_moment())


def test_reduce_is_a_no_op_for_one_process():
    class OneProcess:
        num_processes = 1

    acc = SecondMomentAccumulator(7)
    acc.update(_data(6))
    before = acc.second_moment().clone()
    reduce_accumulators({"a": acc}, OneProcess())
    torch.testing.assert_close(acc.second_moment(), before)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_activations_rejected(bad):
    x = torch.ones(3, 7)
    x[1, 2] = bad
    with pytest.raises(ValueError, match="NaN or inf activations"):
        SecondMomentAccumulator(7).update(x)


def test_shape_errors():
    acc = SecondMomentAccumulator(7)
    with pytest.raises(ValueError, match="last dimension 7, got shape \\(3, 5\\)"):
        acc.update(torch.ones(3, 5))
    with pytest.raises(ValueError, match="`mask` must have shape \\(2, 4\\)"):
        acc.update(torch.ones(2, 4, 7), torch.ones(2, 5))
    with pytest.raises(ValueError, match="`dim` must be a positive integer, got 0"):
        SecondMomentAccumulator(0)


def test_fewer_than_two_samples_rejected():
    acc = SecondMomentAccumulator(7)
    acc.update(torch.ones(1, 7))
    with pytest.raises(ValueError, match="At least 2 samples are needed .* got 1"):
        acc.second_moment()


def test_samples_per_view_is_the_largest_single_count():
    views = [SecondMomentAccumulator(3) for _ in range(3)]
    for count, view in zip((5, 9, 7), views):
        view.update(torch.randn(count, 3, dtype=torch.float64))
    assert merged(views).n_samples == 21
    assert samples_per_view(views) == 9


def test_an_offloaded_accumulator_reads_its_sums_back_from_disk(tmp_path):
    x = _data(5)
    acc = SecondMomentAccumulator(7)
    acc.update(x[:120])
    in_memory = (acc.second_moment().clone(), acc.eigh(centered=True).eigenvalues.clone(), acc.mean().clone())
    acc.offload(tmp_path / "statistics")
    files = list((tmp_path / "statistics").iterdir())
    assert acc.is_offloaded and len(files) == 1 and files[0].suffix == ".safetensors"
    assert acc._sums is None  # nothing kept in memory between reads
    torch.testing.assert_close(acc.second_moment(), in_memory[0], rtol=0, atol=0)
    torch.testing.assert_close(acc.eigh(centered=True).eigenvalues, in_memory[1], rtol=0, atol=0)
    torch.testing.assert_close(acc.mean(), in_memory[2], rtol=0, atol=0)
    assert acc.is_offloaded  # reading does not load it back for good
    pooled = merged([acc, acc])
    assert pooled.n_samples == 240 and not pooled.is_offloaded
    torch.testing.assert_close(pooled.second_moment(), in_memory[0])


def test_an_update_after_offload_is_not_lost(tmp_path):
    x = _data(6)
    whole, acc = SecondMomentAccumulator(7), SecondMomentAccumulator(7)
    whole.update(x)
    acc.update(x[:50])
    acc.offload(tmp_path)
    acc.update(x[50:])
    assert not acc.is_offloaded and acc.n_samples == 200
    torch.testing.assert_close(acc.sum_outer, whole.sum_outer, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(acc.sum, whole.sum, rtol=1e-12, atol=1e-12)


def test_the_offload_file_is_deleted_with_its_accumulator(tmp_path):
    import gc

    acc = SecondMomentAccumulator(7)
    acc.update(_data(7))
    acc.offload(tmp_path)
    assert len(list(tmp_path.iterdir())) == 1
    del acc
    gc.collect()
    assert list(tmp_path.iterdir()) == []
