"""partition(): units in execution order, full parameter coverage, FLOPs, memory traffic and
operator counts, cut points."""

from __future__ import annotations

import pytest
import torch
from helpers import ResidualBlock, ResidualNet, conv_chain
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from freeze_agent import UnitKind, partition
from freeze_agent.core.units import _count_work


def whole_model_flops(model: nn.Module, inputs, batch: int) -> float:
    with FlopCounterMode(display=False) as counter:
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
        logits = out if isinstance(out, torch.Tensor) else out[0]
        logits.float().sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


def assert_exact_cover(model: nn.Module, units) -> None:
    owned = [id(p) for u in units for p in u.parameters()]
    assert len(owned) == len(set(owned)), "a parameter belongs to two units"
    assert set(owned) == {id(p) for p in model.parameters()}, "a parameter belongs to no unit"
    assert sum(u.num_params for u in units) == sum(p.numel() for p in model.parameters())


class TransformerClassifier(nn.Module):
    def __init__(self, d: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(4, d)
        self.position = nn.Embedding(8, d)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d, 2, 32, dropout=0.1, batch_first=True, norm_first=True)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 5)

    def forward(self, x):
        x = self.embed(x.view(x.shape[0], 8, 4)) + self.position.weight
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x).mean(1))


class GRUNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.grus = nn.ModuleList(
            [nn.GRU(4, 16, batch_first=True), nn.GRU(16, 16, batch_first=True)]
        )
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = x.view(x.shape[0], 8, 4)
        for gru in self.grus:
            x, _ = gru(x)
        return self.head(x[:, -1])


class Unstructured(nn.Module):
    """One custom child that holds everything: the partition falls back to leaf modules."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Module()
        self.inner.a = nn.Linear(32, 16)
        self.inner.b = nn.Linear(16, 16)
        self.inner.c = nn.Linear(16, 3)
        self.scale = nn.Parameter(torch.ones(16))  # a bare parameter on the root

    def forward(self, x):
        h = torch.relu(self.inner.a(x.flatten(1))) * self.scale
        return self.inner.c(torch.relu(self.inner.b(h)))


def test_residual_net_units_follow_execution_order(residual_net):
    units = partition(residual_net, torch.randn(4, 1, 16))
    assert [u.name for u in units] == ["stem", "blocks.0", "blocks.1", "blocks.2", "head"]
    assert [u.index for u in units] == list(range(5))
    assert units[-1].modules[0] is residual_net.head
    assert units[1].kind is UnitKind.CONV and units[-1].kind is UnitKind.LINEAR
    assert_exact_cover(residual_net, units)


def test_residual_blocks_are_cut_points_and_head_is_not(residual_net):
    units = partition(residual_net, torch.randn(4, 1, 16))
    assert all(u.is_cut_point for u in units[:-1])
    assert not units[-1].is_cut_point


def test_a_raw_input_read_past_a_boundary_keeps_it_a_cut_point():
    """The cache runs the rest of the model on the batch's real inputs, so reading an input past
    the boundary (labels for the model's own loss, an attention mask) is no obstacle."""

    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x, labels=None):
            h = self.a(x)
            out = self.head(self.b(h + x))  # the raw input skips past unit 0's boundary
            return out if labels is None else nn.functional.cross_entropy(out, labels)

    units = partition(Skip(), torch.randn(4, 8))
    assert [u.is_cut_point for u in units] == [True, True, False]
    units = partition(Skip(), {"x": torch.randn(4, 8), "labels": torch.tensor([0, 1, 1, 0])})
    assert [u.is_cut_point for u in units] == [True, True, False]


