"""The reference model: SP loss, slope, int8 snapshots, fidelity on a trained model, and the
CPU worker process (results, non-blocking submit, crash and hang recovery, giving up, reuse of
children across workers through the pool).

Test models live at module level: the worker's child unpickles them by class (a spawned child
imports their module: pytest puts ``tests/`` on ``sys.path``, which the child inherits).
"""

from __future__ import annotations

import math
import multiprocessing.connection
import os
import signal
import threading
import time
import warnings

import pytest
import torch
from torch import nn

from freeze_agent.core.units import partition
from freeze_agent.signals import reference_pool
from freeze_agent.signals.quantization import dequantize_state_dict, quantize_state_dict
from freeze_agent.signals.reference import ReferenceWorker, ReferenceWorkerWarning
from freeze_agent.signals.reference_pool import Incarnation, warm_pool
from freeze_agent.signals.similarity import gram_distance, normalized_gram, slope, sp_loss
from freeze_agent.signals.unit_outputs import exit_module_paths, unit_outputs

# --------------------------------------------------------------------------- test models


class DigitsCNN(nn.Module):
    """A small conv net for 8×8 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv2 = nn.Sequential(
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(16 * 16, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(self.conv2(self.conv1(x))))


class DigitsMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer1 = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Linear(128, 128), nn.ReLU())
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer2(self.layer1(x)))


class SleepyNet(nn.Module):
    """A conv + GRU + linear net whose forward sleeps ``delay`` seconds (a persistent buffer, so
    a snapshot carries it to the worker): a busy or hung worker on demand."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv1d(1, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU())
        self.rnn = nn.GRU(8, 8, batch_first=True)
        self.head = nn.Linear(8 * 12, 5)
        self.register_buffer("delay", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.delay > 0:
            time.sleep(float(self.delay))
        hidden, _ = self.rnn(self.conv(x).transpose(1, 2))  # the GRU returns a tuple
        return self.head(hidden.flatten(1))


SLEEPY_PATHS = ["conv", "rnn", "head"]


def sleepy_probe() -> torch.Tensor:
    return torch.randn(32, 1, 12, generator=torch.Generator().manual_seed(1))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b).clamp_min(1e-12))


