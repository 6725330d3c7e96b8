"""SmartFRZ's attention-based freezing predictor (Li et al., ICLR 2023): inference.

The predictor looks at a short history of each unit's weights and outputs the probability that
the unit has converged and can freeze. In the order data flows:

1. ``WeightSampler`` ("layer tailoring") reads a fixed random subset of ``SNAPSHOT_SIZE`` weights
   of every unit, so units of any size give snapshots of one size; ``WeightHistory`` keeps the
   last ``HISTORY`` snapshots, one per decision interval.
2. ``AttentionPredictor`` embeds each snapshot with one MLP, attends from the newest snapshot
   (the query) over the history (keys and values) and classifies the pooled vector: keep
   training or freeze. Units are the batch dimension, so one call scores a whole model.

The artifact is a safetensors file plus a JSON card (``load_predictor`` runs no pickled code).
Its offline training, on CKA labels from recorded full-training runs, is
``freeze_agent.rl.predictor_training``.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from freeze_agent.core.resources import POLICIES_DIR
from freeze_agent.core.units import Unit

SNAPSHOT_SIZE = 1024  # sampled weights per unit and snapshot ("layer tailoring")
HISTORY = 30  # snapshots the predictor sees, one per decision interval
ENCODER_DIMS = (256, 256, 64)  # snapshot MLP after the input layer: keys, values and the query
HEAD_DIMS = (32, 32, 2)  # classifier after the 64-d pooled vector: (keep training, freeze)
DRIFT_SCALE = 1e-3  # relative weight change that maps to ~1 before the asinh compression
SAMPLER_SEED = 0  # which weights a snapshot reads; fixed so training and deployment agree


WEIGHTS_FILE, CARD_FILE = "predictor.safetensors", "card.json"
DEFAULT_DIR = POLICIES_DIR / "smartfrz"


# --------------------------------------------------------------------------- weight snapshots


def _sample_positions(total: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``size`` sorted positions in ``range(total)``: distinct when ``total >= size``, drawn with
    replacement otherwise. Large units are sampled without a full permutation of their size."""
    if total < size:
        return torch.randint(total, (size,), generator=generator).sort().values
    if total <= 16 * size:
        return torch.randperm(total, generator=generator)[:size].sort().values
    picked = torch.empty(0, dtype=torch.long)
    while picked.numel() < size:
        drawn = torch.randint(total, (size,), generator=generator)
        picked = torch.cat([picked, drawn]).unique()
    keep = torch.randperm(picked.numel(), generator=generator)[:size]
    return picked[keep].sort().values


class WeightSampler:
    """'Layer tailoring': a fixed random subset (seeded) of ``size`` entries of each unit's
    parameters (sampled with replacement when a unit has fewer), so every unit gives an
    equal-size snapshot.

    The positions are drawn once, per unit and per parameter, so a snapshot is one
    ``index_select`` per parameter: no copy of the model, cheap enough for every decision.
    """

    def __init__(self, units: Sequence[Unit], size: int = SNAPSHOT_SIZE, seed: int = 0) -> None:
        self.size = size
        self._picks: list[list[tuple[nn.Parameter, torch.Tensor]]] = []
        for unit in units:
            params = list(unit.parameters())
            total = sum(p.numel() for p in params)
            generator = torch.Generator().manual_seed(seed * 1_000_003 + unit.index)
            positions = _sample_positions(total, size, generator) if total else None
            picks, start = [], 0
            for p in params:
                inside = positions[(positions >= start) & (positions < start + p.numel())]
                if inside.numel():
                    picks.append((p, (inside - start).to(p.device)))
                start += p.numel()
            self._picks.append(picks)

    @torch.no_grad()
    def snapshot(self) -> torch.Tensor:
        """The sampled weights now, as a CPU float32 tensor of shape (n_units, size); a unit
        without parameters reads as zeros."""
        rows = [
            torch.cat(
                [p.detach().reshape(-1).index_select(0, idx.to(p.device)) for p, idx in picks]
            )
            if picks
            else torch.zeros(self.size)
            for picks in self._picks
        ]
        return torch.stack([row.float().cpu() for row in rows])


class WeightHistory:
    """Last ``history`` snapshots per unit, taken once per decision interval."""

    def __init__(self, sampler: WeightSampler, history: int = HISTORY) -> None:
        self.sampler = sampler
        self._snapshots: deque[torch.Tensor] = deque(maxlen=history)

    def record(self) -> None:
        """Take a snapshot now (call once per decision, before asking the predictor)."""
        self._snapshots.append(self.sampler.snapshot())

    def state_dict(self) -> dict:
        return {"snapshots": [s.clone() for s in self._snapshots]}

    def load_state_dict(self, state: dict) -> None:
        self._snapshots.clear()
        self._snapshots.extend(state["snapshots"])

    def tensor(self) -> torch.Tensor:
        """The recorded snapshots, oldest first: (n_units, T, size) with 1 <= T <= history."""
        if not self._snapshots:
            raise RuntimeError("no snapshot recorded yet: call record() first")
        return torch.stack(list(self._snapshots), dim=1)

    def __len__(self) -> int:
        return len(self._snapshots)


# --------------------------------------------------------------------------- the predictor


