"""Collect a dataset in D4RL's layout from gymnasium rollouts, with no download.

    python -m tasks.d4rl.collect --env hopper --policy random --episodes 1000 --out data/d4rl/hopper-random.hdf5
    python -m tasks.d4rl.collect --env hopper --policy <run dir> --episodes 100 --out data/d4rl/hopper-ours.hdf5

`--policy random` draws uniform actions; `--policy <run dir>` plays a Decision Transformer trained by
`experiments.train` (its best checkpoint, else its last), conditioned on `--target` (default: the run's reported
target), which gives datasets of chosen quality. Episode j resets with seed `--seed + j`. The file holds
`observations`, `actions`, `rewards`, `terminals` (the episode ended by termination), `timeouts` (it hit
`--max-episode-steps`) and `next_observations`, plus the provenance as attributes; name it `<env>-<anything>.hdf5`
under `$DATA_DIR/d4rl/` and train on it with `experiment=d4rl/base data.dataset=<anything but .hdf5>`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from results.atomic_io import atomic_path
from tasks.d4rl.environments import ENV_VERSIONS, GYMNASIUM_NAMES, gymnasium_id, make_env, require_gymnasium
from tasks.d4rl.rollout import Episode, TransformerPolicy, run_episodes
from tasks.d4rl.trajectories import D4RL_KEYS
from tasks.d4rl.windows import Conditioning


def to_d4rl_arrays(episodes: list[Episode]) -> dict[str, np.ndarray]:
    """The recorded episodes as D4RL's arrays (N rows, one per step)."""
    arrays = {
        key: np.concatenate([np.stack(e.transitions[key]) for e in episodes]).astype(np.float32)
        for key in ("observations", "actions", "rewards", "next_observations")
    }
    last = np.concatenate([np.arange(e.length) == e.length - 1 for e in episodes])
    terminated = np.concatenate([np.full(e.length, e.terminated) for e in episodes])
    arrays["terminals"] = last & terminated
    arrays["timeouts"] = last & ~terminated
    return arrays


def write_d4rl_file(path: str | Path, arrays: dict[str, np.ndarray], attributes: dict[str, object]) -> Path:
    """Write `arrays` (at least D4RL's five keys) as an HDF5 file, atomically; `attributes` go on the root."""
    import h5py

    missing = [key for key in D4RL_KEYS if key not in arrays]
    if missing:
        raise ValueError(f"a D4RL file needs the arrays {missing}")
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as handle:
        for key, value in arrays.items():
            handle.create_dataset(key, data=value)
        for key, value in attributes.items():
            handle.attrs[key] = value
    return Path(path)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tasks.d4rl.collect", description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", required=True, choices=sorted(GYMNASIUM_NAMES), help="environment family")
    parser.add_argument(
        "--policy", required=True, help="'random', or a run directory of a trained Decision Transformer"
    )
    parser.add_argument("--episodes", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True, help="the HDF5 file to write")
    parser.add_argument("--env-version", default="v4", choices=ENV_VERSIONS)
    parser.add_argument("--max-episode-steps", type=int, default=1000)
    parser.add_argument(
        "--seed", type=int, default=0, help="episode j resets with seed + j (and the random policy's draws)"
    )
    parser.add_argument("--target", type=float, help="return to condition a trained policy on (default: its run's)")
    parser.add_argument("--num-envs", type=int, default=100, help="episodes stepped together")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.episodes < 1:
        print("error: --episodes must be >= 1", file=sys.stderr)
        return 2
    gym = require_gymnasium()
    env_id = gymnasium_id(args.env, args.env_version)
    seeds = [args.seed + episode for episode in range(args.episodes)]
    if args.policy == "random":
        from tasks.d4rl.policy import RandomPolicy

        env = make_env(env_id)
        low, high, state_dim = env.action_space.low, env.action_space.high, env.observation_space.shape[0]
        env.close()
        policy, target, source = RandomPolicy(low, high, args.seed), 0.0, "random"
        conditioning = Conditioning.identity(state_dim)
    else:
        from tasks.d4rl.policy import load_trained_policy

        trained = load_trained_policy(args.policy)
        if trained.env_id.split("-")[0] != env_id.split("-")[0]:
            print(f"error: {args.policy} was trained for {trained.env_id}, not {env_id}", file=sys.stderr)
            return 2
        policy, conditioning = TransformerPolicy(trained.model), trained.conditioning
        target = trained.report_target if args.target is None else args.target
        source = str(trained.checkpoint)
    episodes = run_episodes(
        policy,
        env_id,
        target,
        seeds,
        conditioning,
        num_envs=args.num_envs,
        max_episode_steps=args.max_episode_steps,
        record=True,
    )
    arrays = to_d4rl_arrays(episodes)
    attributes = {
        "env_id": env_id,
        "policy": source,
        "target_return": target,
        "seeds": np.asarray(seeds),
        "gymnasium": gym.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_d4rl_file(args.out, arrays, attributes)
    returns = np.array([episode.episode_return for episode in episodes])
    print(
        f"wrote {args.out}: {len(episodes)} episodes, {len(arrays['rewards'])} steps on {env_id}; "
        f"return mean {returns.mean():.1f} (min {returns.min():.1f}, max {returns.max():.1f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
