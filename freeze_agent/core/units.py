"""Partition a model into freezable units.

A *unit* is a block of a model that is trained, trained locally or frozen as a whole: a conv
block, a residual block, a transformer layer, an embedding, the head. ``partition`` finds the
units of any model by tracing one forward pass of an example input with hooks, so units come
out in forward-execution order whatever order the modules were registered in.

How blocks are recognized:

* the root module is always split into its parameter-bearing children;
* an ``nn.ModuleList`` is always split into its items (a list of layers has no forward of its
  own, so its items are the natural blocks);
* an ``nn.Sequential`` is split when it holds composite blocks (a stage of residual blocks), and
  kept whole when it holds plain layers (``Sequential(conv, bn, relu)`` is one block);
* any other module is split when somewhere below it lies a list of blocks, items that hold two
  or more weight layers each (a ``BertModel`` holds ``encoder.layer``; a ResNet stage holds its
  residual layers), and kept whole otherwise: a residual block whose body is a ``Sequential``
  of single conv layers (Hugging Face's ResNet layer, torchvision's inverted residual) is one
  block, and so is a stage of a single layer;
* a module whose own forward never runs while its sub-modules' do (a ``Sequential`` or
  ``ModuleDict`` that its parent iterates) is a mere container and is split too.

Blocks then group into units: a block made only of normalization layers (torch's or a custom
``...Norm``) joins the block executed before it, or after it when it is a pre-norm at the head of
a list; a block that returns no per-sample tensor (a position-embedding table) joins the
embedding lookup before it or else the block that reads it.

If that leaves a single block (a model with no structure to speak of), the partition falls back
to the model's parameter-bearing leaf modules. When there are more blocks than ``max_units``,
adjacent blocks are merged into groups of balanced compute; the head always stays alone.

A parameter that several units use (tied weights: GPT-2's token embedding is its LM head's
weight) belongs to the last of them in execution order; the units before it record the tie in
``Unit.tied_to``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from itertools import chain
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.module_tracker import ModuleTracker

from freeze_agent.core.random_state import forked_torch_rngs, preserved_global_rngs

ModelInput = torch.Tensor | tuple[Any, ...] | Mapping[str, Any]

_NORM_TYPES = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)
_LOCAL_RULE_TYPES = (nn.Linear, nn.modules.conv._ConvNd)


class UnitKind(str, Enum):
    """What a unit mostly is, from the layers inside it (the first match in this order wins)."""

    ATTENTION = "attention"
    RECURRENT = "recurrent"
    CONV = "conv"
    LINEAR = "linear"
    EMBEDDING = "embedding"
    NORM = "norm"
    OTHER = "other"


UNIT_KINDS: tuple[UnitKind, ...] = tuple(UnitKind)


@dataclass(eq=False)
class Unit:
    """One freezable block of a model.

    FLOP figures are per sample, measured with ``torch.utils.flop_counter.FlopCounterMode`` on the
    example input: ``flops_forward`` for the forward pass, ``flops_backward_input`` for passing the
    gradient through the unit to its input (zero for the first unit, whose input needs none) and
    ``flops_backward_weight`` for the unit's own weight gradients. Summed over all units they give
    the whole model's forward + backward count. The same passes count, split the same way, the
    memory traffic of every other (memory-bound) operator and the number of operators dispatched,
    which the cost model needs once the GEMMs are gone.
    """

    index: int
    name: str
    modules: tuple[nn.Module, ...]
    module_names: tuple[str, ...]
    exit_module: nn.Module
    """The unit's last executed module: its output is the unit's output. (A unit that ends with
    a position table added to its embedding lookup's output is the exception: the sum is made
    outside any module, so that unit is no cut point.)"""
    extra_parameters: tuple[nn.Parameter, ...]
    num_params: int
    kind: UnitKind
    flops_forward: float
    flops_backward_input: float
    flops_backward_weight: float
    is_cut_point: bool
    """The unit's output alone determines everything after it (the activation cache needs this)."""
    supports_local: bool
    """Every weight of the unit sits in a conv or linear layer, so the local rule can train it."""
    traffic_forward: float = 0.0
    traffic_backward_input: float = 0.0
    traffic_backward_weight: float = 0.0
    """Per-sample bytes read and written by the unit's memory-bound ops (everything but the GEMMs
    and convolutions that the FLOP figures count, and but views), split like the FLOPs."""
    ops_forward: float = 0.0
    ops_backward_input: float = 0.0
    ops_backward_weight: float = 0.0
    """Operators dispatched per iteration (views excluded), split like the FLOPs: the per-call
    overhead that dominates small layers."""
    traffic_forward_frozen: float = 0.0
    ops_forward_frozen: float = 0.0
    """The same for the forward of a frozen prefix unit: eval mode (norm layers use their running
    statistics, no dropout) and no autograd (pooling keeps no indices), often much cheaper."""
    output_bytes: float = 0.0
    """Per-sample bytes of the unit's output (what the activation cache stores and reads back)."""
    num_param_tensors: int = 0
    """Parameter tensors the unit owns (the optimizer's per-tensor work)."""
    tied_to: tuple[int, ...] = ()
    """Indices of the later units that own parameters this unit's modules also use (tied
    weights: GPT-2's token embedding is its LM head's weight); empty normally. Such a unit's
    output keeps changing while its owners train, even with the unit frozen, so it must never be
    served from the activation cache, and it cannot learn by the local rule (``supports_local``
    is False)."""
    borrowed_parameters: tuple[nn.Parameter, ...] = ()
    """The parameters of this unit's modules that those later units own (left out of
    ``parameters()`` and ``num_params``)."""

    def parameters(self) -> Iterator[nn.Parameter]:
        """The parameters this unit owns, each once: its modules' and its extra ones, less the
        borrowed ones. Each model parameter belongs to exactly one unit, so freezing a unit
        freezes exactly what it owns."""
        borrowed = {id(p) for p in self.borrowed_parameters}
        params = chain((p for m in self.modules for p in m.parameters()), self.extra_parameters)
        yield from (p for p in _distinct(params) if id(p) not in borrowed)

    @property
    def flops_train(self) -> float:
        """Per-sample FLOPs of one training iteration of this unit with everything in TRAIN."""
        return self.flops_forward + self.flops_backward_input + self.flops_backward_weight

    def __repr__(self) -> str:
        return (
            f"Unit({self.index}, {self.name!r}, kind={self.kind.value}, params={self.num_params}, "
            f"fwd={self.flops_forward:.3g}, cut={self.is_cut_point}, local={self.supports_local})"
        )


