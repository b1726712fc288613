"""The linear probe and kNN: 52 linear heads trained in one step on frozen features, kNN on the CLS token.

What other jobs use: ``Evaluator`` (the probe inside a pretraining run, configured by its ``evals``
section) and ``validate_evals`` (that section's check). The probe job itself is ``trainer.run``.
"""

from medjax.probe.evaluator import Evaluator
from medjax.probe.validate import validate_evals

__all__ = ["Evaluator", "validate_evals"]
