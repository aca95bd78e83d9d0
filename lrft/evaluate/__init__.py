"""Evaluation: during training (the trainer calls :func:`evaluate_model`) and for ``lrft eval``
(:func:`lrft.cli.eval.eval_main`, which runs :func:`lrft.evaluate.run.run_eval`)."""

from lrft.evaluate.core import encode_for_eval, evaluate_model

__all__ = ["encode_for_eval", "evaluate_model"]
