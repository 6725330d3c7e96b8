"""The one place where units change mode, and what a user's training loop drives.

``FreezeController`` (``freeze_controller``) partitions a model and owns every mode change; with a
policy attached (``FreezeController.from_pretrained``) it also decides by itself at planned steps
(``decision_schedule``), protects accuracy (``safety_net``) and serves the frozen prefix from the
activation cache through the user's own ``DataLoader`` (``cached_loader``).
"""

from freeze_agent.controller.freeze_controller import FreezeController

__all__ = ["FreezeController"]
