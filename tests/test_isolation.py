"""The suite itself: what it writes stays under pytest's temporary folder."""

from __future__ import annotations

from freeze_agent.tasks.data import cache_dir


def test_the_freeze_agent_cache_is_under_pytests_temporary_folder(tmp_path_factory):
    assert cache_dir().is_relative_to(tmp_path_factory.getbasetemp())
