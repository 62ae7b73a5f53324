"""Streaming second-moment statistics of one site's activations, in float64, with O(dim²) memory."""
from __future__ import annotations

import contextlib
import os
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import torch
from safetensors.torch import load_file, save_file


@dataclass
class Eigendecomposition:
    """Eigenvalues in descending order and the matching eigenvectors as columns (`eigenvectors[:, i]`)."""

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor


class SecondMomentAccumulator:
    """Accumulates Σ x xᵀ, Σ x and n over batches of samples x ∈ R^dim, never storing the samples.

    The sums are kept (not running means) so that shards from several processes combine by plain addition:
    `state()` gives the tensors to all-reduce with `reduction="sum"`, `load_state()` puts the reduced sums back.
    A finished accumulator can be `offload`ed to disk: its sums are then read back on every use, so that a caller
    going through many sites one at a time holds one d × d sum, not all of them (layer-wise calibration).

    Args:
        dim (`int`): width d of the site.
        device (`torch.device` or `str`, *optional*, defaults to `"cpu"`): where the float64 sums live.
    """

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        if not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"`dim` must be a positive integer, got {dim!r}.")
        self.dim = dim
        self.device = torch.device(device)
        self._sums: Optional[Dict[str, torch.Tensor]] = {
            "sum_outer": torch.zeros(dim, dim, dtype=torch.float64, device=device),
            "sum": torch.zeros(dim, dtype=torch.float64, device=device),
        }
        self._offload_path: Optional[Path] = None
        self.n_samples = 0

    @property
    def sum_outer(self) -> torch.Tensor:
        """Σ x xᵀ (float64, d × d); read from disk on each access when offloaded."""
        return self._read("sum_outer")

    @property
    def sum(self) -> torch.Tensor:
        """Σ x (float64, d); read from disk on each access when offloaded."""
        return self._read("sum")

    @property
    def is_offloaded(self) -> bool:
        return self._offload_path is not None

    def _read(self, name: str) -> torch.Tensor:
        if self._sums is not None:
            return self._sums[name]
        return load_file(self._offload_path)[name].to(self.device)

    def _writable_sums(self) -> Dict[str, torch.Tensor]:
        """The sums in memory, read back first if they were offloaded (an update must not go to a temporary)."""
        if self._sums is None:
            self._sums = load_file(self._offload_path, device=str(self.device))
            self._offload_path = None
        return self._sums

    def offload(self, folder: Union[str, os.PathLike, None] = None) -> None:
        """Write the sums to a file in `folder` (the system's temporary folder by default) and drop them from memory.

        The file is deleted when the accumulator is garbage-collected. Reads (`second_moment`, `eigh`, `state`...)
        load it each time and keep nothing; an `update` or `merge` into it loads it back for good.
        """
        if self._sums is None:
            return
        folder = Path(folder if folder is not None else tempfile.gettempdir())
        folder.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix="rmtkd-statistics-", suffix=".safetensors", dir=folder)
        os.close(handle)
        save_file({key: value.detach().cpu().contiguous() for key, value in self._sums.items()}, name)
        weakref.finalize(self, _remove_quietly, name)
        self._offload_path, self._sums = Path(name), None

    def update(self, samples: torch.Tensor, mask: Optional[torch.Tensor] = None) -> None:
        """Add a batch of samples.

        Args:
            samples (`torch.Tensor`): shape `(..., dim)`; every leading position is one sample.
            mask (`torch.Tensor`, *optional*): boolean or 0/1 tensor of shape `samples.shape[:-1]`; positions where
                it is false (padding) are not counted.
        """
        if samples.ndim < 1 or samples.shape[-1] != self.dim:
            raise ValueError(
                f"`samples` must have last dimension {self.dim}, got shape {tuple(samples.shape)}."
            )
        flat = samples.reshape(-1, self.dim)
        if mask is not None:
            if tuple(mask.shape) != tuple(samples.shape[:-1]):
                raise ValueError(
                    f"`mask` must have shape {tuple(samples.shape[:-1])} to match `samples`, got {tuple(mask.shape)}."
                )
            flat = flat[mask.reshape(-1).to(torch.bool)]
        if flat.shape[0] == 0:
            return
        flat = flat.to(device=self.device, dtype=torch.float64)
        if not torch.isfinite(flat).all():
            raise ValueError(
                "`samples` contain NaN or inf activations; check the model's dtype (fp16 overflow) and its inputs."
            )
        sums = self._writable_sums()
        sums["sum_outer"].addmm_(flat.T, flat)
        sums["sum"].add_(flat.sum(dim=0))
        self.n_samples += flat.shape[0]

    def merge(self, other: "SecondMomentAccumulator") -> "SecondMomentAccumulator":
        """Add the sums of `other` (another shard of the same site) into this accumulator and return it."""
        if other.dim != self.dim:
            raise ValueError(f"Cannot merge accumulators of width {self.dim} and {other.dim}.")
        sums = self._writable_sums()
        sums["sum_outer"] += other.sum_outer.to(self.device)
        sums["sum"] += other.sum.to(self.device)
        self.n_samples += other.n_samples
        return self

    def state(self) -> Dict[str, torch.Tensor]:
        """The sums as float64 tensors, ready for `accelerator.reduce(state, reduction="sum")`."""
        count = torch.tensor([float(self.n_samples)], dtype=torch.float64, device=self.device)
        return {"sum_outer": self.sum_outer, "sum": self.sum, "n_samples": count}

    def load_state(self, state: Dict[str, torch.Tensor]) -> None:
        """Replace the sums by `state` (typically the result of an all-reduce of every process's `state()`)."""
        self._sums = {name: state[name].to(torch.float64).clone() for name in ("sum_outer", "sum")}
        self._offload_path = None
        self.device = self._sums["sum"].device
        self.n_samples = int(round(float(state["n_samples"].reshape(-1)[0])))

    def mean(self) -> torch.Tensor:
        self._check_enough_samples()
        return self.sum / self.n_samples

    def second_moment(self, centered: bool = False) -> torch.Tensor:
        """Σ = (1/n) Σ x xᵀ (the paper's uncentred form), or the covariance with the mean removed when `centered`."""
        self._check_enough_samples()
        matrix = self.sum_outer / self.n_samples
        if centered:
            mu = self.sum / self.n_samples
            matrix = matrix - torch.outer(mu, mu)
        return (matrix + matrix.T) / 2

    def eigh(self, centered: bool = False) -> Eigendecomposition:
        """Eigendecomposition of `second_moment(centered)`, eigenvalues descending and clipped at 0 (round-off)."""
        values, vectors = torch.linalg.eigh(self.second_moment(centered))
        return Eigendecomposition(values.flip(0).clamp_min(0.0), vectors.flip(1))

    def _check_enough_samples(self) -> None:
        if self.n_samples < 2:
            raise ValueError(
                f"At least 2 samples are needed to estimate a second moment, got {self.n_samples}; "
                "use a larger calibration set."
            )


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


