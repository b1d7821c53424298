"""The benchmark's schedule: which configurations run, in which order, within which budgets; and its command line.

Variants are interleaved at each length, so slow drifts of a shared machine hit all of them alike; later rounds
re-time the quick configurations, and those timed while other processes kept the machine busy, each keeping the
median of its least-contended round. Before each measurement the runner waits, within limits, for the machine to
be quiet: on a shared machine a neighbour slows a multi-threaded op by far more than its share of the CPU, since a
thread preempted at a parallel region stalls the others. A variant whose median
call exceeds the time budget, or whose peak exceeds the memory budget, is not run at larger lengths; neither is one
whose extrapolation from its last two lengths predicts more than `TIME_SLACK` x the time budget or `MEMORY_SLACK`
x the memory budget (this keeps the machine out of swap). Every measurement is saved as it comes.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from experiments.bench import report, targets
from experiments.bench.isolation import METHODS, WORKER_ENV, Isolation
from experiments.bench.measure import BUSY, TIME_SLACK, CpuMeter
from experiments.bench.variants import DEFAULT_VARIANTS, GEMM, VARIANTS, parse_variant

REPO = Path(__file__).resolve().parents[2]
MODES = report.MODES
MEMORY_SLACK = 1.25
DEFAULT_LENGTHS = tuple(2**p for p in range(8, 17))  # 256 ... 65536
QUICK_LENGTHS = (256, 1024, 4096)
# The settings every configuration carries (and its record keeps).
SETTING_KEYS = ("batch", "n_heads", "head_dim", "threads", "device", "repeats", "min_repeats", "min_time", "warmup",
                "warmup_length", "time_budget", "gemm_size")


def predict(history: list[tuple[int, float]], length: int) -> float | None:
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
        "default_threads": torch.get_num_threads(),
        "cpu_model": None,
        "memory_gib": None,
    }
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
        info["load_average_at_start"] = os.getloadavg()
    except (OSError, StopIteration, ValueError):
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


class _Schedule:
    """The budgets of one dtype's pass over lengths: which (variant, mode) pairs have stopped, and why."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.stopped: dict[tuple[str, str], str] = {}
        self.history: dict[tuple[str, str], dict[str, list[tuple[int, float]]]] = {}

    def skip_reason(self, key: tuple[str, str], length: int) -> str | None:
        """Why `key` does not run at `length` (None: it runs)."""
        if key not in self.stopped:
            past = self.history.setdefault(key, {"time": [], "memory": []})
            seconds, gib = predict(past["time"], length), predict(past["memory"], length)
            if seconds is not None and seconds > TIME_SLACK * self.args.time_budget:
                self.stopped[key] = (f"predicted {seconds:.1f} s per call > {TIME_SLACK:g} x time budget "
                                     f"{self.args.time_budget} s")
            elif gib is not None and gib > MEMORY_SLACK * self.args.memory_budget:
                self.stopped[key] = (f"predicted {gib:.2f} GiB > {MEMORY_SLACK:g} x memory budget "
                                     f"{self.args.memory_budget} GiB")
        return self.stopped.get(key)

    def record(self, key: tuple[str, str], length: int, record: dict[str, Any]) -> None:
        if "error" in record:
            self.stopped[key] = f"failed at L={length}: {record['error']}"
            return
        seconds, gib = record["time_ms"] / 1e3, record["peak_mib"] / 1024
        self.history[key]["time"].append((length, seconds))
        self.history[key]["memory"].append((length, gib))
        if seconds > self.args.time_budget:
            self.stopped[key] = f"exceeded the time budget at L={length} ({seconds:.1f} s)"
        elif gib > self.args.memory_budget:
            self.stopped[key] = f"exceeded the memory budget at L={length} ({gib:.2f} GiB)"


def run_suite(args: argparse.Namespace, isolation: Isolation | None = None) -> dict[str, Any]:
    """Measure every configuration of `args`; returns the run (header, settings and records)."""
    from experiments.provenance import git_sha

    suite = _Suite(args, isolation or Isolation(args.isolation))
    sha_at_start = suite.header["git_sha"]
    for dtype in args.dtypes:
        suite.gemm(dtype)
        suite.first_round(dtype)
        for round_index in range(1, args.rounds):
            print(f"round {round_index + 1} of {args.rounds}: configurations up to {args.recheck_max} s per call",
                  flush=True)
            suite.retime_quick(dtype)
        suite.gemm(dtype)
    sha_at_end = git_sha(REPO)
    return {**suite.header, "wall_s": time.time() - suite.started,
            "git_sha_at_end": sha_at_end if sha_at_end != sha_at_start else None, "records": suite.records}


