"""CUDA-path defects of issue 25 that show on CPU: ``method.project_grad`` under bf16 autocast,
LoRA-GA on a 4-bit base with calibration-less ranks, DDP's buffer broadcast."""

from __future__ import annotations

import torch
from test_layers import K, N, R, make


def _projected_b_grad(autocast: bool, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    layer = make(True, 0.0, torch.float32)
    layer.project_grad = True
    with torch.no_grad():  # an ill-conditioned A A^T: the inverse's entries span decades
        layer.lora_A.copy_(torch.randn(R, K) * torch.tensor([[1.0], [0.3], [0.1], [0.03]]))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = layer(x)
    (out.float() * g).sum().backward()
    return layer.lora_B.grad, layer


def test_project_grad_applies_the_inverse_in_float32_under_bf16_autocast():
    """B's projected gradient under bf16 autocast against the float32 computation: the inverse
    is applied in float32 now (was: rounded to bf16, then a bf16 product)."""
    torch.manual_seed(1)
    x, g = torch.randn(N, K), torch.randn(N, 48)
    ref, _ = _projected_b_grad(False, x, g)
    got, layer = _projected_b_grad(True, x, g)
    # what the old backward did: the plain bf16 gradient times the bf16-rounded inverse, in bf16
    proj = layer._grad_proj()  # the cached float32 (A Aᵀ + δI)⁻¹ / s²
    layer.project_grad = False
    layer.lora_B.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    (out.float() * g).sum().backward()
    plain = layer.lora_B.grad.to(torch.bfloat16)
    old = (plain @ proj.to(torch.bfloat16)).float()
    exact = plain.float() @ proj  # the same bf16 gradient, projected exactly in float32

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a - b).norm() / b.norm()).item()

    # end to end the bf16 gradient itself dominates; the projection step alone is what changed
    new_err, old_err = rel(got, ref), rel(old, ref)
    new_step, old_step = rel(got, exact), rel(old, exact)
    print(f"project_grad vs fp32: new {new_err:.2e}, old {old_err:.2e}; "
          f"error the projection adds: new {new_step:.2e}, old {old_step:.2e}")  # fmt: skip
    assert new_err < old_err
    assert new_step < 1e-6 < 1e-3 < old_step  # fp32 product vs bf16-rounded inverse and product


def test_ddp_does_not_rebroadcast_buffers(tmp_path):
    """The run's Accelerator wraps DDP with broadcast_buffers=False: PiSSA's / LoRA-GA's offset
    buffers (lora_A0, lora_B0) never change after init, and no model lrft trains has BatchNorm."""
    from accelerate import DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState

    from lrft.config.compose import compose
    from lrft.train.engine import ddp_kwargs, make_engine

    assert ddp_kwargs(DistributedDataParallelKwargs).to_kwargs() == {"broadcast_buffers": False}
    try:
        engine = make_engine(compose(["model=tiny_llama", "method=pissa"]), tmp_path)
        assert engine.accelerator.ddp_handler.to_kwargs() == {"broadcast_buffers": False}
    finally:
        AcceleratorState._reset_state()
