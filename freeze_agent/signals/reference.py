"""The Egeria-style reference model: an int8 snapshot of the training model, run on the CPU in a
separate process, whose per-unit outputs on a fixed probe batch measure each unit's *plasticity*.

Egeria (EuroSys 2023) compares a layer's output in the training model with its output in a
quantized snapshot taken a little earlier; the similarity-preserving (SP) loss between the two
(:func:`sp_loss`) shrinks as the layer stops moving, and the least-squares :func:`slope` of the
last few values tells when it has flattened out. The snapshot is run off the training path so
the accelerator never waits for it.

:class:`ReferenceWorker` owns one spawned CPU process at a time. ``submit()`` quantizes the
model's weights (:func:`quantize_state_dict`) and hands them to a background sender thread; the
child dequantizes them, loads them into its own copy of the architecture and returns every unit's
exit-module output (:func:`unit_outputs`, the same function the training side calls on its own
model, so both sides compute identically). ``poll()`` picks a result up if one is there. Neither
waits for the child. A child that dies, reports an error or keeps a job past ``timeout_s`` costs
the training process one ``warnings.warn``: the worker is restarted up to ``max_restarts`` times,
after which ``available`` is False and ``submit``/``poll`` return False/None.

Child processes are pooled: a worker that closes while its child is healthy and idle hands the
child to the next worker of the same process, which sends it a new model ("init") rather than
spawning another interpreter. Start-up (importing torch, a few CPU-seconds) is paid once per
process, not once per training run; on a 2-core machine it otherwise competes with training.

int8 kernels: the snapshot is stored as per-output-channel symmetric int8 and *dequantized in the
worker*, which then runs in float32. torchao 0.18 (the maintained int8 path; it imports against
torch 2.13 on the CPU without pulling another torch) was measured here: its int8 weight-only
linear was no faster than float32 on the CPU, its dynamic int8 activation path was ~10× slower,
and it has no int8 convolution at all. Dequantizing keeps int8's numerics (what the reference
model is about: a slightly perturbed, cheaply stored snapshot) and its 4× smaller transfer, at
float32 speed, with no extra dependency.

Transport: snapshots and results travel as plain bytes through pipes, not as torch shared-memory
tensors, so a small ``/dev/shm`` (containers) cannot break the worker and a killed child leaks no
shared segments.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import itertools
import multiprocessing.connection
import os
import queue
import signal
import sys
import threading
import time
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.multiprocessing as torch_mp
from torch import nn

from freeze_agent.core.units import ModelInput, Unit, batch_size_of, call_model

__all__ = [
    "ReferenceOutputs",
    "ReferenceWorker",
    "ReferenceWorkerWarning",
    "dequantize_state_dict",
    "exit_module_paths",
    "gram_distance",
    "normalized_gram",
    "quantize_state_dict",
    "slope",
    "sp_loss",
    "unit_outputs",
    "warm_pool",
]

SCALE_SUFFIX = ".scale"
_QUANTIZED_TYPES = (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding, nn.EmbeddingBag)
_HOOK_ATTRIBUTES = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


# --------------------------------------------------------------------------- plasticity


def sp_loss(a: torch.Tensor, b: torch.Tensor) -> float:
    """Egeria's similarity-preserving loss between two activations of the same probe batch.

    Both are flattened to (batch, features) (the feature counts may differ). With
    G(X) = row-normalize(X Xᵀ) (each row of the batch Gram matrix scaled to unit L2 norm), the
    loss is ‖G(A) − G(B)‖²_F / batch². It compares how the batch's samples relate to each other,
    so it is invariant to a global scale of either side and to any rotation of the features.
    """
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"batch sizes differ: {a.shape[0]} vs {b.shape[0]}")
    if a.shape[0] == 0:
        return 0.0
    return gram_distance(normalized_gram(a), normalized_gram(b))


def normalized_gram(x: torch.Tensor) -> torch.Tensor:
    """G(X) of :func:`sp_loss`, float64 on the CPU. For a side that is compared many times (the
    reference outputs), compute it once and compare with :func:`gram_distance`."""
    # float64: the Gram matrix is small (batch²) and sums over many features
    flat = x.detach().reshape(x.shape[0], -1).to("cpu", torch.float64)
    gram = flat @ flat.T
    return gram / gram.norm(dim=1, keepdim=True).clamp_min(1e-12)


def gram_distance(ga: torch.Tensor, gb: torch.Tensor) -> float:
    """:func:`sp_loss` from two :func:`normalized_gram` results: ‖G(A) − G(B)‖²_F / batch²."""
    if ga.shape != gb.shape:
        raise ValueError(f"batch sizes differ: {ga.shape[0]} vs {gb.shape[0]}")
    n = ga.shape[0]
    return float(((ga - gb) ** 2).sum() / (n * n)) if n else 0.0


def slope(values: Sequence[float]) -> float:
    """Least-squares slope of ``values`` against their index 0..n-1 (0.0 for fewer than two)."""
    n = len(values)
    if n < 2:
        return 0.0
    y = np.asarray(values, dtype=np.float64)
    x = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
    return float((x * (y - y.mean())).sum() / (x * x).sum())


# --------------------------------------------------------------------------- unit outputs


def exit_module_paths(model: nn.Module, units: Sequence[Unit]) -> list[str]:
    """The qualified module path of each unit's exit module ("" for the root), the form
    :class:`ReferenceWorker` and :func:`unit_outputs` take."""
    names = {id(module): name for name, module in model.named_modules()}
    try:
        return [names[id(unit.exit_module)] for unit in units]
    except KeyError:
        raise ValueError("a unit's exit module is not a sub-module of this model") from None


def unit_outputs(
    model: nn.Module, unit_module_paths: Sequence[str], probe_inputs: ModelInput
) -> list[torch.Tensor]:
    """Each unit's exit-module output on ``probe_inputs``, flattened to (batch, features), as
    float32 CPU tensors.

    The model runs once in eval mode under ``no_grad``; its train/eval flags and the RNG state are
    restored afterwards, so calling this in the middle of training changes nothing. Tensor
    inputs are moved to the model's device. A module output that is a tuple, list or dict
    contributes its first tensor; a module that runs more than once contributes its last call.
    """
    modules = dict(model.named_modules())
    unknown = [path for path in unit_module_paths if path not in modules]
    if unknown:
        raise KeyError(f"no module at path(s) {unknown} in {type(model).__name__}")
    captured: dict[int, torch.Tensor] = {}

    def make_hook(i: int):
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            tensor = _first_tensor(output)
            if tensor is not None:
                captured[i] = tensor.detach()

        return hook

    device = _device_of(model)
    inputs = _map_tensors(probe_inputs, lambda t: t.to(device))
    batch = batch_size_of(inputs)
    handles = [
        modules[path].register_forward_hook(make_hook(i))
        for i, path in enumerate(unit_module_paths)
    ]
    training = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with _forked_rng(device), torch.no_grad():
            call_model(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
        for m, flag in training.items():
            m.training = flag
    missing = [p for i, p in enumerate(unit_module_paths) if i not in captured]
    if missing:
        raise RuntimeError(f"module(s) {missing} produced no tensor output on the probe batch")
    return [_flatten(captured[i], batch) for i in range(len(unit_module_paths))]


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    items = value.values() if isinstance(value, Mapping) else value
    if isinstance(value, (Mapping, tuple, list)):
        for item in items:
            tensor = _first_tensor(item)
            if tensor is not None:
                return tensor
    return None


def _flatten(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    """(batch, features) float32 on the CPU; the batch axis is the first axis of size ``batch``."""
    out = tensor.detach().to("cpu", torch.float32)
    if out.dim() == 0:
        return out.reshape(1, 1)
    if out.shape[0] != batch and batch in out.shape:
        out = out.movedim(list(out.shape).index(batch), 0)
    rows = batch if out.shape[0] == batch else 1
    return out.reshape(rows, -1).contiguous()


def _device_of(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def _forked_rng(device: torch.device) -> Iterator[None]:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.random.fork_rng(devices=[index], device_type="cuda"):
            yield
    else:
        with torch.random.fork_rng(devices=[]):
            yield


def _map_tensors(value: Any, fn) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, Mapping):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_map_tensors(v, fn) for v in value)
    if isinstance(value, list):
        return [_map_tensors(v, fn) for v in value]
    return value


# --------------------------------------------------------------------------- int8 snapshots


def quantize_state_dict(model: nn.Module) -> dict[str, Any]:
    """An int8 snapshot of ``model``'s state dict, as independent CPU tensors.

    The weights of conv, linear and embedding modules become symmetric int8 with one float32
    scale per row of their first axis (the output channel of a conv or linear layer, the token
    of an embedding): ``{name: int8 tensor, name + ".scale": float32 scale}``, with
    ``weight ≈ int8 · scale``. Every other entry (biases, norm parameters and statistics, other
    weights) is kept unquantized. Quantization runs on the weights' own device, so only int8
    crosses to the CPU. The result is a copy: safe to keep while training goes on.
    """
    state = model.state_dict(keep_vars=False)
    quantized: set[str] = set()
    out: dict[str, Any] = {}
    for name, module in model.named_modules():
        if not isinstance(module, _QUANTIZED_TYPES):
            continue
        key = f"{name}.weight" if name else "weight"
        weight = state.get(key)
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            continue  # e.g. a parametrized or uninitialized (lazy) weight
        if weight.dim() < 1 or weight.numel() == 0 or key in quantized:
            continue
        q, scale = _quantize_rows(weight.detach())
        out[key], out[key + SCALE_SUFFIX] = q, scale
        quantized.add(key)
    for key, value in state.items():
        if key in quantized:
            continue
        out[key] = value.detach().to("cpu", copy=True) if isinstance(value, torch.Tensor) else value
    return out


def _quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = weight.reshape(weight.shape[0], -1).float()
    if rows.device.type == "cpu":
        # numpy is single-threaded: small torch ops on a busy multi-threaded CPU pool can stall
        # for milliseconds each (measured: 60x slower than this for the mnist1d CNN)
        r = rows.numpy()
        scale = np.abs(r).max(axis=1) / np.float32(127.0)
        scale[scale == 0] = 1.0
        q = np.rint(r / scale[:, None]).clip(-127, 127).astype(np.int8)
        return torch.from_numpy(q).reshape(weight.shape), torch.from_numpy(scale)
    scale = rows.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (rows / scale[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return q.reshape(weight.shape).cpu(), scale.cpu()


def dequantize_state_dict(q: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The float state dict of an int8 snapshot from :func:`quantize_state_dict`: each int8
    entry with a ``.scale`` companion becomes float32 ``int8 · scale``; the rest is passed on."""

    def is_int8(value: Any) -> bool:
        return isinstance(value, torch.Tensor) and value.dtype == torch.int8

    out: dict[str, Any] = {}
    for key, value in q.items():
        if key.endswith(SCALE_SUFFIX) and is_int8(q.get(key[: -len(SCALE_SUFFIX)])):
            continue  # consumed with its weight
        scale = q.get(key + SCALE_SUFFIX)
        if is_int8(value) and scale is not None:
            rows = value.reshape(value.shape[0], -1).float() * scale.float()[:, None]
            out[key] = rows.reshape(value.shape)
        else:
            out[key] = value
    return out


