"""Mechanisms: units (the partition of a model), modes, the local learning rule, the activation
cache and the cost model. Nothing here imports from a layer above."""
