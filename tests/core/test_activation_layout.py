"""ActivationLayout: any boundary output (tensor, tuple, ModelOutput) as one stored row per sample
and back, with constants kept once and changes between batches named."""

from __future__ import annotations

import pytest
import torch

from freeze_agent.core.activation_layout import ActivationLayout


def test_a_single_tensor_is_stored_as_it_is():
    x = torch.randn(4, 3, 2)
    layout = ActivationLayout.of(x, 4)
    assert isinstance(layout, ActivationLayout) and layout.single_tensor
    assert layout.pack(x) is x and layout.unpack(x) is x
    assert layout.bytes_per_sample == 3 * 2 * 4


def test_a_tuple_with_constants_round_trips_through_packed_rows():
    hidden = torch.randn(4, 5, 3)
    mask = torch.rand(4, 5) > 0.5
    position_bias = torch.randn(1, 2, 5, 5)  # no batch dimension: a constant
    output = (hidden.half(), None, (mask, position_bias), 7)
    layout = ActivationLayout.of(output, 4)
    assert isinstance(layout, ActivationLayout) and not layout.single_tensor
    rows = layout.pack(output)
    assert rows.dtype == torch.uint8 and rows.shape == (4, 5 * 3 * 2 + 5)
    assert layout.bytes_per_sample == rows.shape[1]
    # rows are per sample: any subset of them unpacks to that subset of the batch
    back = layout.unpack(rows[[2, 0]])
    assert torch.equal(back[0], hidden.half()[[2, 0]]) and back[1] is None and back[3] == 7
    assert torch.equal(back[2][0], mask[[2, 0]]) and torch.equal(back[2][1], position_bias)
    zeros = layout.zeros(3, torch.device("cpu"))
    assert zeros[0].shape == (3, 5, 3) and not zeros[0].any() and zeros[1] is None


def test_a_model_output_round_trips():
    outputs = pytest.importorskip("transformers.modeling_outputs")
    output = outputs.BaseModelOutput(last_hidden_state=torch.randn(4, 6, 8))
    layout = ActivationLayout.of(output, 4)
    back = layout.unpack(layout.pack(output))
    assert type(back) is type(output)
    assert torch.equal(back.last_hidden_state, output.last_hidden_state)


def test_changes_between_batches_are_named():
    layout = ActivationLayout.of((torch.randn(4, 3), torch.ones(1, 3)), 4)
    assert layout.matches((torch.randn(2, 3), torch.ones(1, 3)), 2) is None
    assert "not per sample changed" in layout.matches((torch.randn(2, 3), torch.zeros(1, 3)), 2)
    assert "shape or dtype" in layout.matches((torch.randn(2, 4), torch.ones(1, 3)), 2)
    assert "structure changed" in layout.matches([torch.randn(2, 3), torch.ones(1, 3)], 2)


def test_an_output_without_a_per_sample_tensor_cannot_be_stored():
    reason = ActivationLayout.of((torch.randn(1, 3), None), 4)
    assert isinstance(reason, str) and "no tensor with the batch first" in reason