def _distinct(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    """``params`` in order, each once (a module may be reached twice, a weight may be tied)."""
    return list({id(p): p for p in params}.values())


# --------------------------------------------------------------------------- running a model


def call_model(model: nn.Module, inputs: ModelInput) -> Any:
    """Call ``model`` the way its input asks: a dict as keywords, a tuple as positional args."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def batch_size_of(inputs: ModelInput) -> int:
    """The leading dimension of the first tensor found in ``inputs``."""
    for tensor in tensors_in(inputs):
        if tensor.dim() > 0:
            return int(tensor.shape[0])
    raise ValueError("the example input holds no tensor with a batch dimension")


def tensors_in(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor inside a (nested) tensor / tuple / list / dict / ModelOutput."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from tensors_in(item)
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from tensors_in(item)


def _scalar_objective(output: Any) -> torch.Tensor:
    """A scalar that depends on every floating-point output, for a backward pass."""
    terms = [t.float().sum() for t in tensors_in(output) if t.is_floating_point()]
    if not terms:
        raise ValueError("the model's output holds no floating-point tensor to back-propagate")
    return torch.stack(terms).sum()


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Run probes on ``model`` and leave no trace: buffers (e.g. BatchNorm statistics), gradients,
    ``requires_grad`` flags, train/eval flags and the random generators (torch's CPU one and
    those of the model's CUDA devices, NumPy's and Python's) are all restored."""
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    grads = {p: p.grad for p in model.parameters()}
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    training = {m: m.training for m in model.modules()}
    with forked_torch_rngs(model), preserved_global_rngs():
        try:
            yield
        finally:
            with torch.no_grad():
                for name, b in model.named_buffers():
                    if name in buffers:
                        b.copy_(buffers[name])
            for p in model.parameters():
                p.grad = grads[p]
                p.requires_grad_(requires_grad[p])
            for m, flag in training.items():
                m.training = flag


# --------------------------------------------------------------------------- block discovery


def _has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _owns_params(module: nn.Module) -> bool:
    return next(module.parameters(recurse=False), None) is not None


def _param_children(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, c) for n, c in module.named_children() if _has_params(c)]


def _is_composite(module: nn.Module) -> bool:
    """A module built of parameter-bearing sub-modules (a block), not a single layer."""
    return bool(_param_children(module))


def _is_norm(module: nn.Module) -> bool:
    """A normalization layer: a torch one, or a custom one such as ``LlamaRMSNorm`` (named so,
    holding nothing but per-channel vectors)."""
    if isinstance(module, _NORM_TYPES):
        return True
    return (
        "norm" in type(module).__name__.lower()
        and not _is_composite(module)
        and all(p.dim() <= 1 for p in module.parameters())
    )


def _weight_layers(module: nn.Module) -> int:
    """Parameter-owning modules in ``module``'s subtree that are not normalization layers."""
    return sum(1 for m in module.modules() if _owns_params(m) and not _is_norm(m))


def _is_list(module: nn.Module) -> bool:
    return isinstance(module, (nn.ModuleList, nn.Sequential))


