"""freeze-agent deployed on Hugging Face transformers models as a user deploys it: a plain loop
with AdamW over a ``DataLoader`` wrapped by ``controller.wrap_loader``, a frozen prefix set with
a timeline string (``"FFFTT"``).

Each architecture of the catalog (tiny config, random init, nothing downloaded) is one that
broke the library once (relative attention, labels passed to the model, a padded mask, dropout
between the units, NumPy masks, weight norm, a shared layer, a list of single conv layers) or a
distinct shape that never did. Each trains two epochs with a frozen prefix (the first fills the
activation cache, the second is served from it) and must give the same losses as without the
cache, keep the frozen units bitwise fixed, train the rest, serve the cache where the
architecture allows it and leave every ``requires_grad`` as the model had it. Each one's unit
count is pinned, so that a change to the partition shows, and Wav2Vec2 also trains under the
shipped policy with its signals on (the reference worker pickles its weight norm).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from freeze_agent import FreezeController, Mode, Unit, partition
from freeze_agent.core.units import tensors_in

transformers = pytest.importorskip("transformers")

SAMPLES = 16
BATCH = 4
EPOCHS = 2
CLASSES = 3
VOCAB = 64
LENGTH = 12

Inputs = dict[str, torch.Tensor]


# --------------------------------------------------------------------------- data


def generator(seed: int = 1234) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def classes() -> torch.Tensor:
    return torch.randint(0, CLASSES, (SAMPLES,), generator=generator(99))


def tokens(padded: bool = False, eos: int | None = None) -> Inputs:
    """Token ids (none below 3, the special ids) and their attention mask; ``padded`` masks out
    a random tail of each row, ``eos`` ends every row with that id."""
    ids = torch.randint(3, VOCAB, (SAMPLES, LENGTH), generator=generator())
    if eos is not None:
        ids[:, -1] = eos
    mask = torch.ones_like(ids)
    if padded:
        lengths = torch.randint(6, LENGTH + 1, (SAMPLES,), generator=generator(7))
        mask[torch.arange(LENGTH) >= lengths[:, None]] = 0
    return {"input_ids": ids, "attention_mask": mask}


def text_classification() -> tuple[Inputs, torch.Tensor]:
    return tokens(), classes()


def next_tokens() -> tuple[Inputs, torch.Tensor]:
    """Windows of a token stream, each target the input shifted by one."""
    stream = torch.randint(3, VOCAB, (SAMPLES, LENGTH + 1), generator=generator())
    return {"input_ids": stream[:, :-1].contiguous()}, stream[:, 1:].contiguous()


def images(size: int = 32) -> tuple[Inputs, torch.Tensor]:
    return {"pixel_values": torch.randn(SAMPLES, 3, size, size, generator=generator())}, classes()


def waveforms() -> tuple[Inputs, torch.Tensor]:
    return {"input_values": torch.randn(SAMPLES, 320, generator=generator())}, classes()


def log_mel() -> tuple[Inputs, torch.Tensor]:
    return {"input_features": torch.randn(SAMPLES, 8, 32, generator=generator())}, classes()


# --------------------------------------------------------------------------- the catalog


@dataclass(frozen=True)
class Architecture:
    """A model, its data and what deploying freeze-agent on it must give."""

    build: Callable[[], nn.Module]
    data: Callable[[], tuple[Inputs, torch.Tensor]]
    """Every sample's model inputs and its targets (classes, or the next tokens)."""
    units: int
    cache: dict[int, int | str]
    """Frozen depth -> the depth the cache serves in the second epoch, or (a string) a part of
    the reason it stays off."""
    own_loss: bool = False
    """The targets go to the model as ``labels=`` and it computes its own loss."""


class WithHead(nn.Module):
    """What a user writes around a headless encoder: a linear classifier on the mean of the
    last hidden state."""

    def __init__(self, backbone: nn.Module, width: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(width, CLASSES)

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(**inputs).last_hidden_state.mean(1))


BERT_LIKE: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=32,
    num_labels=CLASSES,
)
LLAMA_LIKE: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=32,
)
VIT_LIKE: dict[str, Any] = dict(
    image_size=32,
    patch_size=8,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    num_labels=CLASSES,
)


