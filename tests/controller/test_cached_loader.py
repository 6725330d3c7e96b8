"""``wrap_loader``: a user's DataLoader served from the activation cache, with losses equal to the
uncached run, on models whose blocks return tuples; and a clear pass-through otherwise."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import FreezePrefix
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from freeze_agent import FreezeController


class TupleLayer(nn.Module):
    """A pre-norm transformer-style layer that returns ``(hidden, position_bias)`` as T5's
    blocks do: the bias has no batch dimension and comes from the first layer's parameters."""

    def __init__(self, width: int, heads: int, length: int, makes_bias: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(
            nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)
        )
        self.bias = nn.Parameter(torch.zeros(heads, length, length)) if makes_bias else None
        self.heads = heads

    def forward(self, hidden, position_bias=None):
        if position_bias is None:
            position_bias = self.bias.unsqueeze(0)  # (1, heads, T, T)
        h = self.norm(hidden)
        batch, length, _ = h.shape
        mask = position_bias.expand(batch, -1, -1, -1).reshape(batch * self.heads, length, length)
        hidden = hidden + self.attention(h, h, h, attn_mask=mask, need_weights=False)[0]
        return hidden + self.mlp(hidden), position_bias


class TupleLM(nn.Module):
    def __init__(self, vocab: int = 20, width: int = 16, layers: int = 4, length: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList(
            TupleLayer(width, 2, length, makes_bias=i == 0) for i in range(layers)
        )
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Dropout(0.1), nn.Linear(width, vocab))

    def forward(self, tokens):
        hidden, bias = self.embed(tokens), None
        for layer in self.layers:
            hidden, bias = layer(hidden, bias)
        return self.head(hidden)


def lm_data(samples: int = 96, length: int = 8, vocab: int = 20) -> TensorDataset:
    tokens = torch.randint(
        0, vocab, (samples, length + 1), generator=torch.Generator().manual_seed(1)
    )
    return TensorDataset(tokens[:, :-1], tokens[:, 1:])


def run(cached: bool, epochs: int = 3, depth: int = 3) -> tuple[list[float], dict]:
    torch.manual_seed(0)
    model = TupleLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = lm_data()
    loader = DataLoader(
        data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(2)
    )
    total = epochs * len(loader)
    controller = FreezeController.from_pretrained(
        FreezePrefix(depth),
        model,
        optimizer,
        data[:16][0],
        total_steps=total,
        decisions=3,
        reference=False,
        safety_net=False,
    )
    batches = controller.wrap_loader(loader) if cached else loader
    losses = []
    try:
        for _ in range(epochs):
            for tokens, targets in batches:
                model.train()
                optimizer.zero_grad()
                loss = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
                loss.backward()
                optimizer.step()
                controller.step(loss)
                losses.append(loss.item())
        summary = controller.summary()
    finally:
        controller.close()
    return losses, summary


def test_cached_losses_equal_the_uncached_run_on_tuple_returning_blocks():
    plain, plain_summary = run(cached=False)
    cached, summary = run(cached=True)
    assert plain_summary["cache"]["reason_off"] == "wrap_loader() was not called"
    assert summary["timeline"] == plain_summary["timeline"]
    assert summary["timeline"][-1].startswith("FFF")
    cache = summary["cache"]
    assert cache["reason_off"] is None and cache["depth"] == 3 and cache["state"] == "serving"
    # the third decision comes after a full epoch frozen: every sample is stored by then
    assert cache["hits"] >= 96
    torch.testing.assert_close(torch.tensor(cached), torch.tensor(plain), rtol=1e-5, atol=1e-6)
    assert summary["modeled_speedup"] > plain_summary["modeled_speedup"]


def test_the_wrapped_loader_yields_the_same_batches_and_forwards_outside_training_pass():
    torch.manual_seed(0)
    model = TupleLM()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = lm_data()
    loader = DataLoader(data, batch_size=16, shuffle=False)
    controller = FreezeController.from_pretrained(
        FreezePrefix(3), model, optimizer, data[:16][0], interval_steps=1, signals=False
    )
    try:
        wrapped = controller.wrap_loader(loader)
        assert len(wrapped) == len(loader) and wrapped.dataset is data
        for (a, b), (c, d) in zip(wrapped, loader, strict=True):
            assert torch.equal(a, c) and torch.equal(b, d)
            model.eval()
            with torch.no_grad():  # an evaluation forward in between is not routed
                model(a)
            model.train()
            loss = F.cross_entropy(model(a).flatten(0, 1), b.flatten())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            controller.step(loss)
        assert controller.summary()["cache"]["routed_batches"] == len(loader)
        assert "forward" in model.__dict__
    finally:
        controller.close()
    assert "forward" not in model.__dict__  # close() puts the model's own forward back


class Augmented(Dataset):
    def __init__(self, data: TensorDataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        tokens, targets = self.data[i]
        return (tokens + torch.randint(0, 2, tokens.shape)) % 20, targets


class Stream(IterableDataset):
    def __iter__(self):
        yield from lm_data()


@pytest.mark.parametrize(
    ("make_loader", "kwargs", "reason"),
    [
        (lambda d: DataLoader(Augmented(d), batch_size=16), {}, "random augmentation"),
        (lambda d: DataLoader(d, batch_size=16), {"deterministic": False}, "non-deterministic"),
        (lambda d: DataLoader(Stream(), batch_size=16), {}, "iterable-style"),
        (lambda d: [d[:16]], {}, "not a torch DataLoader"),
    ],
)
def test_loaders_the_cache_cannot_serve_pass_through_with_the_reason(make_loader, kwargs, reason):
    model = TupleLM()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = lm_data()
    controller = FreezeController.from_pretrained(
        FreezePrefix(3), model, optimizer, data[:16][0], interval_steps=1, signals=False
    )
    try:
        loader = make_loader(data)
        state = torch.get_rng_state()
        wrapped = controller.wrap_loader(loader, **kwargs)
        assert torch.equal(state, torch.get_rng_state())  # the check left the RNG alone
        assert sum(1 for _ in wrapped) == sum(1 for _ in loader)
        assert reason in controller.summary()["cache"]["reason_off"]
        assert "forward" not in model.__dict__
    finally:
        controller.close()
