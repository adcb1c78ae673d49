"""The benches' one timing toolkit: timed calls with device synchronisation, percentiles, peak memory (GPU allocator
or CPU resident set), and the markdown table. bench/speed.py, bench/restore_speed.py and bench/load.py use it.
"""
from __future__ import annotations

import math
import resource
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch


def sync(device: torch.device | str | None) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so that a wall clock covers the work itself."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], repeats: int, warmup: int = 1,
               device: torch.device | str | None = None) -> tuple[list[float], float]:
    """Seconds of `repeats` calls of `fn` after `warmup` calls; returns (the timed calls, the first call's seconds:
    with torch.compile it holds the compilation)."""
    first = float("nan")
    for i in range(warmup):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        if i == 0:
            first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    if warmup == 0 and times:
        first = times[0]
    return times, first


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of `values`, nearest rank; NaN for none."""
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(q * (len(v) - 1))))]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ---------------------------------------------------------------------------------------------------- peak memory
def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    """Reset the kernel's resident-set high-water mark of this process (Linux: 5 > /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of a block: on CUDA `torch.cuda.max_memory_allocated` (MiB); on the CPU the growth of the
    process's resident set over the block (VmHWM after the block minus VmRSS before, MiB), or the process's
    lifetime peak `ru_maxrss` where the high-water mark cannot be reset (`kind` says which)."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.mib: float = float("nan")
        self.kind = ""

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._resettable = _reset_rss_peak() and _status_kb("VmHWM") is not None
            self._base = _status_kb("VmRSS") or 0
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20
            self.kind = "cuda max allocated"
        elif self._resettable:
            self.mib = max(0, (_status_kb("VmHWM") or 0) - self._base) / 1024
            self.kind = "RSS growth"
        else:
            self.mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            self.kind = "process peak RSS"


@contextmanager
def stopwatch() -> Iterator[list[float]]:
    """`with stopwatch() as t: ...` then `t[0]` holds the block's seconds."""
    out: list[float] = []
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        out.append(time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------------- the table
def row(section, case, batch, variant, value, unit, peak=float("nan"), note="", **extra) -> dict:
    """One row of the table: `value` in `unit`, `peak` MiB, any further figures in `extra`."""
    return {"section": section, "case": case, "batch": batch, "variant": variant, "value": value, "unit": unit,
            "peak_mib": peak, "extra": extra, "note": note}


COLUMNS = ("section", "case", "batch", "variant", "value", "unit", "peak_mib", "extra", "note")


def fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def markdown(rows: list[dict]) -> str:
    """The rows as one markdown table (COLUMNS; `extra` is a dict shown as k=v)."""
    head = ["section", "case", "batch", "variant", "value", "unit", "peak MiB", "extra", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        extra = ", ".join(f"{k}={fmt(v)}" for k, v in (r.get("extra") or {}).items())
        cells = [fmt(r.get(c)) for c in COLUMNS[:7]] + [extra, r.get("note") or ""]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)
