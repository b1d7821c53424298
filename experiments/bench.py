"""Attention efficiency benchmark: time and peak memory of Flow-Attention against its official formulations and
the baselines, for growing sequence lengths. `make bench` runs it; `make bench ARGS=--quick` is the fast check.

    python -m experiments.bench                      # full run: L = 256 ... 65536, forward and forward+backward
    python -m experiments.bench --quick              # L in {256, 1024, 4096}, few repeats
    python -m experiments.bench --variants flow_causal:32,flow_causal:64,flow_causal:128 --tag chunk_sweep
    python -m experiments.bench --device cuda        # on a GPU: fp32 and bf16, adds backend='triton'
    python -m experiments.bench --from-json results/bench/efficiency.json   # re-render table and figure only

Method (see also shared/reference/perf-facts.md):
- Attention alone, on random q, k, v of shape (B, H, L, d) = (1, 8, L, 64); fp32 on CPU (bf16 added on a GPU).
- One torch thread per worker by default (`--threads`): on a shared 2-core machine a 2-thread op waits for its
  slower thread at every parallel region, and one busy neighbour made a 512² matmul 6x slower (16 ms against
  2.7 ms on one thread). Use `--threads 2` on a quiet machine.
- Every (L, variant, mode) runs in its own fresh process, so one variant's heap, caches and compiled code never help
  or hurt another: by default a child forked from a "zygote" that has imported torch once and never ran an op
  (`--isolation fork`); `--isolation spawn` starts a new interpreter each time (`python -m experiments.bench
  --worker <json>`), 2-3 s slower per configuration. Variants are interleaved at each L, so slow
  drifts of a shared machine hit all of them alike; compare ratios within one run, never absolute times across runs.
- The worker warms up at a small length, then makes the real inputs and measures the peak memory of the *first*
  real call above the baseline taken just before it: RSS high-water mark (VmHWM, reset through
  /proc/self/clear_refs) on CPU, `torch.cuda.max_memory_allocated` on GPU. It includes the output and, in
  forward+backward mode, the input gradients. Then it times the call (median over repeats after warm-up).
- The glibc allocator is fixed for every worker alike (`ALLOCATOR_ENV`, recorded in the JSON): freed memory stays in
  the process, so no variant pays page faults that another avoids.
- Budgets: a variant whose median call exceeds `--time-budget` seconds, or whose peak exceeds `--memory-budget` GiB,
  is not run at larger L; neither is one whose extrapolation from its last two lengths predicts more than
  `TIME_SLACK` x the time budget or `MEMORY_SLACK` x the memory budget (this keeps the machine out of swap/OOM).
Outputs: results/bench/<tag>.json (every measurement, settings, machine), results/bench/<tag>.md (tables and the
issue's targets with the measured ratios) and results/figures/<tag>.png (log-log time and memory against L).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "BENCH_RESULT "
# Freed memory stays in the heap (no mmap for big blocks, no trimming): otherwise every large temporary is
# handed back to the kernel and faulted in again at ~1-3 µs per 4 KiB page, which favours whichever variant
# happens to allocate less often (perf-facts.md, "The allocator").
ALLOCATOR_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(64 * 2**30)}
# A configuration is skipped without running when extrapolation predicts more than this many times a budget
# (extrapolations are rough; a measured excess stops the variant at once).
TIME_SLACK, MEMORY_SLACK = 2.0, 1.25
MODES = ("forward", "backward")  # "backward" = forward + backward
MODE_TITLES = {"forward": "forward", "backward": "forward+backward"}


@dataclass(frozen=True)
class Variant:
    """One benchmarked attention. `flops(L, d, dv, chunk)` counts the matmul FLOPs per (batch, head)."""

    description: str
    causal: bool
    forward_only: bool = False
    flops: Callable[[int, int, int, int], float] | None = None
    device: str | None = None  # only on this device type
    dtypes: tuple[str, ...] | None = None  # only in these dtypes

    def runs_on(self, device: str, dtype: str | None = None) -> bool:
        return self.device in (None, device) and (dtype is None or self.dtypes is None or dtype in self.dtypes)


def _noncausal_matmul_flops(length: int, dim: int, dim_v: int, chunk: int) -> float:
    return 4.0 * length * dim * dim_v  # kᵀ(c v) and q (kᵀ v)


def _causal_matmul_flops(length: int, dim: int, dim_v: int, chunk: int) -> float:
    # per chunk: scores (C,d)(d,C), intra (C,C)(C,dv), state (d,C)(C,dv), inter (C,d)(d,dv)
    return 2.0 * length * chunk * (dim + dim_v) + 4.0 * length * dim * dim_v


VARIANTS: dict[str, Variant] = {
    "flow": Variant("Flow-Attention, non-causal (ours, backend='eager')", False, flops=_noncausal_matmul_flops),
    "flow_compile": Variant("Flow-Attention, non-causal (ours, backend='compile')", False, flops=_noncausal_matmul_flops),
    "flow_fused": Variant(
        "Flow-Attention, non-causal (ours, backend='fused': compiled CPU loops)", False, flops=_noncausal_matmul_flops,
        device="cpu",
    ),
    "flow_official": Variant("official non-causal maths as plain einsum (baseline)", False, flops=_noncausal_matmul_flops),
    "flow_causal": Variant("Flow-Attention, causal, chunked (ours, backend='eager')", True, flops=_causal_matmul_flops),
    # the compiled loops serve inference only (with autograd the causal path is eager), so no forward+backward
    "flow_causal_fused": Variant(
        "Flow-Attention, causal, chunked (ours, backend='fused': compiled CPU loops, inference)", True,
        forward_only=True, flops=_causal_matmul_flops, device="cpu",
    ),
    "flow_causal_triton": Variant(
        "Flow-Attention, causal (ours, backend='triton')", True, flops=_causal_matmul_flops, device="cuda"
    ),
    "flow_causal_materialised": Variant("official causal maths, materialised (B,H,L,d,dv) cumsum (baseline)", True),
    "softmax": Variant("softmax attention, SDPA", False),
    "softmax_causal": Variant("softmax attention, SDPA, causal", True),
    # SDPA picks its own kernel (cuDNN, flash, memory-efficient); these pin FlashAttention, the GPU yardstick
    "softmax_flash": Variant(
        "softmax attention, SDPA pinned to FlashAttention", False, device="cuda", dtypes=("bfloat16", "float16")
    ),
    "softmax_flash_causal": Variant(
        "softmax attention, SDPA pinned to FlashAttention, causal", True, device="cuda", dtypes=("bfloat16", "float16")
    ),
    "linear": Variant("linear attention (elu+1)", False),
    "linear_causal": Variant("linear attention (elu+1), causal", True),
    "performer": Variant("Performer (FAVOR+)", False),
    "performer_causal": Variant("Performer (FAVOR+), causal", True),
    "cosformer": Variant("cosFormer", False),
    "cosformer_causal": Variant("cosFormer, causal", True),
    "reformer": Variant("Reformer (LSH)", False),
    "matmul": Variant(
        "only the two matmuls of non-causal flow, kᵀv and q(kᵀv): the ceiling for these shapes",
        False,
        forward_only=True,
        flops=_noncausal_matmul_flops,
    ),
    "matmul_causal": Variant(
        "only the four chunked GEMMs of causal flow (scores, intra, states, inter): the ceiling for these shapes",
        True,
        forward_only=True,
        flops=_causal_matmul_flops,
    ),
}
# flow_compile is left out by default: on the 2-core CPU it was no faster than eager, its first call at each new
# size class can recompile for seconds, and its workers pay 5-20 s of compilation (`--variants` can add it).
DEFAULT_VARIANTS = (  # flow_causal_triton and softmax_flash* run only with --device cuda
    "flow", "flow_fused", "flow_official", "flow_causal", "flow_causal_fused", "flow_causal_triton",
    "flow_causal_materialised", "softmax", "softmax_causal", "softmax_flash", "softmax_flash_causal",
    "linear", "linear_causal", "performer", "cosformer", "reformer", "matmul", "matmul_causal",
)
# the variants that run backend="fused" (the name's suffix picks the backend, see `build_op`) and so need its
# compiled CPU loops
FUSED_VARIANTS = tuple(name for name in VARIANTS if name.startswith("flow") and name.endswith("_fused"))
DEFAULT_LENGTHS = tuple(2**p for p in range(8, 17))  # 256 ... 65536
QUICK_LENGTHS = (256, 1024, 4096)


# ------------------------------------------------------------------------------------------------------------------
# Official formulations, written from the equations (official-settings.md §1.2-1.3) as the official code computes
# them: einsum over shifted copies, and for the causal case the (B, H, L, d, dv) cumulative sum of k_j v_jᵀ.
# ------------------------------------------------------------------------------------------------------------------


def official_noncausal_flow(q, k, v, eps: float = 1e-6, clamp: float = 1.0):
    """Non-causal Flow-Attention in the official code's formulation. q, k, v: (B, H, L|S, d) -> (B, H, L, d)."""
    import torch

    q, k = torch.sigmoid(q), torch.sigmoid(k)
    n_sinks, n_sources = q.shape[2], k.shape[2]
    sink_incoming = 1.0 / torch.einsum("bhld,bhd->bhl", q + eps, k.sum(dim=2) + eps)
    source_outgoing = 1.0 / torch.einsum("bhld,bhd->bhl", k + eps, q.sum(dim=2) + eps)
    conserved_sink = torch.einsum("bhld,bhd->bhl", q + eps, (k * source_outgoing[:, :, :, None]).sum(dim=2) + eps)
    conserved_source = torch.einsum("bhld,bhd->bhl", k + eps, (q * sink_incoming[:, :, :, None]).sum(dim=2) + eps)
    conserved_source = torch.clamp(conserved_source, min=-clamp, max=clamp)
    sink_allocation = torch.sigmoid(conserved_sink * (float(n_sinks) / float(n_sources)))
    source_competition = torch.softmax(conserved_source, dim=-1) * float(n_sources)
    kv = torch.einsum("bhld,bhlm->bhdm", k, v * source_competition[:, :, :, None])
    qkv = torch.einsum("bhld,bhdm->bhlm", q * sink_incoming[:, :, :, None], kv)
    return qkv * sink_allocation[:, :, :, None]


