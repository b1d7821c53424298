"""Fetch the paper's nine D4RL datasets and check them: `make data-d4rl` (`python -m tasks.d4rl.download`).

Each file comes from D4RL's own server (rail.eecs.berkeley.edu, over https; D4RL's code names http) and is saved as
`$DATA_DIR/d4rl/<name>.hdf5` (e.g. `hopper-medium-replay-v2.hdf5`) by `tasks.common.download`: with a progress bar,
resuming an interrupted download, and checked against the size and SHA-256 that TensorFlow Datasets records for it
(D4RL publishes none). The hash is recorded beside the file (`<name>.hdf5.sha256`), and every later run checks the
file against it. A file already there, or in D4RL's cache (`$D4RL_DATASET_DIR`, with D4RL's underscore names), is
not fetched again. Every file is then checked: the five arrays of D4RL's layout, their common length, the state and
action sizes of its environment, finite values, at least one episode, and rewards that replaying some of its
transitions in that environment gives back (tasks/d4rl/reward_check.py). Without network, the message gives each URL
and where to put the file by hand.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from results.roots import data_root
from tasks.common.download import ChecksumError, Source, verify_record
from tasks.common.download import fetch as fetch_source
from tasks.d4rl.environments import env_family, gymnasium_id, make_env
from tasks.d4rl.reward_check import RewardCheck, check_rewards, mismatch_message
from tasks.d4rl.trajectories import (
    D4RLDataError,
    Trajectories,
    d4rl_file_names,
    episodes_of,
    find_d4rl_file,
    read_d4rl_arrays,
)

ENVIRONMENTS = ("halfcheetah", "hopper", "walker2d")
QUALITIES = ("medium", "medium-replay", "medium-expert")
PAPER_DATASETS = tuple(f"{env}-{quality}-v2" for quality in QUALITIES for env in ENVIRONMENTS)
BASE_URL = "https://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2"
COMMAND = "make data-d4rl"
# state and action sizes of each environment family (gymnasium's v4 environments take the same)
SIZES = {"halfcheetah": (17, 6), "hopper": (11, 3), "walker2d": (17, 6)}
# (bytes, SHA-256) of each file, as TensorFlow Datasets records them for D4RL's server (its d4rl checksums.tsv)
CHECKSUMS = {
    "halfcheetah-medium-v2": (237_727_262, "41324e8487a9556d8cfa4538827f8937f4d63dae3030825ebc9f3a726ed08ca0"),
    "hopper-medium-v2": (152_756_557, "5bdf1bc4a713c82941de44633df669b36c89850b652a25985166796d25cf71a0"),
    "walker2d-medium-v2": (232_254_996, "cf00f43add04c17fdfc2958dd581dea0851b2e5bedbe6fda073758a8f841aeda"),
    "halfcheetah-medium-replay-v2": (59_448_533, "48d494a4770c11f48260736dec090b78bdca8375647ed4d24bfa5b6610c7f683"),
    "hopper-medium-replay-v2": (75_854_457, "e121c5f7c9857a307baa9edc6a2c3b48e85fedb9ac316ecddd0f48ca7ef4e39b"),
    "walker2d-medium-replay-v2": (86_323_963, "e75de96a4f77acf7d4e0d6fdf0d7ccb177c26c44bb4388e4fd99f543ccfa18db"),
    "halfcheetah-medium-expert-v2": (474_567_252, "015db75dae5bbe8e94029b71fa0bafc2073365df0c94744e71031189f3f79c06"),
    "hopper-medium-expert-v2": (304_537_315, "9d51ad87f8c905be3880d84c6140bcdb7fbf39a19e046a237f238ba34fec9e26"),
    "walker2d-medium-expert-v2": (462_197_079, "6b8d7f868c45bbaedf460be797fb7271b46dee6ebe45fe7a64319f2005b59a04"),
}


def dataset_url(name: str) -> str:
    """D4RL's download address of a v2 locomotion dataset (its files carry the underscore name)."""
    return f"{BASE_URL}/{d4rl_file_names(name)[-1]}"


