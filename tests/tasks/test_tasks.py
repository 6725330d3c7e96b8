"""Task specs: the shipped suite loads, and a wrong key or value is a clear error naming it."""

from __future__ import annotations

import textwrap

import pytest

from freeze_agent import TaskSpecError, list_tasks, load_task
from freeze_agent.tasks.spec import DEFAULT_TASK

VALID = """
description: test task
dataset: {name: digits, n_train: 256, n_val: 64, n_test: 64}
model: {family: mlp, depth: 2, width: 32}
optimizer: {name: adamw, lr: 1.0e-3, weight_decay: 0.01}
schedule: {name: cosine, warmup_epochs: 0.5}
batch_size: 32
epochs: 2
decisions: 4
"""


def test_builtin_spec_keeps_its_fingerprint(tmp_path):
    """Caches keyed by the fingerprint (oracle schedules, reference trajectories) stay valid:
    a built-in spec hashes as it did before factories existed."""
    assert load_task(write_spec(tmp_path, VALID)).fingerprint() == "7a33d6965d6076e2"


def write_spec(tmp_path, text: str, name: str = "tiny"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_shipped_suite_covers_enough_datasets_and_families():
    tasks = list_tasks()
    assert len(tasks) >= 10
    assert len({t.dataset.name for t in tasks}) >= 4
    assert len({t.family for t in tasks}) >= 6
    train = [t for t in tasks if t.split == "train"]
    heldout = [t for t in tasks if t.split == "heldout"]
    assert train and heldout and any(t.split == "val" for t in tasks)
    seen = {t.family for t in train} | {t.dataset.name for t in train}
    assert all(t.family not in seen or t.dataset.name not in seen for t in heldout)
    assert load_task(DEFAULT_TASK).split == "train"


def test_valid_spec_loads_with_defaults(tmp_path):
    task = load_task(write_spec(tmp_path, VALID))
    assert task.name == "tiny" and task.split == "custom"
    assert task.optimizer.name == "adamw" and task.optimizer.lr == pytest.approx(1e-3)
    assert task.optimizer.momentum == 0.9  # default
    assert task.model == {"family": "mlp", "depth": 2, "width": 32}
    assert task.fingerprint() == load_task(write_spec(tmp_path, VALID, "other")).fingerprint()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("epochs: 2", "epochs: 2\nlearning_rate: 3"), "unknown key 'learning_rate'"),
        (("epochs: 2", "epochs: zero"), "epochs must be a positive integer"),
        (("batch_size: 32", "batch_size: 1000"), "batch_size 1000 exceeds dataset n_train"),
        (("name: digits", "name: cifar"), "dataset: name 'cifar' is not a dataset"),
        (("n_test: 64", "n_test: 64, shuffle: true"), "dataset: unknown key 'shuffle'"),
        (("family: mlp", "family: lstm"), "family 'lstm' is not a model family"),
        (("width: 32", "width: 32, heads: 2"), "unknown hyper-parameter 'heads'"),
        (("name: adamw", "name: lion"), "optimizer: name 'lion' is not supported"),
        (("lr: 1.0e-3", "lr: 1e-3"), "write 5.0e-4"),
        (("name: cosine", "name: exponential"), "schedule: name 'exponential'"),
    ],
)
def test_wrong_key_or_value_is_named(tmp_path, change, message):
    old, new = change
    assert old in VALID
    with pytest.raises(TaskSpecError, match=message) as error:
        load_task(write_spec(tmp_path, VALID.replace(old, new)))
    assert "tiny.yaml" in str(error.value)


def test_missing_required_key_and_bad_yaml(tmp_path):
    with pytest.raises(TaskSpecError, match="missing required key 'epochs'"):
        load_task(write_spec(tmp_path, VALID.replace("epochs: 2", "")))
    with pytest.raises(TaskSpecError, match="not valid YAML"):
        load_task(write_spec(tmp_path, "dataset: [unclosed"))


def test_unknown_task_name_lists_the_known_ones():
    with pytest.raises(FileNotFoundError, match=f"known tasks: .*{DEFAULT_TASK}"):
        load_task("no-such-task")
