"""One measurement: a configuration's time and peak memory, taken in the process that runs it.

The worker warms up at a small length, then makes the real inputs and measures the peak memory of the *first* real
call above the baseline taken just before it: the RSS high-water mark on CPU, `torch.cuda.max_memory_allocated` on
a GPU. It includes the output and, in forward+backward mode, the input gradients. The first call pays the page
faults of a growing heap, so it is never timed; the time is the median of the repeats after a warm-up. A compiled
variant (`*_compiled`) compiles for the real shape in one more call before the memory probe, timed as `compile_s`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import math
import os
import resource
import statistics
import time
from typing import Any

from experiments.bench.variants import GEMM, VARIANTS, build_op, parse_variant

# A configuration whose first call takes more than this many times the time budget is not timed any further.
TIME_SLACK = 2.0
# Above this share of the machine's CPU used by other processes, a timing counts as contended.
BUSY = 0.25


class MemoryProbe:
    """Peak memory of a block of code above the memory in use when the probe starts.

    CPU: the resident-set high-water mark (VmHWM), reset through /proc/self/clear_refs; where that file is not
    writable, ru_maxrss (valid when the block's peak is the process's highest, which the small warm-up ensures).
    CUDA: torch.cuda.max_memory_allocated.
    """

    def __init__(self, device: str) -> None:
        import torch

        self.device = device
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
            self.method = "torch.cuda.max_memory_allocated"
            return
        # Hand free heap pages back first: warm-up leaves freed memory in the heap, which the measured call would
        # reuse without raising the RSS, hiding part of its peak.
        trimmed = _malloc_trim()
        self.baseline = _status_kib("VmRSS") * 1024
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")  # 5 = reset the peak RSS to the current RSS
            self.method = "VmHWM after clear_refs"
        except OSError:
            self.method = "ru_maxrss"
        if trimmed:
            self.method += ", after malloc_trim(0)"

    def peak_bytes(self) -> int:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated() - self.baseline)
        if self.method == "ru_maxrss":
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        else:
            peak = _status_kib("VmHWM") * 1024
        return max(0, int(peak - self.baseline))


def _malloc_trim() -> bool:
    """glibc malloc_trim(0): return every free heap page to the kernel. False where there is no glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line; the CPU memory probe needs Linux")


