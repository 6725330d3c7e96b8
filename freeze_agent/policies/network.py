"""The learned policy's network: one set of weights for models of any number of units.

Every unit slot is encoded by the same MLP (its features next to the global vector), tagged with
a sinusoidal encoding of its relative depth, and mixed with the other real units by
self-attention; one shared linear layer turns each slot into the logits of its three modes. No
weight's shape depends on the number of units, so the same policy decides for a 4-unit MLP and a
32-unit transformer, and padded slots never reach the real units (they are masked out of the
attention and zeroed after it).

Actions follow ``MultiDiscrete([len(Mode)] * max_units)``: the logits are flattened unit by unit,
``[u0_TRAIN, u0_LOCAL, u0_FROZEN, u1_TRAIN, ...]``, which is how
``MaskableMultiCategoricalDistribution`` splits them and how ``action_mask(obs).reshape(-1)``
lays out the legal modes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.type_aliases import Schedule
from torch import nn

from freeze_agent.core.modes import Mode
from freeze_agent.policies.base import Observation
from freeze_agent.signals.observation import UNIT_FEATURES, action_mask

_DEPTH = UNIT_FEATURES.index("relative_depth")


class UnitObservationExtractor(BaseFeaturesExtractor):
    """Concatenates an observation dict into one flat tensor ``[units (flattened), mask, global]``.

    It holds no weights: the network that reads the units is ``UnitAttentionNetwork``, which
    splits the tensor back. Keeping the extractor weightless also keeps the state dict free of the
    aliases SB3 registers for a shared extractor.
    """

    def __init__(self, observation_space: spaces.Dict) -> None:
        max_units, n_unit_features = observation_space["units"].shape
        n_global = observation_space["global"].shape[0]
        super().__init__(observation_space, max_units * (n_unit_features + 1) + n_global)

    def forward(self, observations: dict[str, th.Tensor]) -> th.Tensor:
        return th.cat(
            [observations["units"].flatten(1), observations["mask"], observations["global"]], dim=1
        )


class DepthEncoding(nn.Module):
    """Sinusoidal encoding of a relative depth in [0, 1], the transformer's position signal.

    Frequencies are geometric from π to 100π, so depths as close as 1/100 stay distinguishable
    whatever the number of units.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"the depth encoding needs an even embedding size, got {dim}")
        frequencies = math.pi * th.logspace(0.0, 2.0, dim // 2)
        self.register_buffer("frequencies", frequencies, persistent=False)

    def forward(self, depth: th.Tensor) -> th.Tensor:
        angles = depth.unsqueeze(-1) * self.frequencies
        return th.cat([angles.sin(), angles.cos()], dim=-1)


class UnitAttentionNetwork(nn.Module):
    """The policy's ``mlp_extractor``: flat features in, actor and critic latents out.

    ``latent_pi`` is (batch, max_units * embed_dim), one embedding per slot (zero for padded
    slots); ``latent_vf`` is (batch, value_dim), from the masked mean of the real units'
    embeddings next to the global vector.
    """

    def __init__(
        self,
        max_units: int,
        n_unit_features: int,
        n_global: int,
        embed_dim: int = 64,
        n_heads: int = 4,
        n_layers: int = 2,
        value_dim: int = 64,
    ) -> None:
        super().__init__()
        self.max_units, self.n_unit_features = max_units, n_unit_features
        self.latent_dim_pi = max_units * embed_dim
        self.latent_dim_vf = value_dim
        self.encoder = nn.Sequential(
            nn.Linear(n_unit_features + n_global, embed_dim),
            nn.GELU(),
            nn.Linear(embed_dim, embed_dim),
        )
        self.depth_encoding = DepthEncoding(embed_dim)
        layer = nn.TransformerEncoderLayer(
            embed_dim,
            n_heads,
            dim_feedforward=2 * embed_dim,
            dropout=0.0,  # PPO compares log-probabilities across train/eval modes
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.attention = nn.TransformerEncoder(
            layer, n_layers, norm=nn.LayerNorm(embed_dim), enable_nested_tensor=False
        )
        self.value_mlp = nn.Sequential(nn.Linear(embed_dim + n_global, value_dim), nn.Tanh())

    def _split(self, features: th.Tensor) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        n, f = self.max_units, self.n_unit_features
        units = features[:, : n * f].reshape(-1, n, f)
        real = features[:, n * f : n * f + n] > 0.5
        return units, real, features[:, n * f + n :]

    def _embed(self, features: th.Tensor) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """Per-slot embeddings (batch, max_units, embed_dim), the real-unit mask and the global
        vector."""
        units, real, global_vector = self._split(features)
        per_unit_global = global_vector.unsqueeze(1).expand(-1, self.max_units, -1)
        tokens = self.encoder(th.cat([units, per_unit_global], dim=-1))
        tokens = tokens + self.depth_encoding(units[..., _DEPTH])
        # Attention over keys that are all masked gives NaN: an observation without real units
        # attends over its (zero-masked afterwards) padded slots instead.
        padding = ~real & real.any(dim=1, keepdim=True)
        tokens = self.attention(tokens, src_key_padding_mask=padding)
        return tokens * real.unsqueeze(-1), real, global_vector

    def _value_latent(
        self, tokens: th.Tensor, real: th.Tensor, global_vector: th.Tensor
    ) -> th.Tensor:
        count = real.sum(dim=1, keepdim=True).clamp(min=1)
        pooled = tokens.sum(dim=1) / count
        return self.value_mlp(th.cat([pooled, global_vector], dim=-1))

    def forward(self, features: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
        tokens, real, global_vector = self._embed(features)
        return tokens.flatten(1), self._value_latent(tokens, real, global_vector)

    def forward_actor(self, features: th.Tensor) -> th.Tensor:
        return self._embed(features)[0].flatten(1)

    def forward_critic(self, features: th.Tensor) -> th.Tensor:
        return self._value_latent(*self._embed(features))


class UnitwiseLogits(nn.Module):
    """One ``Linear(embed_dim, n_modes)`` applied to every slot: (batch, n * embed_dim) ->
    (batch, n * n_modes), unit by unit, for any n."""

    def __init__(self, embed_dim: int, n_modes: int) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.linear = nn.Linear(embed_dim, n_modes)

    def forward(self, latent: th.Tensor) -> th.Tensor:
        return self.linear(latent.reshape(latent.shape[0], -1, self.embed_dim)).flatten(1)


# TRAIN, LOCAL, FROZEN. Freezing or localizing a unit for an interval costs little, but doing so
# for most units most of the time (what a uniform policy does) costs so much accuracy that the
# accuracy penalty drowns every other signal. Starting near all-TRAIN keeps early episodes close
# to the reference run, and PPO then learns where leaving TRAIN pays.
INITIAL_MODE_PROBABILITIES = (0.8, 0.05, 0.15)


class UnitAttentionPolicy(MaskableActorCriticPolicy):
    """MaskablePPO actor-critic over unit slots (see the module docstring).

    Args:
        observation_space: ``observation.observation_space(max_units)``
        action_space: ``MultiDiscrete([len(Mode)] * max_units)``
        lr_schedule: learning rate schedule (constant or not)
        embed_dim: size of each unit's embedding (even, divisible by ``n_heads``)
        n_heads: attention heads per layer
        n_layers: self-attention layers
        value_dim: hidden size of the value head
        ortho_init: SB3's orthogonal initialization of the MLPs and heads (the attention
            layers keep PyTorch's initialization)
        initial_mode_probabilities: the untrained policy's probability of TRAIN, LOCAL and
            FROZEN for every unit, set as the action head's bias (with ``ortho_init`` its weights
            start near zero, so the bias decides). Only the initialization uses it.
        optimizer_class: the optimizer to use
        optimizer_kwargs: its keyword arguments, excluding the learning rate
    """

    def __init__(
        self,
        observation_space: spaces.Dict,
        action_space: spaces.MultiDiscrete,
        lr_schedule: Schedule,
        embed_dim: int = 64,
        n_heads: int = 4,
        n_layers: int = 2,
        value_dim: int = 64,
        ortho_init: bool = True,
        initial_mode_probabilities: tuple[float, float, float] = INITIAL_MODE_PROBABILITIES,
        optimizer_class: type[th.optim.Optimizer] = th.optim.Adam,
        optimizer_kwargs: dict[str, Any] | None = None,
    ) -> None:
        _check_spaces(observation_space, action_space)
        self.initial_mode_probabilities = _check_probabilities(initial_mode_probabilities)
        # Set before the parent constructor, which calls _build.
        self.architecture = {
            "embed_dim": embed_dim,
            "n_heads": n_heads,
            "n_layers": n_layers,
            "value_dim": value_dim,
        }
        super().__init__(
            observation_space,
            action_space,
            lr_schedule,
            ortho_init=ortho_init,
            features_extractor_class=UnitObservationExtractor,
            optimizer_class=optimizer_class,
            optimizer_kwargs=optimizer_kwargs,
        )

    @property
    def max_units(self) -> int:
        return int(self.observation_space["units"].shape[0])

    def _build_mlp_extractor(self) -> None:
        self.mlp_extractor = UnitAttentionNetwork(
            self.max_units,
            self.observation_space["units"].shape[1],
            self.observation_space["global"].shape[0],
            **self.architecture,
        )

    def _build(self, lr_schedule: Schedule) -> None:
        """As the parent's, with the per-unit action head in place of one Linear over all
        slots."""
        self._build_mlp_extractor()
        self.action_net = UnitwiseLogits(self.architecture["embed_dim"], len(Mode))
        self.value_net = nn.Linear(self.mlp_extractor.latent_dim_vf, 1)
        if self.ortho_init:
            # Small output gain: the initial logits are the action head's bias, set below.
            gains = {
                self.mlp_extractor.encoder: np.sqrt(2),
                self.mlp_extractor.value_mlp: np.sqrt(2),
                self.action_net: 0.01,
                self.value_net: 1.0,
            }
            for module, gain in gains.items():
                module.apply(partial(self.init_weights, gain=gain))
        with th.no_grad():
            self.action_net.linear.bias.copy_(th.tensor(self.initial_mode_probabilities).log())
        self.optimizer = self.optimizer_class(
            self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs
        )

    def _get_constructor_parameters(self) -> dict[str, Any]:
        """The arguments that rebuild this policy (``BasePolicy.save`` / ``load``)."""
        data = super()._get_constructor_parameters()
        return {
            **{key: data[key] for key in ("observation_space", "action_space", "lr_schedule")},
            "ortho_init": self.ortho_init,
            "initial_mode_probabilities": self.initial_mode_probabilities,
            "optimizer_class": self.optimizer_class,
            "optimizer_kwargs": self.optimizer_kwargs,
            **self.architecture,
        }


def _check_probabilities(probabilities: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(p) for p in probabilities)
    if len(values) != len(Mode) or min(values) <= 0 or not math.isclose(sum(values), 1.0):
        raise ValueError(
            f"initial_mode_probabilities must be {len(Mode)} positive probabilities (TRAIN, "
            f"LOCAL, FROZEN) that sum to 1, got {probabilities}"
        )
    return values


def _check_spaces(observation_space: spaces.Space, action_space: spaces.Space) -> None:
    if not (
        isinstance(observation_space, spaces.Dict)
        and {"units", "mask", "global"} <= set(observation_space.spaces)
    ):
        raise ValueError(
            "UnitAttentionPolicy needs the Dict space of freeze_agent.signals.observation."
            f"observation_space(max_units), got {observation_space}"
        )
    max_units = observation_space["units"].shape[0]
    if not (
        isinstance(action_space, spaces.MultiDiscrete)
        and action_space.nvec.shape == (max_units,)
        and (action_space.nvec == len(Mode)).all()
    ):
        raise ValueError(
            f"UnitAttentionPolicy needs MultiDiscrete([{len(Mode)}] * {max_units}) actions (one "
            f"mode per unit slot), got {action_space}"
        )


def deterministic_actions(
    policy: MaskableActorCriticPolicy, observation: Observation
) -> np.ndarray:
    """The most probable legal mode of every slot, (max_units,) ints, for one observation.

    Legal modes come from ``action_mask``, so the SB3 model (``model.policy``) and a policy
    loaded from its artifact decide the same way on the same observation. This is
    ``policy.predict(observation, deterministic=True, action_masks=...)`` without building the
    masked distributions (a quarter of the cost, which a deployed run pays at every decision):
    the actor's logits, illegal modes set to sb3-contrib's -1e8, and the argmax of each slot's
    probabilities, as ``MaskableCategorical``'s mode takes it.
    """
    policy.set_training_mode(False)
    observation_tensor, _ = policy.obs_to_tensor(observation)
    with th.no_grad():
        features = policy.extract_features(observation_tensor, policy.pi_features_extractor)
        logits = policy.action_net(policy.mlp_extractor.forward_actor(features))
        logits = logits.reshape(-1, len(Mode))
        legal = th.as_tensor(action_mask(observation), device=logits.device).reshape(logits.shape)
        masked = th.where(legal, logits, th.tensor(-1e8, dtype=logits.dtype))
        return masked.softmax(-1).argmax(-1).cpu().numpy()