def official_causal_flow(q, k, v, eps: float = 1e-6, clamp: float = 1.0):
    """Causal Flow-Attention in the official code's formulation, with the materialised (B, H, L, d, dv) prefix sum."""
    import torch

    q, k = torch.sigmoid(q), torch.sigmoid(k)
    position = torch.arange(1, q.shape[2] + 1, device=q.device, dtype=q.dtype)[None, None, :]
    sink_incoming = 1.0 / torch.einsum("bhld,bhld->bhl", q + eps, k.cumsum(dim=2) + eps)
    source_outgoing = 1.0 / torch.einsum("bhld,bhld->bhl", k + eps, q.cumsum(dim=2) + eps)
    conserved_sink = torch.einsum(
        "bhld,bhld->bhl", q + eps, (k * (source_outgoing * position)[:, :, :, None]).cumsum(dim=2) + eps
    ) / position
    conserved_source = torch.einsum(
        "bhld,bhld->bhl", k + eps, (q * (sink_incoming * position)[:, :, :, None]).cumsum(dim=2) + eps
    ) / position
    conserved_source = torch.clamp(conserved_source, min=-clamp, max=clamp)
    sink_allocation = torch.sigmoid(conserved_sink)
    conserved_source = torch.exp(conserved_source)
    source_competition = conserved_source / conserved_source.cumsum(dim=-1) * position
    kv = torch.einsum("bhld,bhlm->bhldm", k, v * source_competition[:, :, :, None]).cumsum(dim=2)
    qkv = torch.einsum("bhld,bhldm->bhlm", q * sink_incoming[:, :, :, None], kv)
    return qkv * sink_allocation[:, :, :, None]


def chunked_causal_matmuls(q, k, v, chunk: int):
    """The GEMMs of the chunked causal path alone, at its shapes (L a multiple of `chunk`): the matmul ceiling."""
    batch, heads, length, _ = q.shape
    n_chunks = length // chunk
    qc, kc, vc = (t.reshape(batch, heads, n_chunks, chunk, t.shape[-1]) for t in (q, k, v))
    scores = qc @ kc.transpose(-2, -1)
    states = kc.transpose(-2, -1) @ vc
    out = qc @ states
    out.view(-1, chunk, out.shape[-1]).baddbmm_(scores.view(-1, chunk, chunk), vc.reshape(-1, chunk, vc.shape[-1]))
    return out


# ------------------------------------------------------------------------------------------------------------------
# Worker: one configuration in its own process
# ------------------------------------------------------------------------------------------------------------------