def test_a_prefix_output_read_past_a_boundary_is_not_a_cut_point():
    class Side(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            h = self.a(x)
            return self.head(self.c(self.b(h)) + h)  # unit 0's output skips units 1 and 2

    units = partition(Side(), torch.randn(4, 8))
    assert [u.is_cut_point for u in units] == [True, False, False, False]


@pytest.mark.parametrize(
    ("model", "inputs"),
    [
        (ResidualNet(), torch.randn(4, 1, 16)),
        (TransformerClassifier(), torch.randn(4, 32)),
        (GRUNet(), torch.randn(4, 32)),
        (Unstructured(), torch.randn(4, 32)),
    ],
    ids=["resnet", "transformer", "gru", "unstructured"],
)
def test_flops_sum_to_the_whole_model_count(model, inputs):
    units = partition(model, inputs)
    assert_exact_cover(model, units)
    total = sum(u.flops_forward + u.flops_backward_input + u.flops_backward_weight for u in units)
    assert total == pytest.approx(whole_model_flops(model, inputs, 4), rel=1e-9)
    assert units[0].flops_backward_input == 0
    assert all(u.flops_forward >= 0 and u.flops_backward_weight >= 0 for u in units)


def test_traffic_and_ops_of_a_hand_checked_model():
    """Batch 4: Linear(4, 8, no bias) → ReLU | head Linear(8, 2). GEMMs (mm, addmm) move no
    counted bytes; views (t, detach, expand) are neither bytes nor ops."""
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 8, bias=False), nn.ReLU()), nn.Linear(8, 2))
    first, head = partition(model, torch.randn(4, 4))
    floats = 4  # bytes
    # forward: relu reads and writes 4×8 floats; backward: threshold_backward reads the
    # incoming gradient and the relu output and writes the gradient (3 × 4×8 floats)
    assert first.traffic_forward == 2 * 8 * floats
    assert first.traffic_backward_input == 0
    assert first.traffic_backward_weight == 3 * 8 * floats
    assert (first.ops_forward, first.ops_backward_weight) == (2, 2)  # mm + relu; relu' + mm
    # the head: addmm forward; mm to its input; mm + the bias gradient's sum (4×2 → 2) to weights
    assert head.traffic_forward == head.traffic_backward_input == 0
    assert head.traffic_backward_weight == (4 * 2 + 2) * floats / 4
    assert (head.ops_forward, head.ops_backward_input, head.ops_backward_weight) == (1, 1, 2)
    assert (first.output_bytes, head.output_bytes) == (8 * floats, 2 * floats)
    assert (first.num_param_tensors, head.num_param_tensors) == (1, 2)


def test_a_frozen_forward_is_counted_in_eval_mode():
    """Block: Conv1d(8→8) → BatchNorm → ReLU → Dropout. Frozen (eval mode, no autograd) the
    dropout is gone and BatchNorm only reads and writes its input once with its statistics."""
    units = partition(conv_chain(width=8, depth=3), torch.randn(4, 1, 16))
    block = units[1]
    assert block.ops_forward_frozen < block.ops_forward
    assert block.traffic_forward_frozen < block.traffic_forward
    assert block.flops_forward > 0
    activation = 8 * 16 * 4  # bytes per sample of an 8-channel, length-16 float map
    # BatchNorm in eval mode: input and output (plus 4 per-channel vectors); ReLU: in and out
    assert block.traffic_forward_frozen == pytest.approx(4 * activation, abs=4 * 8 * 4)


@pytest.mark.parametrize(
    ("model", "inputs"),
    [(ResidualNet(), torch.randn(4, 1, 16)), (GRUNet(), torch.randn(4, 32))],
    ids=["resnet", "gru"],
)
def test_traffic_and_ops_sum_to_the_whole_model_count(model, inputs):
    units = partition(model, inputs)
    whole = _count_work(model, inputs, list(model.parameters())).work(model, "")
    traffic = sum(
        u.traffic_forward + u.traffic_backward_input + u.traffic_backward_weight for u in units
    )
    ops = sum(u.ops_forward + u.ops_backward_input + u.ops_backward_weight for u in units)
    model.zero_grad(set_to_none=True)
    assert traffic * 4 == pytest.approx(whole.traffic, rel=1e-9) and whole.traffic > 0
    assert ops == whole.ops and ops > 0
    assert all(u.traffic_forward >= 0 and u.ops_forward > 0 for u in units)
    assert units[-1].output_bytes == units[-1].modules[0].out_features * 4  # the logits


