"""Where the files that ship with the package lie: the task specs and the trained policies.

They are the repo-root folders ``envs/`` and ``policies/``, which pyproject.toml maps into the
package as the resource packages ``freeze_agent._shipped_envs`` and
``freeze_agent._shipped_policies``: a wheel carries them as ``freeze_agent/_shipped_envs/`` and
``freeze_agent/_shipped_policies/``, an editable install maps the names onto the checkout's
folders (each folder's ``__init__.py`` makes it a regular package, which that mapping needs).

Why ``importlib.resources`` and not a path from ``__file__``: the import system knows where a
package's files are in each kind of install (site-packages for a wheel, the checkout for an
editable install), whereas ``Path(__file__).parents[2] / "envs"`` assumes the checkout's layout
and points outside site-packages once installed. ``ENVS_DIR`` and ``POLICIES_DIR`` are real
folders (callers glob and join them), so an import from a zip archive, where the files are not
on disk, is refused here with a clear error instead of giving paths that do not exist.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

ENVS_PACKAGE = "freeze_agent._shipped_envs"
POLICIES_PACKAGE = "freeze_agent._shipped_policies"


def shipped_folder(package: str) -> Path:
    """The folder on disk of one of the resource packages above."""
    try:
        folder = files(package)
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            f"{package} (envs/ or policies/, shipped with freeze-agent) is not installed; an "
            "editable install older than it needs reinstalling: scripts/setup, or "
            "pip install -e ."
        ) from error
    if not isinstance(folder, Path):
        raise RuntimeError(
            f"{package} is not a folder on disk ({folder!r}): freeze-agent reads its task specs "
            "and policies as files, so install it unzipped (pip install)"
        )
    return folder


ENVS_DIR = shipped_folder(ENVS_PACKAGE)
POLICIES_DIR = shipped_folder(POLICIES_PACKAGE)