def parse_variant(spec: str) -> tuple[str, int | None]:
    """'flow_causal:32' -> ('flow_causal', 32); 'softmax' -> ('softmax', None)."""
    name, _, chunk = spec.partition(":")
    if name not in VARIANTS and name != "gemm":
        raise SystemExit(
            f"experiments/bench.py: unknown variant {name!r}. Known: {', '.join(VARIANTS)} "
            "(optionally with ':<chunk>' for the flow variants, e.g. flow_causal:128)."
        )
    return name, (int(chunk) if chunk else None)


def build_op(name: str, chunk: int | None, head_dim: int, n_heads: int) -> Callable:
    """The callable `op(q, k, v) -> out` of a variant."""
    from flowformer.attention.flow import flow_attention
    from flowformer.attention.registry import build_attention

    causal = VARIANTS[name].causal
    if name.startswith("flow_official"):
        return official_noncausal_flow
    if name == "flow_causal_materialised":
        return official_causal_flow
    if name == "matmul":
        return lambda q, k, v: q @ (k.transpose(-2, -1) @ v)
    if name == "matmul_causal":
        from flowformer.attention.flow import DEFAULT_CHUNK_SIZE

        return lambda q, k, v: chunked_causal_matmuls(q, k, v, chunk or DEFAULT_CHUNK_SIZE)
    if name.startswith("softmax_flash"):
        return _flash_attention(causal)
    if name.startswith("flow"):
        backend = {"compile": "compile", "triton": "triton", "fused": "fused"}.get(name.rsplit("_", 1)[-1], "eager")
        if backend == "fused":
            _require_fused_loops()
        return lambda q, k, v: flow_attention(q, k, v, causal=causal, chunk_size=chunk, backend=backend)
    base = name.removesuffix("_causal")
    op = build_attention(base, head_dim, n_heads)
    op.eval()  # e.g. Reformer: fixed hash rotations, so every repeat does the same work
    return lambda q, k, v: op(q, k, v, causal=causal)


def _require_fused_loops() -> None:
    """The fused variants must time the compiled loops, never the eager fallback: fail the configuration instead."""
    from flowformer.attention import cpu_fused

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the failure is reported below, as the configuration's error
        if cpu_fused.load() is None:
            raise RuntimeError(f"backend='fused' could not build its CPU loops: {cpu_fused.failure()}")


def _flash_attention(causal: bool) -> Callable:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def op(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # an error, not a silent fallback, where flash cannot run
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return op


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
        # Hand free heap pages back first: warm-up (and torch.compile) leave freed memory in the heap, which the
        # measured call would reuse without raising the RSS, hiding part of its peak.
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
    import ctypes
    import ctypes.util

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


def run_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Measure one configuration; returns the record printed by `--worker`."""
    import torch

    torch.set_num_threads(config["threads"])
    device, dtype = config["device"], getattr(torch, config["dtype"])
    name, chunk = parse_variant(config["variant"])
    backward = config["mode"] == "backward"
    generator = torch.Generator().manual_seed(0)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    if name == "gemm":
        size = config["gemm_size"]
        a, b = (torch.randn(size, size, generator=generator).to(device, dtype) for _ in range(2))

        def call(_inputs) -> None:
            torch.mm(a, b)
            sync()  # CUDA runs asynchronously: without this the host clock times the launch alone

        make_inputs = lambda length: None
        flops = 2.0 * size**3
    else:
        op = build_op(name, chunk, config["head_dim"], config["n_heads"])
        batch, heads, dim = config["batch"], config["n_heads"], config["head_dim"]

        def make_inputs(length: int):
            shape = (batch, heads, length, dim)
            tensors = [torch.randn(shape, generator=generator).to(device, dtype) for _ in range(4)]
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

        from flowformer.attention.flow import DEFAULT_CHUNK_SIZE

        chunk = chunk or DEFAULT_CHUNK_SIZE
        variant = VARIANTS[name]
        flops = None
        if variant.flops is not None:
            flops = batch * heads * variant.flops(config["length"], dim, dim, chunk) * (3.0 if backward else 1.0)

    length = config["length"]
    # Warm-up at a small length: loads kernels, allocator pools and (backend='compile') the dynamic-shape graph,
    # so that the measured first call pays none of that.
    small = make_inputs(min(length, config["warmup_length"]))
    for _ in range(2):
        call(small)
    del small
    inputs = make_inputs(length)
    gc.collect()
    probe = MemoryProbe(device)
    start = time.perf_counter()
    call(inputs)
    first = time.perf_counter() - start
    peak = probe.peak_bytes()

    # The first call pays the page faults of a growing heap, so it is never timed. A call over the time budget gets
    # a single timed repeat (the driver then stops growing L for it); one far over it, none.
    times: list[float] = []
    if first <= TIME_SLACK * config["time_budget"]:
        repeats = max(config["min_repeats"], min(config["repeats"], math.ceil(config["min_time"] / max(first, 1e-9))))
        warmup = config["warmup"]
        if first > config["time_budget"]:
            repeats, warmup = 1, 0
        for _ in range(warmup):
            call(inputs)
        for _ in range(repeats):
            start = time.perf_counter()
            call(inputs)
            times.append(time.perf_counter() - start)
    median = statistics.median(times) if times else first
    return {
        "time_ms": median * 1e3,
        "timed_calls": len(times),
        "times_ms": [t * 1e3 for t in times],
        "first_call_ms": first * 1e3,
        "peak_mib": peak / 2**20,
        "memory_method": probe.method,
        "gflops": None if flops is None else flops / median / 1e9,
        "matmul_flops": flops,
        "chunk_size": chunk if name != "gemm" else None,
    }


# ------------------------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------------------------


def _worker_env() -> dict[str, str]:
    return {**os.environ, **ALLOCATOR_ENV, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def launch_spawn(config: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one configuration in a fresh interpreter; returns its record, or a record with an `error`."""
    command = [sys.executable, "-m", "experiments.bench", "--worker", json.dumps(config)]
    start = time.perf_counter()
    try:
        done = subprocess.run(
            command, cwd=REPO, env=_worker_env(), capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return {**config, "error": f"timeout after {timeout:.0f} s", "wall_s": time.perf_counter() - start}
    wall = time.perf_counter() - start
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return {**config, **json.loads(line[len(RESULT_PREFIX):]), "wall_s": wall}
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    return {**config, "error": f"{_exit_reason(done.returncode)}: {' | '.join(tail)}", "wall_s": wall}


def _exit_reason(returncode: int) -> str:
    if returncode < 0:
        return f"killed by signal {-returncode}" + (" (out of memory?)" if returncode == -9 else "")
    return f"exit code {returncode}"


class Zygote:
    """A process that has imported torch and the attention modules, and forks one child per configuration.

    Importing torch costs ~2-3 s per process, more than most measurements. The zygote pays it once; each child is
    still a separate process with its own heap, thread pool, kernel caches and compiled graphs, because the zygote
    itself never runs a torch op (so no OpenMP pool or CUDA context exists at fork time). Started with
    `ALLOCATOR_ENV`, which the children inherit.
    """

    def __init__(self, load_fused: bool = False) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "experiments.bench", "--zygote"] + (["--zygote-load-fused"] if load_fused else []),
            cwd=REPO, env=_worker_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
        )

    def run(self, config: dict[str, Any], timeout: float) -> dict[str, Any]:
        start = time.perf_counter()
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps({"config": config, "timeout": timeout}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"experiments/bench.py: the zygote process exited ({self.process.poll()}); see stderr above")
        reply = json.loads(line)
        wall = time.perf_counter() - start
        if "error" in reply:
            return {**config, "error": reply["error"], "wall_s": wall}
        return {**config, **reply["record"], "wall_s": wall}

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=30)


