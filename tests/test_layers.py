"""The shared low-rank layer: exact gradients, what it saves for backward, parity with PEFT."""

import pytest
import torch
from torch import nn

from lrft.memory.measure import saved_activation_bytes
from lrft.methods.dropout import dropout_mask, keep_mask, new_seed
from lrft.methods.layers import LowRankLinear

N, K, D, R = 24, 64, 48, 4  # tokens, in, out, rank


def make(freeze_a: bool, p: float, dtype=torch.float64):
    torch.manual_seed(0)
    base = nn.Linear(K, D).to(dtype).requires_grad_(False)
    layer = LowRankLinear(base, R, alpha=8, dropout=p, freeze_a=freeze_a).to(dtype)
    nn.init.normal_(layer.lora_B)  # non-zero B so every gradient path is exercised
    return layer


@pytest.mark.parametrize("freeze_a", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradients_match_plain_autograd(freeze_a, p):
    """Custom backward == autograd of the textbook formula (float64, tolerance 1e-12)."""
    layer = make(freeze_a, p)
    x = torch.randn(2, N // 2, K, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(7)
    y = layer(x)
    (y.sin().sum()).backward()

    a = layer.lora_A.detach().clone().requires_grad_(not freeze_a)
    b = layer.lora_B.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    torch.manual_seed(7)
    seed = new_seed(x2.device)  # the layer's first (and only) draw from the global RNG
    xd = x2 * dropout_mask(x2, p, seed) if p > 0 else x2
    y2 = layer.base_layer(x2) + layer.scale * (xd @ a.t()) @ b.t()
    (y2.sin().sum()).backward()

    torch.testing.assert_close(y, y2, rtol=0, atol=1e-12)
    torch.testing.assert_close(x.grad, x2.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.lora_B.grad, b.grad, rtol=0, atol=1e-12)
    if freeze_a:
        assert layer.lora_A.grad is None
    else:
        torch.testing.assert_close(layer.lora_A.grad, a.grad, rtol=0, atol=1e-12)


def test_dropout_is_active_in_training_and_off_in_eval():
    layer = make(True, 0.5)
    x = torch.randn(N, K, dtype=torch.float64)
    assert not torch.equal(layer(x), layer(x))  # fresh masks each call
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))


@pytest.mark.parametrize(
    ("freeze_a", "p", "expected"),
    [
        (True, 0.0, N * R),  # LoRA-FA: only x·Aᵀ
        (True, 0.1, N * R),  # ... and no dropout mask
        (False, 0.1, N * K + N * R),  # LoRA: the dropped input once, plus x·Aᵀ
    ],
)
def test_saves_only_what_gradients_need(freeze_a, p, expected):
    """Saved activations (parameters excluded, float32 => 4 bytes per number)."""
    layer = make(freeze_a, p, torch.float32)
    x = torch.randn(N, K, requires_grad=True)  # an activation of an earlier layer
    x = x * 1.0  # not a leaf: counted if saved
    assert saved_activation_bytes(layer, lambda: layer(x)) == 4 * expected


def test_frozen_model_saves_nothing_for_its_weights():
    base = nn.Linear(K, D).requires_grad_(False)
    x = torch.randn(N, K, requires_grad=True) * 1.0
    assert saved_activation_bytes(base, lambda: base(x)) == 0


def test_delta_reproduces_the_adapted_output():
    layer = make(False, 0.0)
    layer.eval()
    x = torch.randn(N, K, dtype=torch.float64)
    merged = nn.functional.linear(x, layer.base_layer.weight + layer.delta().double(), layer.base_layer.bias)
    torch.testing.assert_close(layer(x), merged, rtol=1e-10, atol=1e-10)


