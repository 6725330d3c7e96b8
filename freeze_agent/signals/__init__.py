"""Signals: what the controller measures of a run (the int8 reference worker and plasticity,
gradient and weight dynamics, SmartFRZ's attention score) and the versioned observation built
from them."""
