"""Peak resident memory and seconds of each step of a run, read from /proc/self (Linux; elsewhere seconds only)."""
from __future__ import annotations

import contextlib
import gc
import time

STATUS = "/proc/self/status"
CLEAR_REFS = "/proc/self/clear_refs"
RESET_SLACK_KB = 64_000  # what other threads may allocate or free between the reset and the check


def _status_kb(key: str) -> int | None:
    try:
        with open(STATUS) as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Start a new high-water mark of resident memory (VmHWM) at the current size; False where the kernel cannot."""
    try:
        with open(CLEAR_REFS, "w") as fh:
            fh.write("5")  # 5 resets the peak RSS (Linux 4.0+), leaving page state alone
    except OSError:
        return False
    # Some sandboxed kernels accept the write and keep the old mark; a peak that still sits above the current size
    # would be the run's, not the step's, so it is reported as unknown instead.
    peak, now = _status_kb("VmHWM"), _status_kb("VmRSS")
    return peak is not None and now is not None and peak - now <= RESET_SLACK_KB


def current_gb() -> float | None:
    """Resident memory of this process now, in GB; None off Linux."""
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1e6


def peak_gb() -> float | None:
    """Largest resident memory of this process since the last reset_peak(), in GB; None off Linux."""
    kb = _status_kb("VmHWM")
    return None if kb is None else kb / 1e6


class Steps:
    """A table of steps, each with its batch size, peak resident memory and seconds.

    Each step starts with a garbage collection, so what the step before left in reference cycles (Keras models,
    tf2onnx graphs) is freed instead of counted, and then restarts the kernel's high-water mark: the peak is the
    step's own, not the run's.
    """

    def __init__(self, log=print):
        self.rows: list[dict] = []
        self.log = log

    @contextlib.contextmanager
    def step(self, name: str, batch_size: int | None = None):
        gc.collect()
        measured = reset_peak()
        started = time.perf_counter()
        try:
            yield
        finally:
            row = {"step": name, "batch_size": batch_size, "seconds": round(time.perf_counter() - started, 1),
                   "peak_rss_gb": round(peak_gb(), 2) if measured else None}
            self.rows.append(row)
            peak = f"peak {row['peak_rss_gb']:.2f} GB resident" if measured else "peak memory unknown here"
            self.log(f"step {name}: {row['seconds']:.1f} s, {peak}"
                     + (f", batches of {batch_size}" if batch_size else ""))
