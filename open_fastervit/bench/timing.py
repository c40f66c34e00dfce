"""How the benchmarks time work: interleaved rounds, medians and quartiles, the device barrier, autocast.

How a measurement is taken (:func:`measure_interleaved`): all candidates of one workload run in turn after a
warm-up, A B C A B C ..., and each turn is timed with ``time.perf_counter`` around ``iters`` calls (device
synchronised on both sides). The medians and the quartiles of those per-call times are reported, and every ratio
against a baseline is the median of the per-round ratios, so slow phases of a noisy machine hit all candidates
alike.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from open_fastervit.runtime import PRECISIONS

__all__ = [
    "BenchError",
    "Progress",
    "Stats",
    "Step",
    "Timer",
    "auto_iters",
    "autocast",
    "device_sync",
    "measure_interleaved",
    "no_sync",
    "per_round_ratio",
    "resolve_device",
    "summarize",
    "timing_fields",
]

#: A monotonic clock in seconds (``time.perf_counter``; tests inject a fake one).
Timer = Callable[[], float]
#: One unit of timed work (a forward pass, a training step).
Step = Callable[[], Any]


class BenchError(ValueError):
    """A benchmark request that cannot be run as asked (bad names, arguments or pairing)."""


@dataclass(frozen=True)
class Stats:
    """Summary of per-call times in seconds."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    n: int

    @property
    def spread_pct(self) -> float:
        """Interquartile range as a percentage of the median."""
        return 100.0 * (self.q3 - self.q1) / self.median if self.median > 0 else 0.0


def summarize(samples: Sequence[float]) -> Stats:
    """Median, quartiles (inclusive method) and range of a non-empty list of times (seconds).

    Raises:
        BenchError: ``samples`` is empty.
    """
    if not samples:
        raise BenchError("no timing samples to summarize")
    values = sorted(samples)
    if len(values) == 1:
        q1 = q3 = values[0]
    else:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return Stats(statistics.median(values), q1, q3, values[0], values[-1], len(values))


def no_sync() -> None:
    """The barrier of a device without queued work (CPU): does nothing."""
    return None


def measure_interleaved(
    steps: dict[Any, Step],
    *,
    warmup: int,
    rounds: int,
    iters: int | dict[Any, int] = 1,
    timer: Timer = time.perf_counter,
    sync: Callable[[], None] = no_sync,
    tick: Callable[[], None] = no_sync,
) -> tuple[dict[Any, list[float]], dict[Any, str]]:
    """Run every step in turn (A B C A B C ...): ``warmup`` untimed rounds, then ``rounds`` timed ones.

    Each timed turn calls a step ``iters`` times between two synchronised timer reads and records the
    time per call. A step that raises is dropped from the run and its error returned instead.
    Returns (samples in seconds per call for each surviving step, errors by step).
    """
    live = dict(steps)
    errors: dict[Any, str] = {}
    samples: dict[Any, list[float]] = {key: [] for key in steps}
    counts = iters if isinstance(iters, dict) else dict.fromkeys(steps, iters)
    for timed in [False] * warmup + [True] * rounds:
        for key in list(live):
            try:
                elapsed = _timed_calls(live[key], counts[key] if timed else 1, timer, sync)
            except Exception as exc:  # a candidate failing must not stop the others
                errors[key] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                del live[key]
                continue
            finally:
                tick()
            if timed:
                samples[key].append(elapsed / counts[key])
    return {key: samples[key] for key in live}, errors


def _timed_calls(step: Step, calls: int, timer: Timer, sync: Callable[[], None]) -> float:
    """Seconds for ``calls`` calls of ``step``, the device synchronised before and after."""
    sync()
    start = timer()
    for _ in range(calls):
        step()
    sync()
    return timer() - start