def _mlp(*dims: int) -> nn.Sequential:
    """Linear layers of the given widths with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(pairwise(dims)):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


class AttentionPredictor(nn.Module):
    """SmartFRZ's predictor: snapshot history of each unit → logits (keep training, freeze).

    Keys and values: the MLP ``size → 256 → 256 → 64`` over every snapshot of the history; query:
    the same MLP on the newest snapshot; the attention-weighted sum of the values goes through the
    head MLP ``64 → 32 → 32 → 2``. Units are the batch dimension, so any number of units and any
    history length >= 1 work. The newest snapshot is one of the keys as well, so a history of one
    snapshot is valid (it then attends to itself).

    Input normalization: each snapshot is replaced by its drift from the newest one, relative to
    the newest weights' root mean square, and compressed with ``asinh(drift / drift_scale)``.
    Why: raw weights differ in scale by orders of magnitude between layer types, models and
    initializations, and their values say nothing about convergence; how far a unit moved, and
    when, relative to its own weight scale, does. Dividing by the unit's RMS makes the input
    invariant to rescaling a unit's weights, and subtracting the newest makes it invariant to
    their current values. Relative drifts per interval span ~1e-5 (late, small learning rate) to
    ~1 (early), so the signed log-like asinh keeps all of them in a range an MLP can read
    (drift_scale maps to ~0.9, 1 to ~7.6). After centering, the newest snapshot is all zeros, so
    the query is a learned constant: attention pools the history with a learned query while the
    keys still depend on each snapshot's drift. Padded positions (a ``mask`` of False) are
    ignored; the newest (last) position is always attended.
    """

    def __init__(self, size: int = SNAPSHOT_SIZE, drift_scale: float = DRIFT_SCALE) -> None:
        super().__init__()
        self.size, self.drift_scale = size, drift_scale
        self.encoder = _mlp(size, *ENCODER_DIMS)
        self.head = _mlp(ENCODER_DIMS[-1], *HEAD_DIMS)

    def normalize(self, history: torch.Tensor) -> torch.Tensor:
        """Scale-free drift of every snapshot from the newest (see the class docstring)."""
        newest = history[:, -1:]
        scale = newest.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-8)
        return torch.asinh((history - newest) / (self.drift_scale * scale))

    def forward(self, history: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(n_units, T, size) snapshots, oldest first, and an optional (n_units, T) mask of real
        (not padded) positions → (n_units, 2) logits of (keep training, freeze)."""
        if history.dim() != 3 or history.shape[-1] != self.size or history.shape[1] < 1:
            raise ValueError(
                f"expected a history of shape (n_units, T >= 1, {self.size}), "
                f"got {tuple(history.shape)}"
            )
        x = self.normalize(history.float())
        if mask is None:
            embedded = self.encoder(x)  # (n, T, d)
        else:  # embed only the real positions: padding costs nothing
            attended = mask.bool().clone()
            attended[:, -1] = True
            embedded = x.new_zeros(*x.shape[:2], ENCODER_DIMS[-1])
            embedded[attended] = self.encoder(x[attended])
        query = embedded[:, -1:]  # (n, 1, d)
        scores = query @ embedded.transpose(1, 2) / math.sqrt(embedded.shape[-1])  # (n, 1, T)
        if mask is not None:
            scores = scores.masked_fill(~attended[:, None, :], float("-inf"))
        pooled = (scores.softmax(-1) @ embedded).squeeze(1)  # (n, d)
        return self.head(pooled)

    @torch.no_grad()
    def freeze_probability(
        self, history: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(n_units,) probability in [0, 1] that each unit has converged and can freeze."""
        return self(history, mask).softmax(-1)[:, 1]


def save_predictor(model: AttentionPredictor, folder: str | Path, card: dict[str, Any]) -> None:
    """Write ``predictor.safetensors`` and ``card.json`` (the card records the architecture)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    card = {**card, "architecture": _architecture(model)}
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        folder / WEIGHTS_FILE,
        metadata={"format": "pt"},
    )
    (folder / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")


def _architecture(model: AttentionPredictor) -> dict[str, Any]:
    return {
        "snapshot_size": model.size,
        "history": HISTORY,
        "encoder": [model.size, *ENCODER_DIMS],
        "head": [ENCODER_DIMS[-1], *HEAD_DIMS],
        "drift_scale": model.drift_scale,
        "sampler_seed": SAMPLER_SEED,
        "normalization": "asinh((w_t - w_newest) / (drift_scale * rms(w_newest)))",
    }


class PredictorArtifactError(ValueError):
    """A SmartFRZ predictor artifact whose files exist but cannot be read."""


def load_predictor(folder: str | Path = DEFAULT_DIR) -> AttentionPredictor:
    """The trained predictor from ``predictor.safetensors`` + ``card.json``, in eval mode.

    Raises:
        FileNotFoundError: the folder holds no trained predictor.
        PredictorArtifactError: its card or weights are damaged (the message names the file).
    """
    folder = Path(folder)
    weights, card_path = folder / WEIGHTS_FILE, folder / CARD_FILE
    if not weights.is_file() or not card_path.is_file():
        raise FileNotFoundError(
            f"no trained SmartFRZ predictor in {folder} (expected {WEIGHTS_FILE} and "
            f"{CARD_FILE}); train one with `freeze-agent train-predictor --out {folder}`"
        )
    remedy = (
        f"restore it or train the predictor again (freeze-agent train-predictor --out {folder})"
    )
    try:
        architecture = json.loads(card_path.read_text())["architecture"]
        size, drift_scale = architecture["snapshot_size"], architecture["drift_scale"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise PredictorArtifactError(f"{card_path} is damaged ({error!r}); {remedy}") from error
    try:
        state = load_file(weights)
    except (SafetensorError, OSError) as error:
        raise PredictorArtifactError(f"{weights} is damaged ({error}); {remedy}") from error
    # Building the layers draws their (then overwritten) initial weights from the global RNG;
    # a controller loads this mid-setup, and the training it observes must not see a different
    # random stream (dropout masks) because of it.
    with torch.random.fork_rng(devices=[]):
        model = AttentionPredictor(size, drift_scale)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise PredictorArtifactError(
            f"{weights} does not match the architecture in {card_path}: {error}"
        ) from error
    return model.eval()
