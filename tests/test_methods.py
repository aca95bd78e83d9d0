"""One contract, every registered method (PEFT-style table): rows run through the same checks.

A row is a method plus overrides (compositions such as PiSSA + frozen A, or a quantized base).
Tolerances: full-precision rows compare float32 outputs; those whose base is moved by an init
(PiSSA, LoRA-GA: W − s·B₀A₀ then + s·B·A) or rescaled (DoRA: (out − b)·1 + b) differ from the
base by float32 rounding only (atol 1e-4 on logits of magnitude ~10). Quantized rows are compared
with the full-precision model they came from, against the quantization error itself.
"""

import copy
import functools
from dataclasses import dataclass, field

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import lrft
from lrft.config.compose import compose
from lrft.errors import UserError
from lrft.methods import METHODS, DoraLinear, LowRankLinear, get_method
from lrft.methods.base import ApplyContext
from lrft.model.load import load_model
from lrft.model.quantization import dense_weight, is_quantized
from lrft.optim import build_optimizer


@dataclass(frozen=True)
class Row:
    id: str
    method: str
    options: tuple[str, ...] = ()
    quant: str = "none"
    extra: tuple[str, ...] = field(default=())  # other overrides (optimizer=...)

    @property
    def overrides(self) -> list[str]:
        q = [f"quantization={self.quant}"]
        if self.quant != "none":
            q.append("quantization.compute_dtype=float32")  # bf16 compute would blur every check
        return [f"method={self.method}", *[f"method.{o}" for o in self.options], *q, *self.extra]


ROWS = [
    Row("full", "full"),
    Row("lora", "lora"),
    Row("lora_rslora", "lora", ("rslora=true",)),
    Row("lora_fa", "lora_fa"),
    Row("lora_fa_project_grad", "lora_fa", ("project_grad=true",)),
    Row("dora", "dora"),
    Row("dora_freeze_a", "dora", ("freeze_a=true",)),
    Row("pissa", "pissa"),
    Row("pissa_fast_svd", "pissa", ("svd_niter=2",)),
    Row("pissa_freeze_a", "pissa", ("freeze_a=true",)),
    Row("pissa_dora", "pissa", ("dora=true",)),
    Row("lora_ga", "lora_ga", ("init_batches=2",)),
    Row("lora_ga_freeze_a", "lora_ga", ("init_batches=2", "freeze_a=true")),
    Row("galore", "galore", ("rank=4", "update_proj_gap=1"), extra=("optimizer=galore_adamw",)),
    Row("qlora_nf4", "lora", quant="nf4"),
    Row("qlora_fa_nf4", "lora_fa", quant="nf4"),
    Row("lora_int8", "lora", quant="int8"),
    Row("qdora_fp4", "dora", quant="fp4"),
    Row("qpissa_nf4", "pissa", quant="nf4"),
    Row("lora_ga_nf4", "lora_ga", ("init_batches=1",), quant="nf4"),
]
LOW_RANK = [r for r in ROWS if r.method not in ("full", "galore")]
FULL_PRECISION = [r for r in ROWS if r.quant == "none"]
QUANTIZED = [r for r in ROWS if r.quant != "none"]
rows = functools.partial(pytest.mark.parametrize, "row", ids=lambda r: r.id)


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny matmuls gain nothing from threads; other suites run beside
    yield
    torch.set_num_threads(n)


def test_every_registered_method_has_a_row():
    assert {r.method for r in ROWS} == set(METHODS)