def warning_after(worker: ReferenceWorker, timeout_s: float = 120.0) -> str:
    """Poll ``worker`` until it warns; return the message."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert worker.poll() is None
        messages = [str(w.message) for w in caught if w.category is ReferenceWorkerWarning]
        if messages:
            return messages[0]
        time.sleep(0.02)
    raise AssertionError(f"no warning within {timeout_s} s (status {worker.status})")


# --------------------------------------------------------------------------- SP loss, slope


def test_sp_loss_is_zero_for_identical_inputs():
    a = torch.randn(16, 3, 5)
    assert sp_loss(a, a.clone()) == pytest.approx(0.0, abs=1e-12)


def test_sp_loss_ignores_scale_and_feature_rotation():
    a, b = torch.randn(12, 20), torch.randn(12, 7)
    base = sp_loss(a, b)
    assert base > 0
    assert sp_loss(a * 37.0, b) == pytest.approx(base, rel=1e-6)
    assert sp_loss(a, b * 1e-3) == pytest.approx(base, rel=1e-6)
    rotation, _ = torch.linalg.qr(torch.randn(20, 20, dtype=torch.float64))
    assert sp_loss((a.double() @ rotation).float(), b) == pytest.approx(base, rel=1e-5)
    # features of different width: padding with zeros changes nothing
    assert sp_loss(torch.cat([a, torch.zeros(12, 9)], 1), b) == pytest.approx(base, rel=1e-6)


def test_sp_loss_hand_computed_case():
    # A = I: G(A) = I. B = [[1, 0], [1, 0]]: B Bᵀ = all ones, rows normalized to 1/√2.
    # ‖G(A) − G(B)‖² = 2 (1 − 1/√2)² + 2 · 1/2 = 4 − 2√2; divided by b² = 4.
    a = torch.eye(2)
    b = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert sp_loss(a, b) == pytest.approx(1 - math.sqrt(2) / 2, rel=1e-9)
    assert sp_loss(a, b) == pytest.approx(sp_loss(b, a))
    # the cached form the plasticity monitor uses: G(reference) once, compared many times
    assert gram_distance(normalized_gram(a), normalized_gram(b)) == sp_loss(a, b)


def test_slope_of_known_sequences():
    assert slope([]) == 0.0
    assert slope([4.2]) == 0.0
    assert slope([0, 1, 2, 3]) == pytest.approx(1.0)
    assert slope([3.0, 1.0]) == pytest.approx(-2.0)
    assert slope([7.0] * 5) == pytest.approx(0.0)
    assert slope([2 * i + 5 for i in range(20)]) == pytest.approx(2.0)
    assert slope([1, 0, 1, 0]) == pytest.approx(-0.2)  # Σ(x−x̄)(y−ȳ) = −1, Σ(x−x̄)² = 5


# --------------------------------------------------------------------------- int8 snapshots


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.conv = nn.Conv1d(6, 5, 3)
        self.norm = nn.BatchNorm1d(5)
        self.fc = nn.Linear(5, 4)
        self.gru = nn.GRU(4, 3)


def test_quantize_round_trip_error_bound_and_dtypes():
    model = Mixed()
    with torch.no_grad():
        model.conv.weight[2].zero_()  # an all-zero channel must not divide by zero
        model.norm.running_mean.normal_()
    state = model.state_dict()
    q = quantize_state_dict(model)
    quantized = {"embed.weight", "conv.weight", "fc.weight"}
    for key in quantized:
        assert q[key].dtype == torch.int8 and q[key].shape == state[key].shape
        scale = q[key + ".scale"]
        assert scale.dtype == torch.float32 and scale.shape == (state[key].shape[0],)
        assert q[key].abs().max() <= 127
    for key, value in state.items():
        if key not in quantized:
            assert torch.equal(q[key], value) and q[key].dtype == value.dtype
            assert q[key].data_ptr() != value.data_ptr(), "the snapshot must be a copy"
    restored = dequantize_state_dict(q)
    assert set(restored) == set(state)
    for key in quantized:
        rows = state[key].reshape(state[key].shape[0], -1)
        error = (restored[key].reshape(rows.shape) - rows).abs().amax(dim=1)
        bound = rows.abs().amax(dim=1) / 127 / 2
        assert torch.all(error <= bound * (1 + 1e-5) + 1e-8)
    assert torch.all(restored["conv.weight"][2] == 0)
    copy = Mixed()
    copy.load_state_dict(restored)  # loads strictly


def test_unit_outputs_restore_flags_and_rng(chain):
    chain.train()
    probe = torch.randn(8, 1, 16)
    paths = exit_module_paths(chain, partition(chain, probe))
    state = torch.random.get_rng_state()
    outputs = unit_outputs(chain, paths, probe)
    assert torch.equal(state, torch.random.get_rng_state())
    assert all(m.training for m in chain.modules())
    assert len(outputs) == len(paths)
    assert all(o.dtype == torch.float32 and o.shape[0] == 8 and o.dim() == 2 for o in outputs)
    assert torch.equal(outputs[-1], chain.eval()(probe))  # the head's output is the model's


# --------------------------------------------------------------------------- fidelity


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return (x - 0.3) / 0.4, torch.tensor(data.target)


@pytest.mark.parametrize("model_class", [DigitsCNN, DigitsMLP])
def test_int8_reference_is_faithful_on_a_trained_model(model_class):
    torch.manual_seed(0)
    x, y = digits()
    model = model_class()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: a shared thread pool on busy cores only stalls
    try:
        for _ in range(200):
            rows = torch.randint(0, len(x), (64,), generator=generator)
            loss = nn.functional.cross_entropy(model(x[rows]), y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.9, "the model must actually be trained"

    probe = x[:32]
    paths = exit_module_paths(model, partition(model, probe))
    assert len(paths) >= 3
    reference = model_class()
    reference.load_state_dict(dequantize_state_dict(quantize_state_dict(model)))
    errors = [
        relative_error(r, f)
        for r, f in zip(
            unit_outputs(reference, paths, probe), unit_outputs(model, paths, probe), strict=True
        )
    ]
    print(model_class.__name__, dict(zip(paths, [f"{e:.4f}" for e in errors], strict=True)))
    assert max(errors) < 0.05, errors


# --------------------------------------------------------------------------- the worker


@pytest.fixture(scope="module")
def sleepy_worker():
    torch.manual_seed(0)
    model = SleepyNet()
    worker = ReferenceWorker(model, SLEEPY_PATHS, sleepy_probe(), timeout_s=30.0)
    yield model, worker
    worker.close()


def test_worker_returns_every_unit_matching_the_dequantized_model(sleepy_worker):
    model, worker = sleepy_worker
    assert worker.available and worker.status == "idle"
    assert worker.submit(model, step=7)
    result = worker.wait(60.0)
    assert result is not None, worker.status
    assert result.step == 7 and result.seconds > 0
    assert worker.poll() is None, "a result is returned once"

    expected = unit_outputs(model, SLEEPY_PATHS, sleepy_probe())
    reference = SleepyNet()
    reference.load_state_dict(dequantize_state_dict(quantize_state_dict(model)))
    dequantized = unit_outputs(reference, SLEEPY_PATHS, sleepy_probe())
    assert len(result.outputs) == len(SLEEPY_PATHS)
    for got, want, fp32 in zip(result.outputs, dequantized, expected, strict=True):
        assert got.dtype == torch.float32 and got.shape == want.shape == fp32.shape
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
        assert relative_error(got, fp32) < 0.05
    assert [tuple(o.shape) for o in result.outputs] == [(32, 96), (32, 96), (32, 5)]


def test_submit_never_blocks(sleepy_worker):
    model, worker = sleepy_worker
    with torch.no_grad():
        model.delay.fill_(3.0)
    try:
        # the child sleeps 3 s on this job: had submit waited for it, its result would be in
        assert worker.submit(model, step=1)
        assert worker.status == "busy" and worker.poll() is None
        assert not worker.submit(model, step=2), "a busy worker takes no second snapshot"
        assert worker.poll() is None
        result = worker.wait(60.0)
        assert result is not None and result.step == 1
        assert worker.status == "idle"
    finally:
        with torch.no_grad():
            model.delay.zero_()


def test_worker_restarts_once_after_a_crash_then_gives_up():
    model = SleepyNet()
    worker = ReferenceWorker(model, SLEEPY_PATHS, sleepy_probe(), timeout_s=30.0)
    try:
        assert worker.submit(model, step=0)
        assert worker.wait(60.0) is not None

        first_pid = worker.pid
        os.kill(first_pid, signal.SIGKILL)
        message = warning_after(worker)
        assert "SIGKILL" in message and "exit code -9" in message and "restarting" in message
        assert worker.available and worker.pid != first_pid
        assert worker.submit(model, step=1)
        result = worker.wait(60.0)
        assert result is not None and result.step == 1, worker.status
        assert len(result.outputs) == len(SLEEPY_PATHS)

        os.kill(worker.pid, signal.SIGKILL)
        message = warning_after(worker)
        assert "giving up" in message
        assert not worker.available
        assert worker.status.startswith("failed: ") and "SIGKILL" in worker.status
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no further warnings, no exceptions
            assert worker.submit(model, step=2) is False
            assert worker.poll() is None
            assert worker.wait(0.1) is None
    finally:
        worker.close()


def test_worker_restarts_after_a_hang_and_close_kills_a_hung_child():
    model = SleepyNet()
    worker = ReferenceWorker(model, SLEEPY_PATHS, sleepy_probe(), timeout_s=5.0)
    try:
        with torch.no_grad():
            model.delay.fill_(600.0)
        assert worker.submit(model, step=3)
        with pytest.warns(ReferenceWorkerWarning, match=r"timed out.*5 s.*restarting"):
            assert worker.wait(60.0) is None
        assert worker.status == "restarting"
        with torch.no_grad():
            model.delay.zero_()
        assert worker.submit(model, step=4)
        result = worker.wait(60.0)
        assert result is not None and result.step == 4, worker.status

        with torch.no_grad():
            model.delay.fill_(600.0)
        assert worker.submit(model, step=5)
        pid = worker.pid
        worker.close()  # returns although the child would sleep for ten minutes
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert not worker.available and worker.status.startswith("failed")
    finally:
        worker.close()


def make_local_model() -> nn.Module:
    class Local(nn.Module):  # defined in a function: cannot be pickled by reference
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

    return Local()


def test_an_unpicklable_model_leaves_the_worker_unavailable_with_a_warning():
    model = make_local_model()
    with pytest.warns(ReferenceWorkerWarning, match="cannot be pickled"):
        worker = ReferenceWorker(model, ["fc"], torch.randn(4, 4))
    assert not worker.available and worker.status.startswith("failed: ")
    assert worker.submit(model, step=0) is False and worker.poll() is None
    worker.close()


def test_a_model_holding_the_handle_of_a_local_hook_still_gets_a_worker():
    """transformers' ``gradient_checkpointing_enable`` registers a local function as a forward
    hook and keeps its handle on the model; the handle pickles the hook dict it points to."""
    model = DigitsMLP()
    seen = []

    def make_inputs_require_grads(_module, _args, output):  # local: not picklable
        seen.append(output.shape)

    model._require_grads_hook = model.layer1.register_forward_hook(make_inputs_require_grads)
    paths = exit_module_paths(model, partition(model, torch.randn(2, 1, 8, 8)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReferenceWorkerWarning)
        worker = ReferenceWorker(model, paths, digits_probe())
    try:
        assert worker.submit(model, step=0)
        assert worker.wait(60.0) is not None, worker.status
    finally:
        worker.close()
    seen.clear()
    model(torch.randn(2, 1, 8, 8))  # the hook is still registered, and still removable
    assert len(seen) == 1
    model._require_grads_hook.remove()
    model(torch.randn(2, 1, 8, 8))
    assert len(seen) == 1


class WeightNormed(nn.Module):
    """A weight-normed conv (torch.nn.utils.parametrizations), as Wav2Vec2's positional conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.utils.parametrizations.weight_norm(nn.Conv1d(1, 4, 3, padding=1), dim=2)
        self.fc = nn.Linear(4 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_a_model_with_parametrizations_gets_a_worker():
    """Torch pickles no parametrized module; the worker sends a plain stand-in and the child
    puts the parametrization back, so the snapshots' state dict keys match."""
    model = WeightNormed()
    probe = torch.randn(6, 1, 8, generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReferenceWorkerWarning)
        worker = ReferenceWorker(model, ["conv", "fc"], probe)
    try:
        assert worker.submit(model, step=0)
        result = worker.wait(60.0)
        assert result is not None, worker.status
        reference = WeightNormed()
        reference.load_state_dict(dequantize_state_dict(quantize_state_dict(model)))
        want = unit_outputs(reference, ["conv", "fc"], probe)
        for got, expected in zip(result.outputs, want, strict=True):
            assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)
    finally:
        worker.close()
    assert nn.utils.parametrize.is_parametrized(model.conv, "weight")  # untouched
    model(probe).sum().backward()
    assert model.conv.parametrizations.weight.original1.grad is not None


