"""The activation cache of the frozen prefix: exact, fills once, invalidates exactly, grows
incrementally, spills to disk, stays off when it must, and prefetches in a thread it stops."""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from freeze_agent import FreezeController, Mode
from freeze_agent.core.activation_store import ActivationStore
from freeze_agent.core.prefix_cache import CacheStats, PrefixCache

N, BATCH, LENGTH = 96, 16, 16
T, L, Fz = Mode.TRAIN, Mode.LOCAL, Mode.FROZEN


# --------------------------------------------------------------------------- models


def conv_block(c_in: int, c_out: int, dropout: float = 0.0) -> nn.Sequential:
    layers = [nn.Conv1d(c_in, c_out, 3, padding=1), nn.BatchNorm1d(c_out), nn.ReLU()]
    return nn.Sequential(*layers, nn.Dropout(dropout)) if dropout else nn.Sequential(*layers)


def conv_seq() -> nn.Sequential:
    """Conv blocks with BatchNorm; the later ones (left in TRAIN) also with Dropout."""
    return nn.Sequential(
        conv_block(1, 8),
        conv_block(8, 8),
        conv_block(8, 8, 0.2),
        conv_block(8, 8, 0.2),
        nn.Sequential(nn.Flatten(), nn.Linear(8 * LENGTH, 10)),
    )


class MLPBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1, self.fc2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)
        self.drop = nn.Dropout(0.2)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.drop(self.fc2(F.gelu(self.fc1(self.norm(h)))))