def deberta_v2() -> nn.Module:
    """Relative attention: the encoder reads ``rel_embeddings.weight`` without running it."""
    config = transformers.DebertaV2Config(
        relative_attention=True,
        pos_att_type=["p2c", "c2p"],
        norm_rel_ebd="layer_norm",
        position_buckets=8,
        max_relative_positions=-1,
        **BERT_LIKE,
    )
    return transformers.DebertaV2ForSequenceClassification(config)


def t5_encoder() -> nn.Module:
    """``shared`` never runs, ``encoder.embed_tokens`` holds its weight: an alias, no tie."""
    config = transformers.T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
    )
    return WithHead(transformers.T5EncoderModel(config), 32)


def bart() -> nn.Module:
    config = transformers.BartConfig(
        vocab_size=VOCAB,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=32,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        num_labels=CLASSES,
    )
    return transformers.BartForSequenceClassification(config)


def electra() -> nn.Module:
    config = transformers.ElectraConfig(embedding_size=16, **BERT_LIKE)
    return transformers.ElectraForSequenceClassification(config)


def xlm_roberta() -> nn.Module:
    return transformers.XLMRobertaForSequenceClassification(
        transformers.XLMRobertaConfig(**BERT_LIKE)
    )


def mpnet() -> nn.Module:
    """The relative-position bias is a (length, length) table without a batch dimension."""
    return transformers.MPNetForSequenceClassification(transformers.MPNetConfig(**BERT_LIKE))


def gpt_j() -> nn.Module:
    """``transformer.drop`` (embd_pdrop) is a dropout between the embedding and the layers."""
    config = transformers.GPTJConfig(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=2,
        rotary_dim=8,
        n_positions=32,
        embd_pdrop=0.1,
    )
    return transformers.GPTJForCausalLM(config)


def wav2vec2() -> nn.Module:
    """Weight-normed positional conv, SpecAugment masks drawn from NumPy, LayerDrop."""
    config = transformers.Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(16, 16),
        conv_stride=(5, 2),
        conv_kernel=(10, 3),
        num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=2,
        classifier_proj_size=16,
        mask_time_prob=0.1,
        mask_time_length=4,
        num_labels=CLASSES,
    )
    return transformers.Wav2Vec2ForSequenceClassification(config)


def whisper() -> nn.Module:
    """The sinusoidal position table is a parameter the model keeps fixed."""
    config = transformers.WhisperConfig(
        num_mel_bins=8,
        d_model=16,
        encoder_layers=2,
        encoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_layers=1,
        decoder_attention_heads=2,
        decoder_ffn_dim=32,
        max_source_positions=16,
        num_labels=CLASSES,
    )
    return transformers.WhisperForAudioClassification(config)


def albert() -> nn.Module:
    """One layer group, shared by both layers, runs once per layer."""
    config = transformers.AlbertConfig(embedding_size=16, **BERT_LIKE)
    return transformers.AlbertForSequenceClassification(config)


def mobilenet_v1() -> nn.Module:
    """The body is a list of single conv layers, not of blocks."""
    config = transformers.MobileNetV1Config(
        image_size=32, depth_multiplier=0.25, num_labels=CLASSES
    )
    return transformers.MobileNetV1ForImageClassification(config)


def mobilenet_v2() -> nn.Module:
    config = transformers.MobileNetV2Config(
        image_size=32, depth_multiplier=0.25, num_labels=CLASSES
    )
    return transformers.MobileNetV2ForImageClassification(config)


def efficientnet() -> nn.Module:
    config = transformers.EfficientNetConfig(
        image_size=32,
        width_coefficient=0.25,
        depth_coefficient=0.25,
        hidden_dim=320,
        num_labels=CLASSES,
    )
    return transformers.EfficientNetForImageClassification(config)


def swinv2() -> nn.Module:
    config = transformers.Swinv2Config(
        image_size=32,
        patch_size=4,
        embed_dim=8,
        depths=[1, 1],
        num_heads=[1, 2],
        window_size=4,
        num_labels=CLASSES,
    )
    return transformers.Swinv2ForImageClassification(config)


