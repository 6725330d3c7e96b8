"""partition() on the architectures people train: Hugging Face transformers models built from
small configs (random init, nothing downloaded), the torchvision / timm shapes written out as
small models, and torchvision's own models where torchvision imports.

Each comes out one unit per stage or layer (plus the embedding or stem and the head), every
parameter in exactly one unit, the units in execution order, the layers cut points, the head
last, and the FLOPs summing to the whole model's count.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from itertools import pairwise
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from freeze_agent import Unit, partition
from freeze_agent.controller import FreezeController
from freeze_agent.core.modes import Mode
from freeze_agent.core.units import batch_size_of, call_model, tensors_in

BATCH = 3  # no config dimension is 3, so only per-sample tensors have a dimension of the batch
LAYERS = 3


# --------------------------------------------------------------------------- checks


def whole_model_flops(model: nn.Module, inputs: Any) -> float:
    """Per-sample FLOPs of one forward and backward of every floating-point output's sum."""
    model.train()
    with FlopCounterMode(display=False) as counter:
        output = call_model(model, inputs)
        terms = [t.float().sum() for t in tensors_in(output) if t.is_floating_point()]
        torch.stack(terms).sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch_size_of(inputs)


def assert_owned_once(model: nn.Module, units: Sequence[Unit]) -> None:
    owned = [id(p) for u in units for p in u.parameters()]
    assert len(owned) == len(set(owned)), "a parameter belongs to two units"
    assert set(owned) == {id(p) for p in model.parameters()}, "a parameter belongs to no unit"
    assert sum(u.num_params for u in units) == sum(p.numel() for p in model.parameters())
    assert [u.num_param_tensors for u in units] == [len(list(u.parameters())) for u in units]


def assert_execution_order(model: nn.Module, inputs: Any, units: Sequence[Unit]) -> None:
    """Each unit's first module starts after the previous unit's exit module has returned."""
    clock: dict[tuple[str, int], int] = {}

    def stamp(kind: str):
        def hook(module, *_):
            clock.setdefault((kind, id(module)), len(clock))

        return hook

    modules = {m for u in units for m in u.modules}
    handles = [m.register_forward_pre_hook(stamp("start")) for m in modules]
    handles += [m.register_forward_hook(stamp("end")) for m in modules]
    try:
        with torch.no_grad():
            call_model(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    for before, after in pairwise(units):
        start = min(clock[("start", id(m))] for m in after.modules if ("start", id(m)) in clock)
        assert clock[("end", id(before.exit_module))] < start, f"{after.name} runs too early"


def check(
    model: nn.Module,
    inputs: Any,
    names: Sequence[str],
    head: nn.Module,
    not_cut: Sequence[int] = (),
    max_units: int = 32,
) -> list[Unit]:
    """Partition ``model`` and check everything a real architecture must give."""
    units = partition(model, inputs, max_units)
    assert [u.name for u in units] == list(names)
    assert [u.index for u in units] == list(range(len(units)))
    assert units[-1].modules[0] is head
    assert [u.is_cut_point for u in units] == [i not in not_cut for i in range(len(units) - 1)] + [
        False
    ]
    assert all(u.output_bytes > 0 for u in units if u.is_cut_point)
    assert_owned_once(model, units)
    assert_execution_order(model, inputs, units)
    total = sum(u.flops_train for u in units)
    assert total == pytest.approx(whole_model_flops(model, inputs), rel=1e-9)
    assert units[0].flops_backward_input == 0
    assert all(u.flops_forward >= 0 and u.flops_backward_weight >= 0 for u in units)
    return units


def numbered(prefix: str, count: int, last_suffix: str = "") -> list[str]:
    """``prefix.0``, ..., ``prefix.{count-1}``, the last one extended by ``last_suffix``."""
    names = [f"{prefix}.{i}" for i in range(count)]
    names[-1] += last_suffix
    return names


# --------------------------------------------------------------------------- transformers


def tokens(vocab: int = 64, length: int = 12) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.randint(0, vocab, (BATCH, length)),
        "attention_mask": torch.ones(BATCH, length, dtype=torch.long),
    }


