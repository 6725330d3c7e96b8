"""Policies: the interface, the hand-written methods (one module per family), the learned
policy's network and artifact, and ``make_policy``. A policy reads observations and returns
modes; it never touches the model."""
