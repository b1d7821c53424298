"""Training and inference throughput (images/s) and peak memory of the hierarchical network, flow against softmax.

    python -m experiments.vision_throughput                          # CPU: 224, 384, 512 at batch 2
    python -m experiments.vision_throughput --device cuda --batch 64 --tag vision_throughput_cuda

The network is `experiment=imagenet/hierarchical` as composed for training (1000 classes), with each attention at
each image size; softmax's stage 1 then attends over 3136 (224), 9216 (384) or 16384 (512) tokens. Each
(attention, size) runs in a fresh process: inference (eval, no gradients) first, then training steps (forward,
backward, AdamW update; DropPath on); bf16 autocast on a GPU, fp32 on CPU. Time = median over `--repeats` calls
after `--warmup` calls, from the least-contended of `--rounds` rounds (each round measures every configuration
once, in alternating order; other users of a shared CPU slow some rounds down). Peak memory = the high-water mark
of the timed calls above the memory held before them (model, inputs, AdamW's state), i.e. activations, gradients
and workspace: the resident set on CPU, `torch.cuda.max_memory_allocated` on a GPU. Ratios compare measurements
of one run; absolute numbers depend on the machine and its load. On CPU the ratios compare images per CPU-second
of the measuring process (one torch thread by default), which others' load on a shared machine hardly changes,
where wall-clock images per second swing with it; both are recorded. On a GPU they compare wall-clock images/s.
Writes results/bench/<tag>.json (every measurement, settings, machine) and results/bench/<tag>.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from tabulate import tabulate

from results.atomic_io import write_text_atomic

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "imagenet/hierarchical"
IMAGENET_CLASSES = 1000
MODES = ("inference", "training")


def build_network(attention: str, image_size: int):
    """The training config's network with `attention` at `image_size`."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from results.recipe import register_resolvers

    register_resolvers()
    overrides = [f"experiment={EXPERIMENT}", f"model/attention={attention}", f"data.image_size={image_size}"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    return instantiate(cfg.model, num_classes=IMAGENET_CLASSES, image_size=image_size, _convert_="all")


class PeakMemory:
    """High-water mark of memory above what is held when a phase starts: the resident set's peak (VmHWM, reset
    through /proc/self/clear_refs) on CPU, the allocator's peak on CUDA."""

    def __init__(self, device: str) -> None:
        import torch

        self.device, self.torch = device, torch
        self.baseline = 0

    def start(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.reset_peak_memory_stats()
            self.baseline = self.torch.cuda.memory_allocated()
            return
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # 5: set the peak to the current resident set
        self.baseline = _status_bytes("VmRSS")

    def peak_mib(self) -> float:
        if self.device == "cuda":
            peak = self.torch.cuda.max_memory_allocated()
        else:
            peak = _status_bytes("VmHWM")
        return max(0, peak - self.baseline) / 2**20


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} line; the CPU memory measurement needs Linux")


def _timed(call: Callable[[], None], repeats: int, sync: Callable[[], None]) -> tuple[list[float], list[float]]:
    """(wall-clock seconds, CPU seconds of this process) of each call."""
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        call()
        sync()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return wall, cpu


def measure(config: dict[str, Any]) -> dict[str, Any]:
    """Inference then training of one (attention, image size), in this process."""
    import torch

    if config["threads"]:
        torch.set_num_threads(config["threads"])
    device, batch = config["device"], config["batch"]
    torch.manual_seed(0)
    model = build_network(config["attention"], config["image_size"]).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(batch, 3, config["image_size"], config["image_size"], device=device)
    labels = torch.randint(0, IMAGENET_CLASSES, (batch,), device=device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    memory = PeakMemory(device)

    def infer() -> None:
        with torch.inference_mode(), autocast:
            model(images)

    def train_step() -> None:
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    record = {**config, "threads_used": torch.get_num_threads()}
    for mode, call, train in (("inference", infer, False), ("training", train_step, True)):
        model.train(train)
        for _ in range(config["warmup"]):  # also creates AdamW's state, which the peak then leaves out
            call()
        sync()
        memory.start()
        wall, cpu = _timed(call, config["repeats"], sync)
        record[mode] = {"images_per_s": batch / statistics.median(wall), "times_s": wall, "cpu_s": cpu,
                        "images_per_cpu_s": batch / statistics.median(cpu), "peak_mib": memory.peak_mib()}
    return record


def speed_key(device: str) -> str:
    """The speed that ratios compare: images per CPU-second on CPU (others' load on a shared machine hardly moves
    it), wall-clock images per second on a GPU."""
    return "images_per_cpu_s" if device == "cpu" else "images_per_s"


def run(configs: Sequence[dict[str, Any]], rounds: int = 1) -> list[dict[str, Any]]:
    """Measure each configuration `rounds` times, each time in a fresh process (one model's heap never helps
    another's), alternating the order between rounds; keep the least-contended round of each mode."""
    measured: list[list[dict[str, Any]]] = [[] for _ in configs]
    context = multiprocessing.get_context("spawn")
    for round_index in range(rounds):
        order = list(range(len(configs)))
        for i in order if round_index % 2 == 0 else order[::-1]:
            try:
                with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                    record = pool.submit(measure, configs[i]).result()
            except Exception as error:  # an out-of-memory kill or a failing op: recorded, the others still run
                record = {**configs[i], "error": f"{type(error).__name__}: {error}"[:300]}
            measured[i].append(record)
            print(f"round {round_index + 1}, {configs[i]['attention']} @ {configs[i]['image_size']}: {_brief(record)}",
                  flush=True)
    return [least_contended(config, records, speed_key(config["device"])) for config, records in zip(configs, measured)]


def least_contended(
    config: dict[str, Any], rounds: Sequence[dict[str, Any]], key: str = "images_per_s"
) -> dict[str, Any]:
    """Per mode, the round with the highest `key` (the one others' load slowed least); every round is kept."""
    done = [record for record in rounds if "error" not in record]
    if not done:
        return {**config, "error": rounds[-1]["error"], "rounds": list(rounds)}
    best = {mode: max((record[mode] for record in done), key=lambda m: m[key]) for mode in MODES}
    return {**config, **best, "rounds": list(rounds)}


def _brief(record: dict[str, Any]) -> str:
    if "error" in record:
        return record["error"]
    return ", ".join(f"{mode} {record[mode]['images_per_s']:.2f} img/s ({record[mode]['images_per_cpu_s']:.2f} per "
                     f"CPU-s), {record[mode]['peak_mib']:.0f} MiB" for mode in MODES)


def ratio_rows(
    records: Sequence[dict[str, Any]], key: str, fast: str = "flow", slow: str = "softmax"
) -> list[list[Any]]:
    """Per image size: `fast`'s speed-up over `slow` (ratio of `key`) and memory saving (peak ratio), per mode."""
    by_key = {(r["attention"], r["image_size"]): r for r in records if "error" not in r}
    rows = []
    for size in sorted({r["image_size"] for r in records}):
        pair = by_key.get((fast, size)), by_key.get((slow, size))
        if None in pair:
            continue
        row = [size]
        for mode in ("training", "inference"):
            ours, theirs = pair[0][mode], pair[1][mode]
            row += [f"{ours[key] / theirs[key]:.2f}x",
                    f"{theirs['peak_mib'] / max(ours['peak_mib'], 1e-9):.2f}x"]
        rows.append(row)
    return rows


def _loads(machine: dict[str, Any], when: str) -> str:
    loads = machine.get("load_average", {}).get(when)
    return "unknown" if loads is None else ", ".join(f"{load:.1f}" for load in loads)


def render_markdown(report: dict[str, Any]) -> str:
    """The measurements and the flow/softmax ratios of one run."""
    records = report["records"]
    measured = [
        [r["attention"], r["image_size"],
         *(f"{r[m][k]:.3f}" for m in ("training", "inference") for k in ("images_per_s", "images_per_cpu_s")),
         *(f"{r[m]['peak_mib']:.0f}" for m in ("training", "inference"))]
        if "error" not in r else [r["attention"], r["image_size"], r["error"], "", "", "", "", ""]
        for r in records
    ]
    settings, machine = report["settings"], report["machine"]
    key = speed_key(settings["device"])
    speed = "images per CPU-second" if key == "images_per_cpu_s" else "images per second"
    return "\n".join([
        "# Hierarchical network throughput: flow against softmax",
        "",
        "<!-- Generated by experiments/vision_throughput.py. Do not edit by hand: rerun the command below. -->",
        "",
        f"Command: `{report['command']}` (started {report['started_at']}, wall {report['wall_s']:.0f} s, "
        f"git {report['git_sha']}).",
        "",
        f"Machine: {machine['cpu_count']} CPU cores, {machine['platform']}; torch {machine['torch']}, device "
        f"{settings['device']}{' (' + machine['gpu'] + ')' if machine.get('gpu') else ''}; load average (1, 5, 15 "
        f"min) {_loads(machine, 'start')} at the start, {_loads(machine, 'end')} at the end. Batch "
        f"{settings['batch']}, median of {settings['repeats']} calls after {settings['warmup']} warm-up call(s), "
        f"the least-contended of {settings.get('rounds', 1)} round(s), {settings.get('threads') or 'default'} "
        "torch thread(s); each (attention, size) in a fresh process. Peak memory: above what the model, inputs and "
        "optimiser hold.",
        "",
        f"## Ratios (flow / softmax, same run; speed in {speed})",
        "",
        tabulate(ratio_rows(records, key), headers=["image", "training speed-up", "training memory saving",
                                               "inference speed-up", "inference memory saving"], tablefmt="github"),
        "",
        "## Measurements",
        "",
        tabulate(measured, headers=["attention", "image", "training img/s", "training img/CPU-s", "inference img/s",
                                    "inference img/CPU-s", "training peak MiB", "inference peak MiB"],
                 tablefmt="github"),
        "",
    ])


def main(argv: Sequence[str] | None = None) -> None:
    import torch

    from experiments.provenance import git_sha, utc_now

    parser = argparse.ArgumentParser(prog="python -m experiments.vision_throughput",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 384, 512])
    parser.add_argument("--attentions", nargs="+", default=["flow", "softmax"])
    parser.add_argument("--batch", type=int, default=2, help="images per call (default 2: CPU-sized)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="runs of every configuration (the CPU is shared)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per process (default: 1 on CPU, where idle threads' spinning would count "
                             "as CPU time; torch's default on a GPU)")
    parser.add_argument("--tag", default="vision_throughput", help="output name under --out-dir")
    parser.add_argument("--out-dir", type=Path, default=REPO / "results" / "bench")
    args = parser.parse_args(argv)
    if args.threads is None:
        args.threads = 1 if args.device == "cpu" else 0

    settings = {key: getattr(args, key) for key in ("batch", "device", "warmup", "repeats", "threads")}
    settings["rounds"] = args.rounds
    configs = [{"attention": a, "image_size": s, **settings} for s in args.sizes for a in args.attentions]
    started, start, load_at_start = utc_now(), time.perf_counter(), os.getloadavg()
    records = run(configs, args.rounds)
    report = {
        "command": " ".join(["python -m experiments.vision_throughput", *(argv if argv is not None else sys.argv[1:])]),
        "started_at": started,
        "finished_at": utc_now(),
        "wall_s": time.perf_counter() - start,
        "git_sha": git_sha(),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                    "load_average": {"start": load_at_start, "end": os.getloadavg()}},
        "settings": settings,
        "records": records,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out_dir / f"{args.tag}.json", json.dumps(report, indent=1) + "\n")
    markdown = render_markdown(report)
    write_text_atomic(args.out_dir / f"{args.tag}.md", markdown)
    print(markdown)


if __name__ == "__main__":
    main()