# --------------------------------------------------------------------------- wire format


@dataclass(frozen=True)
class _WireTensor:
    """A tensor as raw bytes: pickles as plain bytes, never as a torch shared-memory handle."""

    dtype: str
    shape: tuple[int, ...]
    data: np.ndarray

    @classmethod
    def of(cls, tensor: torch.Tensor) -> _WireTensor:
        t = tensor.detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy()
        return cls(str(t.dtype).removeprefix("torch."), tuple(t.shape), raw)

    def tensor(self) -> torch.Tensor:
        raw = torch.from_numpy(np.ascontiguousarray(self.data))
        return raw.view(getattr(torch, self.dtype)).reshape(self.shape)


def _to_wire(value: Any) -> Any:
    return _map_tensors(value, _WireTensor.of)


def _from_wire(value: Any) -> Any:
    if isinstance(value, _WireTensor):
        return value.tensor()
    if isinstance(value, Mapping):
        return {k: _from_wire(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_from_wire(v) for v in value)
    if isinstance(value, list):
        return [_from_wire(v) for v in value]
    return value


@contextlib.contextmanager
def _foreign_hooks_removed(model: nn.Module) -> Iterator[None]:
    """Hide hooks not defined by torch itself (a controller's, a profiler's) while the model is
    pickled: they belong to the training process, and pickling a bound method would drag its
    whole owner along. Torch's own (weight norm, spectral norm) are part of the architecture."""
    saved: list[tuple[nn.Module, str, Any]] = []
    for module in model.modules():
        for attr in _HOOK_ATTRIBUTES:
            hooks = module.__dict__.get(attr)
            if not hooks:
                continue
            kept = OrderedDict((k, h) for k, h in hooks.items() if _is_torch_hook(h))
            if len(kept) != len(hooks):
                saved.append((module, attr, hooks))
                module.__dict__[attr] = kept
    try:
        yield
    finally:
        for module, attr, hooks in saved:
            module.__dict__[attr] = hooks


def _is_torch_hook(hook: Any) -> bool:
    owner = getattr(hook, "__module__", None) or type(hook).__module__
    return isinstance(owner, str) and owner.split(".")[0] == "torch"


def _architecture_bytes(model: nn.Module) -> bytes:
    """The model pickled with ``torch.save``: tensors are copied to the CPU one at a time (no
    second copy of the model on the accelerator), the child loads with ``map_location='cpu'``."""
    buffer = io.BytesIO()
    with _foreign_hooks_removed(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "backward hooks will not be serialized"
        torch.save(model, buffer)
    return buffer.getvalue()


# --------------------------------------------------------------------------- the child process


def _worker_main(commands, results) -> None:
    """Entry point of the child: answer snapshots for one owner after another, until the parent
    closes its end of the pipe (it exited, or killed the child).

    Messages in: ("init", token, model bytes, unit paths, probe inputs, threads, sys.path),
    ("job", step, snapshot), ("release",).
    Messages out: ("started",) once, when the interpreter is up (torch imported);
    ("ready", token) after each init; ("result", token, step, [arrays], seconds);
    ("error", text), after which the child exits.

    A child is reused across runs (see :func:`_pool_put`): each "init" replaces the model, unit
    paths and probe batch of the previous owner, and "release" drops them while the child waits
    in the pool. The token tags every answer with the owner it was computed for.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(1)
        results.send(("started",))
        model: nn.Module | None = None
        paths: list[str] = []
        probe: Any = None
        token: int | None = None
        while True:
            try:
                message = commands.recv()
            except EOFError:
                return
            kind = message[0]
            if kind == "init":
                _, token, model_bytes, paths, wire_probe, threads, sys_path = message
                model = probe = None  # free the previous owner's model before loading
                _extend_sys_path(sys_path)
                torch.set_num_threads(threads)
                model = torch.load(io.BytesIO(model_bytes), map_location="cpu", weights_only=False)
                model.float().eval()
                probe = _map_tensors(
                    _from_wire(wire_probe), lambda t: t.float() if t.is_floating_point() else t
                )
                results.send(("ready", token))
            elif kind == "job":
                if model is None:
                    raise RuntimeError("a snapshot arrived before any model")
                _, step, snapshot = message
                started = time.perf_counter()
                model.load_state_dict(dequantize_state_dict(_from_wire(snapshot)))
                outputs = unit_outputs(model, paths, probe)
                seconds = time.perf_counter() - started
                results.send(("result", token, step, [o.numpy() for o in outputs], seconds))
            elif kind == "release":
                model, paths, probe, token = None, [], None, None
    except Exception as error:  # report why, then exit non-zero
        with contextlib.suppress(Exception):
            results.send(("error", f"{type(error).__name__}: {error}"))
        raise SystemExit(1) from error


def _extend_sys_path(entries: Sequence[str]) -> None:
    """Append the parent's import-path entries the child lacks: a pooled child was spawned
    with the parent's ``sys.path`` of back then, and a later model's class may live elsewhere."""
    known = set(sys.path)
    sys.path.extend(e for e in entries if e not in known)


# --------------------------------------------------------------------------- the worker


class ReferenceWorkerWarning(RuntimeWarning):
    """The reference worker failed (died, hung or raised) and was restarted or given up."""


@dataclass
class ReferenceOutputs:
    """One answer of the reference worker."""

    step: int
    """The training step the snapshot was taken at."""
    outputs: list[torch.Tensor]
    """One per unit, float32, shape (probe_batch, features)."""
    seconds: float
    """The worker's compute time (dequantize, load, forward)."""


_LIVE_WORKERS: weakref.WeakSet[ReferenceWorker] = weakref.WeakSet()
_TOKENS = itertools.count(1)


@atexit.register
def _close_live_workers() -> None:
    """At interpreter exit: kill every child, in use or pooled (from now on a closing worker
    kills its child instead of pooling it)."""
    global _shutting_down
    _shutting_down = True
    for worker in list(_LIVE_WORKERS):
        worker.close()
    _drain_pool()


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
    """Start a spawned child without it re-running the parent's ``__main__``.

    multiprocessing's spawn re-imports the parent's main script in the child so that classes
    defined there can be unpickled; for a training script without an ``if __name__ ==
    "__main__"`` guard that would run the whole training again inside the reference worker.
    Hiding the script's path for the duration of ``start()`` prevents it; the price is that a
    model class defined in ``__main__`` cannot be sent (the worker then reports itself
    unavailable with a warning), so define models in an importable module.
    """
    main = sys.modules.get("__main__")
    saved = {k: getattr(main, k) for k in ("__file__", "__spec__") if hasattr(main, k)}
    try:
        for key in saved:
            setattr(main, key, None) if key == "__spec__" else delattr(main, key)
        yield
    finally:
        for key, value in saved.items():
            setattr(main, key, value)


WORKER_NICENESS = 10
"""Added to the parent's niceness for each child: the reference takes the cycles training leaves."""


class _Incarnation:
    """One child process with its pipes and the sender thread that feeds it.

    The child starts bare (interpreter and torch only); :meth:`init` gives it an owner's model.
    Between owners it waits in the process-wide pool (:func:`_pool_put`, :func:`_pool_take`).
    """

    def __init__(self) -> None:
        ctx = torch_mp.get_context("spawn")
        child_commands, self.commands = ctx.Pipe(duplex=False)
        self.results, child_results = ctx.Pipe(duplex=False)
        self.process = ctx.Process(
            target=_worker_main,
            args=(child_commands, child_results),
            name="freeze-agent-reference",
            daemon=True,
        )
        with _main_module_hidden():
            self.process.start()
        # Lower its priority now, before it imports torch (seconds of CPU): on a machine whose
        # cores training keeps busy, the reference runs on spare cycles instead of taking a
        # core from training. (In the child, os.nice would only run after that import.)
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, self.process.pid, min(os.nice(0) + WORKER_NICENESS, 19))
        # Only the child holds these ends now: its death reads as EOF / broken pipe here.
        child_commands.close()
        child_results.close()
        self.owner_pid = os.getpid()
        self.spawned_at = time.monotonic()
        self.started = False  # the child said "started": its interpreter and torch are up
        self.token: int | None = None  # the owner the child is set up for
        self.started_at = self.spawned_at  # when the current owner's init was sent
        self.ready_at: float | None = None  # when the child answered that init
        self._outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, daemon=True)
        self._sender.start()

    def init(self, token: int, init_message: tuple[Any, ...]) -> None:
        """Set the child up for a new owner: ``init_message`` is ("init", model bytes, unit
        paths, probe, threads); answers to earlier owners are told apart by ``token``."""
        self.token, self.ready_at = token, None
        # a child still importing torch counts its start-up from the spawn
        self.started_at = time.monotonic() if self.started else self.spawned_at
        kind, *rest = init_message
        self.send((kind, token, *rest, list(sys.path)))

    def release(self) -> None:
        """Drop the owner's model in the child (it goes back to the pool)."""
        self.token, self.ready_at = None, None
        self.send(("release",))

    def send(self, message: Any) -> None:
        """Queue ``message`` for the child; the sender thread writes it, so this never blocks."""
        self._outbox.put(message)

    def _send_loop(self) -> None:
        while True:
            message = self._outbox.get()
            if message is None:
                return
            try:
                self.commands.send(message)
            except (OSError, ValueError):
                return  # the child is gone; the owner notices through the results pipe

    def receive(self) -> list[Any]:
        """Every message the child has finished writing; raises EOFError once it is gone.
        Notes "started" (and drops it)."""
        messages = []
        while self.results.poll(0):
            message = self.results.recv()
            if message[0] == "started":
                self.started = True
            else:
                messages.append(message)
        return messages

    def healthy(self) -> bool:
        """Alive, owned by this process and with nothing unexpected to say: only stale answers
        to an earlier owner (dropped here) may be waiting in the pipe."""
        if os.getpid() != self.owner_pid:
            return False
        try:
            messages = self.receive()
        except (EOFError, OSError):
            return False
        if any(message[0] == "error" for message in messages):
            return False
        return self.process.exitcode is None and self.process.is_alive()

    def stop(self) -> None:
        """Kill the child (it has nothing to save) and release the pipes; bounded in time."""
        self._outbox.put(None)
        with contextlib.suppress(Exception):
            if self.process.is_alive():
                self.process.kill()
            self.process.join(timeout=2.0)
        for connection in (self.commands, self.results):
            with contextlib.suppress(Exception):
                connection.close()


