"""What a benchmark step costs besides time: peak memory, multiply-accumulates, and the GEMM reference rate."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from open_fastervit.bench.timing import Step, Timer, measure_interleaved, summarize
from open_fastervit.runtime import PRECISIONS

__all__ = ["PeakTensorMemory", "count_gmacs", "measure_gemm", "peak_memory_mb"]


class PeakTensorMemory:
    """Peak bytes of tensors created and still alive while the context is active (CPU-friendly).

    A ``TorchDispatchMode`` sees every op's outputs; new storages are counted until they are freed
    (tracked with storage weak references). Weights and tensors alive before entering are excluded.
    """

    def __init__(self) -> None:
        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
                out = func(*args, **(kwargs or {}))
                tracker._release_dead()
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor) and t.device.type != "meta":
                        tracker._add(StorageWeakRef(t.untyped_storage()), t.untyped_storage().nbytes())
                return out

        self._mode = _Mode()
        self._live: dict[int, tuple[Any, int]] = {}
        self.current = 0
        self.peak = 0

    def _add(self, ref: Any, nbytes: int) -> None:
        if ref.cdata not in self._live:
            self._live[ref.cdata] = (ref, nbytes)
            self.current += nbytes
            self.peak = max(self.peak, self.current)

    def _release_dead(self) -> None:
        for key in [k for k, (ref, _) in self._live.items() if ref.expired()]:
            self.current -= self._live.pop(key)[1]

    def __enter__(self) -> PeakTensorMemory:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)


def peak_memory_mb(step: Step, device: torch.device, compiled: bool) -> float | None:
    """Peak memory of one step above what was allocated before it (MiB), for ``compiled`` or eager models.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: :class:`PeakTensorMemory` (eager only; None when
    compiled, since the tracker would change what is compiled).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    if compiled:
        return None
    with PeakTensorMemory() as tracker:
        step()
    return tracker.peak / 2**20


def count_gmacs(model: nn.Module, size: int, kind: str, device: torch.device) -> float:
    """Multiply-accumulates per image (GMAC) by ``FlopCounterMode`` (MACs = FLOPs / 2).

    Counted on one eval forward at batch 1. A training step counts 3x the forward (the backward pass
    computes two products per forward product); counting the backward directly is wrong in torch's
    counter for grouped convolutions (it ignores the groups, e.g. 100x too much for depthwise convs).
    """
    was_training = model.training
    counter = FlopCounterMode(display=False)
    try:
        model.eval()
        with counter, torch.no_grad():
            model(torch.randn(1, 3, size, size, device=device))
    finally:
        model.train(was_training)
    forward = counter.get_total_flops() / 2 / 1e9
    return forward if kind == "infer" else 3 * forward


def measure_gemm(device: torch.device, precision: str, n: int, rounds: int, timer: Timer,
                 sync: Callable[[], None]) -> dict[str, float]:
    """Rate of a large square ``n`` x ``n`` matrix multiply at ``precision`` (GMAC/s): the machine's practical peak
    for the dtype. Returns ``{"n", "median_s", "gmacs_per_s"}``, or ``{"n", "error"}`` when the multiply fails."""
    dtype = PRECISIONS[precision] or torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    samples, errors = measure_interleaved({"gemm": lambda: torch.mm(a, b)}, warmup=2, rounds=max(3, rounds),
                                          timer=timer, sync=sync)
    if errors:
        return {"n": n, "error": errors["gemm"]}
    stats = summarize(samples["gemm"])
    return {"n": n, "median_s": stats.median, "gmacs_per_s": n**3 / stats.median / 1e9}