def zygote_loop(load_fused: bool = False) -> None:
    """Body of `--zygote`: read {"config", "timeout"} lines, fork a child per line, answer one JSON line each.
    `load_fused`: load the compiled loops of backend="fused" before the first fork (only when a fused variant runs)."""
    import signal

    import torch  # noqa: F401  (imported once here, inherited by every child)

    import flowformer.attention.baselines
    import flowformer.attention.flow
    import flowformer.attention.registry  # noqa: F401

    if load_fused:
        from flowformer.attention import cpu_fused

        # backend="fused"'s compiled loops (built by the driver before the zygote starts), loaded once here like the
        # modules above. Children that loaded them after the fork timed flow_fused at L = 512 at 1.85-2.25 ms,
        # against 1.52-1.61 ms in fresh processes (run_worker called directly); with this load, 1.71-1.72 ms in
        # three of four runs.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # where they cannot be loaded, the fused configurations record why
            cpu_fused.load()

    for line in sys.stdin:
        request = json.loads(line)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: stdout belongs to the protocol, so route prints to stderr
            os.close(read_end)
            os.dup2(2, 1)
            try:
                payload = {"record": run_worker(request["config"])}
            except BaseException as error:  # noqa: BLE001  (reported to the driver, which records it)
                payload = {"error": f"{type(error).__name__}: {error}"[:500]}
            data = json.dumps(payload).encode()
            while data:
                data = data[os.write(write_end, data):]
            os._exit(0)
        os.close(write_end)
        deadline = time.monotonic() + request["timeout"]
        chunks: list[bytes] = []
        os.set_blocking(read_end, False)
        status, timed_out = None, False
        while status is None:
            try:
                while chunk := os.read(read_end, 65536):
                    chunks.append(chunk)
            except BlockingIOError:
                pass
            done, code = os.waitpid(pid, os.WNOHANG)
            if done:
                status = code
            elif time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
                timed_out = True
            else:
                time.sleep(0.02)
        try:
            while chunk := os.read(read_end, 65536):
                chunks.append(chunk)
        except BlockingIOError:
            pass
        os.close(read_end)
        text = b"".join(chunks).decode()
        if timed_out:
            reply = {"error": f"timeout after {request['timeout']:.0f} s"}
        elif text:
            reply = json.loads(text)
        else:
            reply = {"error": _exit_reason(-os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))}
        print(json.dumps(reply), flush=True)


def _predict(history: list[tuple[int, float]], length: int) -> float | None:
    """Extrapolate a cost to `length` from the last two (length, cost) points; exponent clipped to [1, 2.5]."""
    if not history:
        return None
    last_length, last = history[-1]
    exponent = 1.0
    if len(history) >= 2:
        prev_length, prev = history[-2]
        if prev > 0 and last > 0 and last_length != prev_length:
            exponent = min(2.5, max(1.0, math.log(last / prev) / math.log(last_length / prev_length)))
    return last * (length / last_length) ** exponent