def _splits_into_items(module: nn.Module) -> bool:
    """A list of at least two parameter-bearing items, some of them composite."""
    children = [c for _, c in _param_children(module)]
    return _is_list(module) and len(children) >= 2 and any(_is_composite(c) for c in children)


def _is_block_list(module: nn.Module, ran: Mapping[int, int]) -> bool:
    """A list of blocks: at least two items run, at least half of them holding two or more
    weight layers (residual blocks, transformer layers). An item counts once per run: ALBERT's
    one layer group, shared by all its layers, is a list of as many blocks as it has layers. A
    list of single conv/linear layers with their norms and activations is the body of one block,
    not a list of blocks."""
    runs = [(c, max(ran.get(id(c), 0), 1)) for _, c in _param_children(module)]
    blocks = sum(n for c, n in runs if _weight_layers(c) >= 2)
    total = sum(n for _, n in runs)
    return _is_list(module) and total >= 2 and 2 * blocks >= total


def _holds_block_list(module: nn.Module, ran: Mapping[int, int]) -> bool:
    return any(_is_block_list(m, ran) for m in module.modules())


def _expand(
    module: nn.Module, path: str, is_root: bool, ran: Mapping[int, int]
) -> list[tuple[str, nn.Module]]:
    """The blocks below ``module`` as (qualified path, module), in registration order.

    ``ran`` holds, for each module whose forward ran on the example input (by ``id``), how many
    times it ran: a module whose own forward never runs while some of its sub-modules' do (a
    ``Sequential`` or ``ModuleDict`` that its parent iterates) is only a container, so it is
    split.
    """
    children = _param_children(module)
    if not children:
        return [(path, module)]
    split = (
        is_root
        or isinstance(module, nn.ModuleList)
        or _splits_into_items(module)
        or (not isinstance(module, nn.Sequential) and _holds_block_list(module, ran))
        or (id(module) not in ran and any(id(m) in ran for m in module.modules()))
    )
    if not split:
        return [(path, module)]
    blocks: list[tuple[str, nn.Module]] = []
    for name, child in children:
        blocks.extend(_expand(child, f"{path}.{name}" if path else name, False, ran))
    return blocks


def _leaf_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Parameter-bearing modules with no parameter-bearing children (the fallback blocks)."""
    return [
        (name, m) for name, m in model.named_modules() if _owns_params(m) and not _is_composite(m)
    ]


def _orphan_parameters(
    model: nn.Module, blocks: list[tuple[str, nn.Module]]
) -> list[tuple[str, nn.Parameter]]:
    """Parameters that no block's subtree holds (a bare ``nn.Parameter`` on a container)."""
    covered = {id(p) for _, m in blocks for p in m.parameters()}
    return [(n, p) for n, p in model.named_parameters() if id(p) not in covered]


@dataclass(frozen=True)
class _Trace:
    """What one forward of the example input showed about each module (by ``id``)."""

    first_call: dict[int, int]
    """When the module's forward first ran (a counter over all modules' calls)."""
    calls: dict[int, int]
    """How many times the module's forward ran (a shared layer runs once per use)."""
    per_sample: set[int]
    """Modules that returned a per-sample tensor: one with a dimension of the batch's size.
    A position-embedding table (GPT-2's ``wpe`` returns (1, T, D)) is shared by all samples."""
    consumers: dict[int, list[int]]
    """For each parameter (by ``id``) that a module received as an input, those modules in call
    order: DeBERTa's encoder hands ``rel_embeddings.weight`` to its layers (or a LayerNorm)
    without ever calling the ``rel_embeddings`` module itself."""


def _trace(model: nn.Module, inputs: ModelInput) -> _Trace:
    """Run ``inputs`` through ``model`` once with hooks on every module; also raises a clear
    error if the example input does not run."""
    batch = batch_size_of(inputs)
    first_call: dict[int, int] = {}
    calls: dict[int, int] = {}
    per_sample: set[int] = set()
    params = {id(p) for p in model.parameters()}
    consumers: dict[int, list[int]] = {}

    def before(module, args, kwargs):
        first_call.setdefault(id(module), len(first_call))
        calls[id(module)] = calls.get(id(module), 0) + 1
        for t in tensors_in((args, kwargs)):
            if id(t) in params:
                consumers.setdefault(id(t), []).append(id(module))

    def after(module, _args, output):
        if any(batch in t.shape for t in tensors_in(output)):
            per_sample.add(id(module))

    handles = []
    for m in model.modules():
        handles += [
            m.register_forward_pre_hook(before, with_kwargs=True),
            m.register_forward_hook(after),
        ]
    try:
        with torch.no_grad():
            call_model(model, inputs)
    except Exception as error:  # the user's model or input is wrong: say so plainly
        raise ValueError(
            f"the example input does not run through the model ({type(error).__name__}: {error}); "
            "pass one batch exactly as the training loop feeds it (a tensor, a tuple of "
            "positional arguments, or a dict of keyword arguments)"
        ) from error
    finally:
        for handle in handles:
            handle.remove()
    return _Trace(first_call, calls, per_sample, consumers)


