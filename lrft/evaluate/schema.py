"""The ``lrft eval`` config schema.

configs/eval.yaml types its groups through the schemas :func:`lrft.config.compose.register_schemas` stores
(so ``compose(..., "eval")`` works anywhere, with nothing else to register); this dataclass types
its top-level keys (:func:`lrft.cli.eval.as_eval_config`) and documents them.
"""

from __future__ import annotations

from dataclasses import dataclass

from lrft.schema import DatasetConfig, ModelConfig, QuantizationConfig


@dataclass
class EvalConfig:
    """What ``lrft eval`` evaluates and how. ``model``/``dataset`` stay null until chosen; with
    ``checkpoint`` they default to the run's own."""

    model: ModelConfig | None = None
    dataset: DatasetConfig | None = None
    quantization: QuantizationConfig | None = None
    checkpoint: str | None = None  # a training run folder: evaluate its final state
    output_dir: str | None = None  # where eval.json goes; null: the run folder, else eval/<time>
    split: str | None = None  # null: the dataset's eval split(s) (MNLI: matched + mismatched; MMLU: test)
    batch_size: int = 8
    max_samples: int | None = None  # first N examples of each split (MMLU: of each subject)
    seed: int = 0  # seeds the random init of from_config models (and anything else random)
    device: str = "auto"  # auto: cuda if available, else cpu
    reuse_prefix: bool = True  # MMLU: run each subject's shared k-shot prefix once (KV cache)
    progress: bool = True


KEYS_HELP = {
    "checkpoint": "training run folder: its final state, on its own dataset unless dataset= is given",
    "output_dir": "where eval.json goes (default: the run folder, else ./eval/<timestamp>)",
    "split": "split to evaluate (default: the dataset's eval split; MNLI both, MMLU test)",
    "batch_size": "examples (or answer choices) per forward pass",
    "max_samples": "first N examples of each split (MMLU: of each subject)",
    "seed": "seed for randomly initialised tiny models",
    "device": "auto | cpu | cuda | cuda:N",
    "reuse_prefix": "MMLU: compute each subject's k-shot prefix once and reuse its KV cache",
    "progress": "show a progress bar",
}