def images(channels: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(BATCH, channels, size, size)


def hf_resnet(t):
    config = t.ResNetConfig(
        num_channels=1,
        embedding_size=16,
        hidden_sizes=[16, 32, 64, 128],
        depths=[1, 1, 1, 1],
        num_labels=10,
    )
    model = t.ResNetForImageClassification(config)
    names = ["resnet.embedder", *numbered("resnet.encoder.stages", 4), "classifier"]
    return model, torch.randn(BATCH, 1, 32, 32), names, model.classifier, ()


def hf_resnet_deep_stages(t):
    """Stages of two residual layers split into their layers; a one-layer stage stays whole."""
    config = t.ResNetConfig(
        num_channels=3,
        embedding_size=8,
        hidden_sizes=[8, 16, 32],
        depths=[2, 2, 1],
        layer_type="basic",
        num_labels=10,
    )
    model = t.ResNetForImageClassification(config)
    stages = "resnet.encoder.stages"
    names = [
        "resnet.embedder",
        *numbered(f"{stages}.0.layers", 2),
        *numbered(f"{stages}.1.layers", 2),
        f"{stages}.2",
        "classifier",
    ]
    return model, images(), names, model.classifier, ()


def hf_convnext(t):
    """The second stage's downsampling ``ModuleList(LayerNorm, Conv2d)`` is one unit; the final
    LayerNorm (after pooling) joins the last layer."""
    config = t.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 2], num_stages=2, num_labels=10)
    model = t.ConvNextForImageClassification(config)
    stage = "convnext.encoder.stages.1"
    names = [
        "convnext.embeddings",
        "convnext.encoder.stages.0",
        f"{stage}.downsampling_layer.0..{stage}.downsampling_layer.1",
        *numbered(f"{stage}.layers", 2, "..convnext.layernorm"),
        "classifier",
    ]
    return model, images(), names, model.classifier, ()


def hf_swin(t):
    config = t.SwinConfig(
        image_size=32,
        patch_size=4,
        embed_dim=8,
        depths=[1, 2],
        num_heads=[1, 2],
        window_size=4,
        num_labels=10,
    )
    model = t.SwinForImageClassification(config)
    names = [
        "swin.embeddings",
        "swin.encoder.layers.0",
        *numbered("swin.encoder.layers.1.blocks", 2, "..swin.layernorm"),
        "classifier",
    ]
    return model, images(), names, model.classifier, ()


def hf_vit(t):
    config = t.ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=16,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=10,
    )
    model = t.ViTForImageClassification(config)
    prefix = "vit.layers" if hasattr(model.vit, "layers") else "vit.encoder.layer"  # 5.x: layers
    names = ["vit.embeddings", *numbered(prefix, LAYERS, "..vit.layernorm"), "classifier"]
    return model, images(), names, model.classifier, ()


def hf_dinov2(t):
    config = t.Dinov2Config(
        image_size=32,
        patch_size=8,
        hidden_size=16,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        mlp_ratio=2,
        num_labels=10,
    )
    model = t.Dinov2ForImageClassification(config)
    names = [
        "dinov2.embeddings",
        *numbered("dinov2.encoder.layer", LAYERS, "..dinov2.layernorm"),
        "classifier",
    ]
    return model, images(), names, model.classifier, ()


def hf_bert(t):
    """The pooler (a Linear + tanh) is a unit of its own before the classifier."""
    config = t.BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    model = t.BertForSequenceClassification(config)
    names = [
        "bert.embeddings",
        *numbered("bert.encoder.layer", LAYERS),
        "bert.pooler",
        "classifier",
    ]
    return model, tokens(), names, model.classifier, ()


def hf_distilbert(t):
    config = t.DistilBertConfig(
        vocab_size=64, dim=16, n_layers=LAYERS, n_heads=2, hidden_dim=32, max_position_embeddings=16
    )
    model = t.DistilBertForSequenceClassification(config)
    names = [
        "distilbert.embeddings",
        *numbered("distilbert.transformer.layer", LAYERS),
        "pre_classifier",
        "classifier",
    ]
    return model, tokens(), names, model.classifier, ()


def hf_roberta(t):
    config = t.RobertaConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=20,
    )
    model = t.RobertaForSequenceClassification(config)
    names = ["roberta.embeddings", *numbered("roberta.encoder.layer", LAYERS), "classifier"]
    return model, tokens(), names, model.classifier, ()


def gpt2(t):
    config = t.GPT2Config(
        vocab_size=64,
        n_embd=16,
        n_layer=LAYERS,
        n_head=2,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
        use_cache=False,
    )
    return t.GPT2LMHeadModel(config)


