"""The low-rank layer's dropout kernels: fused (compiled once) and eager give the same bits.

The fused kernel is ``torch.compile`` of the eager hash; integer arithmetic is exact, so the
comparisons here are ``torch.equal``, not tolerances. Compiling costs seconds per dtype, so the
module keeps to float32 and one bfloat16 case.
"""

import logging

import pytest
import torch

from lrft.config.compose import compose
from lrft.config.validate import validate
from lrft.errors import UserError
from lrft.memory.measure import saved_activation_bytes
from lrft.methods import dropout
from lrft.methods.dropout import drop, fused_for, keep_mask, new_seed
from lrft.methods.layers import LowRankLinear, use_dropout_kernel
from lrft.train.engine import make_engine
from lrft.train.setup import setup


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_fused_kernel_gives_the_eager_bits_for_every_shape(p):
    seed = torch.tensor(123456789, dtype=torch.int32)
    # odd sizes and a changing sequence length: one dynamic kernel must serve every batch
    for shape in [(3, 17, 64), (2, 5, 7, 9), (4, 29, 64), (1, 1, 3)]:
        x = torch.randn(shape)
        fused = drop(x, p, seed, "fused")
        assert torch.equal(fused, x * keep_mask(x, p, seed)), shape
        assert torch.equal(drop(x, p, seed, "eager"), fused), shape
    # and the mask is a real dropout: about p of 64k elements zeroed, depending on the seed
    x = torch.ones(256, 256)
    share = (drop(x, p, seed, "fused") == 0).float().mean().item()
    assert abs(share - p) < 0.01, share
    other = drop(x, p, torch.tensor(7, dtype=torch.int32), "fused")
    assert not torch.equal(other, drop(x, p, seed, "fused"))


def test_fused_kernel_matches_eager_in_bfloat16():
    x = torch.randn(2, 11, 32, dtype=torch.bfloat16)
    seed = torch.tensor(5, dtype=torch.int32)
    out = drop(x, 0.1, seed, "fused")
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, drop(x, 0.1, seed, "eager"))


@pytest.mark.parametrize("freeze_a", [False, True], ids=["lora", "lora_fa"])
def test_layer_forward_and_gradients_are_identical_with_either_kernel(freeze_a):
    torch.manual_seed(0)
    layer = LowRankLinear(torch.nn.Linear(48, 40), r=4, alpha=8, dropout=0.2, freeze_a=freeze_a)
    with torch.no_grad():
        layer.lora_B.normal_()  # B = 0 would make A's and x's gradients zero
    x = torch.randn(3, 13, 48)
    results = []
    for kernel in ("eager", "fused"):
        assert use_dropout_kernel(layer, kernel) == 1
        xi = x.clone().requires_grad_()
        torch.manual_seed(1)  # the same seed draw for both
        y = layer(xi)
        (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
        grads = [xi.grad] + [p.grad for p in (layer.lora_A, layer.lora_B) if p.grad is not None]
        results.append([y.detach(), *[g.clone() for g in grads]])
        layer.zero_grad(set_to_none=True)
    assert len(results[0]) == (3 if freeze_a else 4)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
    # dropout was on: the eval output (no dropout) differs from the training one
    layer.eval()
    assert not torch.equal(layer(x), results[0][0])


def test_auto_is_fused_on_cuda_only_and_never_on_meta():
    cpu, cuda, meta = torch.device("cpu"), torch.device("cuda", 0), torch.device("meta")
    assert fused_for("auto", cuda) and not fused_for("auto", cpu)
    assert fused_for("fused", cpu) and fused_for("fused", cuda)
    assert not fused_for("eager", cuda) and not fused_for("fused", meta)
    with pytest.raises(ValueError, match="dropout kernel must be one of"):
        fused_for("triton", cpu)


def test_a_failing_compiler_falls_back_to_eager_once_with_a_warning(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\nmore detail")

    monkeypatch.setattr(dropout, "_fused", broken)
    monkeypatch.setattr(dropout, "_fused_failed", False)
    x, seed = torch.randn(4, 8), new_seed(torch.device("cpu"))
    with caplog.at_level(logging.WARNING, logger="lrft.methods.dropout"):
        out = drop(x, 0.3, seed, "fused")
        again = drop(x, 0.3, seed, "fused")
    assert torch.equal(out, x * keep_mask(x, 0.3, seed)) and torch.equal(again, out)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "no C++ compiler found" in warnings[0] and "dropout_kernel=eager" in warnings[0]
    assert not fused_for("fused", torch.device("cpu"))


def test_bad_kernel_name_is_refused_with_the_closest():
    with pytest.raises(UserError, match="fused"):
        validate(compose(["trainer.dropout_kernel=fuzed"]))


def test_the_config_key_reaches_every_layer(tmp_path):
    """trainer.dropout_kernel is set on every low-rank layer by setup (the layer tests above show
    the kernels give identical forwards and gradients, so runs with either are the same run)."""
    args = ["method=lora", "method.dropout=0.1", "trainer.cpu=true", "trainer.dropout_kernel=fused"]
    cfg = compose([*args, f"output_dir={tmp_path}"])
    model = setup(cfg, tmp_path, make_engine(cfg, tmp_path)).model
    kernels = [m.dropout_kernel for m in model.modules() if isinstance(m, LowRankLinear)]
    assert len(kernels) == 14 and set(kernels) == {"fused"}  # 2 layers x 7 projections


@pytest.mark.parametrize(("freeze_a", "numbers"), [(True, 24 * 4), (False, 24 * 48 + 24 * 4)])
def test_the_fused_kernel_keeps_nothing_mask_sized_either(freeze_a, numbers):
    """LoRA-FA keeps only x·Aᵀ (n·r), LoRA adds the dropped input once (n·k): no mask, either kernel."""
    layer = LowRankLinear(torch.nn.Linear(48, 40), r=4, alpha=8, dropout=0.1, freeze_a=freeze_a)
    layer.base_layer.requires_grad_(False)
    use_dropout_kernel(layer, "fused")
    x = torch.randn(24, 48, requires_grad=True) * 1.0  # not a leaf: counted if saved
    assert saved_activation_bytes(layer, lambda: layer(x)) == 4 * numbers