def machine_info(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "cpu_model": None,
        "memory_gib": None,
    }
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            info["cpu_model"] = next(
                line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")
            )
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
        info["load_average_at_start"] = os.getloadavg()
    except (OSError, StopIteration, ValueError):
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def run_suite(args: argparse.Namespace) -> dict[str, Any]:
    variants = [spec for spec in args.variants if VARIANTS[parse_variant(spec)[0]].runs_on(args.device)]
    settings = {
        "batch": args.batch,
        "n_heads": args.heads,
        "head_dim": args.head_dim,
        "threads": args.threads,
        "device": args.device,
        "repeats": args.repeats,
        "min_repeats": args.min_repeats,
        "min_time": args.min_time,
        "warmup": args.warmup,
        "warmup_length": args.warmup_length,
        "time_budget": args.time_budget,
        "gemm_size": args.gemm_size,
    }
    from experiments.provenance import git_sha
    from results.atomic_io import write_json_atomic

    records: list[dict[str, Any]] = []
    started = time.time()
    # the code the workers run is the code at the start (the zygote imports it once)
    sha_at_start = git_sha(REPO)
    header = {
        "command": "python -m experiments.bench " + " ".join(shlex.quote(a) for a in args.argv),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "git_sha": sha_at_start,
        "machine": machine_info(args.device),
        "allocator_env": ALLOCATOR_ENV,
        "settings": {
            **settings,
            "dtypes": args.dtypes,
            "modes": list(args.modes),
            "lengths": list(args.lengths),
            "variants": variants,
            "memory_budget_gib": args.memory_budget,
            "time_budget_s": args.time_budget,
            "isolation": args.isolation,
            "rounds": args.rounds,
            "recheck_max_s": args.recheck_max,
        },
        "variants": {spec: VARIANTS[parse_variant(spec)[0]].description for spec in variants},
    }
    # every measurement so far, rewritten atomically after each one: a run that is killed keeps what it measured
    # (`--from-json <tag>.partial.json` renders it)
    partial = partial_path(args.out, args.tag)

    fused = any(parse_variant(spec)[0] in FUSED_VARIANTS for spec in variants)
    if fused:
        # build (or find in the cache) the compiled loops once, here, so that no worker's warm-up pays for it
        print("backend='fused': building the compiled CPU loops (cached after the first build)", flush=True)
        try:
            _require_fused_loops()
        except RuntimeError as error:
            print(f"backend='fused': {error}; its configurations will record the error", flush=True)
    zygote = Zygote(load_fused=fused) if args.isolation == "fork" else None

    def measure(config: dict[str, Any], keep: bool = True) -> dict[str, Any]:
        timeout = args.timeout or max(120.0, 8 * args.time_budget * (2 + args.warmup + args.min_repeats))
        record = zygote.run(config, timeout) if zygote is not None else launch_spawn(config, timeout)
        if keep:
            records.append(record)
            write_json_atomic(partial, {**header, "wall_s": time.time() - started, "records": records})
        shown = "error: " + record["error"] if "error" in record else f"{record['time_ms']:10.2f} ms {record['peak_mib']:9.1f} MiB"
        print(f"L={config['length']:>6} {config['dtype']:>8} {config['mode']:>8} {config['variant']:<26} {shown}", flush=True)
        return record

    def gemm(dtype: str) -> None:
        if args.gemm_size:
            measure({**settings, "variant": "gemm", "mode": "forward", "dtype": dtype, "length": args.gemm_size})

    for dtype in args.dtypes:
        gemm(dtype)
        stopped: dict[tuple[str, str], str] = {}
        history: dict[tuple[str, str], dict[str, list[tuple[int, float]]]] = {}
        for length in args.lengths:
            for spec in variants:  # interleaved: every variant at this L before the next L
                if not VARIANTS[parse_variant(spec)[0]].runs_on(args.device, dtype):
                    continue
                for mode in args.modes:
                    if mode == "backward" and VARIANTS[parse_variant(spec)[0]].forward_only:
                        continue
                    key = (spec, mode)
                    base = {**settings, "variant": spec, "mode": mode, "dtype": dtype, "length": length}
                    if key in stopped:
                        records.append({**base, "skipped": stopped[key]})
                        continue
                    past = history.setdefault(key, {"time": [], "memory": []})
                    predicted_s = _predict(past["time"], length)
                    predicted_gib = _predict(past["memory"], length)
                    if predicted_s is not None and predicted_s > TIME_SLACK * args.time_budget:
                        stopped[key] = (f"predicted {predicted_s:.1f} s per call > {TIME_SLACK:g} x time budget "
                                        f"{args.time_budget} s")
                    elif predicted_gib is not None and predicted_gib > MEMORY_SLACK * args.memory_budget:
                        stopped[key] = (f"predicted {predicted_gib:.2f} GiB > {MEMORY_SLACK:g} x memory budget "
                                        f"{args.memory_budget} GiB")
                    if key in stopped:
                        records.append({**base, "skipped": stopped[key]})
                        continue
                    record = measure(base)
                    if "error" in record:
                        stopped[key] = f"failed at L={length}: {record['error']}"
                        continue
                    past["time"].append((length, record["time_ms"] / 1e3))
                    past["memory"].append((length, record["peak_mib"] / 1024))
                    if record["time_ms"] / 1e3 > args.time_budget:
                        stopped[key] = f"exceeded the time budget at L={length} ({record['time_ms'] / 1e3:.1f} s)"
                    elif record["peak_mib"] / 1024 > args.memory_budget:
                        stopped[key] = f"exceeded the memory budget at L={length} ({record['peak_mib'] / 1024:.2f} GiB)"
        # Later rounds re-time the quick configurations in the same interleaved order, each in a fresh process; a
        # configuration keeps the median of its least-contended round (a neighbour's burst of work lasts seconds,
        # long enough to hit one variant and miss the next).
        for round_index in range(1, args.rounds):
            print(f"round {round_index + 1} of {args.rounds}: configurations up to {args.recheck_max} s per call", flush=True)
            for record in [r for r in records if r["dtype"] == dtype and r["variant"] != "gemm" and "time_ms" in r]:
                if record["time_ms"] / 1e3 > args.recheck_max:
                    continue
                config = {key: record[key] for key in ("variant", "mode", "dtype", "length", *settings)}
                again = measure(config, keep=False)
                record.setdefault("round_medians_ms", [record["time_ms"]])
                if "time_ms" not in again:
                    continue
                record["round_medians_ms"].append(again["time_ms"])
                if again["time_ms"] < record["time_ms"]:
                    for key in ("time_ms", "timed_calls", "times_ms", "gflops"):
                        record[key] = again[key]
        gemm(dtype)
    if zygote is not None:
        zygote.close()

    sha_at_end = git_sha(REPO)
    return {
        **header,
        "wall_s": time.time() - started,
        "git_sha_at_end": sha_at_end if sha_at_end != sha_at_start else None,
        "records": records,
    }


def partial_path(out_dir: Path, tag: str) -> Path:
    return out_dir / f"{tag}.partial.json"


# ------------------------------------------------------------------------------------------------------------------
# Analysis: targets, tables, figure
# ------------------------------------------------------------------------------------------------------------------


def _index(records: list[dict[str, Any]]) -> dict[tuple[str, str, str, int], dict[str, Any]]:
    return {
        (r["variant"], r["mode"], r["dtype"], r["length"]): r
        for r in records
        if "time_ms" in r and r["variant"] != "gemm"
    }