class _Suite:
    """One run: its settings, its records so far, and how it measures a configuration."""

    def __init__(self, args: argparse.Namespace, isolation: Isolation) -> None:
        from experiments.provenance import git_sha

        self.args, self.isolation = args, isolation
        self.variants = [spec for spec in args.variants if VARIANTS[parse_variant(spec)[0]].runs_on(args.device)]
        self.settings = {key: getattr(args, key) for key in SETTING_KEYS}
        self.records: list[dict[str, Any]] = []
        self.started = time.time()
        self.quiet_budget = args.quiet_budget  # seconds left to wait for a quiet machine in this run
        self.header = {
            "command": "python -m experiments.bench " + " ".join(shlex.quote(a) for a in args.argv),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
            "git_sha": git_sha(REPO),  # the code the children run is the code at the start
            "machine": machine_info(args.device),
            "worker_env": WORKER_ENV,
            "settings": {
                **self.settings, "dtypes": args.dtypes, "modes": list(args.modes), "lengths": list(args.lengths),
                "variants": self.variants, "memory_budget_gib": args.memory_budget, "time_budget_s": args.time_budget,
                "isolation": args.isolation, "rounds": args.rounds, "recheck_max_s": args.recheck_max,
            "quiet_wait_s": args.quiet_wait, "quiet_budget_s": args.quiet_budget,
            },
            "variants": {spec: VARIANTS[parse_variant(spec)[0]].description for spec in self.variants},
        }

    def measure(self, config: dict[str, Any], keep: bool = True) -> dict[str, Any]:
        """Run one configuration in its own process; a kept record is saved at once (a killed run keeps it)."""
        from results.atomic_io import write_json_atomic

        args = self.args
        timeout = args.timeout or max(120.0, 8 * args.time_budget * (2 + args.warmup + args.min_repeats))
        self.wait_for_quiet()
        record = self.isolation.run(config, timeout)
        if keep:
            self.records.append(record)
            write_json_atomic(partial_path(args.out, args.tag),
                              {**self.header, "wall_s": time.time() - self.started, "records": self.records})
        shown = ("error: " + record["error"] if "error" in record
                 else f"{record['time_ms']:10.2f} ms {record['peak_mib']:9.1f} MiB")
        if record.get("background_cpu") is not None:
            shown += f"  (others {100 * record['background_cpu']:.0f}% of the CPU)"
        print(f"L={config['length']:>6} {config['dtype']:>8} {config['mode']:>8} {config['variant']:<26} {shown}",
              flush=True)
        return record

    def wait_for_quiet(self) -> None:
        """Wait until other processes use at most `BUSY` of the CPU, for at most --quiet-wait seconds now and
        --quiet-budget seconds in the whole run."""
        waited = 0.0
        while waited < self.args.quiet_wait and self.quiet_budget > 0:
            meter = CpuMeter()
            time.sleep(0.5)
            share = meter.background()
            if share is None or share <= BUSY:
                return
            time.sleep(1.5)
            waited += 2.0
            self.quiet_budget -= 2.0

    def gemm(self, dtype: str) -> None:
        """The square GEMM, the machine's matmul ceiling (at the start and the end of each dtype's pass)."""
        if self.args.gemm_size:
            self.measure({**self.settings, "variant": GEMM, "mode": "forward", "dtype": dtype,
                          "length": self.args.gemm_size})

    def first_round(self, dtype: str) -> None:
        """Every configuration once, interleaved: every variant at one length before the next length."""
        schedule = _Schedule(self.args)
        for length in self.args.lengths:
            for spec in self.variants:
                variant = VARIANTS[parse_variant(spec)[0]]
                if not variant.runs_on(self.args.device, dtype):
                    continue
                for mode in self.args.modes:
                    if mode == "backward" and variant.forward_only:
                        continue
                    base = {**self.settings, "variant": spec, "mode": mode, "dtype": dtype, "length": length}
                    required = (spec, mode, length) in targets.REQUIRED
                    reason = None if required else schedule.skip_reason((spec, mode), length)
                    if reason is not None:
                        self.records.append({**base, "skipped": reason})
                        continue
                    schedule.record((spec, mode), length, self.measure(base))

    def retime_quick(self, dtype: str) -> None:
        """Re-time the configurations of at most `--recheck-max` s per call, and those of at most the time budget
        whose kept timing was contended, in the same interleaved order, each in a fresh process; keep the median of
        the least-contended round (a neighbour's burst of work lasts seconds, long enough to hit one variant and
        miss the next)."""
        for record in [r for r in self.records if r["dtype"] == dtype and r["variant"] != GEMM and "time_ms" in r]:
            seconds, contended = record["time_ms"] / 1e3, (record.get("background_cpu") or 0.0) > BUSY
            if seconds > (self.args.time_budget if contended else self.args.recheck_max):
                continue
            config = {key: record[key] for key in ("variant", "mode", "dtype", "length", *SETTING_KEYS)}
            again = self.measure(config, keep=False)
            record.setdefault("round_medians_ms", [record["time_ms"]])
            if "time_ms" not in again:
                continue
            record["round_medians_ms"].append(again["time_ms"])
            if again["time_ms"] < record["time_ms"]:
                for key in ("time_ms", "timed_calls", "times_ms", "gflops", "background_cpu"):
                    record[key] = again.get(key)