def batch(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 261, (2, 16), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


CALIBRATION = ApplyContext(calibration=lambda: iter([batch(2), batch(3)]))


@functools.cache
def _base(quant: str) -> tuple[nn.Module, nn.Module]:
    """(model to adapt, its full-precision original) for a quantization; built once."""
    cfg = compose(["model=tiny_llama", f"quantization={quant}", "quantization.compute_dtype=float32"])
    torch.manual_seed(0)
    full = load_model(cfg.model)
    if quant == "none":
        return full, full
    torch.manual_seed(0)
    return load_model(cfg.model, qcfg=cfg.quantization), full


def applied(row: Row, restoring: bool = False):
    """(method, adapted model, the model before apply, its full-precision original, config)."""
    cfg = compose(["model=tiny_llama", *row.overrides])
    model, full = (copy.deepcopy(m) for m in _base(row.quant))
    before = copy.deepcopy(model)
    method = get_method(row.method)(OmegaConf.to_object(cfg.method))
    defaults = {k: list(cfg.model[k]) for k in ("target_modules", "modules_to_save")}
    torch.manual_seed(0)
    ctx = ApplyContext(restoring=True) if restoring else CALIBRATION
    return method, method.apply(model, defaults, ctx), before, full, cfg


def logits(model: nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch()).logits


@rows(FULL_PRECISION)
def test_apply_keeps_the_base_output(row):
    _, model, before, _, _ = applied(row)
    exact = row.method in ("full", "galore", "lora", "lora_fa")
    tol = 0.0 if exact else 1e-4
    torch.testing.assert_close(logits(model), logits(before), rtol=0, atol=tol)


@rows(QUANTIZED)
def test_quantized_apply_stays_within_the_quantization_error(row):
    """QLoRA-style rows keep the quantized base's output exactly. Moved bases are re-quantized:
    QPiSSA must be closer to the full-precision model than plain quantization is (its point; the
    random tiny weights have a flat spectrum, so only slightly: see test_quantization for a
    decaying one); LoRA-GA re-quantizes W − s·B₀A₀, so it may add up to one more quantization error."""
    _, model, before, full, _ = applied(row)
    reference, quantized, adapted = logits(full), logits(before), logits(model)
    q_err = (quantized - reference).abs().mean()
    err = (adapted - reference).abs().mean()
    if row.method == "pissa":
        assert err < q_err, f"QPiSSA error {err:.4f} vs plain {row.quant} {q_err:.4f}"
    elif row.method == "lora_ga":
        assert err < 2.5 * q_err
    else:
        torch.testing.assert_close(adapted, quantized, rtol=0, atol=1e-4)


@rows(ROWS)
def test_a_step_changes_only_what_the_method_trains(row):
    method, model, _, _, cfg = applied(row)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    ocfg = OmegaConf.merge(cfg.optimizer, {"lr": 1e-2})
    groups = method.param_groups(model, ocfg.weight_decay)
    opt = build_optimizer(groups, ocfg, in_backward=method.updates_in_backward)
    model.train()
    for _ in range(2):  # two steps: B moves first, then A (LoRA) sees a non-zero B
        model(**batch()).loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "nothing trained"
    assert changed <= trainable, f"frozen parameters changed: {sorted(changed - trainable)[:3]}"
    if row in LOW_RANK:
        assert any(n.endswith("lora_B") for n in changed)
        assert all(n.split(".")[-1].startswith("lora_") or "lm_head" in n for n in trainable)
    if getattr(method.cfg, "dora", False):
        assert any(n.endswith("lora_magnitude") for n in changed)
    if getattr(method.cfg, "freeze_a", False):
        assert not any(n.endswith("lora_A") for n in changed), "LoRA-FA must leave A bit-identical"
        assert not any(n.endswith("lora_A") for n in trainable)
    elif row in LOW_RANK:
        assert any(n.endswith("lora_A") for n in changed)
    if row.method in ("full", "galore"):
        assert trainable == set(before)


@rows(LOW_RANK)
def test_delta_added_to_the_original_weight_reproduces_each_layer(row):
    """W_original (the checkpoint's, full precision) + delta() == the adapted layer's map."""
    _, model, _, full, _ = applied(row)
    model.eval()
    torch.manual_seed(4)
    for name, layer in ((n, m) for n, m in model.named_modules() if isinstance(m, LowRankLinear)):
        with torch.no_grad():
            layer.lora_B.add_(torch.randn_like(layer.lora_B) * 0.1)
            if isinstance(layer, DoraLinear):
                layer.lora_magnitude.mul_(1 + 0.1 * torch.randn_like(layer.lora_magnitude))
        original = full.get_submodule(name)
        x = torch.randn(3, layer.in_features)
        ref = nn.functional.linear(x, original.weight + layer.delta(), original.bias)
        with torch.no_grad():
            out = layer(x)
        if row.quant == "none":
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        else:  # the adapted base is quantized: allow its quantization error, measured here
            q_err = (dense_weight(layer.base_layer) - layer.original_weight()).abs().max()
            q_err = q_err + (layer.original_weight() - original.weight).abs().max()
            assert (out - ref).abs().max() <= q_err * x.abs().sum(dim=1).max()


@rows(LOW_RANK)
def test_export_factors_give_the_same_delta(row):
    _, model, _, _, _ = applied(row)
    for layer in (m for m in model.modules() if isinstance(m, LowRankLinear)):
        nn.init.normal_(layer.lora_B, std=0.1)
        a, b, scale, magnitude = layer.export_factors()
        assert a.dtype == b.dtype == torch.float32 and layer.delta().dtype == torch.float32
        assert a.shape[1] == layer.in_features and b.shape[0] == layer.out_features
        assert a.shape[0] == (2 * layer.r if layer.is_offset else layer.r)
        assert (magnitude is not None) == isinstance(layer, DoraLinear)
        if magnitude is None:
            torch.testing.assert_close(scale * (b @ a), layer.delta(), rtol=1e-5, atol=1e-6)
        else:  # DoRA: m · V/‖V‖_c with V = W_original + s·B·A (rank-2r pair for a moved base)
            v = layer.original_weight() + scale * (b @ a)
            merged = magnitude.unsqueeze(1) * v / v.norm(dim=1, keepdim=True)
            torch.testing.assert_close(merged - layer.original_weight(), layer.delta(), rtol=1e-4, atol=1e-5)


@rows(ROWS)
def test_trainable_state_rebuilds_the_run_without_recomputing(row):
    """What load_run does: apply(restoring=True) on a fresh base, then load_trainable."""
    method, model, _, _, _ = applied(row)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and not is_quantized(model.get_submodule(name.rpartition(".")[0])):
                p.add_(torch.randn_like(p) * 0.02)
    state = method.trainable_state_dict(model)
    if row.method in ("pissa", "lora_ga"):
        assert any(k.endswith("lora_A0") for k in state) and any(k.endswith("lora_B0") for k in state)
    _, fresh, _, _, _ = applied(row, restoring=True)
    method.load_trainable(fresh, state)
    torch.testing.assert_close(logits(fresh), logits(model), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("row", "per_layer"),
    [
        (Row("lora", "lora", ("r=4",)), lambda k, d, r: r * (k + d)),
        (Row("lora_fa", "lora_fa", ("r=4",)), lambda k, d, r: r * d),
        (Row("dora", "dora", ("r=4",)), lambda k, d, r: r * (k + d) + d),
        (Row("pissa", "pissa", ("r=4",)), lambda k, d, r: r * (k + d)),
    ],
    ids=lambda v: v.id if isinstance(v, Row) else "",
)
def test_trainable_parameter_count_formula(row, per_layer):
    _, model, _, _, _ = applied(row)
    layers = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert len(layers) == 2 * 7  # two blocks, seven projections each
    expected = sum(per_layer(m.in_features, m.out_features, 4) for m in layers)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


def test_lora_ga_needs_calibration_batches():
    method = get_method("lora_ga")(METHODS["lora_ga"].config())
    net = nn.Sequential(nn.Linear(8, 16))
    with pytest.raises(UserError, match="gradient of training batches"):
        method.apply(net, {}, ApplyContext())


def test_apply_method_on_a_plain_module():
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    out = lrft.apply_method(net, "lora_fa", r=2, alpha=4, dropout=0.0)
    assert isinstance(out[0], LowRankLinear) and isinstance(out[2], LowRankLinear)
    trainable = [n for n, p in out.named_parameters() if p.requires_grad]
    assert trainable == ["0.lora_B", "2.lora_B"]


def test_apply_method_rejects_unknown_options_and_targets():
    net = nn.Sequential(nn.Linear(8, 16))
    with pytest.raises(UserError, match="Did you mean: r"):
        lrft.apply_method(net, "lora_fa", rr=2)
    with pytest.raises(UserError, match="matches no linear layer"):
        lrft.apply_method(net, "lora", target_modules=["q_proj"])
    with pytest.raises(UserError, match="Did you mean: lora_fa"):
        lrft.apply_method(net, "lora_faa")


def test_modules_to_save_train_fully():
    cfg = compose(["model=tiny_roberta", "dataset=glue/sst2"])
    model = load_model(cfg.model, num_labels=2)
    lrft.apply_method(model, "lora_fa", target_modules=["query", "value"], modules_to_save=["classifier"])
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(n.startswith("classifier.") for n in names)
    assert all(n.startswith("classifier.") or n.endswith("lora_B") for n in names)


LAYERWISE = ["method=galore", "optimizer=galore_adamw", "method.layerwise=true"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method=galore", "optimizer=galore_adamw", "quantization=nf4"], "quantization=none"),
        (["method=full", "quantization=nf4"], "method=lora \\(QLoRA\\)"),
        (["method=galore", "optimizer=sgd"], "optimizer=galore_adamw"),
        (["method=lora", "optimizer=galore_adamw"], "method=galore"),
        (["method=full", "optimizer=galore_adamw8bit"], "method=galore"),
        (["method=lora", "method.project_grad=true"], "freeze_a=true"),
        (["method=pissa", "method.svd_niter=0"], "svd_niter"),
        (["method=lora_ga", "method.direction=BrA2r"], "Did you mean"),
        (["method=galore", "optimizer=galore_adamw", "method.proj_type=up"], "proj_type"),
        (LAYERWISE, "max_grad_norm=0"),
        (
            [*LAYERWISE, "trainer.max_grad_norm=0", "trainer.grad_accum=2"],
            "grad_accum=1",
        ),
        (["quantization=nf4", "quantization.compute_dtype=fp8"], "compute_dtype"),
    ],
)
def test_impossible_combinations_fail_at_compose_with_what_to_use(overrides, message):
    with pytest.raises(UserError, match=message):
        compose(overrides)