def hf_gpt2(t):
    """Token and position embeddings are one unit; its exit is the position table (no
    per-sample output), so it is no cut point."""
    model = gpt2(t)
    names = [
        "transformer.wte..transformer.wpe",
        *numbered("transformer.h", LAYERS, "..transformer.ln_f"),
        "lm_head",
    ]
    return model, tokens(), names, model.lm_head, (0,)


def llama(t, tied: bool = False):
    config = t.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
        tie_word_embeddings=tied,
        use_cache=False,
    )
    return t.LlamaForCausalLM(config)


def hf_llama(t):
    """``LlamaRMSNorm`` is a norm (no torch norm class): the final one joins the last layer."""
    model = llama(t)
    names = ["model.embed_tokens", *numbered("model.layers", LAYERS, "..model.norm"), "lm_head"]
    return model, tokens(), names, model.lm_head, ()


def hf_whisper_encoder(t):
    """The position table joins the layer that reads it, so ``conv2`` stays a cut point."""
    config = t.WhisperConfig(
        num_mel_bins=8,
        d_model=16,
        encoder_layers=2,
        encoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_layers=1,
        decoder_attention_heads=2,
        decoder_ffn_dim=32,
        max_source_positions=16,
        num_labels=4,
    )
    model = t.WhisperForAudioClassification(config)
    names = [
        "encoder.conv1",
        "encoder.conv2",
        "encoder.embed_positions..encoder.layers.0",
        "encoder.layers.1..encoder.layer_norm",
        "projector",
        "classifier",
    ]
    return model, {"input_features": torch.randn(BATCH, 8, 32)}, names, model.classifier, ()