def test_works_under_autocast_and_gradient_checkpointing():
    layer = make(True, 0.1, torch.float32)
    x = torch.randn(N, K, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_B.grad.dtype == torch.float32 and x.grad.dtype == torch.float32

    from torch.utils.checkpoint import checkpoint

    layer.lora_B.grad = None
    torch.manual_seed(3)
    y1 = layer(x)
    y1.sum().backward()
    g1 = layer.lora_B.grad.clone()
    layer.lora_B.grad = None
    torch.manual_seed(3)
    y2 = checkpoint(layer, x, use_reentrant=False)  # recompute must regenerate the same mask
    y2.sum().backward()
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(g1, layer.lora_B.grad)


def test_matches_peft_lora_with_the_same_factors():
    """Same W, A, B, scale => same output as PEFT's LoRA layer (float64, tolerance 1e-12)."""
    peft = pytest.importorskip("peft")

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(K, D), nn.ReLU(), nn.Linear(D, D)).double()
    import copy

    ref = peft.get_peft_model(
        copy.deepcopy(net), peft.LoraConfig(r=R, lora_alpha=8, target_modules=["0", "2"], lora_dropout=0.0)
    )
    import lrft

    ours = lrft.apply_method(copy.deepcopy(net), "lora", r=R, alpha=8, dropout=0.0, target_modules=["0", "2"])
    for idx in ("0", "2"):
        peft_layer = ref.base_model.model.get_submodule(idx)
        layer = ours.get_submodule(idx)
        with torch.no_grad():
            nn.init.normal_(layer.lora_B)
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B)
    x = torch.randn(N, K, dtype=torch.float64)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-12, atol=1e-12)


def make_dora(freeze_a: bool, p: float, dtype=torch.float64):
    from lrft.methods.layers import DoraLinear

    torch.manual_seed(0)
    base = nn.Linear(K, D).to(dtype).requires_grad_(False)
    layer = DoraLinear(base, R, alpha=8, dropout=p, freeze_a=freeze_a).to(dtype)
    with torch.no_grad():
        nn.init.normal_(layer.lora_B)
        layer.lora_magnitude.mul_(1 + 0.1 * torch.randn_like(layer.lora_magnitude))
    return layer