def _execution_order(blocks: Sequence[tuple[str, nn.Module]], trace: _Trace) -> list[int]:
    """Indices of ``blocks`` in the order their forward first ran; blocks that never ran are
    left out."""
    ran = [i for i, (_, m) in enumerate(blocks) if id(m) in trace.first_call]
    return sorted(ran, key=lambda i: trace.first_call[id(blocks[i][1])])


# --------------------------------------------------------------------------- work counts


@dataclass(frozen=True)
class _Work:
    """Work of a stretch of execution: GEMM FLOPs, bytes moved by the other ops, ops dispatched."""

    flops: float = 0.0
    traffic: float = 0.0
    ops: float = 0.0

    def __add__(self, other: _Work) -> _Work:
        return _Work(self.flops + other.flops, self.traffic + other.traffic, self.ops + other.ops)

    def __sub__(self, other: _Work) -> _Work:
        return _Work(self.flops - other.flops, self.traffic - other.traffic, self.ops - other.ops)


_FACTORIES = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"})


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class _ModuleTracker(ModuleTracker):
    """torch's ``ModuleTracker``, except that a module whose inputs need no gradient leaves the
    backward once the autograd nodes it made have run. torch's waits for its inputs' gradients
    only, so such a module (a position table reading position ids) stayed entered for the rest of
    the backward and was charged with all of it."""

    def _fw_post_hook(self, mod: nn.Module, input: Any, output: Any) -> None:
        super()._fw_post_hook(mod, input, output)
        if any(t.requires_grad for t in tensors_in(input)):
            return
        last = _nodes_next_to_leaves(output)  # its backward ends with one of these
        if not last:
            return
        leave = self._get_pop_fn(self._get_mod_name(mod), True)
        remaining = len(last)

        def ran(*_: Any) -> None:
            nonlocal remaining
            remaining -= 1
            if remaining == 0:
                leave()

        self._hooks += [node.register_hook(ran) for node in last]


def _nodes_next_to_leaves(output: Any) -> list[Any]:
    """The autograd nodes behind ``output`` that lead to nothing but leaves (no hooks go on the
    leaves themselves: a hooked leaf's gradient is copied, which would change the counts)."""
    stack = [t.grad_fn for t in tensors_in(output) if t.grad_fn is not None]
    seen: dict[int, Any] = {}
    last = []
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen[id(node)] = node
        after = [
            n
            for n, _ in node.next_functions
            if n is not None and type(n).__name__ != "AccumulateGrad"
        ]
        if not after:
            last.append(node)
        stack.extend(after)
    return last


class _WorkCounter(FlopCounterMode):
    """FlopCounterMode that also counts, per module, the operators dispatched and the bytes that
    the operators without a FLOP formula read and write (their tensor arguments and results).
    Views cost nothing: an op whose every result shares storage with an argument and that is not
    in place (aten names in-place ops ``name_``) is a view; an allocation (``empty``) dispatches
    but moves no bytes. ``mark()`` ends the forward phase: ``work(..., "forward")`` is what ran
    before it, ``work(..., "backward")`` what ran after."""

    def __init__(self) -> None:
        super().__init__(display=False)
        self.mod_tracker = _ModuleTracker()
        self.traffic: dict[str, float] = {}
        self.ops: dict[str, float] = {}
        self._forward: dict[str, _Work] | None = None

    def _count_flops(self, func_packet, out, args, kwargs):
        result = super()._count_flops(func_packet, out, args, kwargs)
        inputs = [t for t in tensors_in((args, kwargs)) if t.numel()]
        outputs = [t for t in tensors_in(out) if t.numel()]
        storages = {_storage(t) for t in inputs}
        in_place = func_packet.__name__.endswith("_")  # aten's naming rule: add_, relu_, copy_
        if outputs and not in_place and all(_storage(t) in storages for t in outputs):
            return result  # a view
        moved = 0
        if func_packet not in self.flop_registry and func_packet.__name__ not in _FACTORIES:
            moved = sum(t.numel() * t.element_size() for t in inputs + outputs)
        for parent in set(self.mod_tracker.parents):
            self.ops[parent] = self.ops.get(parent, 0) + 1
            self.traffic[parent] = self.traffic.get(parent, 0) + moved
        return result

    def _total(self, key: str) -> _Work:
        flops = sum(self.flop_counts.get(key, {}).values())
        return _Work(float(flops), float(self.traffic.get(key, 0)), float(self.ops.get(key, 0)))

    def mark(self) -> None:
        self._forward = {key: self._total(key) for key in set(self.flop_counts) | set(self.ops)}

    def work(self, model: nn.Module, path: str, phase: str = "all") -> _Work:
        key = type(model).__name__ + (f".{path}" if path else "")
        total = self._total(key)
        if phase == "all" or self._forward is None:  # unmarked: a forward-only pass
            return total if phase != "backward" else _Work()
        forward = self._forward.get(key, _Work())
        return forward if phase == "forward" else total - forward


