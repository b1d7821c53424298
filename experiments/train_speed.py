"""Training speed of each domain's paper model: steps per second and peak memory, eager against compiled, flow
against softmax.

    python -m experiments.train_speed                     # every domain at the paper's shapes and batch
    python -m experiments.train_speed --quick             # the paper's shapes, small batches: minutes on a CPU
    python -m experiments.train_speed --device cuda --precision bf16-mixed
    python -m experiments.train_speed --from-json results/bench/train_speed.json   # re-render the table only

Each configuration (domain, attention, eager or compiled) builds the model of the domain's experiment config
(`conf/experiment/...`, so the widths, depths and attention options are the paper's) on synthetic batches of the
data's shapes, and trains it with the recipe's optimiser (its fastest implementation, as training uses), gradient
clipping and precision. It runs in a fresh process; compiling happens in the warm-up steps and is reported apart.
The time is the median of the timed steps; the peak memory is the process's resident-set high-water mark during the
timed steps on a CPU, `torch.cuda.max_memory_allocated` on a GPU. Writes results/bench/<tag>.{json,md} with the
machine, the versions, the commit and the command.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from experiments.bench.train_step import QUICK_WORKLOADS, WORKLOADS

REPO = Path(__file__).resolve().parents[1]
MODES = ("eager", "compiled", "matmul")
ATTENTIONS = ("flow", "softmax")
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")


# ------------------------------------------------------------------------------------------- the command


def configurations(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every configuration of the run, interleaved: for each workload, eager and compiled of each attention."""
    base = {"device": args.device, "precision": args.precision, "scale": args.scale, "warmup": args.warmup,
            "steps": args.steps, "threads": args.threads}
    compiled = args.compiled_attentions or args.attentions

    def wanted(attention: str, mode: str) -> bool:
        if mode == "matmul":  # the linear layers are the same whatever the attention
            return attention == args.attentions[0]
        return mode != "compiled" or attention in compiled

    return [{**base, "workload": name, "attention": attention, "mode": mode}
            for name in args.workloads for attention in args.attentions for mode in args.modes
            if wanted(attention, mode)]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.train_speed", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"the paper's models and shapes at small batches, workloads {','.join(QUICK_WORKLOADS)}, "
                        "few steps, flow alone compiled; tag <tag>_quick")
    parser.add_argument("--tiny", action="store_true",
                        help="toy widths and shapes: every code path in seconds (the test suite's check)")
    parser.add_argument("--workloads", type=lambda text: [w for w in text.split(",") if w],
                        help=f"comma-separated, of {','.join(WORKLOADS)} (default: all)")
    parser.add_argument("--attentions", type=lambda text: text.split(","), default=list(ATTENTIONS))
    parser.add_argument("--modes", type=lambda text: text.split(","), default=list(MODES),
                        help="eager, compiled (compile=true) and matmul (the linear layers' matrix products of a step "
                        "alone: the floor)")
    parser.add_argument("--compiled-attentions", type=lambda text: text.split(","), default=None,
                        help="the attentions measured compiled (default: every one of --attentions)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--precision", default="32-true", choices=PRECISIONS)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (they compile); default 3")
    parser.add_argument("--steps", type=int, default=None, help="timed steps; default 10 (quick 4, tiny 2)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per configuration")
    parser.add_argument("--isolation", default="forkserver", choices=("forkserver", "spawn"))
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench")
    parser.add_argument("--tag", default=None, help="output file stem (default train_speed[_quick|_tiny])")
    parser.add_argument("--from-json", type=Path, default=None, help="re-render the Markdown of an earlier run")
    args = parser.parse_args(argv)
    args.argv = argv
    args.scale = "tiny" if args.tiny else "quick" if args.quick else "paper"
    if args.quick and args.compiled_attentions is None:
        args.compiled_attentions = ["flow"]  # compiling costs tens of seconds per model on a CPU
    args.workloads = args.workloads or (list(QUICK_WORKLOADS) if args.quick else list(WORKLOADS))
    unknown = sorted(set(args.workloads) - set(WORKLOADS)) + sorted(set(args.modes) - set(MODES))
    if unknown:
        parser.error(f"unknown workloads or modes {unknown}; workloads: {', '.join(WORKLOADS)}; modes: eager,compiled")
    args.warmup = args.warmup if args.warmup is not None else (2 if args.tiny else 3)
    args.steps = args.steps if args.steps is not None else {"tiny": 2, "quick": 4, "paper": 10}[args.scale]
    if args.tag is None:
        args.tag = "train_speed" + ("" if args.scale == "paper" else f"_{args.scale}")
        if args.device == "cuda":
            args.tag += "_cuda" + ("" if args.precision == "32-true" else f"_{args.precision.split('-')[0]}")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every configuration, each in a fresh process; returns the run (header and records)."""
    import os

    from experiments.bench.isolation import WORKER_ENV, Isolation
    from experiments.bench.runner import machine_info
    from experiments.bench.train_step import measure
    from experiments.provenance import git_sha, package_versions, utc_now

    isolation = Isolation(args.isolation, target=measure, preload=["torch", "experiments.bench.train_step"])
    header = {
        "command": "python -m experiments.train_speed " + " ".join(shlex.quote(a) for a in args.argv),
        "started_at": utc_now(), "git_sha": git_sha(REPO), "machine": machine_info(args.device),
        "versions": package_versions(), "worker_env": WORKER_ENV, "scale": args.scale,
        "load_average_at_start": os.getloadavg(),
        "workloads": {name: {"experiment": WORKLOADS[name].experiment, "shapes": WORKLOADS[name].shapes[args.scale],
                             "notes": WORKLOADS[name].notes_at(args.scale)} for name in args.workloads},
    }
    records = []
    started = time.time()
    for config in configurations(args):
        record = isolation.run(config, args.timeout)
        records.append(record)
        shown = (f"error: {record['error']}" if "error" in record else
                 f"{record['step_ms']:9.1f} ms/step {record['steps_per_s']:7.2f} steps/s "
                 f"{record['peak_mib']:8.0f} MiB  (warm-up {record['warmup_s']:.1f} s)")
        print(f"{config['workload']:<15} {config['attention']:<8} {config['mode']:<9} {shown}", flush=True)
    return {**header, "load_average_at_end": os.getloadavg(), "wall_s": time.time() - started, "records": records}


def markdown(results: dict[str, Any]) -> str:
    """The report: steps per second and peak memory per workload, attention and mode, with the ratios."""
    machine = results["machine"]
    lines = [
        f"# Training speed ({results['scale']} scale)",
        "",
        f"`{results['command']}` at commit `{results['git_sha']}`, {results['started_at']}.",
        f"Machine: {machine.get('cpu_model')}, {machine.get('cpu_count')} CPUs"
        + (f", {machine['gpu']}" if machine.get("gpu") else "")
        + f"; torch {results['versions'].get('torch')}, {results['records'][0].get('threads') if results['records'] else '?'}"
        f" threads; load average {_load(results['load_average_at_start'])} at the start, "
        f"{_load(results['load_average_at_end'])} at the end.",
        "",
        "Milliseconds per optimiser step (forward, backward, clipping, update) on a synthetic batch of the "
        "workload's shapes, the median of the timed steps; ratios of steps per second (> 1: the first is faster). "
        "Linear matmuls alone: the forward and both backward products of every linear layer at the step's shapes, "
        "the floor the rest of a step adds to. Peak memory: "
        + ("`torch.cuda.max_memory_allocated`." if machine.get("gpu") else "the process's resident set.")
        + " Compiled: `compile=true` (flowformer/compile.py); its warm-up (compiling) is listed apart.",
        "",
        "| workload | batch | attention | eager ms/step | compiled ms/step | linear matmuls alone ms/step | "
        "compiled / eager speed | eager MiB | compiled MiB | compile warm-up s | flow / softmax speed (eager) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    found = {(r["workload"], r["attention"], r["mode"]): r for r in results["records"]}
    attentions = list(dict.fromkeys(r["attention"] for r in results["records"]))
    for name in results["workloads"]:
        matmul = found.get((name, attentions[0], "matmul")) if attentions else None
        for attention in attentions:
            eager, compiled = found.get((name, attention, "eager")), found.get((name, attention, "compiled"))
            softmax = found.get((name, "softmax", "eager"))
            if eager is None and compiled is None:
                continue
            batch = (eager or compiled).get("batch", results["workloads"][name].get("shapes", {}).get("batch", ""))
            row = [name, str(batch), attention, _ms(eager), _ms(compiled),
                   _ms(matmul), _ratio(compiled, eager, "steps_per_s"), _mib(eager), _mib(compiled),
                   f"{compiled['warmup_s']:.1f}" if compiled and "warmup_s" in compiled else "—",
                   _ratio(eager, softmax, "steps_per_s") if attention == "flow" else ""]
            lines.append("| " + " | ".join(row) + " |")
    notes = [f"- {name}: {info['notes']}" for name, info in results["workloads"].items() if info.get("notes")]
    errors = [f"- {r['workload']} {r['attention']} {r['mode']}: {r['error']}" for r in results["records"] if "error" in r]
    if notes:
        lines += ["", "Notes:", *notes]
    if errors:
        lines += ["", "Failed:", *errors]
    return "\n".join(lines) + "\n"


def _load(values: Any) -> str:
    return "/".join(f"{v:.2f}" for v in values) if values else "?"


def _ms(record: dict[str, Any] | None) -> str:
    if record is None:
        return "—"
    if "error" in record:
        return "fail"
    value = record["step_ms"]
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _mib(record: dict[str, Any] | None) -> str:
    return "—" if record is None or "error" in record else f"{record['peak_mib']:.0f}"


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str) -> str:
    if not a or not b or key not in a or key not in b or not b[key]:
        return "—"
    return f"{a[key] / b[key]:.2f}"


def write_outputs(results: dict[str, Any], out: Path, tag: str) -> list[Path]:
    from results.atomic_io import write_json_atomic, write_text_atomic

    json_path, md_path = out / f"{tag}.json", out / f"{tag}.md"
    write_json_atomic(json_path, results)
    write_text_atomic(md_path, markdown(results))
    return [json_path, md_path]


def main(argv: list[str] | None = None) -> int:
    import json

    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.from_json is not None:
        results = json.loads(args.from_json.read_text())
    else:
        print(f"train_speed: {len(configurations(args))} configurations ({args.scale} scale, {args.device}, "
              f"{args.precision})", flush=True)
        results = run(args)
    for path in write_outputs(results, args.out, args.tag if args.from_json is None else args.from_json.stem):
        print(f"wrote {path}")
    failed = [r for r in results["records"] if "error" in r]
    return 1 if failed and args.from_json is None else 0


if __name__ == "__main__":
    raise SystemExit(main())