def hf_albert(t):
    """One layer group, shared by all layers, runs once per layer: a list of as many blocks as
    layers, so it is one unit of its own, and no cut point (it runs more than once)."""
    config = t.AlbertConfig(
        vocab_size=64,
        embedding_size=8,
        hidden_size=16,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    model = t.AlbertForSequenceClassification(config)
    names = [
        "albert.embeddings",
        "albert.encoder.embedding_hidden_mapping_in",
        "albert.encoder.albert_layer_groups.0.albert_layers.0",
        "albert.pooler",
        "classifier",
    ]
    return model, tokens(), names, model.classifier, (2,)


def hf_mobilenet_v1(t):
    """The body is a list of single conv layers (no list of blocks) alone before the head, so
    the partition looks inside it."""
    config = t.MobileNetV1Config(
        num_channels=3, image_size=32, depth_multiplier=0.25, num_labels=10
    )
    model = t.MobileNetV1ForImageClassification(config)
    names = ["mobilenet_v1.conv_stem", *numbered("mobilenet_v1.layer", 26), "classifier"]
    return model, images(), names, model.classifier, ()


HF_ARCHITECTURES: dict[str, Callable[[Any], tuple]] = {
    "resnet": hf_resnet,
    "resnet-deep-stages": hf_resnet_deep_stages,
    "convnext": hf_convnext,
    "swin": hf_swin,
    "vit": hf_vit,
    "dinov2": hf_dinov2,
    "bert": hf_bert,
    "distilbert": hf_distilbert,
    "roberta": hf_roberta,
    "gpt2": hf_gpt2,
    "llama": hf_llama,
    "whisper-encoder": hf_whisper_encoder,
    "albert": hf_albert,
    "mobilenet-v1": hf_mobilenet_v1,
}


@pytest.mark.parametrize("build", HF_ARCHITECTURES.values(), ids=HF_ARCHITECTURES.keys())
def test_transformers_architectures(build):
    transformers = pytest.importorskip("transformers")
    model, inputs, names, head, not_cut = build(transformers)
    check(model, inputs, names, head, not_cut)


def test_a_stage_tuple_output_counts_every_batch_tensor():
    transformers = pytest.importorskip("transformers")
    model, inputs, *_ = hf_swin(transformers)
    stage = partition(model, inputs)[1]
    captured = []
    handle = stage.exit_module.register_forward_hook(lambda _m, _a, out: captured.append(out))
    with torch.no_grad():
        model(inputs)
    handle.remove()
    batch_tensors = [t for t in tensors_in(captured[0]) if t.shape[0] == BATCH]
    assert isinstance(captured[0], tuple) and len(batch_tensors) >= 2
    per_sample = sum(t.numel() * t.element_size() for t in batch_tensors) / BATCH
    assert stage.output_bytes == per_sample


def test_deep_stages_merge_within_max_units():
    transformers = pytest.importorskip("transformers")
    model, inputs, *_ = hf_resnet_deep_stages(transformers)
    units = partition(model, inputs, max_units=3)
    assert len(units) == 3 and units[-1].modules == (model.classifier,)
    assert_owned_once(model, units)


# --------------------------------------------------------------------------- tied weights


def test_tied_embedding_belongs_to_the_head_and_keeps_training():
    transformers = pytest.importorskip("transformers")
    model = gpt2(transformers)
    inputs = tokens()
    wte = model.transformer.wte.weight
    assert model.lm_head.weight is wte
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    controller = FreezeController(model, optimizer, inputs, signals=False)
    units = controller.units
    embedding, head = units[0], units[-1]
    assert all(p is not wte for p in embedding.parameters())
    assert any(p is wte for p in head.parameters())
    assert embedding.tied_to == (head.index,) and embedding.borrowed_parameters == (wte,)
    assert not embedding.supports_local
    assert all(u.tied_to == () and not u.borrowed_parameters for u in units[1:])
    # the head's backward is one GEMM to its input and one to its (tied) weight
    assert head.flops_backward_input == head.flops_forward == head.flops_backward_weight
    with pytest.raises(ValueError, match="cannot be LOCAL"):
        controller.set_modes([Mode.LOCAL] + [Mode.TRAIN] * (len(units) - 1))

    controller.set_modes([Mode.FROZEN] + [Mode.TRAIN] * (len(units) - 1))
    assert wte.requires_grad and not model.transformer.wpe.weight.requires_grad
    before = wte.detach().clone()
    optimizer.zero_grad(set_to_none=True)
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    optimizer.step()
    assert not torch.equal(before, wte)
    assert model.transformer.wpe.weight.grad is None


def test_a_first_unit_owning_nothing_still_splits_the_backward():
    """Llama with tied embeddings: ``embed_tokens`` owns no parameter of its own."""
    transformers = pytest.importorskip("transformers")
    model = llama(transformers, tied=True)
    names = ["model.embed_tokens", *numbered("model.layers", LAYERS, "..model.norm"), "lm_head"]
    units = check(model, tokens(), names, model.lm_head)
    embedding, head = units[0], units[-1]
    assert embedding.num_params == 0 and embedding.tied_to == (head.index,)
    assert head.flops_backward_input == head.flops_forward == head.flops_backward_weight
    assert units[1].flops_backward_input > 0


def test_a_table_that_never_runs_is_no_tie():
    """T5EncoderModel keeps ``shared``, a table that never runs and whose weight
    ``encoder.embed_tokens`` uses: the embedding owns that weight, nothing is tied."""
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(
        vocab_size=64,
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
    )
    model = transformers.T5EncoderModel(config)
    units = partition(model, tokens())
    assert units[0].name == "encoder.embed_tokens" and units[0].tied_to == ()
    assert any(p is model.shared.weight for p in units[0].parameters())
    assert all(not u.tied_to for u in units)
    assert_owned_once(model, units)


def test_a_parameter_read_without_running_its_module_belongs_to_its_reader():
    """DeBERTa's encoder hands ``rel_embeddings.weight`` to a LayerNorm (v2) or to every layer
    (v1) without calling ``rel_embeddings``: the table goes with its (last) reader, not the
    head, so freezing the layers freezes it."""
    transformers = pytest.importorskip("transformers")
    common = dict(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        relative_attention=True,
        pos_att_type=["p2c", "c2p"],
    )
    v2 = transformers.DebertaV2ForSequenceClassification(
        transformers.DebertaV2Config(norm_rel_ebd="layer_norm", position_buckets=8, **common)
    )
    v1 = transformers.DebertaForSequenceClassification(transformers.DebertaConfig(**common))
    for model, reader in ((v2, 1), (v1, LAYERS)):
        units = partition(model, tokens())
        table = model.deberta.encoder.rel_embeddings.weight
        owner = [u.index for u in units if any(p is table for p in u.parameters())]
        assert owner == [reader]
        assert all(reader in u.tied_to for u in units[1:reader])  # v1: every layer reads it
        assert_owned_once(model, units)


# --------------------------------------------------------------------------- torchvision shapes


class BasicBlock(nn.Module):
    """torchvision's ResNet basic block (in-place ReLU and residual add included)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class ResNetLike(nn.Module):
    """torchvision's ``resnet18`` layout at a small width."""

    def __init__(self, widths: Sequence[int] = (8, 16, 32, 64), num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        c_in = widths[0]
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            layer = nn.Sequential(BasicBlock(c_in, width, stride), BasicBlock(width, width))
            self.add_module(f"layer{i + 1}", layer)
            c_in = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ConvBNReLU(nn.Sequential):
    """torchvision's ``Conv2dNormActivation``."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """torchvision's MobileNetV2 block: its body is a ``Sequential`` of single conv layers."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        self.use_res_connect = stride == 1 and c_in == c_out
        layers: list[nn.Module] = [ConvBNReLU(c_in, hidden, 1)] if expand != 1 else []
        layers += [
            ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2Like(nn.Module):
    """A ``features`` Sequential of inverted-residual blocks between a stem and a last conv."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            ConvBNReLU(3, 8, stride=2),
            InvertedResidual(8, 8, 1, 1),
            InvertedResidual(8, 12, 2, 4),
            InvertedResidual(12, 12, 1, 4),
            InvertedResidual(12, 16, 2, 4),
            InvertedResidual(16, 16, 1, 4),
            ConvBNReLU(16, 32, 1),
        )
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


class EncoderBlock(nn.Module):
    """torchvision's ViT encoder block (pre-norm attention and MLP, residual adds)."""

    def __init__(self, d: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.self_attention = nn.MultiheadAttention(d, heads, batch_first=True)
        self.dropout = nn.Dropout(0.1)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, mlp), nn.GELU(), nn.Dropout(0.1), nn.Linear(mlp, d))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = self.ln_1(inputs)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = self.dropout(x) + inputs
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    def __init__(self, tokens: int, d: int, depth: int) -> None:
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.randn(1, tokens, d) * 0.02)
        self.dropout = nn.Dropout(0.1)
        self.layers = nn.Sequential(
            OrderedDict((f"encoder_layer_{i}", EncoderBlock(d, 2, 2 * d)) for i in range(depth))
        )
        self.ln = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.layers(self.dropout(x + self.pos_embedding)))


