"""Peak resident memory of a call: what the benchmark reports per inference and the compressor per calibration.

On Linux the kernel's peak resident size (`VmHWM`) is reset through `/proc/self/clear_refs` after freed heap is
handed back with `malloc_trim`, so the peak is exact; elsewhere a 1 ms poll of the resident size stands in.
"""
from __future__ import annotations

import contextlib
import ctypes
import threading
from typing import Callable, Optional, Tuple, TypeVar

T = TypeVar("T")


def _proc_status_kib(field_name: str) -> Optional[int]:
    with contextlib.suppress(OSError):
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    return None


def release_free_heap() -> None:
    """Hand freed heap pages back to the OS (glibc; a no-op elsewhere). glibc keeps what a multi-threaded process
    frees in its arenas, so without it the resident size counts dead memory too (it grew ~6 MB per decoder layer of
    a layer-by-layer calibration of SmolLM2, ~170 MB in all)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_peak_rss() -> bool:
    """Reset Linux's peak resident size (`VmHWM`) to the current one; `False` where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return _proc_status_kib("VmHWM") is not None


def peak_rss(call: Callable[[], T]) -> Tuple[T, int, int]:
    """Run `call()`; return its result, the resident size before it and the peak while it ran, in bytes."""
    import psutil

    release_free_heap()
    process = psutil.Process()
    if _reset_peak_rss():
        before = _proc_status_kib("VmRSS") * 1024
        result = call()
        return result, before, max(_proc_status_kib("VmHWM") * 1024, before)
    before = process.memory_info().rss
    result, peak = polled_peak(call, lambda: process.memory_info().rss)
    return result, before, peak


def polled_peak(call: Callable[[], T], sample: Callable[[], int], interval: float = 0.001) -> Tuple[T, int]:
    """Run `call()` while a thread reads `sample()` every `interval` seconds; return its result and the largest
    reading (before, during and after), for quantities the kernel keeps no peak of."""
    peak = sample()
    done = threading.Event()

    def poll() -> None:
        nonlocal peak
        while not done.wait(interval):
            peak = max(peak, sample())

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        result = call()
    finally:
        done.set()
        poller.join()
    return result, max(peak, sample())


def peak_rss_increase_mb(call: Callable[[], object]) -> float:
    """Largest rise of the resident set size while `call()` runs, in MB (1e6 bytes)."""
    _, before, peak = peak_rss(call)
    return (peak - before) / 1e6