# --------------------------------------------------------------------------- the pool

POOL_MAX_IDLE = 2
"""At most this many idle children are kept per process (each holds an interpreter with torch
imported, a few hundred MB); a run hands its child back when it ends and the next run takes it,
so a process that trains run after run (the Gymnasium environment) spawns one child, not one per
run."""

CLOSE_GRACE_S = 2.0
"""How long :meth:`ReferenceWorker.close` waits for a job in flight before it kills the child
rather than pooling it (a job takes milliseconds to a fraction of a second)."""

_pool: list[_Incarnation] = []
_pool_lock = threading.Lock()
_shutting_down = False


def _pool_take() -> _Incarnation | None:
    """An idle, healthy child of this process from the pool (dead ones are discarded)."""
    while True:
        with _pool_lock:
            if not _pool:
                return None
            child = _pool.pop()
        if child.healthy():
            return child
        child.stop()


def _pool_put(child: _Incarnation) -> None:
    """Keep ``child`` (idle and healthy, checked by the caller) for the next run, or kill it when
    the pool is full or the interpreter is exiting."""
    child.release()
    with _pool_lock:
        if not _shutting_down and len(_pool) < POOL_MAX_IDLE:
            _pool.append(child)
            return
    child.stop()


def _drain_pool() -> None:
    """Kill every pooled child (kill them all first, then reap: bounded in time)."""
    with _pool_lock:
        children = list(_pool)
        _pool.clear()
    for child in children:
        with contextlib.suppress(Exception):
            child.process.kill()
    for child in children:
        child.stop()