# --------------------------------------------------------------------------- the pool


def digits_probe() -> torch.Tensor:
    return torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(2))


def pooled_pids() -> list[int]:
    return [child.process.pid for child in reference_pool._pool]


@pytest.fixture
def empty_pool():
    """Start from an empty pool (earlier tests may have left idle children there)."""
    reference_pool.drain_pool()
    yield
    reference_pool.drain_pool()


def test_a_closed_idle_child_is_reused_for_a_different_architecture(empty_pool):
    first = ReferenceWorker(SleepyNet(), SLEEPY_PATHS, sleepy_probe(), timeout_s=30.0)
    assert first.submit(SleepyNet(), step=0) and first.wait(60.0) is not None
    pid = first.pid
    first.close()
    assert pid in pooled_pids() and os.kill(pid, 0) is None, "an idle child is kept alive"

    torch.manual_seed(3)
    model = DigitsMLP()
    paths = ["layer1", "layer2", "head"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReferenceWorkerWarning)
        second = ReferenceWorker(model, paths, digits_probe(), timeout_s=30.0)
        try:
            assert second.pid == pid and pid not in pooled_pids()
            assert second.submit(model, step=11)
            result = second.wait(60.0)
            assert result is not None and result.step == 11, second.status
        finally:
            second.close()
    reference_model = DigitsMLP()
    reference_model.load_state_dict(dequantize_state_dict(quantize_state_dict(model)))
    want = unit_outputs(reference_model, paths, digits_probe())
    assert [tuple(o.shape) for o in result.outputs] == [(16, 128), (16, 128), (16, 10)]
    for got, expected in zip(result.outputs, want, strict=True):
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_a_pooled_child_that_died_is_not_reused(empty_pool):
    first = ReferenceWorker(SleepyNet(), SLEEPY_PATHS, sleepy_probe(), timeout_s=30.0)
    assert first.wait(0.0) is None  # nothing submitted
    first.close()
    dead = pooled_pids()
    assert len(dead) == 1, "the idle child went to the pool"
    for pid in dead:
        os.kill(pid, signal.SIGKILL)
    for child in reference_pool._pool:
        child.process.join(60.0)  # dead, not yet noticed by the pool
    model = SleepyNet()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReferenceWorkerWarning)  # not a failure of this worker
        second = ReferenceWorker(model, SLEEPY_PATHS, sleepy_probe(), timeout_s=30.0)
        try:
            assert second.pid not in dead and second.restarts == 0
            assert second.submit(model, step=1)
            result = second.wait(60.0)
            assert result is not None and result.step == 1, second.status
        finally:
            second.close()