def auto_iters(step: Step, min_block_s: float, sync: Callable[[], None], timer: Timer) -> int:
    """Calls needed for one timed turn of ``step`` to last at least ``min_block_s`` seconds (1 to 1000)."""
    if min_block_s <= 0:
        return 1
    once = max(_timed_calls(step, 1, timer, sync), 1e-6)
    return max(1, min(1000, math.ceil(min_block_s / once)))


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available else cpu; otherwise the named device.

    Raises:
        BenchError: CUDA was asked for but is not available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda was asked for but torch.cuda.is_available() is False")
    return device


@contextlib.contextmanager
def run_settings(threads: int, device: torch.device) -> Iterator[None]:
    """torch's thread count (``threads``; 0 keeps it) and ``cudnn.benchmark`` (on for CUDA: the fastest conv
    algorithms for fixed shapes) for one benchmark run, both restored afterwards."""
    threads_before, cudnn_before = torch.get_num_threads(), torch.backends.cudnn.benchmark
    try:
        if threads:
            torch.set_num_threads(threads)
        torch.backends.cudnn.benchmark = device.type == "cuda"
        yield
    finally:
        torch.set_num_threads(threads_before)
        torch.backends.cudnn.benchmark = cudnn_before


def device_sync(device: torch.device) -> Callable[[], None]:
    """A barrier that waits for queued device work (CUDA), or a no-op (CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return no_sync


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` for a precision of :data:`open_fastervit.runtime.PRECISIONS` (bf16/fp16), a no-op for
    fp32. Raises ``KeyError`` for an unknown precision (configurations are validated before)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class Progress:
    """A tqdm bar (on stderr) over all timed and warm-up turns of a run."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = tqdm(total=total, disable=not enabled, unit="turn", desc="bench", file=sys.stderr)
        self.group_end = 0

    def start_group(self, text: str, turns: int) -> None:
        """Name the workload; skipped or failed turns are counted when the next one starts."""
        self.bar.update(max(0, self.group_end - self.bar.n))
        self.group_end = self.bar.n + turns
        self.bar.set_description(text, refresh=False)

    def tick(self) -> None:
        """One turn done."""
        self.bar.update(1)

    def close(self) -> None:
        """Count the turns left of the last workload and close the bar."""
        self.bar.update(max(0, self.group_end - self.bar.n))
        self.bar.close()


def timing_fields(samples: list[float], batch: int, iters: int, gmacs: float | None,
                  mem_mb: float | None) -> dict[str, Any]:
    """Throughput (img/s), latency and spread (ms) of a result row from per-call samples (seconds).

    ``gmacs`` is the work per image (GMAC, or None when not counted), ``mem_mb`` the peak memory of one step (MiB).
    """
    stats = summarize(samples)
    img_s = batch / stats.median
    return {
        "img_per_s": img_s,
        "latency_ms": 1e3 * stats.median,
        "q1_ms": 1e3 * stats.q1,
        "q3_ms": 1e3 * stats.q3,
        "min_ms": 1e3 * stats.min,
        "max_ms": 1e3 * stats.max,
        "spread_pct": stats.spread_pct,
        "rounds": stats.n,
        "iters": iters,
        "samples_ms": [1e3 * s for s in samples],
        "gmacs_per_img": gmacs,
        "gmacs_per_s": gmacs * img_s if gmacs is not None else None,
        "peak_mem_mb": mem_mb,
    }


def per_round_ratio(base: dict[str, Any] | None, row: dict[str, Any]) -> dict[str, Any]:
    """Median (min, max) over rounds of base time / row time: the row's throughput relative to ``base``.

    Both are result rows with ``status`` and ``samples_ms``; all three values are None unless both are ``ok``.
    """
    out: dict[str, Any] = {"median": None, "min": None, "max": None}
    if row["status"] == "ok" and base is not None and base["status"] == "ok":
        per_round = [b / s for b, s in zip(base["samples_ms"], row["samples_ms"])]
        out.update(median=statistics.median(per_round), min=min(per_round), max=max(per_round))
    return out