def _count_work(
    model: nn.Module,
    inputs: ModelInput,
    trainable: Sequence[nn.Parameter] | None,
    training: bool = True,
    grad_from: nn.Module | None = None,
) -> _WorkCounter:
    """Per-module work of one forward without autograd (``trainable`` is None) or one forward
    and backward with exactly ``trainable`` requiring gradients (``mark``ed in between), with
    the model in train (``training``) or eval mode. ``grad_from``'s output also requires
    gradients, as if a parameter had made it."""
    model.train(training)
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None  # as after zero_grad(set_to_none=True): no accumulation into old grads
    for p in trainable or ():
        p.requires_grad_(True)
    handle = grad_from.register_forward_hook(_requiring_grad) if grad_from else None
    try:
        with _WorkCounter() as counter:
            if trainable is None:
                with torch.no_grad():
                    call_model(model, inputs)
            else:
                objective = _scalar_objective(call_model(model, inputs))
                counter.mark()
                if objective.requires_grad:
                    objective.backward()
    finally:
        if handle is not None:
            handle.remove()
    return counter


def _requiring_grad(_module: nn.Module, _args: Any, output: Any) -> Any:
    if type(output) is tuple:
        return tuple(_requiring_grad(_module, _args, o) for o in output)
    if isinstance(output, torch.Tensor) and output.is_floating_point():
        return output.detach().requires_grad_()
    return output


