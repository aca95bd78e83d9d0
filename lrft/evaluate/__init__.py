"""Evaluation: during training (the trainer calls :func:`evaluate_model`) and for ``lrft eval``."""

from lrft.evaluate.core import evaluate_model

__all__ = ["evaluate_model"]