@pytest.mark.parametrize("freeze_a", [True, False])
def test_dora_gradients_match_the_formula_with_a_detached_norm(freeze_a):
    """y = (m/‖V‖_c)(xWᵀ + s·x̃AᵀBᵀ) + b with ‖V‖_c constant in backward (float64, 1e-12)."""
    layer = make_dora(freeze_a, 0.2)
    x = torch.randn(N, K, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(7)
    layer(x).sin().sum().backward()

    a = layer.lora_A.detach().clone().requires_grad_(not freeze_a)
    b = layer.lora_B.detach().clone().requires_grad_(True)
    m = layer.lora_magnitude.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    torch.manual_seed(7)
    seed = new_seed(x2.device)
    w, bias = layer.base_layer.weight, layer.base_layer.bias
    norm = (w + layer.scale * b @ a).norm(dim=1).detach()
    xd = x2 * dropout_mask(x2, 0.2, seed)
    y2 = (m / norm) * (x2 @ w.t() + layer.scale * (xd @ a.t()) @ b.t()) + bias
    y2.sin().sum().backward()
    for ours, ref in [(x.grad, x2.grad), (layer.lora_B.grad, b.grad), (layer.lora_magnitude.grad, m.grad)]:
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    if not freeze_a:
        torch.testing.assert_close(layer.lora_A.grad, a.grad, rtol=0, atol=1e-12)


def test_dora_saves_no_weight_sized_tensor():
    """Frozen A: x·Aᵀ (n·r) for B, the pre-scale output (n·d) for m, two d-vectors; no (d, k)."""
    layer = make_dora(True, 0.1, torch.float32)
    x = torch.randn(N, K, requires_grad=True) * 1.0
    assert saved_activation_bytes(layer, lambda: layer(x)) <= 4 * (N * R + N * D + 2 * D)


def test_project_grad_is_b_grad_times_ridge_inverse():
    layer = make(True, 0.0)
    layer.project_grad = True
    x = torch.randn(N, K, dtype=torch.float64)
    g = torch.randn(N, D, dtype=torch.float64)
    (layer(x) * g).sum().backward()
    a = layer.lora_A.detach()
    plain = layer.scale * g.t() @ (x @ a.t())
    eye = torch.eye(R, dtype=torch.float64)
    expected = plain @ torch.linalg.pinv(a @ a.t() + 1e-8 * eye) / layer.scale**2
    # the r × r inverse is taken in float32 on purpose (it is applied to float32 adapters)
    torch.testing.assert_close(layer.lora_B.grad, expected, rtol=1e-4, atol=1e-5)


def test_offset_base_keeps_the_output_and_delta_stays_relative_to_the_original():
    layer = make(False, 0.0)
    layer.eval()
    w0 = layer.base_layer.weight.detach().clone()
    x = torch.randn(N, K, dtype=torch.float64)
    before = layer.base_layer(x)
    a0, b0 = torch.randn(R, K, dtype=torch.float64), torch.randn(D, R, dtype=torch.float64)
    layer.offset_base(a0, b0)
    torch.testing.assert_close(layer(x), before, rtol=0, atol=1e-5)  # A₀, B₀ are kept in float32
    torch.testing.assert_close(layer.delta(), torch.zeros(D, K, dtype=torch.float64), rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.original_weight().double(), w0, rtol=0, atol=1e-5)
    with pytest.raises(RuntimeError, match="already offset"):
        layer.offset_base(a0, b0)


def test_dropout_mask_rate_and_independence():
    """P(keep) = 1 − p; masks differ between seeds, agree for one seed; neighbours uncorrelated."""
    like = torch.empty(1000, 1000)
    s1, s2 = torch.tensor(1, dtype=torch.int32), torch.tensor(2, dtype=torch.int32)
    for p in (0.05, 0.5):
        keep = keep_mask(like, p, s1).double()
        assert abs(keep.mean().item() - (1 - p)) < 3e-3
    k1, k2 = keep_mask(like, 0.5, s1).double(), keep_mask(like, 0.5, s2).double()
    assert torch.equal(keep_mask(like, 0.5, s1).double(), k1)
    assert abs((k1 == k2).double().mean().item() - 0.5) < 3e-3  # two seeds: independent masks
    flat = k1.flatten() - 0.5
    assert abs((flat[1:] * flat[:-1]).mean().item()) < 3e-3  # adjacent elements
    assert abs((k1[1:] - 0.5).mul(k1[:-1] - 0.5).mean().item()) < 3e-3  # adjacent rows


def test_project_grad_inverse_is_cached_fp32_and_follows_a():
    layer = make(True, 0.0, torch.float32)
    layer.project_grad = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = layer._grad_proj()
    assert first.dtype == torch.float32
    assert layer._grad_proj() is first  # not recomputed per forward
    a = layer.lora_A.detach()
    torch.testing.assert_close(first, torch.linalg.pinv(a @ a.t() + 1e-8 * torch.eye(R)) / layer.scale**2)
    with torch.no_grad():
        layer.lora_A.mul_(2.0)  # A changed (an init, a checkpoint load): the cache follows
    second = layer._grad_proj()
    assert second is not first
    torch.testing.assert_close(second, first / 4, rtol=1e-4, atol=0)


def test_compiled_layer_has_no_graph_breaks_and_matches_eager():
    """torch.compile traces LowRankFn whole; with eager's RNG (fallback_random) it is bit-exact
    forward and backward, dropout included; with inductor's own RNG the backward still replays the
    forward's mask."""
    import torch._dynamo
    import torch._inductor.config as inductor_config

    def run(layer, fn, x):
        torch.manual_seed(11)
        x = x.detach().clone().requires_grad_(True)
        y = fn(x)
        (y * y).sum().backward()
        grads = [x.grad] + [p.grad.clone() for p in (layer.lora_A, layer.lora_B) if p.grad is not None]
        layer.zero_grad(set_to_none=True)
        return y.detach(), grads

    x = torch.randn(2, 6, K)
    for freeze_a, project in ((True, True), (False, False)):
        layer = make(freeze_a, 0.3, torch.float32)
        layer.project_grad = project
        torch._dynamo.reset()
        explain = torch._dynamo.explain(layer)(x)
        assert explain.graph_break_count == 0, explain.break_reasons
        eager = run(layer, layer, x)
        with inductor_config.patch(fallback_random=True):
            torch._dynamo.reset()
            compiled = run(layer, torch.compile(layer), x)
        torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-6)
        for c, e in zip(compiled[1], eager[1], strict=True):
            torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)
    # inductor's RNG: another mask, but the same one in forward and backward. With A = I, B = I the
    # adapter is s·dropout(x) and d/dx of its sum of squares is 2 s² mask² x = 2 s y mask
    layer = make(True, 0.3, torch.float32)
    with torch.no_grad():
        layer.lora_A.copy_(torch.eye(R, K))
        layer.lora_B.copy_(torch.eye(D, R))
        layer.base_layer.weight.zero_()
        layer.base_layer.bias.zero_()
    torch._dynamo.reset()
    y, grads = run(layer, torch.compile(layer), x)
    kept = y[..., :R] != 0
    assert 0 < kept.float().mean() < 1
    expected_grad = 2 * layer.scale * y[..., :R] / (1 - 0.3) * kept
    torch.testing.assert_close(grads[0][..., :R], expected_grad, rtol=1e-5, atol=1e-6)
