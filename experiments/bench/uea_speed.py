"""End-to-end CPU training time of the JapaneseVowels recipe, this checkout against an earlier commit, side by side.

    python -m experiments.bench.uea_speed                          # against 84b8786, 30 epochs, 2 rounds
    python -m experiments.bench.uea_speed --baseline <commit> --epochs 100 --rounds 3
    python -m experiments.bench.uea_speed --ours-extra compile=true   # an override for this checkout's runs only

Each run is the user's command with the shipped defaults, `python -m experiments.train experiment=uea/JapaneseVowels
trainer.max_epochs=<epochs> seed=0`, timed from start to exit (imports, W&B, data, training, the evaluations, the
test). The baseline runs from a git worktree of its commit (made here, removed at the end) with this checkout's
virtual environment; the runs alternate, baseline first, so that a slow drift of the machine hits both alike. The
comparison keeps the fastest run of each side. The machine's load average and the share of the CPU other processes
used during each run are recorded with it: on a shared machine, compare only runs taken under the same load.
Writes results/bench/<tag>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DEFAULT_BASELINE = "84b8786"
TARGET_SPEEDUP = 1.4  # issue 28: the faster of ours at most 1/1.4 of the faster baseline run
ACCURACY_SLACK = 1.0  # points of accuracy ours may lose


def _git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def make_worktree(commit: str, scratch: Path) -> Path:
    """A detached worktree of `commit` under `scratch`, with this checkout's virtual environment linked in."""
    path = scratch / f"baseline-{commit}"
    _git("worktree", "add", "--detach", "--force", str(path), commit)
    venv = (REPO / ".venv").resolve()
    if venv.exists():
        (path / ".venv").symlink_to(venv)
    return path


def run_training(tree: Path, run_dir: Path, epochs: int, extra: list[str]) -> dict[str, Any]:
    """One training run of the recipe from `tree` into the new folder `run_dir`; its wall time, the record's timing
    and accuracy, the load."""
    from experiments.bench.measure import CpuMeter

    command = [sys.executable, "-m", "experiments.train", "experiment=uea/JapaneseVowels", "seed=0",
               f"trainer.max_epochs={epochs}", f"hydra.run.dir={run_dir}", f"paths.runs_dir={run_dir.parent}", *extra]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    load_before, children_before = os.getloadavg(), os.times()
    meter = CpuMeter()
    started = time.perf_counter()
    completed = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    # the meter counts the training process among the "others" (it is a child of this one): take its CPU time out
    children = os.times()
    run_cpu = (children.children_user + children.children_system
               - children_before.children_user - children_before.children_system)
    busy = meter.background()
    others = None if busy is None else round(max(0.0, busy - run_cpu / (wall * (os.cpu_count() or 1))), 3)
    result: dict[str, Any] = {"command": " ".join(shlex.quote(a) for a in command[1:]), "wall_s": round(wall, 2),
                              "cpu_s": round(run_cpu, 1), "load_before": load_before, "load_after": os.getloadavg(),
                              "others_cpu_share": others}
    if completed.returncode != 0:
        return {**result, "error": completed.stderr[-2000:]}
    record = json.loads((run_dir / "metrics.json").read_text())
    return {**result, "accuracy": record["primary_value"], "timing": record["timing"], "git_sha": record["git_sha"]}