def test_a_job_that_finishes_within_the_grace_is_collected_and_the_child_pooled(empty_pool):
    model = SleepyNet()
    worker = ReferenceWorker(model, SLEEPY_PATHS, sleepy_probe(), timeout_s=30.0)
    assert worker.submit(model, step=0) and worker.wait(60.0) is not None
    with torch.no_grad():
        model.delay.fill_(0.3)
    assert worker.submit(model, step=1)  # the snapshot a Gymnasium episode takes at its end
    pid = worker.pid
    worker.close()
    assert pooled_pids() == [pid]


def test_a_busy_child_is_killed_not_pooled(empty_pool):
    model = SleepyNet()
    worker = ReferenceWorker(model, SLEEPY_PATHS, sleepy_probe(), timeout_s=30.0)
    with torch.no_grad():
        model.delay.fill_(600.0)
    assert worker.submit(model, step=0)
    pid = worker.pid
    worker.close()  # returns although the child would sleep for ten minutes
    assert pid not in pooled_pids()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_warm_pool_starts_a_child_ahead_and_a_forked_process_does_not_inherit_it(empty_pool):
    assert warm_pool(1, wait_s=60.0) >= 1
    pids = pooled_pids()
    assert pids and reference_pool._pool[-1].started
    forked = os.fork()
    if forked == 0:  # the forked process: the parent's children are not its to reuse or kill
        os._exit(0 if not reference_pool._pool and os.kill(pids[0], 0) is None else 1)
    _, status = os.waitpid(forked, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    model = SleepyNet()
    worker = ReferenceWorker(model, SLEEPY_PATHS, sleepy_probe(), timeout_s=30.0)
    try:
        assert worker.pid in pids
        assert worker.submit(model, step=2) and worker.wait(60.0) is not None
    finally:
        worker.close()


def test_children_are_forked_here_and_spawned_children_still_work(empty_pool):
    assert reference_pool.default_start_method() == "fork"  # Linux, no CUDA initialized
    for method in ("fork", "spawn"):
        reference_pool.drain_pool()  # a new child, not a pooled one
        model = SleepyNet()
        worker = ReferenceWorker(
            model, SLEEPY_PATHS, sleepy_probe(), timeout_s=30.0, start_method=method
        )
        try:
            assert worker._worker.start_method == method
            assert worker.submit(model, step=1) and worker.wait(60.0) is not None
        finally:
            worker.close()


ORPHAN_SCRIPT = """
import os, sys, time
sys.path.insert(0, {tests!r})
from signals.test_reference import SleepyNet, SLEEPY_PATHS, sleepy_probe
from freeze_agent.signals.reference import ReferenceWorker
workers = [ReferenceWorker(SleepyNet(), SLEEPY_PATHS, sleepy_probe()) for _ in range(2)]
for worker in workers:
    assert worker.submit(SleepyNet(), step=0) and worker.wait(60.0) is not None
print(" ".join(str(worker.pid) for worker in workers), flush=True)
os._exit(0)  # no clean-up: as if the training process were killed
"""


def test_forked_children_exit_when_their_parent_dies_without_cleaning_up(tmp_path):
    """Each forked child must see EOF on its command pipe once the parent is gone, so no child
    may keep a copy of its own (or a sibling's) parent-side pipe end."""
    import subprocess
    import sys

    script = ORPHAN_SCRIPT.format(tests=os.path.dirname(os.path.dirname(__file__)))
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    pids = [int(pid) for pid in done.stdout.split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 30.0
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [pid for pid in pids if _alive(pid)]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive, f"children {alive} outlived their parent"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie has exited; its reaper is gone
        return stat.read().split(")")[-1].split()[0] != "Z"


def test_the_child_runs_at_a_lower_priority_than_training(empty_pool):
    assert warm_pool(1, wait_s=60.0) >= 1
    child = pooled_pids()[0]
    expected = min(os.nice(0) + reference_pool.WORKER_NICENESS, 19)
    assert os.getpriority(os.PRIO_PROCESS, child) == expected > os.nice(0)


class UnreadPipe:
    """A pipe end whose reader never reads: ``send`` blocks, as a large snapshot does while the
    child is still importing torch or busy, until the child dies (then the write fails). It
    records whether it was closed while a send was still under way."""

    def __init__(self, process) -> None:
        self.process = process
        self.sending = threading.Event()
        self.in_send = False
        self.closed_while_sending = False

    def send(self, _message) -> None:
        self.in_send = True
        self.sending.set()
        try:
            while not multiprocessing.connection.wait([self.process.sentinel], timeout=0.05):
                pass
            time.sleep(0.1)  # the failed write reaches the sender a moment after the death
            raise BrokenPipeError
        finally:
            self.in_send = False

    def close(self) -> None:
        self.closed_while_sending |= self.in_send


@pytest.fixture
def thread_errors(monkeypatch):
    """Exceptions that escape any thread (a sender thread's would be printed to stderr)."""
    caught = []
    monkeypatch.setattr(threading, "excepthook", lambda args: caught.append(args.exc_value))
    return caught


def test_stopping_a_child_stops_its_sender_before_closing_the_pipe(thread_errors):
    child = Incarnation()
    real_commands, child.commands = child.commands, UnreadPipe(child.process)
    try:
        child.send(("job", 0, b"a snapshot the child never reads"))
        assert child.commands.sending.wait(60.0)
        child.stop()
        assert not child.commands.closed_while_sending
        assert not child._sender.is_alive() and not child.process.is_alive()
        assert thread_errors == []
    finally:
        real_commands.close()


class LargeSleepyNet(nn.Module):
    """8 MB of weights, and a forward that sleeps ``delay`` seconds."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(512, 2048), nn.Linear(2048, 512)
        self.register_buffer("delay", torch.full((), 30.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(float(self.delay))
        return self.down(torch.relu(self.up(x)))


def test_closing_while_a_snapshot_is_in_flight_is_silent(empty_pool, thread_errors, capfd):
    model = LargeSleepyNet()
    for _ in range(3):
        worker = ReferenceWorker(model, ["up", "down"], torch.randn(4, 512), timeout_s=60.0)
        assert worker.submit(model, step=0)  # queued behind the model while the child starts
        pid = worker.pid
        worker.close()  # the job cannot finish within the grace: the child is stopped
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert thread_errors == []
    assert "Error" not in capfd.readouterr().err