class CpuMeter:
    """The share of the machine's CPU that *other* processes used between `start` and `stop`, from /proc: a shared
    machine's neighbours slow a multi-threaded op far more than their share (a thread preempted at a parallel
    region stalls the others), so every record says how busy the machine was while it was timed."""

    def __init__(self) -> None:
        self.start_busy, self.start_self, self.start_time = self._busy(), self._self(), time.perf_counter()

    @staticmethod
    def _busy() -> int:  # non-idle clock ticks of every CPU of the machine
        with open("/proc/stat") as handle:
            ticks = [int(x) for x in handle.readline().split()[1:]]
        return sum(ticks) - ticks[3] - ticks[4]  # minus idle and iowait

    @staticmethod
    def _self() -> int:  # clock ticks this process (all its threads) has used, user and system
        with open("/proc/self/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])

    def background(self) -> float | None:
        """Fraction of all CPUs used by other processes since the meter started (None where /proc is missing)."""
        elapsed = time.perf_counter() - self.start_time
        ticks = elapsed * os.sysconf("SC_CLK_TCK") * (os.cpu_count() or 1)
        others = (self._busy() - self.start_busy) - (self._self() - self.start_self)
        return round(min(1.0, max(0.0, others / ticks)), 3) if ticks > 0 else None


def _background_meter() -> CpuMeter | None:
    try:
        return CpuMeter()
    except (OSError, ValueError, IndexError):
        return None


def _workload(config: dict[str, Any]):
    """(make_inputs(length), call(inputs), matmul FLOPs per call or None, chunk) for a configuration."""
    import torch

    device, dtype = config["device"], getattr(torch, config["dtype"])
    name, chunk = parse_variant(config["variant"])
    generator = torch.Generator().manual_seed(0)

    def sync() -> None:  # CUDA runs asynchronously: without this the host clock times the launch alone
        if device == "cuda":
            torch.cuda.synchronize()

    if name == GEMM:
        size = config["gemm_size"]
        a, b = (torch.randn(size, size, generator=generator).to(device, dtype) for _ in range(2))

        def gemm(_inputs) -> None:
            torch.mm(a, b)
            sync()

        return (lambda length: None), gemm, 2.0 * size**3, None

    from flowformer.attention.flow import DEFAULT_CHUNK_SIZE

    op = build_op(name, chunk, config["head_dim"], config["n_heads"])
    batch, heads, dim = config["batch"], config["n_heads"], config["head_dim"]
    backward = config["mode"] == "backward"

    def make_inputs(length: int):
        tensors = [torch.randn((batch, heads, length, dim), generator=generator).to(device, dtype) for _ in range(4)]
        if backward:
            for tensor in tensors[:3]:
                tensor.requires_grad_(True)
        return tensors

    def call(inputs) -> None:
        q, k, v, grad = inputs
        if backward:
            op(q, k, v).backward(grad)
            for tensor in (q, k, v):
                tensor.grad = None
        else:
            with torch.no_grad():
                op(q, k, v)
        sync()

    chunk = chunk or DEFAULT_CHUNK_SIZE
    variant = VARIANTS[name]
    flops = None
    if variant.flops is not None:
        flops = batch * heads * variant.flops(config["length"], dim, dim, chunk) * (3.0 if backward else 1.0)
    return make_inputs, call, flops, chunk


def measure(config: dict[str, Any]) -> dict[str, Any]:
    """Measure one configuration in this process; returns its record."""
    import torch

    if config.get("threads"):
        torch.set_num_threads(config["threads"])
    make_inputs, call, flops, chunk = _workload(config)
    length = config["length"]
    # Warm-up at a small length loads kernels and allocator pools, so that the measured first call pays for none
    small = make_inputs(min(length, config["warmup_length"]))
    for _ in range(2):
        call(small)
    del small
    inputs = make_inputs(length)
    compile_seconds = None
    if config["variant"].endswith("_compiled"):
        # compiling for this shape is a one-off cost, kept out of the time and the peak and recorded apart
        start = time.perf_counter()
        call(inputs)
        compile_seconds = time.perf_counter() - start
    gc.collect()
    probe = MemoryProbe(config["device"])
    start = time.perf_counter()
    call(inputs)
    first = time.perf_counter() - start
    peak = probe.peak_bytes()

    # A call over the time budget gets a single timed repeat (the runner then stops growing L for it); one far over
    # it, none.
    times: list[float] = []
    meter = None
    if first <= TIME_SLACK * config["time_budget"]:
        repeats = max(config["min_repeats"], min(config["repeats"], math.ceil(config["min_time"] / max(first, 1e-9))))
        warmup = config["warmup"]
        if first > config["time_budget"]:
            repeats, warmup = 1, 0
        for _ in range(warmup):
            call(inputs)
        meter = _background_meter()
        for _ in range(repeats):
            start = time.perf_counter()
            call(inputs)
            times.append(time.perf_counter() - start)
    median = statistics.median(times) if times else first
    background = meter.background() if meter is not None and times else None
    return {
        "time_ms": median * 1e3,
        "timed_calls": len(times),
        "times_ms": [t * 1e3 for t in times],
        "first_call_ms": first * 1e3,
        "peak_mib": peak / 2**20,
        "memory_method": probe.method,
        "gflops": None if flops is None else flops / median / 1e9,
        "matmul_flops": flops,
        "chunk_size": chunk,
        "threads": torch.get_num_threads(),
        "background_cpu": background,
        "compile_s": compile_seconds,
    }
