"""Every built-in method's config schema and checks, without torch.

Composing and validating a config (``lrft train --help``, a typo's error, ``--cfg job``) needs the
schemas and the cross-group checks, never the layers: keeping them here lets the CLI answer those
without importing torch. :data:`BUILTIN` names the module that implements each method; the registry
imports it on first use (:func:`lrft.methods.registry.get_method`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lrft.errors import UserError, did_you_mean
from lrft.schema import GALORE_OPTIMIZER

PROJ_TYPES = ("std", "reverse_std", "left", "right")  # GaLore's projection sides
LORA_GA_DIRECTIONS = ("ArB2r", "A2rBr", "ArBr")
LORA_GA_SCALES = ("stable", "gd", "unit")


@dataclass
class MethodConfig:
    name: str = "?"
    # modules trained in full besides the method's own parameters (a task head);
    # null: the model config's default (e.g. RoBERTa's classifier)
    modules_to_save: list[str] | None = None


@dataclass
class LoraConfig(MethodConfig):
    name: str = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    # layer names to adapt (last name component) or ["all-linear"]; null: the model's default
    target_modules: list[str] | None = None
    rslora: bool = False  # scale α/√r instead of α/r
    freeze_a: bool = False  # LoRA-FA: A fixed after init, only B trains
    dora: bool = False  # DoRA: W' = m · (W + sBA) / ‖W + sBA‖_c, magnitude m trained too
    project_grad: bool = False  # with freeze_a: B's gradient times (AAᵀ)⁻¹/s² (PEFT's LoraFAOptimizer)


@dataclass
class LoraFAConfig(LoraConfig):
    name: str = "lora_fa"
    freeze_a: bool = True


@dataclass
class DoraConfig(LoraConfig):
    name: str = "dora"
    dora: bool = True


@dataclass
class PissaConfig(LoraConfig):
    name: str = "pissa"
    alpha: float = 8.0  # = r: s = 1, the paper's setting (any s works: the factors absorb 1/s)
    dropout: float = 0.0
    # null: exact SVD; N >= 1: randomized SVD with N subspace iterations; auto: exact up to
    # min(d, k) = 1024, else 4 iterations (a 4096² exact SVD costs seconds per layer, 224 at 7B)
    svd_niter: Any = "auto"


@dataclass
class LoraGAConfig(LoraConfig):
    name: str = "lora_ga"
    init_batches: int = 8  # training batches (trainer.batch_size each) in the gradient estimate
    direction: str = "ArB2r"  # which singular vectors: A from V[:r], B from U[r:2r] (paper default)
    init_scale: str = "stable"  # stable: both × d_out^¼/√γ | gd: both / s | unit: as they come
    stable_gamma: float = 16.0
    svd_niter: int = 4  # subspace iterations of the randomized SVD


@dataclass
class FullConfig(MethodConfig):
    name: str = "full"


@dataclass
class GaloreConfig(MethodConfig):
    name: str = "galore"
    rank: int = 128  # rank r of the gradient projection
    update_proj_gap: int = 200  # steps between SVDs of the gradient (T)
    scale: float = 0.25  # α, multiplies the projected-back update
    proj_type: str = "std"  # std (project the smaller side) | reverse_std | left | right
    layerwise: bool = False  # per-parameter updates in gradient hooks (no grad accumulation/clipping)
    # linear layers whose weights are projected; null: every linear layer but the output heads
    target_modules: list[str] | None = None


def check_lora(root_cfg: Any) -> None:
    m = root_cfg.method
    if m.r < 1:
        raise UserError(f"method.r must be >= 1, got {m.r}.")
    if not 0.0 <= m.dropout < 1.0:
        raise UserError(f"method.dropout must be in [0, 1), got {m.dropout}.")
    if not m.alpha > 0:  # issue 24, finding 7: alpha=0 scales the update to nothing, silently
        raise UserError(
            f"method.alpha must be > 0 (the update is scaled by alpha/r), got {m.alpha}: alpha=0 "
            f"trains nothing. A common choice is alpha = 2r (here {2 * m.r})."
        )
    if m.target_modules is not None and len(m.target_modules) == 0:
        raise UserError(
            "method.target_modules=[] names no layer. List the layers to adapt (e.g. [q_proj,v_proj]), "
            "use all-linear, or drop the key for the model's defaults."
        )
    if m.project_grad and not m.freeze_a:
        raise UserError(
            "method.project_grad=true corrects B's gradient for a FROZEN A (LoRA-FA): "
            "add method.freeze_a=true, or use method=lora_fa."
        )
    if str(root_cfg.optimizer.name).startswith("galore"):
        raise UserError(
            f"optimizer={root_cfg.optimizer.name} projects full-rank gradients to low rank; "
            f"method={m.name}'s factors are low-rank already. Use optimizer=adamw (or adamw8bit), "
            "or method=galore to train full weights with GaLore."
        )


def check_pissa(root_cfg: Any) -> None:
    check_lora(root_cfg)
    m = root_cfg.method
    niter = m.svd_niter
    if (
        niter is not None
        and niter != "auto"
        and (isinstance(niter, bool) or not isinstance(niter, int) or niter < 1)
    ):
        raise UserError(f"method.svd_niter must be auto, null (exact SVD) or >= 1, got {niter!r}.")
    if root_cfg.quantization.name != "none" and _prequantized(root_cfg.model):
        raise UserError(
            f"model.name_or_path={root_cfg.model.name_or_path} is already quantized: PiSSA needs the "
            "full-precision weights for its SVD (QPiSSA quantizes only the residual afterwards). Point "
            "model.name_or_path at the unquantized checkpoint, or use method=lora (QLoRA) on this one."
        )


def _prequantized(mcfg: Any) -> bool:
    if not mcfg.name_or_path:
        return False
    from lrft.model.resolve import prequantized_checkpoint

    return prequantized_checkpoint(mcfg)


def check_lora_ga(root_cfg: Any) -> None:
    from lrft.errors import one_of

    check_lora(root_cfg)
    m = root_cfg.method
    one_of("method.direction", m.direction, LORA_GA_DIRECTIONS)
    one_of("method.init_scale", m.init_scale, LORA_GA_SCALES)
    if m.init_batches < 1:
        raise UserError(f"method.init_batches must be >= 1, got {m.init_batches}.")


def check_full(root_cfg: Any) -> None:
    q = root_cfg.quantization.name
    if q != "none":
        raise UserError(
            f"method=full trains every weight, and {q}-quantized weights cannot train. Use "
            "quantization=none, or train adapters on the quantized base: method=lora (QLoRA) or "
            "method=lora_fa (QLoRA-FA)."
        )
    if str(root_cfg.optimizer.name).startswith("galore"):
        raise UserError(f"optimizer={root_cfg.optimizer.name} goes with method=galore (GaLore).")


def check_galore(root_cfg: Any) -> None:
    m, t = root_cfg.method, root_cfg.trainer
    if root_cfg.quantization.name != "none":
        raise UserError(
            f"method=galore trains the full-rank weights, which cannot be {root_cfg.quantization.name}-"
            "quantized (bitsandbytes weights are frozen). Use quantization=none, or a low-rank method "
            "on the quantized base: method=lora (QLoRA) or method=lora_fa (QLoRA-FA)."
        )
    if root_cfg.optimizer.name not in GALORE_OPTIMIZER:
        raise UserError(
            f"method=galore keeps Adam's state low-rank; optimizer={root_cfg.optimizer.name} has no "
            "such form. Use optimizer=galore_adamw (= adamw here) or galore_adamw8bit (= adamw8bit)."
        )
    if m.rank < 1 or m.update_proj_gap < 1:
        raise UserError("method.rank and method.update_proj_gap must be >= 1.")
    if m.proj_type not in PROJ_TYPES:
        raise UserError(
            f"method.proj_type={m.proj_type!r} is not valid.{did_you_mean(m.proj_type, PROJ_TYPES)}"
        )
    if m.layerwise:
        why = "layer-wise GaLore updates each weight inside backward, as soon as its gradient exists"
        if t.grad_accum > 1:
            raise UserError(
                f"{why}, so gradients cannot accumulate: set trainer.grad_accum=1 (or layerwise=false)."
            )
        if t.max_grad_norm > 0:
            raise UserError(
                f"{why}, before the global norm is known: set trainer.max_grad_norm=0 (no clipping)."
            )
        if t.mixed_precision == "fp16":
            raise UserError(
                f"{why}, before fp16 loss scaling is undone: use trainer.mixed_precision=bf16 or no."
            )


@dataclass(frozen=True)
class Builtin:
    config: type
    module: str  # imported on first use: it registers the implementation
    check: Callable[[Any], None] | None


BUILTIN: dict[str, Builtin] = {
    "lora": Builtin(LoraConfig, "lrft.methods.lora", check_lora),
    "lora_fa": Builtin(LoraFAConfig, "lrft.methods.lora_fa", check_lora),
    "dora": Builtin(DoraConfig, "lrft.methods.dora", check_lora),
    "pissa": Builtin(PissaConfig, "lrft.methods.pissa", check_pissa),
    "lora_ga": Builtin(LoraGAConfig, "lrft.methods.lora_ga", check_lora_ga),
    "full": Builtin(FullConfig, "lrft.methods.full", check_full),
    "galore": Builtin(GaloreConfig, "lrft.methods.galore", check_galore),
}
