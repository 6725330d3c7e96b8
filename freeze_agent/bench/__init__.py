"""Measurement: a policy against no freezing, the cost model against measured time, and the
signals' overhead."""