def convnext_v2() -> nn.Module:
    config = transformers.ConvNextV2Config(
        hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=CLASSES
    )
    return transformers.ConvNextV2ForImageClassification(config)


def deit() -> nn.Module:
    return transformers.DeiTForImageClassification(transformers.DeiTConfig(**VIT_LIKE))


def segformer() -> nn.Module:
    config = transformers.SegformerConfig(
        num_encoder_blocks=2,
        depths=[1, 1],
        sr_ratios=[2, 1],
        hidden_sizes=[8, 16],
        num_attention_heads=[1, 2],
        decoder_hidden_size=16,
        num_labels=CLASSES,
    )
    return transformers.SegformerForImageClassification(config)


def qwen2() -> nn.Module:
    config = transformers.Qwen2Config(**LLAMA_LIKE, tie_word_embeddings=False)
    return transformers.Qwen2ForCausalLM(config)


def opt() -> nn.Module:
    config = transformers.OPTConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        ffn_dim=64,
        num_attention_heads=2,
        max_position_embeddings=32,
        word_embed_proj_dim=32,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    return transformers.OPTForCausalLM(config)


def gpt_neo() -> nn.Module:
    """The token embedding is the LM head's weight: a real tie."""
    config = transformers.GPTNeoConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        attention_types=[[["global", "local"], 1]],
        window_size=4,
        max_position_embeddings=32,
        intermediate_size=64,
    )
    return transformers.GPTNeoForCausalLM(config)


ARCHITECTURES: dict[str, Architecture] = {
    "deberta-v2": Architecture(deberta_v2, text_classification, 5, {4: 4, 2: 1}),
    # T5Stack's dropout runs between the embedding and the first layer
    "t5-encoder+head": Architecture(t5_encoder, text_classification, 6, {5: 1, 2: 1}),
    # the encoder's and the decoder's embeddings share their table: a real tie
    "bart": Architecture(
        bart, lambda: (tokens(eos=2), classes()), 8, {4: "tied to unit 4", 1: "tied to unit 4"}
    ),
    "electra": Architecture(electra, text_classification, 5, {4: 4, 2: 2}, own_loss=True),
    "xlm-roberta-padded": Architecture(
        xlm_roberta, lambda: (tokens(padded=True), classes()), 4, {3: 3, 2: 2}
    ),
    "mpnet": Architecture(mpnet, text_classification, 4, {3: 3, 2: 1}),
    "gpt-j": Architecture(gpt_j, next_tokens, 4, {3: 1, 2: 1}),
    # SpecAugment and LayerDrop run between the units after the feature projection
    "wav2vec2": Architecture(wav2vec2, waveforms, 7, {6: 2, 2: 2}),
    "whisper": Architecture(whisper, log_mel, 6, {5: 5, 2: 2}),
    "albert": Architecture(albert, text_classification, 5, {4: 4, 3: 2}),
    "mobilenet-v1": Architecture(mobilenet_v1, images, 28, {27: 27, 13: 13}),
    "mobilenet-v2": Architecture(mobilenet_v2, images, 19, {18: 18, 9: 9}),
    # not below 6: at init, blocks 2 and 3 of this tiny EfficientNet get gradients of ~1e-35,
    # too small to move their squeeze-excite biases
    "efficientnet": Architecture(efficientnet, images, 10, {9: 9, 6: 6}),
    "swinv2": Architecture(swinv2, images, 4, {3: 3, 2: 2}),
    "convnext-v2": Architecture(convnext_v2, images, 4, {3: 3, 1: 1}),
    "deit": Architecture(deit, images, 4, {3: 3, 2: 2}),
    "segformer": Architecture(segformer, images, 3, {2: 2, 1: 1}),
    "qwen2": Architecture(qwen2, next_tokens, 4, {3: 3, 1: 1}),
    "opt": Architecture(opt, next_tokens, 5, {4: 4, 2: 1}),
    # the token embedding is the LM head's weight
    "gpt-neo": Architecture(gpt_neo, next_tokens, 4, {3: "tied to unit 3", 1: "tied to unit 3"}),
}


