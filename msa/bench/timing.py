"""Timers, memory trackers and device facts for ``msa.bench``.

GPU timings use CUDA events and ``torch.cuda.max_memory_allocated``. On the CPU, wall-clock timing is
used and memory is the peak of live tensor bytes seen by a dispatch-mode tracker (``LiveTensorBytes``)
during one extra, untimed call: CPU PyTorch keeps no allocator statistics.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], device: torch.device, steps: int, warmup: int) -> list[float]:
    """Milliseconds per call of ``fn`` after ``warmup`` untimed calls: CUDA events on a GPU, else wall clock."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def wall_s(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created while active and still alive (CPU stand-in for max_memory_allocated).

    Every op output whose storage is new (not a view of, or written into, one of the op's inputs) is
    counted until its storage is freed. Tensors that existed before (weights, inputs) are not counted,
    nor are buffers private to a fused kernel. It slows every op down: use it on an untimed call only.
    """

    def __init__(self) -> None:
        super().__init__()
        from torch.multiprocessing.reductions import StorageWeakRef

        self._ref = StorageWeakRef
        self.live: dict[int, tuple[Any, int]] = {}
        self.current = self.peak = 0

    def _sweep(self) -> None:
        for ptr in [p for p, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(ptr)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, Tensor) or t.is_meta:
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr == 0 or ptr in inputs:
                continue
            if ptr in self.live:
                if not self.live[ptr][0].expired():
                    continue
                self.current -= self.live.pop(ptr)[1]
            self.live[ptr] = (self._ref(storage), storage.nbytes())
            self.current += storage.nbytes()
            if self.current > self.peak:  # stale entries only over-count, so sweep before a new peak
                self._sweep()
                self.peak = max(self.peak, self.current)
        return out


def profile_calls(fn: Callable[[], Any], device: torch.device, steps: int = 3, top: int = 12) -> dict[str, Any]:
    """Where a call's time goes, by ``torch.profiler`` over ``steps`` calls (after one unprofiled call).

    Per call: on a GPU the device's busy time (its kernels' summed durations) and the kernels launched (busy
    time well under the step's time means the step waits on launches, not on the chip); everywhere the
    ``top`` operators by self time (device time on a GPU, CPU time on the CPU) with their calls.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    fn()
    sync(device)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])) as prof:
        for _ in range(steps):
            fn()
        sync(device)
    out: dict[str, Any] = {"steps": steps, "self_time": "device" if on_gpu else "cpu"}
    if on_gpu:
        kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        out["device_busy_ms"] = sum(e.time_range.elapsed_us() for e in kernels) / 1e3 / steps
        out["kernels"] = len(kernels) / steps
    ops = prof.key_averages()
    self_us = (lambda e: e.self_device_time_total) if on_gpu else (lambda e: e.self_cpu_time_total)
    out["top_ops"] = [{"op": e.key, "calls": e.count / steps, "self_ms": self_us(e) / 1e3 / steps}
                      for e in sorted(ops, key=self_us, reverse=True)[:top] if self_us(e) > 0]
    return out


@dataclasses.dataclass
class MemoryReading:
    bytes: int
    kind: str  # what the number is, printed next to it


def measure_peak(fn: Callable[[], Any], device: torch.device) -> MemoryReading:
    """Peak extra memory of one call of ``fn`` over what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return MemoryReading(torch.cuda.max_memory_allocated(device) - base, "cuda max_memory_allocated over baseline")
    with LiveTensorBytes() as tracker:
        fn()
    return MemoryReading(tracker.peak, "cpu live tensors, dispatch-tracked")


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)


def free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def maxrss_gib() -> float:
    """This process's resident-set high-water mark (Linux: KiB units)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def cpu_seconds(who: int) -> float:
    """User + system CPU seconds of ``resource.RUSAGE_SELF`` or ``RUSAGE_CHILDREN``."""
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def measure_matmul_tflops(device: torch.device, n: int | None = None) -> dict[str, Any]:
    """Achieved TFLOP/s of a large square matmul: bf16 on a GPU (the card's tensor-core rate), fp32 on the CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    once = wall_s(lambda: a @ b, device)[0]
    reps = max(3, min(50, int(0.5 / max(once, 1e-6))))
    times = time_calls(lambda: a @ b, device, steps=reps, warmup=2)
    ms = statistics.median(times)
    return {"tflops": 2 * n**3 / (ms * 1e-3) / 1e12, "dtype": str(dtype).removeprefix("torch."), "n": n,
            "source": "measured"}
