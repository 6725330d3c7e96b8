"""The task specs, shipped inside freeze-agent as the resource package
``freeze_agent._shipped_envs`` (pyproject.toml's ``[tool.setuptools.package-dir]``). This file
only makes the folder a regular package, which ``importlib.resources`` needs to find it in an
editable install; ``freeze_agent.core.resources.ENVS_DIR`` is the folder."""
