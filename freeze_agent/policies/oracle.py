"""The oracle: the hindsight-best static frozen-prefix schedule of one task."""

from __future__ import annotations

from freeze_agent.policies.schedules import LinearPrefix


class Oracle(LinearPrefix):
    """The hindsight-best linear frozen prefix of a task: an upper reference, not deployable.

    A linear frozen prefix from ``start`` to ``end`` of the run, the pair found by a grid search
    on the task's seed-0 run (``freeze_agent.bench.oracle``): the highest modeled speedup
    whose final validation accuracy stays within the tolerance of no freezing.

    An upper reference, not a deployable policy: it was chosen knowing how the task's training
    turns out. ``freeze-agent bench`` searches (and caches) it per task; ``oracle:start=,end=``
    replays a given pair.
    """

    registry_name = "oracle"
    aliases = ()

    def __init__(self, start: float = 0.5, end: float = 1.0) -> None:
        super().__init__(start, end)
        self.name = f"oracle:{start:g},{end:g}"
