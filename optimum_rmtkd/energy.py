"""Energy meters for the benchmark: NVIDIA GPU power through NVML, CPU package energy through Linux RAPL.

Both meters measure; neither estimates. When a meter cannot read its counter, `available()` is `False` and
`reason` says why, and the benchmark reports "not available" with that reason instead of a number.

- `RAPLReader` reads the cumulative energy counters `/sys/class/powercap/intel-rapl:<n>/energy_uj` of every CPU
  package (AMD exposes the same files). They cover the whole package, idle draw and other processes included, and
  wrap to 0 after `max_energy_range_uj`; one wrap per window is corrected. Since Linux 5.10 they are readable by
  root only.
- `NVMLPowerSampler` samples `nvmlDeviceGetPowerUsage` (milliwatts) in a background thread and integrates the
  average power over the window. Recent drivers report a power value averaged over about a second, so give it
  windows of seconds, not milliseconds.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from transformers.utils import logging

logger = logging.get_logger(__name__)

PathLike = Union[str, os.PathLike]

RAPL_ROOT = "/sys/class/powercap"


@dataclass
class EnergyMeasurement:
    """Energy used over one measured window.

    Args:
        joules (`float`): energy over the window.
        seconds (`float`): length of the window.
        average_watts (`float`): `joules / seconds`.
        source (`str`): `"rapl"` or `"nvml"`.
    """

    joules: float
    seconds: float
    average_watts: float
    source: str


class RAPLReader:
    """Read CPU package energy from the Linux powercap RAPL interface, correcting counter wrap-around.

    Only package zones (`intel-rapl:<n>`) are summed: their sub-zones (`intel-rapl:<n>:<m>`, cores, uncore, DRAM)
    are parts of the package counted again, and a `psys` zone measures the whole platform.

    Args:
        root (`str` or `os.PathLike`, *optional*, defaults to `"/sys/class/powercap"`): the powercap folder.

    Example:
    ```python
    >>> reader = RAPLReader()
    >>> if reader.available():
    ...     reader.start(); run(); print(reader.stop().joules)
    ... else:
    ...     print("not available:", reader.reason)
    ```
    """

    source = "rapl"

    def __init__(self, root: PathLike = RAPL_ROOT):
        self.root = Path(root)
        self.reason: Optional[str] = None
        self._start: Optional[dict[str, int]] = None
        self._start_time = 0.0

    def _zones(self) -> list[Path]:
        zones = []
        for zone in sorted(self.root.glob("intel-rapl:*")):
            if zone.name.count(":") != 1:
                continue
            name_file = zone / "name"
            if name_file.is_file() and name_file.read_text().strip() == "psys":
                continue
            zones.append(zone)
        return zones

    def available(self) -> bool:
        """Whether every package counter can be read now; otherwise `reason` says why."""
        if not self.root.is_dir():
            self.reason = f"{self.root} not readable: no RAPL powercap interface (not Linux, or no RAPL driver)"
            return False
        zones = self._zones()
        if not zones:
            self.reason = f"{self.root} has no intel-rapl:<n> package zone"
            return False
        try:
            self.read_energy_uj()
        except (OSError, ValueError) as error:
            self.reason = (
                f"{zones[0] / 'energy_uj'} not readable ({error.__class__.__name__}: {error}); "
                f"since Linux 5.10 it is readable by root only"
            )
            return False
        self.reason = None
        return True

    def read_energy_uj(self) -> dict[str, int]:
        """The current counter of each package zone, in microjoules, keyed by zone folder name."""
        return {zone.name: int((zone / "energy_uj").read_text()) for zone in self._zones()}

    def _max_range_uj(self, zone: str) -> int:
        return int((self.root / zone / "max_energy_range_uj").read_text())

    def start(self) -> None:
        """Record the counters at the start of the window."""
        self._start = self.read_energy_uj()
        self._start_time = time.perf_counter()

    def stop(self) -> EnergyMeasurement:
        """Read the counters again and return the energy used since `start()`."""
        if self._start is None:
            raise RuntimeError("`RAPLReader.stop()` called before `start()`.")
        end = self.read_energy_uj()
        seconds = time.perf_counter() - self._start_time
        microjoules = 0
        for zone, begin in self._start.items():
            delta = end[zone] - begin
            if delta < 0:
                # The counter passed max_energy_range_uj and restarted from 0 (at most once per window).
                delta += self._max_range_uj(zone)
            microjoules += delta
        self._start = None
        joules = microjoules / 1e6
        return EnergyMeasurement(joules=joules, seconds=seconds, average_watts=joules / seconds, source=self.source)


class NVMLPowerSampler:
    """Sample an NVIDIA GPU's power draw through NVML in a background thread during a window.

    Args:
        device (`int` or `str`, *optional*, defaults to 0): NVML device index, or a UUID (`"GPU-…"`, as
            `CUDA_VISIBLE_DEVICES` may hold it). NVML numbers all GPUs, ignoring `CUDA_VISIBLE_DEVICES`.
        interval_s (`float`, *optional*, defaults to 0.02): time between two samples.

    Example:
    ```python
    >>> sampler = NVMLPowerSampler()
    >>> if sampler.available():
    ...     sampler.start(); run(); print(sampler.stop().average_watts)
    ```
    """

    source = "nvml"

    def __init__(self, device: Union[int, str] = 0, interval_s: float = 0.02):
        if not interval_s > 0:
            raise ValueError(f"`interval_s` must be positive, got {interval_s}.")
        self.device = device
        self.interval_s = interval_s
        self.reason: Optional[str] = None
        self._nvml = None
        self._handle = None
        self._thread: Optional[threading.Thread] = None
        self._stop_event = threading.Event()
        self._samples: list[float] = []
        self._start_time = 0.0

    def available(self) -> bool:
        """Whether NVML starts and reports this GPU's power; otherwise `reason` says why."""
        try:
            import pynvml
        except ImportError:
            self.reason = "pynvml not installed (`pip install nvidia-ml-py`)"
            return False
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as error:
            self.reason = f"NVML did not start ({error}): no NVIDIA GPU or driver"
            return False
        try:
            if pynvml.nvmlDeviceGetCount() == 0:
                self.reason = "no NVIDIA GPU"
                return False
            if isinstance(self.device, str):
                handle = pynvml.nvmlDeviceGetHandleByUUID(self.device)
            else:
                handle = pynvml.nvmlDeviceGetHandleByIndex(self.device)
            pynvml.nvmlDeviceGetPowerUsage(handle)
        except pynvml.NVMLError as error:
            self.reason = f"NVML cannot read the power of GPU {self.device!r} ({error})"
            return False
        self._nvml, self._handle, self.reason = pynvml, handle, None
        return True

    def _sample(self) -> None:
        self._samples.append(self._nvml.nvmlDeviceGetPowerUsage(self._handle) / 1000.0)

    def _run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            self._sample()

    def start(self) -> None:
        """Take a first sample and start the sampling thread."""
        if self._handle is None and not self.available():
            raise RuntimeError(f"NVML power sampling is not available: {self.reason}.")
        self._samples = []
        self._stop_event.clear()
        self._start_time = time.perf_counter()
        self._sample()
        self._thread = threading.Thread(target=self._run, name="nvml-power-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> EnergyMeasurement:
        """Stop sampling (with a last sample) and return average power times the window length."""
        if self._thread is None:
            raise RuntimeError("`NVMLPowerSampler.stop()` called before `start()`.")
        self._stop_event.set()
        self._thread.join()
        self._thread = None
        self._sample()
        seconds = time.perf_counter() - self._start_time
        average_watts = sum(self._samples) / len(self._samples)
        logger.debug("NVML: %d power samples over %.2f s.", len(self._samples), seconds)
        return EnergyMeasurement(
            joules=average_watts * seconds, seconds=seconds, average_watts=average_watts, source=self.source
        )
