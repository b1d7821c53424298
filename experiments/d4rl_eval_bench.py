"""Speed of the Decision Transformer's evaluation: vectorised rollouts against the sequential loop, one run.

    python -m experiments.d4rl_eval_bench [--env halfcheetah] [--episodes 100] [--max-episode-steps 1000]
        [--attention flow softmax] [--widths 256 64] [--device cpu] [--threads 1 2] [--override KEY=VALUE ...]
        [--out results/bench]

Both play the same episodes (seeds 0 … episodes−1) with the same model, built from the training config
(`experiment=d4rl/base`, random weights; `--widths` also measures narrower models, d_ff = 4 × width): the
vectorised evaluation (tasks/d4rl/rollout.py, `run_episodes`: every episode in one gymnasium vector env, one
batched forward per step) and the loop of kzl's and CORL's code (`run_episodes_sequentially`: one environment, one
episode at a time, one forward per step). HalfCheetah by default: its episodes never terminate, so every one lasts
`--max-episode-steps` and both sides do the same work. The report gives both times, their ratio, and how the two
sides' returns compare. They are not expected to be identical: each action agrees up to float rounding (a batched,
padded forward rounds differently from a single one), which MuJoCo's dynamics amplify over an episode, so single
returns drift apart on long episodes. What must hold is equal means: the report gives the mean paired difference
(vectorised − sequential) with its 95% confidence interval, which should contain 0, and the largest single
difference, which shows the drift. It goes to `<out>/d4rl_eval.{json,md}`; compare ratios within one run, not times
across runs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from tabulate import tabulate

from experiments.provenance import git_sha, package_versions, utc_now
from results.atomic_io import write_text_atomic
from results.recipe import register_resolvers
from tasks.d4rl.environments import GYMNASIUM_NAMES, gymnasium_id, make_env
from tasks.d4rl.rollout import TransformerPolicy, run_episodes, run_episodes_sequentially
from tasks.d4rl.windows import Conditioning

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def build_model(attention: str, overrides: Sequence[str], state_dim: int, act_dim: int) -> tuple[torch.nn.Module, Any]:
    """The Decision Transformer of the training config (random weights) and that config."""
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["experiment=d4rl/base", "data.dataset=bench", f"model/attention={attention}", *overrides],
        )
    torch.manual_seed(0)
    model = instantiate(
        cfg.model,
        state_dim=state_dim,
        act_dim=act_dim,
        context_length=cfg.data.context_length,
        max_timestep=cfg.data.max_timestep,
        _convert_="all",
    )
    return model.eval(), cfg


def measure(args: argparse.Namespace) -> dict[str, Any]:
    env_id = gymnasium_id(args.env, args.env_version)
    env = make_env(env_id)
    state_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    env.close()
    model, cfg = build_model(args.attention, args.override, state_dim, act_dim)
    model.to(args.device)
    conditioning = Conditioning(
        np.zeros(state_dim, np.float32),
        np.ones(state_dim, np.float32),
        float(cfg.data.return_scale),
        int(cfg.data.context_length),
        int(cfg.data.max_timestep),
        str(cfg.data.padding),
    )
    target = float(cfg.eval.paper_targets[args.env][0])
    seeds = list(range(args.episodes))
    started = time.perf_counter()
    vectorised = run_episodes(
        TransformerPolicy(model),
        env_id,
        target,
        seeds,
        conditioning,
        num_envs=args.episodes,
        max_episode_steps=args.max_episode_steps,
    )
    vectorised_s = time.perf_counter() - started
    started = time.perf_counter()
    sequential = run_episodes_sequentially(
        model, env_id, target, seeds, conditioning, max_episode_steps=args.max_episode_steps
    )
    sequential_s = time.perf_counter() - started
    returns = (np.array([e.episode_return for e in vectorised]), np.array([e.episode_return for e in sequential]))
    steps = int(sum(e.length for e in vectorised))
    return {
        "env_id": env_id,
        "attention": args.attention,
        "model": {key: cfg.model[key] for key in ("d_model", "n_layers", "n_heads", "d_ff")},
        "context_length": int(cfg.data.context_length),
        "episodes": args.episodes,
        "steps": steps,
        "threads": torch.get_num_threads(),
        "same_lengths": [e.length for e in vectorised] == [e.length for e in sequential],
        "mean_return": {"vectorised": float(returns[0].mean()), "sequential": float(returns[1].mean())},
        "return_difference": paired_difference(returns[0], returns[1]),
        "max_return_difference": float(np.max(np.abs(returns[0] - returns[1]))),
        "vectorised_s": round(vectorised_s, 3),
        "sequential_s": round(sequential_s, 3),
        "speedup": round(sequential_s / vectorised_s, 2),
        "vectorised_steps_per_s": round(steps / vectorised_s, 1),
        "sequential_steps_per_s": round(steps / sequential_s, 1),
    }


def paired_difference(vectorised: np.ndarray, sequential: np.ndarray) -> dict[str, float]:
    """Mean of the per-episode differences of return (vectorised − sequential) and the half-width of its 95%
    confidence interval (normal approximation; 0 for a single episode)."""
    difference = vectorised - sequential
    spread = float(difference.std(ddof=1)) if len(difference) > 1 else 0.0
    return {"mean": float(difference.mean()), "ci95": 1.96 * spread / np.sqrt(len(difference))}


def markdown(result: dict[str, Any], command: str) -> str:
    rows = [
        [
            m["attention"],
            f"{m['model']['d_model']}×{m['model']['n_layers']}",
            m["threads"],
            m["episodes"],
            m["steps"],
            m["sequential_s"],
            m["vectorised_s"],
            f"{m['speedup']}×",
            f"{m['mean_return']['sequential']:.1f} / {m['mean_return']['vectorised']:.1f}",
            f"{m['return_difference']['mean']:.2g} ± {m['return_difference']['ci95']:.2g}",
            f"{m['max_return_difference']:.2g}",
        ]
        for m in result["measurements"]
    ]
    headers = [
        "attention",
        "width×layers",
        "threads",
        "episodes",
        "env steps",
        "sequential (s)",
        "vectorised (s)",
        "speed-up",
        "mean return (seq. / vec.)",
        "mean Δ return (95% CI)",
        "max |Δ return|",
    ]
    device, first = result["device"], result["measurements"][0]
    return (
        "# Decision Transformer evaluation: vectorised against sequential\n\n"
        f"`{command}` on commit `{result['git_sha']}`, {result['time']}, {device['name']} "
        f"({device['cpu_count']} cores), {first['env_id']}, {first['steps'] // first['episodes']} steps per episode. "
        "Both sides play the same episodes with the same "
        "random-weight model; the speed-up is the ratio of their times in this run. The two sides are the same in "
        "this sense: the same episodes, each action equal up to float rounding (batched and single matrix products "
        "round differently), and equal mean returns. HalfCheetah's dynamics amplify the rounding over an episode, "
        "so single returns drift apart with the episode's length (max |Δ return|) while the mean paired difference "
        "stays within its 95% confidence interval of 0; the tests hold single returns equal on short episodes.\n\n" + tabulate(rows, headers=headers, tablefmt="github") + "\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.d4rl_eval_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", default="halfcheetah", choices=sorted(GYMNASIUM_NAMES))
    parser.add_argument("--env-version", default="v4")
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--max-episode-steps", type=int, default=1000)
    parser.add_argument("--attention", nargs="+", default=["flow"], help="one measurement per attention")
    parser.add_argument("--override", nargs="*", default=[], help="Hydra overrides of the model, e.g. model.n_layers=1")
    parser.add_argument("--widths", nargs="+", type=int, help="model widths to measure (default: the config's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", nargs="+", type=int, help="torch thread counts to measure (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path("results/bench"))
    args = parser.parse_args(argv)
    measurements = []
    for threads, width in itertools.product(args.threads or [torch.get_num_threads()], args.widths or [None]):
        torch.set_num_threads(threads)
        sized = [] if width is None else [f"model.d_model={width}", f"model.d_ff={4 * width}"]
        for attention in args.attention:
            variant = {**vars(args), "attention": attention, "override": [*sized, *args.override]}
            measurement = measure(argparse.Namespace(**variant))
            print(json.dumps(measurement), flush=True)
            measurements.append(measurement)
    name = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else (platform.processor() or platform.machine())
    )
    result = {
        "time": utc_now(),
        "git_sha": git_sha(),
        "versions": package_versions(),
        "device": {"name": name, "cpu_count": os.cpu_count()},
        "measurements": measurements,
    }
    command = "python -m experiments.d4rl_eval_bench " + shlex.join(list(argv if argv is not None else sys.argv[1:]))
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / "d4rl_eval.json", json.dumps(result, indent=1) + "\n")
    write_text_atomic(args.out / "d4rl_eval.md", markdown(result, command.strip()))
    print(markdown(result, command.strip()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
