"""A stand-in for the freeze environment: the real observation and action spaces, random bounded
observations of a random number of units, a reward any policy can learn in a few updates."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from freeze_agent.core.modes import Mode
from freeze_agent.signals.observation import (
    GLOBAL_FEATURES,
    UNIT_FEATURES,
    action_mask,
    observation_space,
)

DEPTH = UNIT_FEATURES.index("relative_depth")
IS_HEAD = UNIT_FEATURES.index("is_head")
SUPPORTS_LOCAL = UNIT_FEATURES.index("supports_local")


def random_observation(
    rng: np.random.Generator, max_units: int, n_units: int | None = None
) -> dict[str, np.ndarray]:
    """Features uniform in [-1, 1] for ``n_units`` real units (random if None), with a
    consistent relative depth, head flag and local support; zero padded slots."""
    n = int(rng.integers(1, max_units + 1)) if n_units is None else n_units
    units = np.zeros((max_units, len(UNIT_FEATURES)), dtype=np.float32)
    units[:n] = rng.uniform(-1.0, 1.0, (n, len(UNIT_FEATURES)))
    units[:n, DEPTH] = np.linspace(0.0, 1.0, n) if n > 1 else 1.0
    units[:n, IS_HEAD] = 0.0
    units[n - 1, IS_HEAD] = 1.0
    units[:n, SUPPORTS_LOCAL] = rng.integers(0, 2, n)
    mask = np.zeros(max_units, dtype=np.int8)
    mask[:n] = 1
    global_vector = rng.uniform(-1.0, 1.0, len(GLOBAL_FEATURES)).astype(np.float32)
    return {"units": units, "mask": mask, "global": global_vector}


class SyntheticFreezeEnv(gym.Env):
    """Each step shows a new random model; the reward is the fraction of real units that are
    FROZEN in the shallow half and TRAIN in the deep half. An illegal mode raises."""

    def __init__(self, max_units: int = 8, episode_length: int = 8) -> None:
        self.max_units, self.episode_length = max_units, episode_length
        self.observation_space = observation_space(max_units)
        self.action_space = spaces.MultiDiscrete([len(Mode)] * max_units)

    def action_masks(self) -> np.ndarray:
        return action_mask(self._observation).reshape(-1)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._steps = 0
        self._observation = random_observation(self.np_random, self.max_units)
        return self._observation, {}

    def step(self, action: np.ndarray):
        allowed = action_mask(self._observation)
        if not allowed[np.arange(self.max_units), action].all():
            raise AssertionError(f"illegal action {action} for mask {allowed.astype(int)}")
        real = self._observation["mask"].astype(bool)
        shallow = self._observation["units"][real, DEPTH] < 0.5
        wanted = np.where(shallow, Mode.FROZEN, Mode.TRAIN)
        reward = float(np.mean(action[real] == wanted))
        self._steps += 1
        self._observation = random_observation(self.np_random, self.max_units)
        return self._observation, reward, False, self._steps >= self.episode_length, {}
