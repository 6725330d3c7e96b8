"""The trained policies, shipped inside freeze-agent as the resource package
``freeze_agent._shipped_policies`` (pyproject.toml's ``[tool.setuptools.package-dir]``). This
file only makes the folder a regular package, which ``importlib.resources`` needs to find it in
an editable install; ``freeze_agent.core.resources.POLICIES_DIR`` is the folder."""