def _output_bytes(model: nn.Module, inputs: ModelInput, exits: Sequence[nn.Module]) -> list[float]:
    """Per-sample bytes of each exit module's (first) output: every tensor in it whose leading
    dimension is the batch, each counted once (a tuple or ``ModelOutput`` holds several); 0 where
    there is none."""
    batch = batch_size_of(inputs)
    sizes = [0.0] * len(exits)
    seen: set[int] = set()

    def make_hook(i: int):
        def hook(_module, _args, output):
            if i not in seen:
                tensors = {id(t): t for t in tensors_in(output) if t.dim() and t.shape[0] == batch}
                sizes[i] = sum(t.numel() * t.element_size() for t in tensors.values()) / batch
            seen.add(i)

        return hook

    handles = [m.register_forward_hook(make_hook(i)) for i, m in enumerate(exits)]
    try:
        with torch.no_grad():
            call_model(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return sizes


# --------------------------------------------------------------------------- cut points


def _exit_outputs(
    model: nn.Module, inputs: ModelInput, exits: Sequence[nn.Module]
) -> list[tuple[Any, int]]:
    """Each exit module's first output in one no-grad forward, with how many times it ran."""
    seen: list[tuple[Any, int]] = [(None, 0)] * len(exits)

    def make_hook(i: int):
        def hook(_module, _args, output):
            first, calls = seen[i]
            seen[i] = (output if calls == 0 else first, calls + 1)

        return hook

    handles = [m.register_forward_hook(make_hook(i)) for i, m in enumerate(exits)]
    try:
        with torch.no_grad():
            call_model(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _is_cut_after(
    model: nn.Module,
    exit_module: nn.Module,
    exit_output: tuple[Any, int],
    inputs: ModelInput,
    prefix: Sequence[nn.Module],
) -> bool:
    """Does the output of ``exit_module`` carry everything the rest of the model reads from the
    prefix (``prefix``: the top modules of the units up to and including the boundary's)?

    Checked on the autograd graph: run the input again with the exit module's output put back
    as a constant and every other prefix module's floating-point outputs made leaves that
    require gradients. If none of them reaches the model's output, nothing after the boundary
    reads anything the prefix computed but the exit's output, however little it would weigh
    (a freshly initialized head shrinks every difference a perturbation could show). The
    model's inputs are left alone: the activation cache runs the rest of the model on the
    batch's real inputs, so a suffix that reads them (labels for the model's own loss, an
    attention mask, the input ids a pooler indexes with) does not make the boundary unusable;
    one that reads another prefix module's output does, even when that output does not depend
    on the input (a relative-position bias computed once for all layers). ``exit_output``: the
    exit module's output in an eval forward of ``inputs`` and how many times it ran there
    (``_exit_outputs``).
    """
    output, calls = exit_output
    if calls != 1:
        return False  # a module run twice per forward is no boundary of a chain
    leaves: list[torch.Tensor] = []

    def as_leaf(t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point():
            return t
        leaf = t.detach().requires_grad_()
        leaves.append(leaf)
        return leaf.clone()  # not a leaf itself, so later in-place ops stay legal

    others = [m for m in {id(m): m for m in prefix}.values() if m is not exit_module]
    handles = [
        m.register_forward_hook(
            lambda _m, _a, out: pytree.tree_map_only(torch.Tensor, as_leaf, out)
        )
        for m in others
    ]
    handles.append(exit_module.register_forward_hook(lambda _m, _a, _o: output))
    try:
        with torch.enable_grad():
            final = [t for t in tensors_in(call_model(model, inputs)) if t.requires_grad]
            if not leaves or not final:
                return True
            grads = torch.autograd.grad(
                final, leaves, [torch.ones_like(t) for t in final], allow_unused=True
            )
    except Exception:  # a model that cannot run so: no boundary to rely on
        return False
    finally:
        for handle in handles:
            handle.remove()
    return all(g is None for g in grads)


# --------------------------------------------------------------------------- grouping


def _kind_of(modules: Sequence[nn.Module]) -> UnitKind:
    leaves = [m for top in modules for m in top.modules()]
    checks = (
        (
            UnitKind.ATTENTION,
            lambda m: (
                isinstance(m, nn.MultiheadAttention) or "attention" in type(m).__name__.lower()
            ),
        ),
        (UnitKind.RECURRENT, lambda m: isinstance(m, (nn.RNNBase, nn.RNNCellBase))),
        (UnitKind.CONV, lambda m: isinstance(m, nn.modules.conv._ConvNd)),
        (UnitKind.LINEAR, lambda m: isinstance(m, nn.Linear)),
        (UnitKind.EMBEDDING, lambda m: isinstance(m, (nn.Embedding, nn.EmbeddingBag))),
        (UnitKind.NORM, _is_norm),
    )
    for kind, matches in checks:
        if any(matches(m) for m in leaves):
            return kind
    return UnitKind.OTHER


def _supports_local(modules: Sequence[nn.Module], extra: Sequence[nn.Parameter]) -> bool:
    if extra:
        return False
    owners = [m for top in modules for m in top.modules() if _owns_params(m)]
    return any(isinstance(m, _LOCAL_RULE_TYPES) for m in owners) and all(
        isinstance(m, _LOCAL_RULE_TYPES) or _is_norm(m) for m in owners
    )


def _balanced_groups(costs: Sequence[float], n_groups: int) -> list[list[int]]:
    """Split indices 0..len(costs)-1 into ``n_groups`` contiguous groups minimizing the largest
    group cost (the linear-partition problem; dynamic programming, fine for hundreds of blocks)."""
    n = len(costs)
    if n_groups >= n:
        return [[i] for i in range(n)]
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(n_groups + 1)]
    cut = [[0] * (n + 1) for _ in range(n_groups + 1)]
    best[0][0] = 0.0
    for g in range(1, n_groups + 1):
        for end in range(g, n + 1):
            for start in range(g - 1, end):
                value = max(best[g - 1][start], prefix[end] - prefix[start])
                if value < best[g][end]:
                    best[g][end], cut[g][end] = value, start
    groups, end = [], n
    for g in range(n_groups, 0, -1):
        start = cut[g][end]
        groups.append(list(range(start, end)))
        end = start
    return groups[::-1]


# --------------------------------------------------------------------------- partition


def partition(model: nn.Module, example_input: ModelInput, max_units: int = 32) -> list[Unit]:
    """Split ``model`` into at most ``max_units`` freezable units in forward-execution order.

    ``example_input`` is one batch as the training loop feeds it: a tensor, a tuple of positional
    arguments or a dict of keyword arguments. The model is probed (an eval-mode forward and two
    forward and backward passes under a FlopCounterMode that also counts memory traffic and
    operators, a forward for output sizes, a forward and backward per boundary for the cut-point
    check) and left exactly as it was: parameters, buffers, flags and the RNG states are
    restored.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"partition() needs a torch.nn.Module, got {type(model).__name__}")
    if not _has_params(model):
        raise ValueError(
            f"{type(model).__name__} has no parameters: there is nothing to train or freeze"
        )
    if max_units < 1:
        raise ValueError(f"max_units must be at least 1, got {max_units}")

    with preserved_state(model):
        model.train()
        trace = _trace(model, example_input)
        blocks = _expand(model, "", is_root=True, ran=trace.calls)
        order = _execution_order(blocks, trace)
        if len(order) == 2 and _is_composite(blocks[order[0]][1]):
            # the whole body in one block before the head (MobileNetV1's ``mobilenet_v1``: its
            # ``layer`` list holds single conv layers, no list of blocks): look inside it
            path, body = blocks[order[0]]
            inner = _expand(body, path, is_root=True, ran=trace.calls)
            if len(_execution_order(inner, trace)) >= 2:
                blocks[order[0] : order[0] + 1] = inner
                order = _execution_order(blocks, trace)
        if len(order) < 2:
            blocks = _leaf_blocks(model)
            order = _execution_order(blocks, trace)
        if not order:
            raise ValueError("no parameter-bearing module of the model ran on the example input")
        groups = _group_blocks(model, blocks, order, trace)
        units = _measure_units(model, example_input, blocks, groups, max_units, trace)
    return units


def _is_norm_only(module: nn.Module) -> bool:
    return all(_is_norm(m) for m in module.modules() if _owns_params(m))


def _is_lookup(module: nn.Module) -> bool:
    owners = [m for m in module.modules() if _owns_params(m)]
    return all(isinstance(m, (nn.Embedding, nn.EmbeddingBag)) for m in owners)


def _group_blocks(
    model: nn.Module, blocks: list[tuple[str, nn.Module]], order: list[int], trace: _Trace
) -> list[list[int]]:
    """Executed blocks in execution order, grouped where one block cannot stand alone.

    * A norm-only block joins the block executed before it (a final norm goes with the last
      layer), or the one after it when it leads the model.
    * A pre-norm, the first item of a list run right before the list's next item, joins that
      item (ConvNeXt's downsampling ``ModuleList(LayerNorm, Conv2d)``).
    * A block whose output is no per-sample tensor (a position-embedding table) is added to a
      hidden state, not a step of the chain. Right after an embedding lookup it joins it (GPT-2's
      ``wte`` and ``wpe`` are one embedding unit); otherwise it joins the block after it, the
      one that reads it, so the block before keeps its own output as the boundary (Whisper's
      ``conv2`` stays a cut point).
    """

    def shared(pos: int) -> bool:
        return id(blocks[order[pos]][1]) not in trace.per_sample

    def follows_lookup(pos: int) -> bool:
        return pos > 0 and shared(pos) and _is_lookup(blocks[order[pos - 1]][1])

    def is_pre_norm(pos: int) -> bool:
        name, module = blocks[order[pos]]
        parent, _, item = name.rpartition(".")
        container = model.get_submodule(parent)
        items = [n for n, _ in _param_children(container)] if _is_list(container) else []
        if len(items) < 2 or items[0] != item:
            return False
        following = f"{parent}.{items[1]}" if parent else items[1]
        return _is_norm_only(module) and blocks[order[pos + 1]][0] == following

    def joins_next(pos: int) -> bool:
        table = shared(pos) and not follows_lookup(pos)
        return pos + 1 < len(order) and (table or is_pre_norm(pos))

    groups: list[list[int]] = []
    for pos, i in enumerate(order):
        norm = _is_norm_only(blocks[i][1]) and not joins_next(pos)
        if groups and (joins_next(pos - 1) or norm or follows_lookup(pos)):
            groups[-1].append(i)
        else:
            groups.append([i])
    if len(groups) >= 2 and all(_is_norm_only(blocks[i][1]) for i in groups[0]):
        groups[1] = groups[0] + groups[1]
        groups.pop(0)
    return groups


def _measure_units(
    model: nn.Module,
    inputs: ModelInput,
    blocks: list[tuple[str, nn.Module]],
    groups: list[list[int]],
    max_units: int,
    trace: _Trace,
) -> list[Unit]:
    batch = batch_size_of(inputs)
    all_params = list(model.parameters())
    train = _count_work(model, inputs, all_params)
    frozen = _count_work(model, inputs, None, training=False)  # as a frozen prefix runs

    def work(counts: _WorkCounter, block_ids: Sequence[int], phase: str = "all") -> _Work:
        return sum((counts.work(model, blocks[i][0], phase) for i in block_ids), _Work())

    # Merge into at most max_units units of balanced compute; the head stays alone.
    if max_units == 1 or len(groups) == 1:
        unit_blocks = [[i for g in groups for i in g]]
    else:
        body = groups[:-1]
        costs = [work(train, g, "forward").flops + work(train, g).flops for g in body]
        merged = _balanced_groups(costs, max_units - 1)
        unit_blocks = [[i for k in m for i in body[k]] for m in merged] + [groups[-1]]

    executed = {i for g in unit_blocks for i in g}
    unused = [i for i in range(len(blocks)) if i not in executed]
    orphans = _orphan_parameters(model, blocks)
    extra: list[list[nn.Parameter]] = [[] for _ in unit_blocks]
    for name, param in orphans:
        owner = name.rpartition(".")[0]
        home = next(
            (
                u
                for u, ids in enumerate(unit_blocks)
                if any(owner == "" or blocks[i][0].startswith(owner + ".") for i in ids)
            ),
            len(unit_blocks) - 1,
        )
        extra[home].append(param)

    last = len(unit_blocks) - 1
    unit_modules = [[blocks[i][1] for i in ids] for ids in unit_blocks]
    used = [
        _distinct(chain((p for m in modules for p in m.parameters()), extra[u]))
        for u, modules in enumerate(unit_modules)
    ]
    # A block that never ran holds parameters that are either aliases of ones a block that ran
    # holds (T5's and BART's ``shared`` table, whose weight ``encoder.embed_tokens`` uses) or
    # read directly by the units that take them as an input (DeBERTa's ``rel_embeddings``).
    # Those units use it, and it joins the last of them, its owner (else the head); the
    # aliases are no use of it.
    unit_of = {
        id(m): u for u, modules in enumerate(unit_modules) for top in modules for m in top.modules()
    }
    ran = {id(p) for params in used for p in params}
    hosted: list[list[int]] = [[] for _ in unit_blocks]
    for i in unused:
        own = [p for p in blocks[i][1].parameters() if id(p) not in ran]
        readers = sorted(
            {unit_of[c] for p in own for c in trace.consumers.get(id(p), ()) if c in unit_of}
        )
        hosted[readers[-1] if readers else last].append(i)
        for u in readers or [last]:
            used[u] = _distinct(chain(used[u], own))
    for u, ids in enumerate(hosted):
        unit_modules[u] += [blocks[i][1] for i in ids]
    # A parameter several units use (tied weights) belongs to the last of them: that unit keeps
    # training longest (the head always trains), so freezing an earlier one never freezes it.
    owner_of = {id(p): u for u, params in enumerate(used) for p in params}
    owned = [[p for p in params if owner_of[id(p)] == u] for u, params in enumerate(used)]

    # Only what the first unit owns requires gradients: each later unit's backward is then
    # exactly the gradient to its input. A first unit that owns nothing (a tied embedding)
    # starts the backward at its output instead.
    exit_first = None if owned[0] else blocks[unit_blocks[0][-1]][1]
    to_first = _count_work(model, inputs, owned[0], grad_from=exit_first)
    fwd = [work(train, ids, "forward") for ids in unit_blocks]
    fwd_frozen = [work(frozen, ids) for ids in unit_blocks]
    bwd_all = [work(train, ids, "backward") for ids in unit_blocks]
    bwd_first = [work(to_first, ids, "backward") for ids in unit_blocks]
    b_input = [_Work(), *bwd_first[1:]]
    b_weight = [bwd_all[0]] + [a - c for a, c in zip(bwd_all[1:], bwd_first[1:], strict=True)]
    # Work done by the root's own code (outside every unit) is charged to the head.
    fwd[-1] += train.work(model, "", "forward") - sum(fwd, _Work())
    fwd_frozen[-1] += frozen.work(model, "") - sum(fwd_frozen, _Work())
    if len(unit_blocks) > 1:
        b_input[-1] += to_first.work(model, "", "backward") - sum(bwd_first, _Work())
    total_backward = train.work(model, "", "backward")
    b_weight[-1] += total_backward - sum(b_input, _Work()) - sum(b_weight, _Work())
    model.train()
    output_bytes = _output_bytes(model, inputs, [blocks[ids[-1]][1] for ids in unit_blocks])

    model.eval()
    exits = _exit_outputs(model, inputs, [blocks[ids[-1]][1] for ids in unit_blocks])
    units = []
    for u, ids in enumerate(unit_blocks):
        modules = tuple(unit_modules[u])
        names = tuple(blocks[i][0] or type(model).__name__ for i in ids)
        names += tuple(blocks[i][0] for i in hosted[u])
        exit_module = blocks[ids[-1]][1]
        with torch.no_grad():
            prefix = [blocks[i][1] for block_ids in unit_blocks[: u + 1] for i in block_ids]
            cut = u < last and _is_cut_after(model, exit_module, exits[u], inputs, prefix)
        held = _distinct(chain((p for m in modules for p in m.parameters()), extra[u], used[u]))
        borrowed = tuple(p for p in held if owner_of[id(p)] != u)
        units.append(
            Unit(
                index=u,
                name=names[0] if len(ids) == 1 else f"{names[0]}..{names[len(ids) - 1]}",
                modules=modules,
                module_names=names,
                exit_module=exit_module,
                extra_parameters=tuple(extra[u]),
                num_params=sum(p.numel() for p in owned[u]),
                kind=_kind_of(modules),
                flops_forward=fwd[u].flops / batch,
                flops_backward_input=b_input[u].flops / batch,
                flops_backward_weight=b_weight[u].flops / batch,
                is_cut_point=cut,
                supports_local=not borrowed and _supports_local(modules, extra[u]),
                traffic_forward=fwd[u].traffic / batch,
                traffic_backward_input=b_input[u].traffic / batch,
                traffic_backward_weight=b_weight[u].traffic / batch,
                traffic_forward_frozen=fwd_frozen[u].traffic / batch,
                ops_forward=fwd[u].ops,
                ops_forward_frozen=fwd_frozen[u].ops,
                ops_backward_input=b_input[u].ops,
                ops_backward_weight=b_weight[u].ops,
                output_bytes=output_bytes[u],
                num_param_tensors=len(owned[u]),
                tied_to=tuple(sorted({owner_of[id(p)] for p in borrowed if owner_of[id(p)] > u})),
                borrowed_parameters=borrowed,
            )
        )
    return units