def _forget_pool_after_fork() -> None:
    """In a forked child: the pooled processes belong to the parent. Drop them without killing
    them, and close this copy of their pipes so that they still see EOF when the parent exits."""
    global _pool_lock
    _pool_lock = threading.Lock()  # another thread may have held it at the fork
    children = list(_pool)
    _pool.clear()
    for child in children:
        for connection in (child.commands, child.results):
            with contextlib.suppress(Exception):
                connection.close()


os.register_at_fork(after_in_child=_forget_pool_after_fork)


def warm_pool(count: int = 1, wait_s: float = 0.0) -> int:
    """Spawn children into the pool until it holds ``count`` (at most :data:`POOL_MAX_IDLE`),
    so that the next :class:`ReferenceWorker` skips the child's start-up (a fresh interpreter
    importing torch: seconds of CPU, which on a small machine compete with training). Waits up
    to ``wait_s`` for them to be up. Returns how many pooled children are up.

    Call it before a run's timed part, or at the start of a process that will train run after
    run; a run that starts while its child is still importing torch just waits a little longer
    for its first reference result.
    """
    count = min(count, POOL_MAX_IDLE)
    with _pool_lock:
        missing = count - len(_pool) if not _shutting_down else 0
    spawned = []
    for _ in range(max(missing, 0)):
        try:
            spawned.append(_Incarnation())
        except Exception as error:
            warnings.warn(
                f"reference worker: could not start a pooled child ({error})",
                ReferenceWorkerWarning,
                stacklevel=2,
            )
            break
    with _pool_lock:
        _pool.extend(spawned)
    deadline = time.monotonic() + wait_s
    while True:
        with _pool_lock:
            children = list(_pool)
        waiting = []
        for child in children:
            if not child.started:
                with contextlib.suppress(EOFError, OSError):
                    child.receive()
                    if not child.started:
                        waiting.append(child.results)
        remaining = deadline - time.monotonic()
        if not waiting or remaining <= 0:
            return sum(child.started for child in children)
        with contextlib.suppress(OSError, ValueError):
            multiprocessing.connection.wait(waiting, timeout=min(remaining, 0.1))


