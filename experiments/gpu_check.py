"""`make gpu-check`: what anyone with a GPU runs once, in at most 8 minutes on one H100.

    python -m experiments.gpu_check                  # on a CUDA GPU: results/bench/gpu_check.md and the files it names
    python -m experiments.gpu_check --device cpu     # a small version on the CPU (the test suite runs it)

Three stages, each in its own process with a time limit, each recorded whether it passes, fails or runs out of
time (a failing stage does not stop the next):
1. the `gpu` tests (on a CPU they collect and skip);
2. the attention benchmark (`experiments.bench`) in bf16 and fp32 at 1K-64K tokens: Flow-Attention's backends
   (auto = batched on a GPU, blocked), the official formulation, causal chunked against the materialised official
   one, PyTorch's SDPA and FlashAttention, and the matmul ceiling;
3. `experiments.train_speed` for every domain's paper model in bf16, flow and softmax eager, flow compiled, and the
   linear layers' matmuls alone.
Writes <out>/gpu_check.md (and .json) with the machine, the versions, the commit and every stage's outcome, and the
benchmarks' own reports beside it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
GPU_TESTS = ("tests",)  # every test marked `gpu` (selected by -m gpu), wherever it is
ATTENTION_VARIANTS = ("flow", "flow_blocked", "flow_official", "flow_causal", "flow_causal_materialised", "softmax",
                      "softmax_causal", "softmax_flash", "softmax_flash_causal", "matmul")
DOMAINS = ("uea", "lra_text", "imagenet", "wikitext103", "d4rl")


def stages(device: str, out: Path) -> list[dict[str, Any]]:
    """The stages' commands and time limits (seconds) for `device`."""
    python = sys.executable
    if device == "cuda":
        tests = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "--runslow", *GPU_TESTS]
        bench = [python, "-m", "experiments.bench", "--device", "cuda", "--dtypes", "bfloat16,float32",
                 "--lengths", "1024,4096,16384,65536", "--variants", ",".join(ATTENTION_VARIANTS), "--rounds", "1",
                 "--repeats", "3", "--min-repeats", "2", "--min-time", "0.1", "--time-budget", "2",
                 "--quiet-budget", "0", "--out", str(out), "--tag", "gpu_check_attention", "--no-figure"]
        speed = [python, "-m", "experiments.train_speed", "--device", "cuda", "--precision", "bf16-mixed",
                 "--workloads", ",".join(DOMAINS), "--attentions", "flow,softmax", "--compiled-attentions", "flow",
                 "--modes", "eager,compiled,matmul", "--timeout", "150", "--warmup", "3", "--steps", "8",
                 "--out", str(out),
                 "--tag", "gpu_check_train_speed"]
        # 8 minutes in all; compiling five models takes most of train_speed's share
        return [{"name": "gpu tests", "command": tests, "limit": 90},
                {"name": "attention benchmark (bf16, fp32)", "command": bench, "limit": 150},
                {"name": "train_speed (bf16)", "command": speed, "limit": 240}]
    tests = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests/test_flow_gpu.py"]
    bench = [python, "-m", "experiments.bench", "--device", "cpu", "--dtypes", "float32", "--lengths", "256",
             "--variants", "flow,flow_official", "--modes", "backward", "--rounds", "1", "--repeats", "2",
             "--min-repeats", "1", "--min-time", "0", "--gemm-size", "0", "--quiet-budget", "0",
             "--out", str(out), "--tag", "gpu_check_attention", "--no-figure"]
    speed = [python, "-m", "experiments.train_speed", "--tiny", "--workloads", "uea", "--attentions", "flow",
             "--modes", "eager,compiled", "--out", str(out), "--tag", "gpu_check_train_speed"]
    return [{"name": "gpu tests (they skip on a CPU)", "command": tests, "limit": 60},
            {"name": "attention benchmark (fp32, small)", "command": bench, "limit": 60},
            {"name": "train_speed (tiny)", "command": speed, "limit": 120}]


def run_stage(stage: dict[str, Any]) -> dict[str, Any]:
    """Run one stage; its outcome, seconds and the tail of its output."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    started = time.perf_counter()
    try:
        completed = subprocess.run(stage["command"], cwd=REPO, env=env, capture_output=True, text=True,
                                   timeout=stage["limit"])
        outcome = "passed" if completed.returncode == 0 else f"failed (exit code {completed.returncode})"
        output = completed.stdout + completed.stderr
    except subprocess.TimeoutExpired as expired:
        outcome = f"out of time ({stage['limit']} s)"
        output = (expired.stdout or b"").decode(errors="replace") if isinstance(expired.stdout, bytes) else (
            expired.stdout or "")
    return {"name": stage["name"], "command": " ".join(shlex.quote(part) for part in stage["command"][1:]),
            "limit_s": stage["limit"], "outcome": outcome, "seconds": round(time.perf_counter() - started, 1),
            "output_tail": output[-3000:]}


def markdown(report: dict[str, Any], out: Path) -> str:
    machine = report["machine"]
    lines = [
        "# GPU check" if report["device"] == "cuda" else "# GPU check, small CPU version",
        "",
        f"`{report['command']}` at commit `{report['git_sha']}`, {report['started_at']}, {report['wall_s']} s in all.",
        f"Machine: {machine.get('gpu') or machine.get('cpu_model')}; torch {machine.get('torch')}, "
        f"{machine.get('cpu_count')} CPUs; load average at the start "
        f"{'/'.join(f'{v:.2f}' for v in machine.get('load_average_at_start') or ())}.",
        "",
        "| stage | outcome | seconds | limit |",
        "|---|---|---|---|",
        *[f"| {s['name']} | {s['outcome']} | {s['seconds']} | {s['limit_s']} |" for s in report["stages"]],
    ]
    tests = report["stages"][0]["output_tail"].strip().splitlines()
    if tests:
        lines += ["", f"gpu tests: `{tests[-1]}`"]
    for stem, title in (("gpu_check_attention", "Attention benchmark"), ("gpu_check_train_speed", "Training speed")):
        path = out / f"{stem}.md"
        if path.is_file():
            body = path.read_text(encoding="utf-8").split("\n", 1)[1]  # without its own title
            lines += ["", f"## {title} (`{path.name}`)", body.strip()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from experiments.bench.runner import machine_info
    from experiments.provenance import git_sha, utc_now
    from results.atomic_io import write_json_atomic, write_text_atomic

    parser = argparse.ArgumentParser(prog="python -m experiments.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--out", type=Path, default=None,
                        help="default results/bench on a GPU, experiments/runs/gpu_check on a CPU (untracked)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    out = args.out or (REPO / "results" / "bench" if args.device == "cuda" else REPO / "experiments" / "runs" / "gpu_check")
    out.mkdir(parents=True, exist_ok=True)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("make gpu-check needs a CUDA GPU (torch sees none); `make gpu-check DEVICE=cpu` runs the "
                             "small CPU version")
    started = time.perf_counter()
    report: dict[str, Any] = {
        "command": "python -m experiments.gpu_check " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "device": args.device, "started_at": utc_now(), "git_sha": git_sha(REPO), "machine": machine_info(args.device),
        "stages": [],
    }
    for stage in stages(args.device, out):
        result = run_stage(stage)
        report["stages"].append(result)
        print(f"{result['name']}: {result['outcome']} in {result['seconds']} s", flush=True)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    write_json_atomic(out / "gpu_check.json", report)
    write_text_atomic(out / "gpu_check.md", markdown(report, out))
    print(f"wrote {out / 'gpu_check.md'}")
    return 0 if all(stage["outcome"] == "passed" for stage in report["stages"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
