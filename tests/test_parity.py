"""Parity with the reference implementations (test-only dependencies: peft, galore-torch).

Tolerances: DoRA in float64 against PEFT ``use_dora=True`` (1e-10: same formula, other operation
order); PiSSA in float32 against PEFT ``init_lora_weights="pissa"`` (1e-5 relative: the same
LAPACK SVD, then products in another order); GaLore against galore-torch's ``GaLoreAdamW`` on
identical gradients (1e-6: same float32 arithmetic, projections refreshed on the same steps).
"""

import copy

import pytest
import torch
from torch import nn

import lrft
from lrft.methods import DoraLinear, LowRankLinear
from lrft.optim import GaLoreAdamW

K, D, R = 48, 32, 4


def net(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(K, D), nn.ReLU(), nn.Linear(D, D)).to(dtype)


def peft_model(base: nn.Module, **kwargs):
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=R, lora_alpha=8, target_modules=["0", "2"], lora_dropout=0.0, **kwargs)
    return peft.get_peft_model(copy.deepcopy(base), cfg)


def test_dora_forward_and_merged_weight_match_peft():
    base = net(torch.float64)
    ref = peft_model(base, use_dora=True)
    ours = lrft.apply_method(
        copy.deepcopy(base), "dora", r=R, alpha=8, dropout=0.0, target_modules=["0", "2"]
    )
    torch.manual_seed(1)
    for idx in ("0", "2"):
        theirs, layer = ref.base_model.model.get_submodule(idx), ours.get_submodule(idx)
        assert isinstance(layer, DoraLinear)
        # both start from m = ‖W‖_c (ours is float32, like every adapter)
        m_ref = theirs.lora_magnitude_vector["default"].weight
        torch.testing.assert_close(layer.lora_magnitude.double(), m_ref, rtol=1e-6, atol=1e-7)
        layer.double()  # float64 adapters for the parity check of the formula
        with torch.no_grad():
            nn.init.normal_(layer.lora_B, std=0.3)
            layer.lora_magnitude.mul_(1 + 0.1 * torch.randn_like(layer.lora_magnitude))
            theirs.lora_A["default"].weight.copy_(layer.lora_A)
            theirs.lora_B["default"].weight.copy_(layer.lora_B)
            theirs.lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude)
    x = torch.randn(16, K, dtype=torch.float64)
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-10, atol=1e-10)
    merged = ref.merge_and_unload()
    for idx in ("0", "2"):
        layer = ours.get_submodule(idx)
        w = layer.base_layer.weight + layer.delta()
        torch.testing.assert_close(w, merged.get_submodule(idx).weight, rtol=1e-10, atol=1e-10)


def test_pissa_init_matches_peft():
    base = net(torch.float32)
    ref = peft_model(base, init_lora_weights="pissa")
    ours = lrft.apply_method(
        copy.deepcopy(base), "pissa", r=R, alpha=8, dropout=0.0, target_modules=["0", "2"]
    )
    for idx in ("0", "2"):
        theirs, layer = ref.base_model.model.get_submodule(idx), ours.get_submodule(idx)
        tol = {"rtol": 1e-5, "atol": 1e-6}
        torch.testing.assert_close(layer.lora_A, theirs.lora_A["default"].weight, **tol)
        torch.testing.assert_close(layer.lora_B, theirs.lora_B["default"].weight, **tol)
        torch.testing.assert_close(layer.base_layer.weight, theirs.base_layer.weight, **tol)
        # the export is relative to the original weight: nothing has trained yet
        torch.testing.assert_close(layer.delta(), torch.zeros(D, layer.in_features), rtol=0, atol=1e-6)
    x = torch.randn(16, K)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours(x), base(x), rtol=1e-5, atol=1e-5)


def test_fast_pissa_approximates_the_exact_principal_part():
    """Randomized SVD, 4 iterations: s·B·A within 1% of the exact top-r part (spectrum with a gap)."""
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(D, D))
    v, _ = torch.linalg.qr(torch.randn(K, D))
    spectrum = torch.cat([torch.tensor([1.0, 0.8, 0.6, 0.5]), torch.full((D - R,), 1e-2)])
    w = (u * spectrum) @ v.t()
    exact = nn.Linear(K, D).requires_grad_(False)
    exact.weight.copy_(w)
    fast = copy.deepcopy(exact)
    a = lrft.apply_method(nn.Sequential(exact), "pissa", r=R, alpha=R, dropout=0.0)[0]
    b = lrft.apply_method(nn.Sequential(fast), "pissa", r=R, alpha=R, dropout=0.0, svd_niter=4)[0]
    pa, pb = a.lora_B @ a.lora_A, b.lora_B @ b.lora_A
    assert (pa - pb).norm() / pa.norm() < 1e-2
    assert isinstance(b, LowRankLinear) and b.is_offset


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
def test_galore_update_matches_galore_torch(proj_type):
    galore_torch = pytest.importorskip("galore_torch")
    torch.manual_seed(0)
    params = [torch.randn(32, 48), torch.randn(48, 32), torch.randn(48)]  # wide, tall, 1-D

    def groups(ps):
        extra = {"rank": 4, "update_proj_gap": 2, "scale": 0.25, "proj_type": proj_type}
        return [{"params": [ps[2]]}, {"params": ps[:2], **extra}]

    ours_p = [nn.Parameter(p.clone()) for p in params]
    ref_p = [nn.Parameter(p.clone()) for p in params]
    kw = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.01}
    ours = GaLoreAdamW(groups(ours_p), **kw)
    ref = galore_torch.GaLoreAdamW(groups(ref_p), no_deprecation_warning=True, **kw)
    for step in range(5):  # projections refresh at steps 0, 2, 4
        g = torch.Generator().manual_seed(step)
        for a, b in zip(ours_p, ref_p, strict=True):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        ours.step()
        ref.step()
        for a, b in zip(ours_p, ref_p, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # optimizer state is low-rank: r × n or m × r instead of m × n
    for p in ours_p[:2]:
        assert 4 in ours.state[p]["exp_avg"].shape and ours.state[p]["exp_avg"].numel() < p.numel()
