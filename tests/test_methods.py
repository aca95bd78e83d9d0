"""One contract, every registered method (PEFT-style table): rows run through the same checks."""

import copy

import pytest
import torch
from torch import nn

import lrft
from lrft.config import compose
from lrft.errors import UserError
from lrft.methods import METHODS, LowRankLinear, get_method
from lrft.models import load_model

ALL = sorted(METHODS)


def tiny_llama():
    torch.manual_seed(0)
    return load_model(compose(["model=tiny_llama"]).model)


def applied(name: str, **overrides):
    cfg = compose([f"method={name}", *[f"method.{k}={v}" for k, v in overrides.items()]])
    model = tiny_llama()
    base = copy.deepcopy(model)
    method = get_method(name)(__import__("omegaconf").OmegaConf.to_object(cfg.method))
    defaults = {k: list(cfg.model[k]) for k in ("target_modules", "modules_to_save")}
    return method, method.apply(model, defaults), base


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 261, (2, 16), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


@pytest.mark.parametrize("name", ALL)
def test_apply_keeps_the_base_output(name):
    _, model, base = applied(name)
    model.eval(), base.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch()).logits, base(**batch()).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_a_step_changes_only_what_the_method_trains(name):
    method, model, _ = applied(name, **({} if name == "full" else {"dropout": 0.0}))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):  # two steps: B moves first, then A (LoRA) sees a non-zero B
        model(**batch()).loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "nothing trained"
    assert changed <= trainable, f"frozen parameters changed: {sorted(changed - trainable)[:3]}"
    if name in ("lora", "lora_fa"):
        assert any(n.endswith("lora_B") for n in changed)
    if getattr(method.cfg, "freeze_a", False):
        assert not any(n.endswith("lora_A") for n in changed), "LoRA-FA must leave A bit-identical"
        assert not any(n.endswith("lora_A") for n in trainable)
    if name == "lora":
        assert any(n.endswith("lora_A") for n in changed)


@pytest.mark.parametrize("name", [n for n in ALL if n != "full"])
def test_delta_added_to_the_base_weight_reproduces_each_layer(name):
    _, model, _ = applied(name)
    model.eval()
    for layer in (m for m in model.modules() if isinstance(m, LowRankLinear)):
        nn.init.normal_(layer.lora_B)
        x = torch.randn(3, layer.in_features)
        w = layer.base_layer.weight.float() + layer.delta()
        torch.testing.assert_close(layer(x), nn.functional.linear(x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_trainable_state_round_trips(name):
    method, model, _ = applied(name)
    for p in model.parameters():
        if p.requires_grad:
            nn.init.normal_(p, std=0.02)
    state = method.trainable_state_dict(model)
    _, fresh, _ = applied(name)
    method.load_trainable(fresh, state)
    model.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch()).logits, model(**batch()).logits)


@pytest.mark.parametrize(
    ("name", "per_layer"), [("lora", lambda k, d, r: r * (k + d)), ("lora_fa", lambda k, d, r: r * d)]
)
def test_trainable_parameter_count_formula(name, per_layer):
    _, model, _ = applied(name, r=4)
    layers = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert len(layers) == 2 * 7  # two blocks, seven projections each
    expected = sum(per_layer(m.in_features, m.out_features, 4) for m in layers)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


def test_full_trains_everything():
    _, model, _ = applied("full")
    assert all(p.requires_grad for p in model.parameters())


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