class TokenNet(nn.Module):
    """Not a Sequential: parent-level code reshapes the stem's output, adds a bare position
    parameter and a residual mixer (so ``mix`` is no cut point), then runs blocks and a head."""

    def __init__(self, width: int = 8, patch: int = 4) -> None:
        super().__init__()
        self.embed = nn.Conv1d(1, width, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(LENGTH // patch, width) * 0.1)
        self.mix = nn.Linear(width, width)
        self.blocks = nn.ModuleList(MLPBlock(width) for _ in range(3))
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x).transpose(1, 2) + self.pos
        h = h + torch.tanh(self.mix(h))
        for block in self.blocks:
            h = block(h)
        return self.head(h.mean(1))


class MeanLeak(nn.Module):
    """The head reads the share of nonzero entries of the first layer's output, which no
    perturbation of that output changes: the cut-point probe cannot see it, but skipping the
    first two layers (the first one's stand-in returns zeros) changes the result."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(LENGTH, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.a(x.flatten(1))
        h3 = self.c(torch.relu(self.b(torch.relu(z))))
        return self.head(h3 + (z != 0).float().mean())


class TwoPaths(nn.Module):
    """The first layer runs on two paths, so its output is no cut point."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(LENGTH, LENGTH)
        self.head = nn.Linear(LENGTH, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return self.head(self.a(x) + self.a(x.flip(-1)))


class ParentNoise(nn.Module):
    """Randomness in parent code, outside every unit: a dropout after the first layer and a
    NumPy mask (as Wav2Vec2's SpecAugment) after the second. Frozen layers draw nothing, but a
    prefix holding that code is random."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(LENGTH, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.b(self.drop(torch.relu(self.a(x.flatten(1))))))
        if self.training:
            h = h * torch.from_numpy(np.random.rand(*h.shape) > 0.2).to(h.dtype)
        return self.head(self.c(h))


class TableNet(nn.Module):
    """Parent code adds a position table (no batch dimension, as in Whisper's encoder) inside
    the prefix: the stand-in for the table must keep the table's own shape."""

    def __init__(self, width: int = 8, patch: int = 4) -> None:
        super().__init__()
        self.embed = nn.Conv1d(1, width, patch, stride=patch)
        self.pos = nn.Embedding(LENGTH // patch, width)
        self.blocks = nn.ModuleList(MLPBlock(width) for _ in range(2))
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x).transpose(1, 2)
        h = h + self.pos(torch.arange(h.shape[1]))
        for block in self.blocks:
            h = block(h)
        return self.head(h.mean(1))


class PairBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(LENGTH, LENGTH)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.fc(x)
        return y, y.mean(-1)


class TupleNet(nn.Module):
    """The first unit's output is a tuple: stored as one packed row per sample, served back as the
    same tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.pair = PairBlock()
        self.head = nn.Linear(LENGTH, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pair(x.flatten(1))[0])


# --------------------------------------------------------------------------- harness


def data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(N, 1, LENGTH, generator=generator)
    return x, torch.randint(0, 10, (N,), generator=generator)


def epoch_order(epoch: int) -> torch.Tensor:
    return torch.randperm(N, generator=torch.Generator().manual_seed(100 + epoch))


class Run:
    """A model, SGD and a FreezeController, trained in a fixed per-epoch order."""

    def __init__(self, build: Callable[[], nn.Module], cached: bool = True, **options) -> None:
        torch.manual_seed(0)
        self.model = build()
        self.x, self.y = data()
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4
        )
        self.controller = FreezeController(
            self.model, self.optimizer, self.x[:8], signals=False, reference=False
        )
        self.cache = None
        if cached:
            options.setdefault("deterministic_data", True)
            self.cache = PrefixCache(self.model, self.controller.units, N, **options)
        self.losses: list[float] = []
        self.epoch_stats: list[CacheStats] = []
        self.epoch = 0

    def set_modes(self, modes: Sequence[Mode]) -> None:
        applied = self.controller.set_modes(modes)
        if self.cache is not None:
            self.cache.update(applied)

    def train_epoch(self, modes_at: dict[int, Sequence[Mode]] | None = None) -> None:
        """One epoch; ``modes_at`` maps a step within the epoch to modes applied before it."""
        order = epoch_order(self.epoch)
        if self.cache is not None:
            self.cache.begin_epoch(order, BATCH)
        for step, start in enumerate(range(0, N, BATCH)):
            if modes_at and step in modes_at:
                self.set_modes(modes_at[step])
            self.model.train()
            index = order[start : start + BATCH]
            inputs = self.x[index]
            self.optimizer.zero_grad(set_to_none=True)
            if self.cache is None:
                outputs = self.model(inputs)
            else:
                outputs = self.cache.forward(inputs, index)
            loss = F.cross_entropy(outputs, self.y[index])
            loss.backward()
            self.optimizer.step()
            self.losses.append(float(loss.detach()))
        self.epoch += 1
        if self.cache is not None:
            self.epoch_stats.append(self.cache.stats())

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()


def frozen_prefix(run: Run, depth: int) -> list[Mode]:
    return [Fz] * depth + [T] * (len(run.controller.units) - depth)


def train(
    build: Callable[[], nn.Module],
    modes: int | Sequence[Mode],
    cached: bool,
    freeze_at: int = 0,
    **options,
) -> Run:
    """Three epochs with ``modes`` (an int: that many leading units FROZEN, the rest TRAIN)
    applied from step ``freeze_at`` of the first epoch."""
    run = Run(build, cached, **options)
    if isinstance(modes, int):
        modes = frozen_prefix(run, modes)
    run.train_epoch({freeze_at: modes})
    run.train_epoch()
    run.train_epoch()
    run.close()
    return run


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "activation-prefetch" and t.is_alive()]


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize(
    ("build", "modes", "freeze_at", "failed"),
    [
        (conv_seq, 2, 0, set()),
        (conv_seq, [Fz, Fz, L, T, T], 0, set()),  # the local rule updates weights in forward
        (TokenNet, 3, 2, set()),
        (MeanLeak, 3, 0, {2, 3}),
        (TupleNet, 1, 0, set()),
    ],
    ids=[
        "sequential",
        "local-after-cut",
        "custom-parent-code",
        "fooled-cut-falls-back",
        "tuple-output",
    ],
)
def test_cached_training_equals_uncached(build, modes, freeze_at, failed):
    cached = train(build, modes, cached=True, freeze_at=freeze_at)
    plain = train(build, modes, cached=False, freeze_at=freeze_at)
    torch.testing.assert_close(cached.losses, plain.losses)
    assert cached.epoch_stats[-1].state == "serving"
    assert cached.epoch_stats[-1].hits > 0
    assert set(cached.cache.failed) == failed
    assert not prefetch_threads()


def test_a_boundary_that_changes_the_output_is_retired():
    run = train(MeanLeak, 3, cached=True)
    assert run.cache is not None
    failed = run.cache.failed
    assert set(failed) == {2, 3}  # the head reads a's output: only depth 1 is exact
    assert all(reason.startswith("prefix could not be skipped") for reason in failed.values())
    assert run.epoch_stats[-1].depth == 1


def test_a_prefix_that_draws_random_numbers_is_not_cached():
    np.random.seed(0)
    cached = train(ParentNoise, 3, cached=True)
    np.random.seed(0)
    plain = train(ParentNoise, 3, cached=False)
    torch.testing.assert_close(cached.losses, plain.losses)
    assert cached.cache is not None and set(cached.cache.failed) == {2, 3}
    assert all("draws random numbers" in why for why in cached.cache.failed.values())
    assert (cached.epoch_stats[-1].state, cached.epoch_stats[-1].depth) == ("serving", 1)


def test_a_prefix_reading_a_table_without_batch_dimension_is_served():
    cached = train(TableNet, 3, cached=True)
    plain = train(TableNet, 3, cached=False)
    torch.testing.assert_close(cached.losses, plain.losses)
    assert cached.cache is not None and cached.cache.failed == {}
    assert (cached.epoch_stats[-1].state, cached.epoch_stats[-1].depth) == ("serving", 3)


def test_first_epoch_fills_later_epochs_hit():
    run = train(conv_seq, 2, cached=True)
    first, _, last = run.epoch_stats
    assert (first.state, first.depth, first.hits, first.misses) == ("serving", 2, 0, N)
    assert first.bytes_in_memory == N * 8 * LENGTH * 4 and first.bytes_on_disk == 0
    assert (last.hits, last.misses) == (2 * N, N)


def test_freezing_mid_epoch_computes_only_the_missing_rows():
    run = train(TokenNet, 3, cached=True, freeze_at=2)  # epoch 1 stores 4 of its 6 batches
    first, second, third = run.epoch_stats
    assert (first.state, first.hits, first.misses) == ("filling", 0, 4 * BATCH)
    assert (second.state, second.hits, second.misses) == ("serving", N - 2 * BATCH, N)
    assert (third.hits, third.misses) == (2 * N - 2 * BATCH, N)


# --------------------------------------------------------------------------- invalidation


def test_invalidated_exactly_when_a_cached_unit_leaves_frozen():
    run = Run(conv_seq)
    run.train_epoch({0: [Fz, Fz, T, T, T]})
    assert run.epoch_stats[-1].state == "serving"
    run.train_epoch({0: [Fz, Fz, T, Fz, T]})  # a unit behind the boundary changes: kept
    assert (run.epoch_stats[-1].hits, run.epoch_stats[-1].misses) == (N, N)
    run.set_modes([Fz, T, T, Fz, T])  # unit 1 leaves FROZEN: drop depth 2, fall back to 1
    stats = run.cache.stats()
    assert (stats.depth, stats.state, stats.bytes_in_memory) == (1, "filling", 0)
    run.set_modes([T, T, T, T, T])
    stats = run.cache.stats()
    assert (stats.depth, stats.state, stats.reason_off) == (0, "off", "no frozen prefix")
    run.train_epoch({0: [Fz, Fz, T, T, T]})  # refilled from scratch
    assert (run.epoch_stats[-1].hits, run.epoch_stats[-1].misses) == (N, 2 * N)
    run.close()


def count_calls(module: nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_incremental_growth_reuses_the_stored_boundary():
    run = Run(conv_seq)
    convs = [count_calls(run.model[i][0]) for i in range(3)]

    def calls_during(work: Callable[[], None]) -> list[int]:
        before = [c[0] for c in convs]
        work()
        return [c[0] - b for c, b in zip(convs, before, strict=True)]

    # Six batches; the first one also runs normally once, to check the skip.
    assert calls_during(lambda: run.train_epoch({0: [Fz, Fz, T, T, T]})) == [7, 7, 7]
    assert calls_during(run.train_epoch) == [0, 0, 6]
    # Growing to depth 3 runs only unit 2, on the stored depth-2 boundary (plus the check).
    assert calls_during(lambda: run.train_epoch({0: [Fz, Fz, Fz, T, T]})) == [1, 1, 7]
    stats = run.epoch_stats[-1]
    assert (stats.depth, stats.state) == (3, "serving")
    assert stats.bytes_in_memory == N * 8 * LENGTH * 4  # the depth-2 store is gone
    assert calls_during(run.train_epoch) == [0, 0, 0]
    run.close()


def test_growing_caches_give_the_uncached_losses():
    schedule = [{0: [Fz, T, T, T, T]}, {3: [Fz, Fz, Fz, T, T]}, {}, {}]
    runs = []
    for cached in (True, False):
        run = Run(conv_seq, cached)  # built right before training: dropout draws from here on
        runs.append(run)
        for modes_at in schedule:
            run.train_epoch(modes_at)
        run.close()
    torch.testing.assert_close(runs[0].losses, runs[1].losses)
    assert runs[0].epoch_stats[-1].depth == 3


# --------------------------------------------------------------------------- disk spill


def test_spills_to_disk_beyond_the_memory_budget(tmp_path: Path):
    row = 8 * LENGTH * 4
    in_memory = train(conv_seq, 2, cached=True)
    spilled = Run(conv_seq, memory_budget_bytes=10 * row, spill_dir=tmp_path)
    for epoch in range(3):
        spilled.train_epoch({0: frozen_prefix(spilled, 2)} if epoch == 0 else None)
    stats = spilled.epoch_stats[-1]
    assert stats.bytes_in_memory == 10 * row
    assert stats.bytes_on_disk == (N - 10) * row
    assert list(tmp_path.iterdir())
    spilled.close()
    assert not list(tmp_path.iterdir())
    assert spilled.losses == in_memory.losses


# --------------------------------------------------------------------------- staying off


@pytest.mark.parametrize(
    ("build", "options", "reason"),
    [
        (conv_seq, {"deterministic_data": False}, "random augmentation"),
        (conv_seq, {"enabled": False}, "disabled"),
        (TwoPaths, {}, "unit 0 is not a cut point"),
    ],
)
def test_off_with_a_reason(build, options, reason):
    run = train(build, 1, cached=True, **options)
    stats = run.epoch_stats[-1]
    assert (stats.state, stats.depth, stats.hits) == ("off", 0, 0)
    assert reason in (stats.reason_off or "")
    torch.testing.assert_close(run.losses, train(build, 1, cached=False).losses)


# --------------------------------------------------------------------------- the store


def filled_store(
    num: int = 40, budget: int = 1 << 20, dtype: torch.dtype = torch.float32
) -> tuple[ActivationStore, torch.Tensor]:
    values = torch.randn(num, 3, 2).to(dtype)
    store = ActivationStore(num, budget)
    order = torch.randperm(num)
    for chunk in order.split(7):
        assert not store.complete
        store.store(chunk, values[chunk])
    assert store.complete
    return store, values


def test_store_round_trips_memory_and_disk_and_any_dtype(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where its own spill folder goes
    store, values = filled_store(budget=10 * 6 * 2, dtype=torch.bfloat16)
    assert (store.bytes_in_memory, store.bytes_on_disk) == (10 * 12, 30 * 12)
    index = torch.tensor([39, 0, 9, 10, 25])
    assert torch.equal(store.fetch(index), values[index])
    with pytest.raises(ValueError, match="differs"):
        store.store(index, values[index].float())
    assert len(list(tmp_path.iterdir())) == 1
    store.close()
    assert not list(tmp_path.iterdir())
    fresh = ActivationStore(5, 1 << 20)
    fresh.store(torch.tensor([1, 3]), torch.ones(2, 4))
    assert fresh.contains(torch.tensor([3, 1])) and not fresh.contains(torch.tensor([0, 1]))
    with pytest.raises(KeyError, match="1 of the 2"):
        fresh.fetch(torch.tensor([0, 1]))
    fresh.close()


def test_prefetch_delivers_the_order_and_stops_on_close():
    store, values = filled_store()
    order = torch.randperm(40)
    batches = list(order.split(6))
    store.prefetch(order, 6)
    assert prefetch_threads()
    for i in (0, 1, 3):  # batch 2 is skipped: the queue moves on to batch 3
        assert torch.equal(store.fetch(batches[i]), values[batches[i]])
    assert store.prefetched == 3
    assert torch.equal(store.fetch(batches[1]), values[batches[1]])  # behind: read directly
    assert torch.equal(store.fetch(order[:5]), values[order[:5]])  # not a batch: read directly
    assert store.prefetched == 3
    store.prefetch(order.flip(0), 6)  # replaces the running thread
    assert len(prefetch_threads()) == 1
    store.close()  # its queue is full and nobody reads: close must still end it
    assert not prefetch_threads()


class TiedNet(nn.Module):
    """An embedding whose weight is also the output layer's, as GPT-2's is."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, LENGTH)
        self.body = nn.Sequential(nn.Linear(LENGTH, LENGTH), nn.ReLU(), nn.Linear(LENGTH, LENGTH))
        self.head = nn.Linear(LENGTH, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = (x.flatten(1)[:, 0].abs() * 3).long().clamp(max=9)
        return self.head(self.body(self.embed(tokens)))


def test_a_prefix_holding_a_tied_parameter_is_never_cached():
    run = train(TiedNet, 2, cached=True)
    stats = run.epoch_stats[-1]
    assert (stats.state, stats.hits) == ("off", 0)
    assert "unit 0 uses a parameter tied to unit 2" in stats.reason_off
