"""The Method protocol the trainer talks to, and the helpers every method shares."""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lrft.errors import UserError
from lrft.methods.schemas import MethodConfig
from lrft.model.quantization import quantized_linear_types
from lrft.model.targets import OUTPUT_HEADS

_HALF = (torch.float16, torch.bfloat16)


@dataclass
class ApplyContext:
    """What a method may use while it transforms a model.

    calibration: yields training batches (dicts of tensors on the model's device) for data-aware
        inits such as LoRA-GA's gradient estimate; None when no data is at hand.
    restoring: the model is being rebuilt to load a saved trainable state right after; skip
        expensive or data-dependent inits (SVD, gradient estimates): ``load_trainable`` follows.
    accelerator: the run's ``accelerate.Accelerator`` (rank, world size, all-reduce), or None.
    """

    calibration: Callable[[], Iterator[dict[str, Any]]] | None = None
    restoring: bool = False
    accelerator: Any = None


class Method(abc.ABC):
    """A fine-tuning strategy. The trainer calls nothing but these methods.

    Subclasses set ``name`` through ``@register_method`` and override :meth:`inject` (and
    :meth:`initialize` when the init needs weights or data). The two phases are separate so the
    structure can be built anywhere (meta device, CPU) while the initialization runs where the
    weights are (on the GPU, inside the engine's gather context) and is skipped on resume.
    """

    name: str = "?"
    full_weights: bool = False  # True: the trained state is the whole model (saved with save_pretrained)
    # True: initialize computes on the weights (SVDs, gradient probes), worth a GPU: a sharded run
    # moves rank 0's whole model to its device for the init when it fits (lrft.train.materialize)
    init_computes: bool = False

    def __init__(self, cfg: MethodConfig) -> None:
        self.cfg = cfg

    @classmethod
    def validate(cls, root_cfg: Any) -> None:
        """Refuse impossible combinations with other config groups (before any work).

        Built-in methods keep their checks torch-free in :mod:`lrft.methods.schemas`; a method
        registered from outside may override this.
        """
        from lrft.methods.registry import METHODS

        spec = METHODS.get(cls.name)
        if spec is not None and spec.check is not None:
            spec.check(root_cfg)

    def apply(
        self, model: nn.Module, defaults: dict[str, list[str]] | None = None, ctx: ApplyContext | None = None
    ) -> nn.Module:
        """Transform ``model`` in place for training and return it: :meth:`inject`, then
        :meth:`initialize` unless ``ctx.restoring`` (a saved trainable state is loaded next).

        ``defaults`` gives the model's default ``target_modules`` and ``modules_to_save``.
        """
        ctx = ctx or ApplyContext()
        model = self.inject(model, defaults or {})
        if not ctx.restoring:
            self.initialize(model, ctx)
        return model

    @abc.abstractmethod
    def inject(self, model: nn.Module, defaults: dict[str, list[str]]) -> nn.Module:
        """Structural change only (replace layers, set requires_grad): safe on meta or CPU, reads
        no weight values."""

    def initialize(self, model: nn.Module, ctx: ApplyContext) -> None:  # noqa: B027 - optional
        """Value-dependent init (SVD of W, gradient probes) on the model's device; none by default."""

    @property
    def updates_in_backward(self) -> bool:
        """True when the optimizer updates each parameter inside backward (and frees its gradient):
        the trainer then has no gradient left to clip, check for NaN, or accumulate."""
        return False

    def refuse(self, accelerator: Any, model: nn.Module) -> None:
        """Refuse, with what works instead, an engine setup this method would train wrongly on
        without an error. Called once the model is loaded and on its device, before :meth:`apply`."""
        if self.full_weights:
            half = sorted({str(p.dtype) for p in model.parameters() if p.dtype in _HALF})
            if half:
                raise UserError(
                    f"method={self.name} trains every weight, and this base is stored in "
                    f"{', '.join(half)}: optimizer updates would round away in half precision (no fp32 "
                    "master weights). Load it in float32 (model.dtype=float32) and let mixed precision "
                    "compute in half (trainer.mixed_precision=bf16), or use a low-rank method (lora, "
                    "lora_fa)."
                )

    def trainable_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """What a checkpoint must hold to rebuild the trained model on top of the base."""
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def load_trainable(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        missing = set(state) - {n for n, _ in model.named_parameters()}
        if missing:
            raise UserError(f"checkpoint has parameters the model lacks: {sorted(missing)[:5]}")
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        """Trainable parameters split into decay / no-decay (biases, norms, 1-D) groups: what
        :func:`lrft.optim.build_optimizer` builds the optimizer over. A group may carry options
        of its own (GaLore's projection settings)."""
        decay, no_decay = [], []
        for _, p in model.named_parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return groups


def mark_modules_to_save(model: nn.Module, names: list[str]) -> list[str]:
    """Make every parameter of modules whose name ends with one of ``names`` trainable."""
    hit = []
    for mod_name, module in model.named_modules():
        if any(mod_name == n or mod_name.endswith("." + n) for n in names):
            module.requires_grad_(True)
            hit.append(mod_name)
    return hit


def find_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """Names of the linear layers matching ``targets`` (last name component, or "all-linear")."""
    linear_types = _linear_types()
    linears = [n for n, m in model.named_modules() if isinstance(m, linear_types)]
    if targets == ["all-linear"]:
        found = [n for n in linears if n.split(".")[-1] not in OUTPUT_HEADS]
    else:
        found = [n for n in linears if n.split(".")[-1] in targets or n in targets]
    if not found:
        kinds = sorted({n.split(".")[-1] for n in linears})
        raise UserError(
            f"method.target_modules={targets} matches no linear layer of this model. "
            f"Its linear layers are named: {', '.join(kinds)} (or use all-linear)."
        )
    return found


def _linear_types() -> tuple[type, ...]:
    # quantized bases are adapted like plain ones
    return (nn.Linear, *quantized_linear_types())


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