class ReferenceWorker:
    """Owns a spawned CPU process (torch.multiprocessing, 'spawn' context) holding a copy of the
    model architecture; each :meth:`submit` sends an int8 snapshot; the process loads it
    (dequantized), runs the probe batch in eval mode under ``no_grad`` with
    ``torch.set_num_threads(threads)``, and sends back every unit's exit-module output (hooks
    registered by module path in the child).

    Children outlive their worker: :meth:`close` hands a healthy, idle child to a process-wide
    pool (at most :data:`POOL_MAX_IDLE`), and a new worker takes one from there and sends it its
    own model, instead of paying for a fresh interpreter and torch import on every run.
    :func:`warm_pool` starts one ahead of time. A child still busy after a short grace
    (:data:`CLOSE_GRACE_S`), hung or failed is killed instead; pooled children die at
    interpreter exit, and a forked process never touches its parent's.

    Args:
        model: the model being trained. It is sent to the child once, pickled with
            ``torch.save`` (a CPU copy; hooks not defined by torch are left out), so its class
            must be importable in a fresh interpreter: defined at module level in an importable
            module; not in the ``__main__`` script (the child does not re-run it), a notebook
            cell or a function. The pickled copy
            is kept to restart the worker. The child runs it in float32.
        unit_module_paths: the qualified path of each unit's exit module ("" = the root); see
            :func:`exit_module_paths`.
        probe_inputs: the fixed probe batch (tensor, tuple or dict, as the model is called).
        threads: torch threads of the child.
        timeout_s: a submitted job not answered within this many seconds of the child being
            ready counts as a hang.
        max_restarts: restarts after a failure before the worker gives up.
        startup_timeout_s: a child not ready (torch imported, model loaded) within this many
            seconds of being spawned (or, for a pooled child, of being handed the model) counts
            as a failure.

    Failures (death, hang, an error in the child, an unpicklable model) never raise in the
    training process: each gives one :class:`ReferenceWorkerWarning` saying why.
    """

    def __init__(
        self,
        model: nn.Module,
        unit_module_paths: list[str],
        probe_inputs: ModelInput,
        *,
        threads: int = 1,
        timeout_s: float = 60.0,
        max_restarts: int = 1,
        startup_timeout_s: float = 120.0,
    ) -> None:
        self.unit_module_paths = list(unit_module_paths)
        self.threads = threads
        self.timeout_s = timeout_s
        self.max_restarts = max_restarts
        self.startup_timeout_s = startup_timeout_s
        self.restarts = 0
        self._owner_pid = os.getpid()
        self._failure: str | None = None
        self._closed = False
        self._worker: _Incarnation | None = None
        self._job: tuple[int, float] | None = None  # (step, submitted at)
        self._latest: ReferenceOutputs | None = None
        self._token: int | None = None  # tags the child's answers meant for this worker
        _LIVE_WORKERS.add(self)
        modules = dict(model.named_modules())
        unknown = [p for p in self.unit_module_paths if p not in modules]
        if unknown:
            raise KeyError(f"no module at path(s) {unknown} in {type(model).__name__}")
        try:
            model_bytes = _architecture_bytes(model)
        except Exception as error:
            self._give_up(f"the model cannot be pickled for the worker ({error})")
            return
        self._init_message = (
            "init",
            model_bytes,
            self.unit_module_paths,
            _to_wire(probe_inputs),
            self.threads,
        )
        self._launch()

    # ------------------------------------------------------------------ public

    def submit(self, model: nn.Module, step: int) -> bool:
        """Send an int8 snapshot of ``model`` taken at ``step`` if the worker is idle; never
        waits for the child (the cost is one pass over the weights to quantize them).
        Returns whether a snapshot was sent."""
        self._check()
        if self._worker is None or self._job is not None:
            return False
        snapshot = _to_wire(quantize_state_dict(model))
        self._job = (int(step), time.monotonic())
        self._worker.send(("job", int(step), snapshot))
        return True

    def poll(self) -> ReferenceOutputs | None:
        """The newest finished result not yet returned, else None; never waits."""
        self._check()
        result, self._latest = self._latest, None
        return result

    def wait(self, timeout_s: float) -> ReferenceOutputs | None:
        """Block until the submitted job's result arrives (or a failure, or ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        while True:
            self._check()
            if self._latest is not None or self._job is None or self._worker is None:
                return self.poll()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            with contextlib.suppress(OSError, ValueError):
                multiprocessing.connection.wait(
                    [self._worker.results, self._worker.process.sentinel],
                    timeout=min(remaining, 0.1),
                )

    @property
    def available(self) -> bool:
        """False once the worker failed beyond ``max_restarts`` (or was closed)."""
        self._check()
        return self._worker is not None

    @property
    def status(self) -> str:
        """One of "idle", "busy", "restarting" or "failed: <reason>"."""
        self._check()
        if self._worker is None:
            return f"failed: {self._failure or 'closed'}"
        if self._job is not None:
            return "busy"
        if self.restarts and self._worker.ready_at is None:
            return "restarting"
        return "idle"

    @property
    def pid(self) -> int | None:
        """The child's process id (None when there is none)."""
        return self._worker.process.pid if self._worker is not None else None

    def close(self) -> None:
        """Hand the child back to the process-wide pool when it is healthy and idle, else kill
        it (still busy after a grace of at most :data:`CLOSE_GRACE_S`, hung, failed, or the
        interpreter is exiting); bounded in time, safe to call twice, never warns."""
        if self._closed:
            return
        self._closed = True
        worker = self._worker
        if worker is not None and os.getpid() == self._owner_pid:
            if self._settle(worker) and worker.healthy():
                _pool_put(worker)
            else:
                worker.stop()
        self._worker, self._job = None, None
        if self._failure is None:
            self._failure = "closed"
        _LIVE_WORKERS.discard(self)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __enter__(self) -> ReferenceWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _settle(self, worker: _Incarnation) -> bool:
        """Whether ``worker``'s child can be reused: it has reported no error, and a job still in
        flight finishes within the grace. (A run that ends right after a snapshot, as a
        Gymnasium episode does, would otherwise never hand its child on.) A child still loading
        this worker's model counts as reusable: its late "ready" is told apart by the token."""
        grace = 0.0 if _shutting_down else min(CLOSE_GRACE_S, self.timeout_s)
        deadline = time.monotonic() + grace
        while True:
            try:
                if self._handle(worker.receive()) is not None:
                    return False
            except (EOFError, OSError):
                return False
            if self._job is None:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False  # busy: possibly hung, so not reused
            with contextlib.suppress(OSError, ValueError):
                multiprocessing.connection.wait(
                    [worker.results, worker.process.sentinel], timeout=min(remaining, 0.1)
                )

    def _launch(self) -> None:
        """Take an idle child from the pool, or spawn one, and send it this worker's model."""
        worker = _pool_take()
        if worker is None:
            try:
                worker = _Incarnation()
            except Exception as error:
                self._worker = None
                self._failure = f"could not start ({type(error).__name__}: {error})"
                self._warn(self._failure, gave_up=True)
                return
        self._token = next(_TOKENS)
        worker.init(self._token, self._init_message)
        self._worker = worker

    def _check(self) -> None:
        """Collect what the child sent; detect death, errors and timeouts (never blocks)."""
        worker = self._worker
        if worker is None or os.getpid() != self._owner_pid:
            return
        try:
            messages = worker.receive()
            eof = False
        except (EOFError, OSError):
            messages, eof = [], True
        problem = self._handle(messages)
        if problem is None:
            exitcode = worker.process.exitcode
            if eof or exitcode is not None:
                with contextlib.suppress(Exception):
                    worker.process.join(timeout=1.0)
                problem = _describe_exit(worker.process.pid, worker.process.exitcode)
        if problem is None:
            problem = self._timed_out(worker)
        if problem is not None:
            self._on_failure(problem)

    def _handle(self, messages: list[Any]) -> str | None:
        worker = self._worker
        assert worker is not None
        for message in messages:
            kind = message[0]
            if kind in ("ready", "result") and message[1] != self._token:
                continue  # an answer to the child's previous owner
            if kind == "ready":
                worker.ready_at = time.monotonic()
            elif kind == "result":
                _, _token, step, arrays, seconds = message
                if self._job is not None and self._job[0] == step:
                    self._job = None
                self._latest = ReferenceOutputs(
                    step=step,
                    outputs=[torch.from_numpy(a) for a in arrays],
                    seconds=float(seconds),
                )
            elif kind == "error":
                return f"process {worker.process.pid} raised {message[1]}"
        return None

    def _timed_out(self, worker: _Incarnation) -> str | None:
        now = time.monotonic()
        if worker.ready_at is None:
            if now - worker.started_at > self.startup_timeout_s:
                return (
                    f"process {worker.process.pid} did not start within "
                    f"{self.startup_timeout_s:g} s"
                )
            return None
        if self._job is not None and now - max(self._job[1], worker.ready_at) > self.timeout_s:
            return (
                f"process {worker.process.pid} timed out: no result within "
                f"{self.timeout_s:g} s (step {self._job[0]})"
            )
        return None

    def _on_failure(self, reason: str) -> None:
        worker, self._worker = self._worker, None
        self._job = None
        if worker is not None:
            worker.stop()
        if self.restarts < self.max_restarts:
            self.restarts += 1
            self._warn(reason, gave_up=False)
            self._launch()
        else:
            self._give_up(reason)

    def _give_up(self, reason: str) -> None:
        self._worker, self._job = None, None
        self._failure = reason
        self._warn(reason, gave_up=True)

    def _warn(self, reason: str, *, gave_up: bool) -> None:
        if gave_up:
            tail = "giving up: reference-model plasticity is unavailable for the rest of the run"
        else:
            tail = f"restarting it (restart {self.restarts} of {self.max_restarts})"
        warnings.warn(f"reference worker: {reason}; {tail}", ReferenceWorkerWarning, stacklevel=5)


def _describe_exit(pid: int | None, exitcode: int | None) -> str:
    if exitcode is None:
        return f"process {pid} closed its pipe"
    if exitcode < 0:
        with contextlib.suppress(ValueError):
            name = signal.Signals(-exitcode).name
            return f"process {pid} was killed by {name} (exit code {exitcode})"
    return f"process {pid} exited with code {exitcode}"