def partial_path(out_dir: Path, tag: str) -> Path:
    return out_dir / f"{tag}.partial.json"


def _csv(kind: Callable[[str], Any]) -> Callable[[str], list]:
    return lambda text: [kind(item) for item in text.split(",") if item]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.bench", description="The attention efficiency benchmark (experiments/bench).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true",
                        help=f"preset: L in {QUICK_LENGTHS}, few repeats, tag <tag>_quick")
    parser.add_argument("--lengths", type=_csv(int),
                        help=f"comma-separated L (default {DEFAULT_LENGTHS[0]}..{DEFAULT_LENGTHS[-1]})")
    parser.add_argument("--variants", type=_csv(str),
                        help=f"comma-separated variants (default: {','.join(DEFAULT_VARIANTS)})")
    parser.add_argument("--modes", type=_csv(str), default=list(MODES),
                        help="forward,backward (backward = forward+backward)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtypes", type=_csv(str), help="default float32 on CPU, float32,bfloat16 on CUDA")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch threads per configuration (default: torch's default, one per core, as users run it)",
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", dest="n_heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--time-budget", type=float, default=5.0,
                        help="seconds per call; slower variants stop growing L")
    parser.add_argument("--memory-budget", type=float, default=None,
                        help="GiB above baseline; larger variants stop growing L (default 8 on CPU, 48 on CUDA)")
    parser.add_argument("--repeats", type=int, default=11, help="most timed calls per configuration")
    parser.add_argument("--min-repeats", type=int, default=5, help="fewest timed calls per configuration")
    parser.add_argument("--min-time", type=float, default=1.5, help="timed calls continue (up to --repeats) this long")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls at the real length before timing")
    parser.add_argument("--rounds", type=int, default=4,
                        help="interleaved rounds; configurations of at most --recheck-max s per call are re-timed in "
                        "each later round and keep the median of their least-contended round")
    parser.add_argument("--recheck-max", type=float, default=1.0, help="seconds per call; see --rounds")
    parser.add_argument("--quiet-wait", type=float, default=10.0,
                        help="seconds to wait before a measurement for other processes to leave the CPU")
    parser.add_argument("--quiet-budget", type=float, default=1200.0,
                        help="seconds to wait for a quiet machine in the whole run (0: never wait)")
    parser.add_argument("--warmup-length", type=int, default=256, help="length of the warm-up calls")
    parser.add_argument("--gemm-size", type=int, default=None,
                        help="square GEMM for the machine ceiling (0 = skip; default 2048 on CPU, 8192 on CUDA, where "
                        "a 2048 GEMM is too short to fill the card or to time from the host)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds per configuration (default from the budget)")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench")
    parser.add_argument("--figure", type=Path, default=None, help="default results/figures/<tag>.png")
    parser.add_argument("--no-figure", action="store_true")
    parser.add_argument("--tag", default="efficiency", help="output file stem")
    parser.add_argument("--isolation", default="forkserver", choices=METHODS,
                        help="forkserver: children forked from a server that imported torch once (default); spawn: "
                        "a new interpreter per configuration, seconds slower each")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="re-render the table and figure of an earlier run's JSON without measuring anything")
    args = parser.parse_args(argv)
    args.argv = argv
    unknown_modes = set(args.modes) - set(MODES)
    if unknown_modes:
        parser.error(f"--modes: unknown {sorted(unknown_modes)}; use forward and/or backward")
    if args.quick:
        args.lengths = args.lengths or list(QUICK_LENGTHS)
        args.repeats, args.min_repeats = min(args.repeats, 3), min(args.min_repeats, 2)
        args.min_time = min(args.min_time, 0.3)
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
    import json

    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.from_json is not None:
        results = json.loads(args.from_json.read_text())
        for path in report.write_outputs(results, args.out, args.tag, args.figure, REPO):
            print(f"wrote {path}")
        return 0
    print(f"bench: {len(args.variants)} variants x {len(args.lengths)} lengths x {len(args.modes)} modes; "
          f"budgets {args.time_budget} s/call, {args.memory_budget} GiB", flush=True)
    results = run_suite(args)
    for path in report.write_outputs(results, args.out, args.tag, args.figure, REPO):
        print(f"wrote {path}")
    partial_path(args.out, args.tag).unlink(missing_ok=True)  # superseded by the complete JSON
    print(targets.summary(results), flush=True)
    return 0
