"""The task specs beside the examples (``scripts/examples/tasks``) name `transformers` models by
import path: they load, build through their factory, partition into the model's blocks and
train, so ``freeze-agent overhead`` / ``bench`` / ``train`` work on them as documented."""

from __future__ import annotations

from pathlib import Path

import pytest

from freeze_agent import LinearPrefix, Trainer
from freeze_agent.tasks.spec import load_task

EXAMPLES = Path(__file__).resolve().parents[2] / "scripts" / "examples"
SPECS = sorted((EXAMPLES / "tasks").glob("*.yaml"))


def test_there_are_example_task_specs():
    assert SPECS, f"no task specs in {EXAMPLES / 'tasks'}"


@pytest.mark.parametrize("spec", SPECS, ids=lambda path: path.stem)
def test_example_task_builds_its_transformers_model_and_trains(spec, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.syspath_prepend(str(EXAMPLES))  # as PYTHONPATH=scripts/examples does
    task = load_task(spec)
    trainer = Trainer(task, seed=0, device="cpu", epochs=1)
    try:
        assert type(trainer.model).__module__ == "hf_models"
        # the embeddings, each encoder layer on its own, and the classifier: real blocks
        assert len(trainer.units) >= 5, [unit.name for unit in trainer.units]
        result = trainer.run(LinearPrefix(0.3))
    finally:
        trainer.close()
    assert not result.diverged
    assert result.timeline[-1]["modes"].startswith("F")
    assert result.signals["plasticity_fraction"] > 0