def test_transformer_layers_are_attention_units_and_final_norm_joins_the_last_layer():
    model = TransformerClassifier()
    units = partition(model, torch.randn(4, 32))
    assert [u.kind for u in units[1:4]] == [UnitKind.ATTENTION] * 3
    assert model.norm in units[3].modules
    assert not units[1].supports_local  # MultiheadAttention weights are not nn.Linear calls


def test_gru_layers_are_recurrent_units():
    units = partition(GRUNet(), torch.randn(4, 32))
    assert [u.kind for u in units] == [UnitKind.RECURRENT, UnitKind.RECURRENT, UnitKind.LINEAR]
    assert not units[0].supports_local


def test_fallback_to_leaf_modules_with_a_bare_parameter():
    model = Unstructured()
    units = partition(model, torch.randn(4, 32))
    assert [u.name for u in units] == ["inner.a", "inner.b", "inner.c"]
    assert any(p is model.scale for p in units[0].parameters())
    assert not units[0].supports_local  # the bare parameter is no conv/linear weight
    assert_exact_cover(model, units)


def test_bert_encoder_from_transformers():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    model = transformers.BertForSequenceClassification(config)
    inputs = {
        "input_ids": torch.randint(0, 50, (4, 12)),
        "attention_mask": torch.ones(4, 12, dtype=torch.long),
    }
    units = partition(model, inputs)
    names = [u.name for u in units]
    assert names[:4] == [
        "bert.embeddings",
        "bert.encoder.layer.0",
        "bert.encoder.layer.1",
        "bert.encoder.layer.2",
    ]
    assert units[0].kind is UnitKind.EMBEDDING
    assert units[1].kind is UnitKind.ATTENTION
    assert units[-1].name.endswith("classifier")
    assert_exact_cover(model, units)


class IteratedContainers(nn.Module):
    """Containers whose own forward never runs: the forward iterates a one-block Sequential and
    a ModuleDict."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv1d(1, 8, 3, padding=1)
        self.stage = nn.Sequential(ResidualBlock(8))
        self.more = nn.ModuleDict({"a": ResidualBlock(8), "b": ResidualBlock(8)})
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        for block in [*self.stage, *self.more.values()]:
            x = block(x)
        return self.head(x.mean(-1))


def test_containers_whose_forward_never_runs_are_split_into_their_blocks():
    model = IteratedContainers()
    units = partition(model, torch.randn(4, 1, 16))
    assert [u.name for u in units] == ["stem", "stage.0", "more.a", "more.b", "head"]
    assert all(u.is_cut_point for u in units[:-1])
    assert_exact_cover(model, units)


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class RMSNorm(nn.Module):
    """A norm of no torch norm class, as Llama's."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class TinyLM(nn.Module):
    """Token and position embeddings (a table of no batch dimension), layers, a custom final
    norm and a head, optionally tied to the token embedding."""

    def __init__(self, tied: bool = False, vocab: int = 11, d: int = 8) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, d)
        self.positions = nn.Embedding(16, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(2))
        self.norm = RMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.tokens.weight

    def forward(self, ids):
        x = self.tokens(ids) + self.positions(torch.arange(ids.shape[1]))
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