class ViTLike(nn.Module):
    """torchvision's ``VisionTransformer`` layout: patch conv, class token, ``encoder.layers``."""

    def __init__(self, d: int = 16, patch: int = 8, size: int = 32, depth: int = LAYERS) -> None:
        super().__init__()
        self.conv_proj = nn.Conv2d(3, d, patch, patch)
        self.class_token = nn.Parameter(torch.zeros(1, 1, d))
        self.encoder = Encoder((size // patch) ** 2 + 1, d, depth)
        self.heads = nn.Sequential(OrderedDict(head=nn.Linear(d, 10)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.heads(self.encoder(x)[:, 0])


def resnet_names() -> list[str]:
    return ["conv1..bn1", *(f"layer{i}.{j}" for i in range(1, 5) for j in range(2)), "fc"]


def vit_names(depth: int = LAYERS) -> list[str]:
    layers = [f"encoder.layers.encoder_layer_{i}" for i in range(depth)]
    layers[-1] += "..encoder.ln"
    return ["conv_proj", *layers, "heads"]


def test_torchvision_style_resnet():
    model = ResNetLike()
    check(model, images(), resnet_names(), model.fc)


def test_torchvision_style_mobilenet_v2():
    model = MobileNetV2Like()
    names = [*numbered("features", 7), "classifier"]
    check(model, images(), names, model.classifier)


def test_torchvision_style_vit():
    model = ViTLike()
    units = check(model, images(), vit_names(), model.heads)
    assert units[0].extra_parameters == (model.class_token,)
    assert units[1].extra_parameters == (model.encoder.pos_embedding,)


# --------------------------------------------------------------------------- torchvision itself


def torchvision_models():
    try:
        from torchvision import models
    except Exception as error:  # not installed, or a build that does not match this torch
        pytest.skip(f"torchvision does not import: {type(error).__name__}: {error}")
    return models


def test_torchvision_resnet18():
    model = torchvision_models().resnet18(num_classes=10)
    check(model, images(), resnet_names(), model.fc)


def test_torchvision_mobilenet_v2():
    model = torchvision_models().mobilenet_v2(num_classes=10)
    check(model, images(), [*numbered("features", 19), "classifier"], model.classifier)


def test_torchvision_vision_transformer():
    model = torchvision_models().VisionTransformer(
        image_size=32, patch_size=8, num_layers=LAYERS, num_heads=2, hidden_dim=16, mlp_dim=32
    )
    check(model, images(), vit_names(), model.heads)