def gemm_gflops(records: list[dict[str, Any]], dtype: str) -> float | None:
    """Best GFLOP/s of the square GEMM measured in this run (it runs at the start and the end)."""
    values = [r["gflops"] for r in records if r["variant"] == "gemm" and r["dtype"] == dtype and r.get("gflops")]
    return max(values) if values else None


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value from this run and whether it is met (None = not measured)."""
    records = results["records"]
    dtype = results["settings"]["dtypes"][0]
    found = _index(records)
    targets: list[dict[str, Any]] = []

    def get(variant: str, mode: str, length: int) -> dict[str, Any] | None:
        return found.get((variant, mode, dtype, length))

    def add(name: str, measured: str, goal: str, met: bool | None) -> None:
        targets.append({"target": name, "measured": measured, "goal": goal, "met": met})

    flow, official = get("flow_causal", "backward", 4096), get("flow_causal_materialised", "backward", 4096)
    if flow and official:
        speed = official["time_ms"] / flow["time_ms"]
        memory = official["peak_mib"] / max(flow["peak_mib"], 1e-9)
        add("causal flow vs materialised cumsum, L=4096, fwd+bwd: speed-up", f"{speed:.1f}x "
            f"({flow['time_ms']:.1f} vs {official['time_ms']:.1f} ms)", ">= 10x", speed >= 10)
        add("causal flow vs materialised cumsum, L=4096, fwd+bwd: memory", f"{memory:.1f}x less "
            f"({flow['peak_mib']:.0f} vs {official['peak_mib']:.0f} MiB)", ">= 10x", memory >= 10)
    else:
        add("causal flow vs materialised cumsum, L=4096, fwd+bwd", "not measured", ">= 10x time and memory", None)

    long = get("flow_causal", "forward", 65536)
    add("causal flow, L=65536, forward: peak memory",
        f"{long['peak_mib'] / 1024:.2f} GiB" if long else "not measured", "< 4 GiB", (long["peak_mib"] < 4096) if long else None)

    for variant in ("flow", "flow_fused", "flow_causal", "flow_causal_fused"):
        for mode in MODES:
            if mode == "backward" and VARIANTS[variant].forward_only:
                continue
            short, longer = get(variant, mode, 4096), get(variant, mode, 16384)
            if short and longer:
                ratio = longer["time_ms"] / short["time_ms"]
                add(f"{variant}, {MODE_TITLES[mode]}: time(16384)/time(4096)", f"{ratio:.2f}", "<= 4.5", ratio <= 4.5)
            else:
                add(f"{variant}, {MODE_TITLES[mode]}: time(16384)/time(4096)", "not measured", "<= 4.5", None)

    lengths = sorted({r["length"] for r in records if r["variant"] != "gemm"})
    for variant in ("flow", "flow_fused", "flow_compile"):
        for mode in MODES:
            ratios = [
                (length, get("flow_official", mode, length)["time_ms"] / get(variant, mode, length)["time_ms"])
                for length in lengths
                if get(variant, mode, length) and get("flow_official", mode, length)
            ]
            if not ratios:
                continue
            everywhere = all(r > 1.0 for _, r in ratios)
            long_ratios = [r for length, r in ratios if length >= 4096]
            shown = ", ".join(f"{length}: {r:.2f}x" for length, r in ratios)
            add(f"{variant} vs official einsum, {MODE_TITLES[mode]}: faster at every L", shown, "> 1x at every L", everywhere)
            if long_ratios:
                add(f"{variant} vs official einsum, {MODE_TITLES[mode]}: L >= 4096", f"min {min(long_ratios):.2f}x",
                    ">= 1.5x", min(long_ratios) >= 1.5)
            overtakes = next(
                (length for length in lengths
                 if get(variant, mode, length) and get("softmax", mode, length)
                 and get(variant, mode, length)["time_ms"] < get("softmax", mode, length)["time_ms"]),
                None,
            )
            add(f"{variant} overtakes softmax SDPA ({MODE_TITLES[mode]}) from L =", str(overtakes), "report", None)

    # on a GPU: ours against FlashAttention at the lengths, in each half dtype measured
    for half in ("bfloat16", "float16"):
        for variant in ("flow_causal_triton", "flow_causal"):
            for mode in MODES:
                cells = []
                for length in (4096, 16384, 65536):
                    ours = found.get((variant, mode, half, length))
                    flash = found.get(("softmax_flash_causal", mode, half, length))
                    if ours and flash:
                        cells.append(f"{length}: {flash['time_ms'] / ours['time_ms']:.2f}x "
                                     f"({ours['time_ms']:.3g} vs {flash['time_ms']:.3g} ms)")
                if cells:
                    add(f"{variant} vs SDPA flash (causal), {half}, {MODE_TITLES[mode]}: flash time / ours",
                        ", ".join(cells), "report", None)

    ceiling = gemm_gflops(records, dtype)
    ceiling_variants = ("flow", "flow_fused", "flow_compile", "flow_causal", "flow_causal_fused", "matmul", "matmul_causal")
    for variant in ceiling_variants:
        rates = [(length, get(variant, "forward", length)) for length in lengths if length >= 4096]
        rates = [(length, r["gflops"]) for length, r in rates if r and r.get("gflops")]
        if ceiling and rates:
            worst = max(ceiling / rate for _, rate in rates)
            shown = ", ".join(f"{length}: {rate:.0f} ({ceiling / rate:.1f}x below)" for length, rate in rates)
            if variant.startswith("matmul"):
                add(f"for reference, {variant} (the GEMMs alone) GFLOP/s vs GEMM {ceiling:.0f}", shown, "report", None)
            else:
                add(f"{variant} forward, matmul FLOPs / whole-call time (L >= 4096) vs GEMM {ceiling:.0f} GFLOP/s",
                    shown, "within 3x of the GEMM", worst <= 3.0)
    return targets


def _missing_cell(record: dict[str, Any] | None) -> str | None:
    """The table text for a configuration without a measurement ("—", "skip" or "fail"), else None."""
    if record is None:
        return "—"
    if "skipped" in record:
        return "skip"
    if "error" in record:
        return "fail"
    return None


def _format_time(record: dict[str, Any] | None) -> str:
    missing = _missing_cell(record)
    if missing is not None:
        return missing
    value = record["time_ms"]
    shown = f"{value:.3g}" if value < 100 else f"{value:.0f}"
    calls = record.get("timed_calls")
    # fewer timed calls than asked (a call over the time budget): mark it; 0 = the untimed first call only
    return shown + ("" if calls is None or calls >= record.get("min_repeats", 1) else f"<sup>{calls}</sup>")


def _format_memory(record: dict[str, Any] | None) -> str:
    missing = _missing_cell(record)
    if missing is not None:
        return missing
    return f"{record['peak_mib']:.3g}" if record["peak_mib"] < 100 else f"{record['peak_mib']:.0f}"


def render_markdown(results: dict[str, Any], targets: list[dict[str, Any]], figure: Path | None) -> str:
    settings, machine = results["settings"], results["machine"]
    records = [r for r in results["records"] if r["variant"] != "gemm"]
    lines = [
        "# Attention efficiency benchmark",
        "",
        "<!-- Generated by experiments/bench.py. Do not edit by hand: rerun the command below. -->",
        "",
        (f"Command: `{results['command']}` (wall time {results['wall_s'] / 60:.1f} min, started "
         f"{results['started_at']}, git {results['git_sha']})."),
        "",
        (f"Machine: {machine.get('cpu_model')}, {machine.get('cpu_count')} cores, {machine.get('memory_gib')} GiB; "
         f"{machine.get('gpu', 'no GPU')}; torch {machine['torch']}, {settings['threads']} thread(s) per worker, "
         f"device {settings['device']}. Load average at start: {machine.get('load_average_at_start')}."),
        "",
        (f"Shapes: B={settings['batch']}, H={settings['n_heads']}, d=dv={settings['head_dim']}; attention alone (no "
         f"projections). Each (L, variant, mode) ran in a fresh process ({settings['isolation']}) with allocator env "
         f"`{' '.join(f'{k}={v}' for k, v in results['allocator_env'].items())}`; time = median of "
         f"{settings['min_repeats']}-{settings['repeats']} calls after {settings['warmup']} warm-up call(s), from the "
         f"least-contended of {settings.get('rounds', 1)} interleaved round(s) for calls under "
         f"{settings.get('recheck_max_s', 0)} s (a "
         "superscript gives the number of timed calls where a call over the time budget got fewer; 0 = only the "
         "first call, page faults included); memory = peak above the process baseline during the first call (RSS "
         "high-water mark on CPU), output and input gradients included. Budgets: "
         f"{settings['time_budget_s']} s per call, {settings['memory_budget_gib']} GiB. The machine is shared: "
         "compare ratios within this run, not absolute times across runs."),
        "",
    ]
    if figure is not None:
        lines += [f"Figure: `{figure.as_posix()}`.", ""]
    # notes added to the JSON by hand after a run (e.g. a record replaced, and why) are shown, never dropped
    if results.get("notes"):
        lines += ["Notes on this run:", ""] + [f"- {note}" for note in results["notes"]] + [""]
    lines += ["## Targets", "", "| target | measured (this run) | goal | met |", "|---|---|---|---|"]
    for target in targets:
        met = {True: "yes", False: "**no**", None: "—"}[target["met"]]
        lines.append(f"| {target['target']} | {target['measured']} | {target['goal']} | {met} |")
    lines.append("")

    variants = list(results["variants"])
    for dtype in settings["dtypes"]:
        found = {(r["variant"], r["mode"], r["length"]): r for r in records if r["dtype"] == dtype}
        lengths = sorted({r["length"] for r in records if r["dtype"] == dtype})
        for title, fmt, unit in (("time", _format_time, "ms"), ("peak memory", _format_memory, "MiB")):
            for mode in settings["modes"]:
                shown = [v for v in variants if any((v, mode, n) in found for n in lengths)]
                if not shown:
                    continue
                lines += [f"## {MODE_TITLES[mode].capitalize()} {title} ({unit}, {dtype})", ""]
                lines.append("| L | " + " | ".join(shown) + " |")
                lines.append("|---:|" + "---:|" * len(shown))
                for length in lengths:
                    lines.append(f"| {length} | " + " | ".join(fmt(found.get((v, mode, length))) for v in shown) + " |")
                lines.append("")
        ceiling = gemm_gflops(results["records"], dtype)
        rated = [v for v in variants if any(found.get((v, "forward", n), {}).get("gflops") for n in lengths)]
        if rated:
            lines += [f"## Matmul throughput, forward (GFLOP/s of the matmul FLOPs over the whole call, {dtype})", ""]
            lines.append(f"Square GEMM ({settings['gemm_size']}³) in this run: "
                         f"{ceiling:.0f} GFLOP/s." if ceiling else "No square GEMM measured in this run.")
            lines += ["", "| L | " + " | ".join(rated) + " |", "|---:|" + "---:|" * len(rated)]
            for length in lengths:
                cells = []
                for v in rated:
                    rate = found.get((v, "forward", length), {}).get("gflops")
                    cells.append(f"{rate:.0f}" if rate else "—")
                lines.append(f"| {length} | " + " | ".join(cells) + " |")
            lines.append("")

    notes = sorted({(r["variant"], r["mode"], r.get("skipped") or r.get("error")) for r in records
                    if "skipped" in r or "error" in r}, key=str)
    first_notes: dict[tuple[str, str], str] = {}
    for variant, mode, reason in notes:
        first_notes.setdefault((variant, mode), reason)
    if first_notes:
        lines += ["## Skipped or failed", ""]
        lines += [f"- {variant} ({MODE_TITLES[mode]}): {reason}" for (variant, mode), reason in sorted(first_notes.items())]
        lines.append("")
    lines += ["## Variants", ""] + [f"- `{name}`: {text}" for name, text in results["variants"].items()] + [""]
    return "\n".join(lines)


def render_figure(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from results.atomic_io import atomic_path

    settings = results["settings"]
    dtype = settings["dtypes"][0]
    records = [r for r in results["records"] if "time_ms" in r and r["variant"] != "gemm" and r["dtype"] == dtype]
    modes = list(settings["modes"])
    variants = list(results["variants"])
    palette = plt.get_cmap("tab20").colors
    # a hue per maths: ours (dark) beside the official formulation of the same attention (light)
    hues = {"flow": 0, "flow_compile": 0, "flow_fused": 13, "flow_official": 1, "flow_causal": 6,
            "flow_causal_fused": 17, "flow_causal_triton": 12, "flow_causal_materialised": 7, "softmax": 4,
            "softmax_causal": 5, "softmax_flash": 14, "softmax_flash_causal": 15, "linear": 8, "linear_causal": 9,
            "performer": 2, "performer_causal": 3, "cosformer": 10, "cosformer_causal": 11, "reformer": 16}

    def style(variant: str) -> dict[str, Any]:
        # ours: solid and thick; the official formulations: dashed; other baselines: dotted; GEMM-only references: grey
        if variant.startswith("matmul"):
            return {"linestyle": ":", "color": "0.35" if variant == "matmul" else "0.65", "linewidth": 1.2}
        color = palette[hues.get(parse_variant(variant)[0], variants.index(variant)) % len(palette)]
        if "official" in variant or "materialised" in variant:
            return {"linestyle": "--", "color": color, "linewidth": 1.8}
        if variant.startswith("flow"):
            return {"linestyle": "-", "color": color, "linewidth": 2.4}
        return {"linestyle": ":", "color": color, "linewidth": 1.5}

    fig, axes = plt.subplots(2, len(modes), figsize=(6.5 * len(modes) + 2.5, 9), squeeze=False)
    for column, mode in enumerate(modes):
        for row, (key, label) in enumerate((("time_ms", "time per call (ms)"), ("peak_mib", "peak memory (MiB)"))):
            axis = axes[row][column]
            for variant in variants:
                points = sorted((r["length"], r[key]) for r in records if r["variant"] == variant and r["mode"] == mode)
                points = [(n, value) for n, value in points if value > 0]
                if points:
                    axis.plot(*zip(*points), marker="o", markersize=3, label=variant, **style(variant))
            axis.set_xscale("log", base=2)
            axis.set_yscale("log")
            axis.set_xlabel("sequence length L")
            axis.set_ylabel(label)
            axis.set_title(f"{MODE_TITLES[mode]}, {dtype}, B={settings['batch']} H={settings['n_heads']} d={settings['head_dim']}")
            axis.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1 - 2.3 / (6.5 * len(modes) + 2.5), 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def write_outputs(results: dict[str, Any], out_dir: Path, tag: str, figure: Path | None) -> list[Path]:
    from results.atomic_io import write_json_atomic
    from results.atomic_io import write_text_atomic

    targets = evaluate_targets(results)
    results["targets"] = targets
    json_path, md_path = out_dir / f"{tag}.json", out_dir / f"{tag}.md"
    write_json_atomic(json_path, results)
    written = [json_path]
    if figure is not None:
        render_figure(results, figure)
        written.append(figure)
    shown_figure = figure.relative_to(REPO) if figure is not None and figure.is_relative_to(REPO) else figure
    write_text_atomic(md_path, render_markdown(results, targets, shown_figure))
    written.append(md_path)
    return written


# ------------------------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------------------------


def _csv(kind: Callable[[str], Any]) -> Callable[[str], list]:
    return lambda text: [kind(item) for item in text.split(",") if item]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.bench", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help=f"preset: L in {QUICK_LENGTHS}, 2-3 repeats, tag <tag>_quick")
    parser.add_argument("--lengths", type=_csv(int), help=f"comma-separated L values (default {DEFAULT_LENGTHS[0]}..{DEFAULT_LENGTHS[-1]})")
    parser.add_argument("--variants", type=_csv(str), help=f"comma-separated variants (default: {','.join(DEFAULT_VARIANTS)})")
    parser.add_argument("--modes", type=_csv(str), default=list(MODES), help="forward,backward (backward = forward+backward)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtypes", type=_csv(str), help="default float32 on CPU, float32,bfloat16 on CUDA")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads per worker (default 1: on a shared machine a multi-threaded op waits for its slowest "
        "thread at every parallel region, so one busy neighbour inflates times several-fold; use all cores only on "
        "a quiet machine)",
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--time-budget", type=float, default=5.0, help="seconds per call; slower variants stop growing L")
    parser.add_argument(
        "--memory-budget", type=float, default=None,
        help="GiB above baseline; larger variants stop growing L (default 8 on CPU, 48 on CUDA)",
    )
    parser.add_argument("--repeats", type=int, default=11, help="most timed calls per configuration")
    parser.add_argument("--min-repeats", type=int, default=5, help="fewest timed calls per configuration")
    parser.add_argument("--min-time", type=float, default=1.5, help="timed calls continue (up to --repeats) until this many seconds")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls at the real length before timing")
    # 4 rounds, re-timing calls up to 1 s: with 3 rounds up to 0.5 s, each full run still left one or two ratios on
    # the wrong side of their bound, on different targets each time (a contended round at L = 512, a 0.6 s call at
    # L = 65536 timed in a single round); the extra samples took a full run from ~22 to ~31 min
    parser.add_argument(
        "--rounds", type=int, default=4,
        help="interleaved rounds; configurations of at most --recheck-max s per call are re-timed in each later "
        "round, and keep the median of their least-contended round",
    )
    parser.add_argument("--recheck-max", type=float, default=1.0, help="seconds per call; see --rounds")
    parser.add_argument("--warmup-length", type=int, default=256, help="length of the warm-up calls before the memory probe")
    parser.add_argument(
        "--gemm-size", type=int, default=None,
        help="square GEMM for the machine ceiling (0 = skip; default 2048 on CPU, 8192 on CUDA, where a 2048 GEMM is "
        "too short to fill the card or to time from the host)",
    )
    parser.add_argument("--timeout", type=float, default=None, help="seconds per worker process (default from the time budget)")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench")
    parser.add_argument("--figure", type=Path, default=None, help="default results/figures/<tag>.png")
    parser.add_argument("--no-figure", action="store_true")
    parser.add_argument("--tag", default="efficiency", help="output file stem")
    parser.add_argument(
        "--isolation", default="fork", choices=("fork", "spawn"),
        help="fork: each configuration in a child forked from a process that imported torch once (default); "
        "spawn: each in a new interpreter (python -m experiments.bench --worker ...), ~2-3 s slower per configuration",
    )
    parser.add_argument(
        "--from-json", type=Path, default=None,
        help="re-render the table and figure of an earlier run's JSON without measuring anything",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--zygote", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--zygote-load-fused", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = argv
    if args.worker or args.zygote:
        return args
    unknown_modes = set(args.modes) - set(MODES)
    if unknown_modes:
        parser.error(f"--modes: unknown {sorted(unknown_modes)}; use forward and/or backward")
    if args.quick:
        args.lengths = args.lengths or list(QUICK_LENGTHS)
        args.repeats, args.min_repeats, args.min_time = min(args.repeats, 3), min(args.min_repeats, 2), min(args.min_time, 0.3)
        args.rounds = 1
        args.tag = args.tag + "_quick" if args.tag == "efficiency" else args.tag
    args.lengths = args.lengths or list(DEFAULT_LENGTHS)
    args.variants = args.variants or list(DEFAULT_VARIANTS)
    for spec in args.variants:
        parse_variant(spec)
    on_cpu = args.device == "cpu"
    args.dtypes = args.dtypes or (["float32"] if on_cpu else ["float32", "bfloat16"])
    args.memory_budget = args.memory_budget if args.memory_budget is not None else (8.0 if on_cpu else 48.0)
    args.gemm_size = args.gemm_size if args.gemm_size is not None else (2048 if on_cpu else 8192)
    if args.from_json is not None and args.tag == "efficiency":
        args.tag = args.from_json.stem
    if args.figure is None and not args.no_figure:
        args.figure = REPO / "results" / "figures" / f"{args.tag}.png"
    if args.no_figure:
        args.figure = None
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.zygote:
        zygote_loop(load_fused=args.zygote_load_fused)
        return 0
    if args.worker:
        record = run_worker(json.loads(args.worker))
        print(RESULT_PREFIX + json.dumps(record), flush=True)
        return 0
    if args.from_json is not None:
        results = json.loads(args.from_json.read_text())
        for path in write_outputs(results, args.out, args.tag, args.figure):
            print(f"wrote {path}")
        return 0
    print(f"bench: {len(args.variants)} variants x {len(args.lengths)} lengths x {len(args.modes)} modes; "
          f"budgets {args.time_budget} s/call, {args.memory_budget} GiB", flush=True)
    results = run_suite(args)
    for path in write_outputs(results, args.out, args.tag, args.figure):
        print(f"wrote {path}")
    partial_path(args.out, args.tag).unlink(missing_ok=True)  # superseded by the complete JSON
    for target in results["targets"]:
        print(f"  [{ {True: 'met', False: 'NOT MET', None: '-'}[target['met']] }] {target['target']}: {target['measured']} (goal {target['goal']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