# --------------------------------------------------------------------------- a user's run


def samples(architecture: Architecture) -> list[tuple[Inputs, torch.Tensor]]:
    """The dataset as a list of (inputs, target) samples; the default collate batches them."""
    inputs, targets = architecture.data()
    return [({k: v[i] for k, v in inputs.items()}, targets[i]) for i in range(SAMPLES)]


def loader(data: list[tuple[Inputs, torch.Tensor]]) -> DataLoader:
    return DataLoader(data, batch_size=BATCH, shuffle=True, generator=generator(0))


def example_input(architecture: Architecture, data: list[tuple[Inputs, torch.Tensor]]) -> Inputs:
    """One batch as the loop passes it to the model."""
    inputs, targets = next(iter(DataLoader(data, batch_size=BATCH)))
    return {**inputs, "labels": targets} if architecture.own_loss else inputs


def seeded(architecture: Architecture) -> nn.Module:
    """The model from the same seed in every run, and NumPy's and Python's generators seeded
    too (Wav2Vec2 draws its SpecAugment masks from NumPy)."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    return architecture.build().train()


def fit(
    architecture: Architecture,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    controller: FreezeController,
    batches: Iterable[tuple[Inputs, torch.Tensor]],
) -> list[float]:
    """The user's loop, ``EPOCHS`` epochs; returns the losses."""
    losses = []
    for _ in range(EPOCHS):
        model.train()
        for inputs, targets in batches:
            if architecture.own_loss:
                loss = model(**inputs, labels=targets).loss
            else:
                output = model(**inputs)
                logits = output if isinstance(output, torch.Tensor) else output.logits
                # (batch, classes), or (batch, length, vocabulary) for the next tokens
                loss = F.cross_entropy(logits.flatten(0, -2), targets.flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            controller.step(loss)
            losses.append(loss.item())
    return losses


def prefix_output(model: nn.Module, unit: Unit, inputs: Inputs) -> list[torch.Tensor]:
    """The tensors ``unit`` outputs (every call) in an eval forward of ``inputs``."""
    outputs: list[torch.Tensor] = []
    handle = unit.exit_module.register_forward_hook(
        lambda _module, _args, output: outputs.extend(tensors_in(output))
    )
    model.eval()
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
        model.train()
    return outputs


@dataclass
class Run:
    """What one run showed; the parameter lists hold names and are empty when all is well."""

    losses: list[float]
    cache: dict[str, Any]
    """``controller.summary()["cache"]`` after the last step."""
    frozen_changed: list[str]
    frozen_with_grad: list[str]
    trained_unchanged: list[str]
    """Parameters of TRAIN units that the model trains and that did not change."""
    fixed_changed: list[str]
    """Parameters that the model keeps fixed (``requires_grad`` False) and that changed."""
    flags_changed_by_close: list[str]
    """Parameters whose ``requires_grad`` differs after ``close()`` from the model's own."""
    prefix_moved: bool
    """Whether the frozen prefix's output (an eval forward of one batch) changed."""
    tied_to_train: bool
    """Whether a frozen unit uses a weight that a TRAIN unit owns, so the prefix's output moves
    as that unit trains (GPT-Neo's token embedding, the LM head's weight)."""


def train(architecture: Architecture, depth: int, cached: bool) -> Run:
    """Train with the first ``depth`` units FROZEN, through ``wrap_loader`` if ``cached``."""
    model = seeded(architecture)
    names = {p: name for name, p in model.named_parameters()}
    trainable = {p: p.requires_grad for p in model.parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = samples(architecture)
    example = example_input(architecture, data)
    controller = FreezeController(model, optimizer, example, signals=False)
    units = controller.units
    try:
        modes = controller.set_modes("F" * depth + "T" * (len(units) - depth))
        batches = controller.wrap_loader(loader(data)) if cached else loader(data)
        before = {p: p.detach().clone() for p in model.parameters()}
        prefix_before = prefix_output(model, units[depth - 1], example)
        losses = fit(architecture, model, optimizer, controller, batches)
        cache = controller.summary()["cache"]
    finally:
        controller.close()
    changed = {p: not torch.equal(p.detach(), before[p]) for p in model.parameters()}
    owned = {
        mode: [p for u in units if modes[u.index] is mode for p in u.parameters()] for mode in Mode
    }
    prefix_after = prefix_output(model, units[depth - 1], example)
    return Run(
        losses=losses,
        cache=cache,
        frozen_changed=[names[p] for p in owned[Mode.FROZEN] if changed[p]],
        frozen_with_grad=[names[p] for p in owned[Mode.FROZEN] if p.grad is not None],
        trained_unchanged=[names[p] for p in owned[Mode.TRAIN] if trainable[p] and not changed[p]],
        fixed_changed=[names[p] for p in model.parameters() if not trainable[p] and changed[p]],
        flags_changed_by_close=[
            names[p] for p in model.parameters() if p.requires_grad != trainable[p]
        ],
        prefix_moved=not all(map(torch.equal, prefix_before, prefix_after)),
        tied_to_train=any(
            modes[owner] is Mode.TRAIN for unit in units[:depth] for owner in unit.tied_to
        ),
    )


# --------------------------------------------------------------------------- the checks


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_each_architecture_splits_into_its_blocks(name: str) -> None:
    """One unit per block (plus the embedding or stem and the head), as the catalog counts."""
    architecture = ARCHITECTURES[name]
    units = partition(seeded(architecture), example_input(architecture, samples(architecture)))
    assert len(units) == architecture.units, [unit.name for unit in units]


CASES = [(name, depth) for name, arch in ARCHITECTURES.items() for depth in arch.cache]


@pytest.mark.parametrize(("name", "depth"), CASES, ids=[f"{n}-frozen{d}" for n, d in CASES])
def test_a_frozen_prefix_trains_as_without_the_cache(name: str, depth: int) -> None:
    """Same losses with and without ``wrap_loader``. In both runs the frozen units stay bitwise
    fixed and get no gradient, and the prefix's output stays fixed too unless a frozen unit
    uses a weight of a TRAIN unit (the cache must then stay off); the other units train, and
    ``close()`` leaves every ``requires_grad`` as the model had it. The cache serves where the
    architecture allows it."""
    architecture = ARCHITECTURES[name]
    cached = train(architecture, depth, cached=True)
    plain = train(architecture, depth, cached=False)
    assert all(math.isfinite(loss) for loss in cached.losses)
    assert cached.losses == pytest.approx(plain.losses, rel=1e-4, abs=1e-6)
    for run in (cached, plain):
        assert run.frozen_changed == [] and run.frozen_with_grad == []
        assert run.tied_to_train or not run.prefix_moved, "the frozen prefix's output changed"
        assert run.trained_unchanged == [] and run.fixed_changed == []
        assert run.flags_changed_by_close == []
    expected = architecture.cache[depth]
    if isinstance(expected, int):
        assert (cached.cache["state"], cached.cache["depth"]) == ("serving", expected), cached.cache
        assert cached.cache["hits"] > 0
    else:
        assert cached.cache["state"] == "off", cached.cache
        assert expected in cached.cache["reason_off"]


@pytest.mark.slow  # starts the reference worker's process
def test_the_default_policy_measures_plasticity_on_a_weight_normed_model() -> None:
    """The shipped policy, signals on: the reference worker must pickle Wav2Vec2, whose
    positional conv is weight-normed (a parametrization), for plasticity to be measured."""
    architecture = ARCHITECTURES["wav2vec2"]
    model = seeded(architecture)
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = samples(architecture)
    batches = loader(data)
    controller = FreezeController.from_pretrained(
        "default",
        model,
        optimizer,
        example_input(architecture, data),
        total_steps=EPOCHS * len(batches),
        decisions=4,
    )
    try:
        losses = fit(architecture, model, optimizer, controller, controller.wrap_loader(batches))
    finally:
        controller.close()
    assert len(losses) == EPOCHS * len(batches) and all(math.isfinite(v) for v in losses)
    assert controller.signal_report()["plasticity_fraction"] > 0
    assert {name: p.requires_grad for name, p in model.named_parameters()} == trainable