def compare(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest run of each side, their ratio and accuracies, and whether the issue's targets are met."""
    best = {}
    for side in ("baseline", "ours"):
        done = [r for r in runs if r["side"] == side and "error" not in r]
        best[side] = min(done, key=lambda r: r["wall_s"]) if done else None
    if not best["baseline"] or not best["ours"]:
        return {"best": best, "speedup": None, "meets_targets": False}
    speedup = best["baseline"]["wall_s"] / best["ours"]["wall_s"]
    accuracy_drop = best["baseline"]["accuracy"] - best["ours"]["accuracy"]
    return {"best": best, "speedup": round(speedup, 3), "accuracy_drop_points": round(accuracy_drop, 3),
            "meets_targets": speedup >= TARGET_SPEEDUP and accuracy_drop <= ACCURACY_SLACK}


def markdown(report: dict[str, Any]) -> str:
    summary = report["summary"]
    lines = [
        "# JapaneseVowels end to end on CPU: this checkout against an earlier commit",
        "",
        f"`{report['command']}`, {report['started_at']}; machine: {report['machine'].get('cpu_model')}, "
        f"{report['machine'].get('cpu_count')} CPUs, torch {report['machine'].get('torch')}.",
        f"Baseline `{report['baseline']}`, ours `{report['ours']}`; {report['epochs']} epochs, shipped defaults"
        + (f", ours with `{' '.join(report['ours_extra'])}`" if report["ours_extra"] else "") + ".",
        "",
        "| run | side | wall s | fit s | test s | accuracy % | load average before | others' CPU share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for index, run in enumerate(report["runs"], 1):
        timing = run.get("timing", {})
        lines.append(f"| {index} | {run['side']} | {run['wall_s']} | {timing.get('fit_s', '—')} | "
                     f"{timing.get('test_s', '—')} | {run.get('accuracy', 'fail')} | "
                     f"{'/'.join(f'{v:.2f}' for v in run['load_before'])} | {run.get('others_cpu_share')} |")
    if summary["speedup"] is not None:
        lines += ["", f"Fastest runs: baseline {summary['best']['baseline']['wall_s']} s, ours "
                  f"{summary['best']['ours']['wall_s']} s: **{summary['speedup']}x** (target {TARGET_SPEEDUP}x); "
                  f"accuracy {summary['best']['baseline']['accuracy']:.2f} -> {summary['best']['ours']['accuracy']:.2f} "
                  f"(at most {ACCURACY_SLACK:g} point lower). Targets met: {summary['meets_targets']}."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench.uea_speed", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default=DEFAULT_BASELINE, help=f"the commit to compare with ({DEFAULT_BASELINE})")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2, help="runs per side, alternating (baseline first)")
    parser.add_argument("--ours-extra", nargs="*", default=[], help="overrides for this checkout's runs only")
    parser.add_argument("--scratch", type=Path, default=None, help="where the worktree and the runs go (a temp dir)")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "bench")
    parser.add_argument("--tag", default="uea_speed")
    args = parser.parse_args(argv)
    args.argv = argv
    return args


def main(argv: list[str] | None = None) -> int:
    from experiments.bench.runner import machine_info
    from experiments.provenance import git_sha, utc_now
    from results.atomic_io import write_json_atomic, write_text_atomic

    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="uea-speed-"))
    scratch.mkdir(parents=True, exist_ok=True)
    baseline = _git("rev-parse", "--short", args.baseline)
    worktree = make_worktree(baseline, scratch)
    report: dict[str, Any] = {
        "command": "python -m experiments.bench.uea_speed " + " ".join(shlex.quote(a) for a in args.argv),
        "started_at": utc_now(), "machine": machine_info("cpu"), "baseline": baseline, "ours": git_sha(REPO),
        "epochs": args.epochs, "ours_extra": args.ours_extra, "runs": [],
    }
    try:
        for round_index in range(args.rounds):
            for side, tree, extra in (("baseline", worktree, []), ("ours", REPO, args.ours_extra)):
                run = run_training(tree, scratch / "runs" / f"{side}-{round_index}", args.epochs, extra)
                report["runs"].append({"side": side, "round": round_index, **run})
                print(f"{side:<8} round {round_index + 1}: {run['wall_s']:8.1f} s  accuracy "
                      f"{run.get('accuracy', 'failed')}  load {run['load_before'][0]:.2f}", flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=REPO, capture_output=True)
        if args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)
    report["summary"] = compare(report["runs"])
    write_json_atomic(args.out / f"{args.tag}.json", report)
    write_text_atomic(args.out / f"{args.tag}.md", markdown(report))
    print(markdown(report))
    return 0 if all("error" not in run for run in report["runs"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
