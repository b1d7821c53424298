"""The MuJoCo locomotion environments of the D4RL table: names, gymnasium ids, reference returns and the score.

Gymnasium and MuJoCo are the `rl` extra; they are imported only when an environment is built, so that the data
pipeline, the configs and the aggregator load without them.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# The environment families of the paper's table: dataset name's first field -> gymnasium name.
GYMNASIUM_NAMES = {"halfcheetah": "HalfCheetah", "hopper": "Hopper", "walker2d": "Walker2d"}
ENV_VERSIONS = ("v4", "v5")

# D4RL's normalisation constants for its v2 locomotion datasets (the same for every dataset of an environment):
# the mean return of a random policy and of an expert (results/paper/official_code.md §4.2).
REFERENCE_RETURNS = {
    "halfcheetah": (-280.178953, 12135.0),
    "hopper": (-20.272305, 3234.3),
    "walker2d": (1.629008, 4592.3),
}

RL_EXTRA_HINT = "install the `rl` extra: pip install -e '.[rl]' (gymnasium[mujoco], h5py, minari)"


class UnknownEnvironmentError(ValueError):
    """A dataset name whose first field names none of the table's environments."""


def require_gymnasium() -> Any:
    """The `gymnasium` module, or an ImportError that names the extra to install."""
    try:
        import gymnasium
        import mujoco
    except ImportError as error:
        raise ImportError(
            f"evaluating or collecting D4RL episodes needs gymnasium with MuJoCo: {RL_EXTRA_HINT}"
        ) from error
    if mujoco.get_mju_user_warning() is None:
        # MuJoCo appends its warnings to MUJOCO_LOG.TXT in the working directory (HalfCheetah's model raises one)
        mujoco.set_mju_user_warning(_log_mujoco_warning)
    return gymnasium


def _log_mujoco_warning(text: str) -> None:
    """Log each distinct MuJoCo warning once (every environment of a vector env compiles the same model)."""
    if text not in _MUJOCO_WARNINGS_SEEN:
        _MUJOCO_WARNINGS_SEEN.add(text)
        log.warning("MuJoCo: %s", text.strip())


_MUJOCO_WARNINGS_SEEN: set[str] = set()


@contextmanager
def _v4_chosen():
    """Gymnasium warns that v4 is out of date at every make; v4 is this suite's deliberate default."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is out of date.*")
        yield


def make_env(env_id: str, **kwargs: Any) -> Any:
    """`gymnasium.make(env_id, **kwargs)`."""
    gym = require_gymnasium()
    with _v4_chosen():
        return gym.make(env_id, **kwargs)


def make_vector_env(env_id: str, num_envs: int, max_episode_steps: int, vectorization: str = "sync") -> Any:
    """`num_envs` copies of `env_id` in one gymnasium vector environment that never resets a finished episode by
    itself (autoreset disabled: the caller resets each finished slot, with the seed it chooses)."""
    gym = require_gymnasium()
    from gymnasium.vector import AutoresetMode

    with _v4_chosen():
        return gym.make_vec(
            env_id,
            num_envs=num_envs,
            vectorization_mode=vectorization,
            vector_kwargs={"autoreset_mode": AutoresetMode.DISABLED},
            max_episode_steps=max_episode_steps,
        )


def env_family(dataset: str) -> str:
    """The environment family of a D4RL-style dataset name: its first `-` field (`hopper-medium-v2` -> `hopper`)."""
    family = dataset.split("/")[-1].split("-", 1)[0].lower()
    if family not in GYMNASIUM_NAMES:
        raise UnknownEnvironmentError(
            f"data.dataset={dataset!r}: its first field {family!r} names no environment of the D4RL table "
            f"(known: {', '.join(GYMNASIUM_NAMES)}). Name the file <env>-<quality>.hdf5 with one of them, e.g. "
            "hopper-medium-v2 or hopper-random-collected."
        )
    return family


def gymnasium_id(family: str, version: str) -> str:
    """`hopper`, `v4` -> `Hopper-v4`."""
    if version not in ENV_VERSIONS:
        raise ValueError(f"eval.env_version={version!r}; expected one of {', '.join(ENV_VERSIONS)}")
    return f"{GYMNASIUM_NAMES[family]}-{version}"


def family_of_env_id(env_id: str) -> str | None:
    """`Hopper-v5` -> `hopper`; None for an environment outside the table."""
    name = env_id.split("/")[-1].rsplit("-", 1)[0]
    return next((family for family, gym_name in GYMNASIUM_NAMES.items() if gym_name == name), None)


@dataclass(frozen=True)
class ReferenceReturns:
    """The returns that map to score 0 (random policy) and 100 (expert), and where they come from."""

    random: float
    expert: float
    source: str = "d4rl"

    def score(self, episode_return: float) -> float:
        """The normalised score ×100: 100 · (return − random) / (expert − random)."""
        return 100.0 * (episode_return - self.random) / (self.expert - self.random)


def d4rl_reference(family: str) -> ReferenceReturns:
    random, expert = REFERENCE_RETURNS[family]
    return ReferenceReturns(random, expert, "d4rl")