def merged(accumulators: Sequence["SecondMomentAccumulator"]) -> "SecondMomentAccumulator":
    """A new accumulator holding the pooled samples of several equal-width accumulators (e.g. a site read at
    several points); the inputs are left unchanged."""
    first = accumulators[0]
    pooled = SecondMomentAccumulator(first.dim, device=first.device)
    for acc in accumulators:
        pooled.merge(acc)
    return pooled


def samples_per_view(accumulators: Sequence["SecondMomentAccumulator"]) -> int:
    """The n of the Marchenko–Pastur null for a site pooled from several capture points.

    The points are views of the same inputs (the residual stream after every layer sees the same tokens), and
    neighbouring views are strongly correlated, so they are not independent samples: counting their total would
    shrink q = d/n by the number of views and lower the bulk edge. The largest single view's count is used.
    """
    return max(acc.n_samples for acc in accumulators)


def reduce_accumulators(accumulators: Dict[str, SecondMomentAccumulator], accelerator) -> None:
    """Sum every accumulator's state across processes in one collective call (no-op for a single process).

    Only the sums (Σ x xᵀ, Σ x, n) travel; each process must have seen a disjoint shard (`even_batches=False`),
    otherwise repeated samples would be counted twice.
    """
    if accelerator is None or accelerator.num_processes == 1:
        return
    names = sorted(accumulators)
    states = {name: accumulators[name].state() for name in names}
    reduced = accelerator.reduce(states, reduction="sum")
    for name in names:
        accumulators[name].load_state(reduced[name])


