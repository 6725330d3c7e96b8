"""Where the files that ship beside the package lie: the task specs and the trained policies."""

from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
ENVS_DIR = PROJECT_ROOT / "envs"
POLICIES_DIR = PROJECT_ROOT / "policies"