def source(name: str) -> Source:
    """Dataset `name` as a download: our file name, D4RL's address, and its recorded size and hash."""
    size, sha256 = CHECKSUMS.get(name, (None, None))
    origin = "as TensorFlow Datasets records it for D4RL's server"
    return Source(f"{name}.hdf5", (dataset_url(name),), size=size, sha256=sha256, origin=origin)


def check_file(path: Path, name: str) -> list[str]:
    """Problems with one dataset file (empty when it is usable); a bad file is reported, never raised."""
    try:
        arrays = read_d4rl_arrays(path)
        expected = SIZES[env_family(name)]
        found = (arrays["observations"].shape[1], arrays["actions"].shape[1])
        if found != expected:
            sizes = f"states of size {found[0]} and actions of size {found[1]}"
            return [f"{path}: {sizes}, expected {expected[0]} and {expected[1]}"]
        trajectories = episodes_of(path, arrays)
        if trajectories.num_episodes:
            check = _replay_rewards(name, trajectories)
            if not check.passed:
                return [mismatch_message(path, name, check)]
    except (D4RLDataError, ImportError) as error:
        return [str(error)]
    except (ValueError, OSError, KeyError, TypeError) as error:  # h5py and numpy on content no check foresaw
        return [f"{path}: unreadable ({type(error).__name__}: {error}); delete it and fetch it again"]
    return [] if trajectories.num_episodes else [f"{path}: no complete episode"]


def _replay_rewards(name: str, trajectories: Trajectories) -> RewardCheck:
    """Whether the file's rewards are those of the environment its name gives (tasks/d4rl/reward_check.py)."""
    family = env_family(name)
    env_id = gymnasium_id(family, "v4")
    env = make_env(env_id)
    try:
        return check_rewards(env, env_id, family, trajectories.observations, trajectories.actions, trajectories.rewards)
    finally:
        env.close()


def fetch(name: str, root: Path) -> Path:
    """Download dataset `name` into `root/<name>.hdf5`, checked and its hash recorded (tasks.common.download)."""
    return fetch_source(source(name), root, COMMAND)


def prepare(root: Path, names: tuple[str, ...], check_only: bool = False) -> dict[str, list[str]]:
    """Fetch what is missing (unless `check_only`), then check every requested dataset. Returns {name: problems}.

    A file downloaded before is first checked against the SHA-256 recorded beside it."""
    report = {}
    for name in names:
        path = find_d4rl_file(name, root)
        try:
            if path is not None:
                verify_record(path, COMMAND)
            elif not check_only:
                path = fetch(name, root)
        except ChecksumError as error:
            report[name] = [str(error)]
            continue
        except (OSError, TimeoutError) as error:
            reason = getattr(error, "reason", error)
            report[name] = [
                f"could not download {dataset_url(name)} ({reason}); download it by hand to {root / f'{name}.hdf5'}"
            ]
            continue
        report[name] = check_file(path, name) if path is not None else [f"missing {root / f'{name}.hdf5'}"]
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.d4rl.download", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data-dir", type=Path, default=data_root(), help="the DATA_DIR root"
    )
    parser.add_argument("--datasets", nargs="+", choices=PAPER_DATASETS, default=list(PAPER_DATASETS))
    parser.add_argument("--check", action="store_true", help="only check what is on disk")
    args = parser.parse_args(argv)
    root = args.data_dir / "d4rl"
    report = prepare(root, tuple(args.datasets), check_only=args.check)
    for name, problems in report.items():
        print(
            f"[ok] {name}" if not problems else f"[missing] {name}: " + "; ".join(problems),
            file=sys.stdout if not problems else sys.stderr,
        )
    failed = [name for name, problems in report.items() if problems]
    if failed:
        print(
            f"{len(failed)} of {len(report)} D4RL datasets are not usable under {root}. Run `{COMMAND}` where the "
            "network allows, or place the files by hand (see data/README.md). Without them, collect a dataset with "
            "`python -m tasks.d4rl.collect` and train with `experiment=d4rl/base`.",
            file=sys.stderr,
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