class ConvFrontEnd(nn.Module):
    """Whisper's shape: convolutions, then a position table added before the layers."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, d, 3, padding=1)
        self.positions = nn.Embedding(16, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(2))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        x = self.conv(x).transpose(1, 2) + self.positions(torch.arange(x.shape[-1]))
        for layer in self.layers:
            x = layer(x)
        return self.head(x.mean(1))


def test_a_position_table_joins_its_lookup_and_a_custom_norm_joins_the_last_layer():
    model = TinyLM()
    units = partition(model, torch.randint(0, 11, (4, 6)))
    assert [u.name for u in units] == ["tokens..positions", "layers.0", "layers.1..norm", "head"]
    assert units[0].kind is UnitKind.EMBEDDING and not units[0].is_cut_point  # exit: the table
    assert all(u.is_cut_point for u in units[1:-1])
    assert_exact_cover(model, units)


def test_a_position_table_joins_the_layer_that_reads_it_and_is_charged_only_its_own_work():
    """The table's input (positions) needs no gradient; its backward must still end with it,
    not run on and take the convolution's backward too."""
    model = ConvFrontEnd()
    units = partition(model, torch.randn(4, 1, 6))
    assert [u.name for u in units] == ["conv", "positions..layers.0", "layers.1", "head"]
    assert [u.is_cut_point for u in units] == [True, True, True, False]
    layer = units[1]  # two Linear layers: one GEMM each to the input and to the weights
    assert layer.flops_backward_weight == layer.flops_backward_input == layer.flops_forward
    total = sum(u.flops_train for u in units)
    assert total == pytest.approx(whole_model_flops(model, torch.randn(4, 1, 6), 4), rel=1e-9)


def test_a_tied_weight_belongs_to_the_last_unit_using_it():
    model = TinyLM(tied=True)
    ids = torch.randint(0, 11, (4, 6))
    units = partition(model, ids)
    embedding, head = units[0], units[-1]
    assert [p for p in embedding.parameters()] == [model.positions.weight]
    assert embedding.borrowed_parameters == (model.tokens.weight,)
    assert embedding.tied_to == (head.index,) and not embedding.supports_local
    assert [p for p in head.parameters()] == [model.head.weight]
    assert head.num_params == model.head.weight.numel() and head.num_param_tensors == 1
    assert head.flops_backward_input == head.flops_forward == head.flops_backward_weight
    assert_exact_cover(model, units)


def test_more_blocks_than_max_units_are_merged_in_balanced_groups():
    model = nn.Sequential(
        *[nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(9)], nn.Linear(16, 2)
    )
    units = partition(model, torch.randn(4, 16), max_units=4)
    assert len(units) == 4
    assert [len(u.modules) for u in units] == [3, 3, 3, 1]
    assert units[-1].modules[0] is model[9]
    assert_exact_cover(model, units)


def test_partition_leaves_the_model_untouched(residual_net):
    residual_net.train()
    before = {k: v.clone() for k, v in residual_net.state_dict().items()}
    inputs = torch.randn(4, 1, 16)
    rng = torch.get_rng_state()
    partition(residual_net, inputs)
    after = residual_net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(rng, torch.get_rng_state())
    assert residual_net.training and all(p.requires_grad for p in residual_net.parameters())
    assert all(p.grad is None for p in residual_net.parameters())


def test_model_without_parameters_is_a_clear_error():
    with pytest.raises(ValueError, match="no parameters"):
        partition(nn.Sequential(nn.ReLU()), torch.randn(2, 3))


def test_input_that_does_not_run_is_a_clear_error(residual_net):
    with pytest.raises(ValueError, match="does not run through the model"):
        partition(residual_net, torch.randn(4, 3, 16))


def test_per_unit_flops_match_a_hand_count():
    # per sample, a GEMM of (m x k) by (k x n) is 2mkn FLOPs; the backward to the input and to
    # the weights are one such GEMM each, and the first unit needs no gradient for its input
    model = nn.Sequential(
        nn.Sequential(nn.Conv1d(1, 2, 3, padding=1), nn.ReLU()),  # 2 * (2 out x 1 in x 3 taps) x 8
        nn.Sequential(nn.Flatten(), nn.Linear(16, 5), nn.ReLU()),  # 2 * 16 * 5
        nn.Linear(5, 3),  # 2 * 5 * 3
    )
    counts = [
        (u.flops_forward, u.flops_backward_input, u.flops_backward_weight)
        for u in partition(model, torch.randn(4, 1, 8))
    ]
    assert counts == [(96, 0, 96), (160, 160, 160), (30, 30, 30)]
