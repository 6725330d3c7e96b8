"""The reference worker's child processes, seen from the parent: one child incarnation
(``Incarnation``: the forked or spawned process, its pipes and the thread that feeds it) and
the process-wide pool of idle children (``pool_take``, ``pool_put``, ``warm_pool``).

Children are forked where that is safe (``default_start_method``), so they start with the
parent's imports instead of paying seconds of start-up that the first reference result would
wait for. Child processes are pooled: a worker that closes while its child is healthy and idle
hands the child to the next worker of the same process, which sends it a new model ("init")
rather than starting another process; a spawned child's start-up (importing torch and the
model's library, a few CPU-seconds) is then paid once per process, not once per training run.
Pooled children are killed at interpreter exit, and a forked process never touches its
parent's. What runs inside a child is ``freeze_agent.signals.reference_child``.
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing.connection
import os
import queue
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.multiprocessing as torch_mp

from freeze_agent.signals.reference_child import worker_main

__all__ = [
    "POOL_MAX_IDLE",
    "WORKER_NICENESS",
    "Incarnation",
    "ReferenceWorkerWarning",
    "default_start_method",
    "drain_pool",
    "pool_put",
    "pool_take",
    "shut_down",
    "shutting_down",
    "warm_pool",
]


class ReferenceWorkerWarning(RuntimeWarning):
    """The reference worker failed (died, hung or raised) and was restarted or given up."""


# --------------------------------------------------------------------------- one child


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
SENDER_STOP_S = 0.2  # how long ``stop`` lets an idle sender thread finish on its own
CHILD_EXIT_S = 2.0  # how long ``stop`` waits for a killed child (and its sender) to go


def default_start_method() -> str:
    """How a child starts: forked where the platform can fork and CUDA is not initialized in
    this process, else spawned.

    A spawned child is a fresh interpreter that imports torch, and then the model's own library
    to unpickle it (``transformers`` alone takes seconds): on a short run that start-up is the
    largest cost freeze-agent adds, because the first reference result waits for it. A forked
    child has all of that already and answers within milliseconds. CUDA is the exception: a
    process that initialized it is forked only by code that never touches the GPU again, and
    the spawned child keeps that guarantee without relying on it. A forked child shares the
    parent's memory pages copy-on-write, like a DataLoader worker.
    """
    if "fork" in torch_mp.get_all_start_methods() and not torch.cuda.is_initialized():
        return "fork"
    return "spawn"


class Incarnation:
    """One child process with its pipes and the sender thread that feeds it.

    The child starts bare (no owner's model); ``init`` gives it an owner's model. Between
    owners it waits in the process-wide pool (``pool_put``, ``pool_take``).

    Args:
        start_method: "fork" or "spawn" (default: ``default_start_method()``).
    """

    def __init__(self, start_method: str | None = None) -> None:
        self.start_method = start_method or default_start_method()
        ctx = torch_mp.get_context(self.start_method)
        child_commands, self.commands = ctx.Pipe(duplex=False)
        self.results, child_results = ctx.Pipe(duplex=False)
        self.process = ctx.Process(
            target=worker_main,
            args=(child_commands, child_results),
            name="freeze-agent-reference",
            daemon=True,
        )
        _incarnations.add(self)  # so that a forked child closes this process's ends of the pipes
        if self.start_method == "spawn":
            with _main_module_hidden():
                self.process.start()
        else:
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
        """Shut the child down in order, silently and bounded in time: stop the sender thread,
        then close the pipes, then reap the process.

        A sender blocked writing to a child that does not read (still importing torch, or busy)
        cannot take the stop request, so the child is killed first: its end of the pipe goes,
        the write fails and the sender returns. Closing a pipe under a sender still writing to
        it is what must not happen (``multiprocessing.connection`` then fails inside ``_send``
        on a handle that is gone).
        """
        self._outbox.put(None)
        self._sender.join(timeout=SENDER_STOP_S)  # an idle sender takes the request at once
        if self._sender.is_alive():
            with contextlib.suppress(Exception):
                self.process.kill()
            self._sender.join(timeout=CHILD_EXIT_S)
        if not self._sender.is_alive():  # else leave the pipes to the garbage collector
            for connection in (self.commands, self.results):
                with contextlib.suppress(Exception):
                    connection.close()
        with contextlib.suppress(Exception):
            if self.process.is_alive():
                self.process.kill()
            self.process.join(timeout=CHILD_EXIT_S)


# --------------------------------------------------------------------------- the pool

POOL_MAX_IDLE = 2
"""At most this many idle children are kept per process (each holds an interpreter with torch
imported, a few hundred MB); a run hands its child back when it ends and the next run takes it,
so a process that trains run after run (the Gymnasium environment) spawns one child, not one per
run."""


_pool: list[Incarnation] = []
_pool_lock = threading.Lock()
_incarnations: weakref.WeakSet[Incarnation] = weakref.WeakSet()  # every child of this process
_shutting_down = False


def pool_take() -> Incarnation | None:
    """An idle, healthy child of this process from the pool (dead ones are discarded)."""
    while True:
        with _pool_lock:
            if not _pool:
                return None
            child = _pool.pop()
        if child.healthy():
            return child
        child.stop()


def pool_put(child: Incarnation) -> None:
    """Keep ``child`` (idle and healthy, checked by the caller) for the next run, or kill it when
    the pool is full or the interpreter is exiting."""
    child.release()
    with _pool_lock:
        if not _shutting_down and len(_pool) < POOL_MAX_IDLE:
            _pool.append(child)
            return
    child.stop()


def drain_pool() -> None:
    """Kill every pooled child (kill them all first, then reap: bounded in time)."""
    with _pool_lock:
        children = list(_pool)
        _pool.clear()
    for child in children:
        with contextlib.suppress(Exception):
            child.process.kill()
    for child in children:
        child.stop()


def shut_down() -> None:
    """At interpreter exit: kill every pooled child; from then on ``pool_put`` kills the
    child it is given instead of pooling it, and ``warm_pool`` spawns none."""
    global _shutting_down
    _shutting_down = True
    drain_pool()


atexit.register(shut_down)


def shutting_down() -> bool:
    """Whether the interpreter is exiting (``shut_down`` has run)."""
    return _shutting_down


def _forget_children_after_fork() -> None:
    """In a forked process (a DataLoader worker, or a reference child itself): the children
    belong to the parent. Drop the pooled ones without killing them, and close this copy of
    every child's pipes, so that a child still sees EOF when the parent exits (a forked reference
    child keeping the write end of its own command pipe would otherwise never see it)."""
    global _pool_lock
    _pool_lock = threading.Lock()  # another thread may have held it at the fork
    _pool.clear()
    for child in list(_incarnations):
        for connection in (child.commands, child.results):
            with contextlib.suppress(Exception):
                connection.close()
    _incarnations.clear()


os.register_at_fork(after_in_child=_forget_children_after_fork)


def warm_pool(count: int = 1, wait_s: float = 0.0) -> int:
    """Spawn children into the pool until it holds ``count`` (at most :data:`POOL_MAX_IDLE`),
    so that the next ``freeze_agent.signals.reference.ReferenceWorker`` skips the child's
    start-up (a fresh interpreter importing torch: seconds of CPU, which on a small machine
    compete with training). Waits up to ``wait_s`` for them to be up. Returns how many pooled
    children are up.

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
            spawned.append(Incarnation())
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
