"""Optimizers: GaLore (layer-wise, 8-bit, resumable state) and bitsandbytes' 8-bit AdamW."""

import io

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from lrft.config.compose import compose
from lrft.errors import UserError
from lrft.methods import get_method
from lrft.model.load import load_model
from lrft.optim import GaLoreAdamW, build_optimizer


def galore_setup(layerwise: bool, name: str = "galore_adamw"):
    galore = ["method=galore", "method.rank=4", "method.update_proj_gap=2", f"method.layerwise={layerwise}"]
    optim = [f"optimizer={name}", "optimizer.lr=1e-2", "optimizer.weight_decay=0.01"]
    cfg = compose([*galore, *optim, "trainer.max_grad_norm=0"])
    torch.manual_seed(0)
    model = load_model(cfg.model)
    method = get_method("galore")(OmegaConf.to_object(cfg.method))
    method.apply(model)
    return model, build_optimizer(
        method.param_groups(model, cfg.optimizer.weight_decay),
        cfg.optimizer,
        in_backward=method.updates_in_backward,
    )


def batch(step: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(5, 261, (2, 12), generator=torch.Generator().manual_seed(step))
    return {"input_ids": ids, "labels": ids}


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        model(**batch(step)).loss.backward()
        opt.step()
        opt.zero_grad()


def test_galore_projects_only_the_target_linear_weights():
    model, opt = galore_setup(False)
    projected = [g for g in opt.param_groups if "rank" in g]
    assert len(projected) == 1 and len(projected[0]["params"]) == 2 * 7
    plain = sum(len(g["params"]) for g in opt.param_groups if "rank" not in g)
    assert plain == sum(1 for _ in model.parameters()) - 2 * 7  # embeddings, norms, lm_head: plain Adam


def test_layerwise_galore_makes_the_same_updates_inside_backward():
    model, opt = galore_setup(False)
    model_lw, opt_lw = galore_setup(True)
    train(model, opt, range(3))
    for step in range(3):
        model_lw(**batch(step)).loss.backward()
        assert all(p.grad is None for p in model_lw.parameters())  # used and freed in the hooks
        opt_lw.step()  # no-op
    for (n, a), b in zip(model.named_parameters(), model_lw.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    opt_lw.remove_hooks()


@pytest.mark.parametrize("name", ["galore_adamw", "galore_adamw8bit"])
def test_galore_state_dict_resumes_exactly(name):
    """Projection matrices and moments are in state_dict; torch.load(weights_only=True) reads it."""
    model, opt = galore_setup(False, name)
    if name.endswith("8bit"):
        opt.min_8bit_size = 256  # the tiny model's moments are small: force the 8-bit path
    train(model, opt, range(3))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buf)
    train(model, opt, range(3, 6))  # uninterrupted

    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed, opt2 = galore_setup(False, name)
    opt2.min_8bit_size = opt.min_8bit_size
    resumed.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["optim"])
    assert any("proj" in s for s in opt2.state.values())
    if name.endswith("8bit"):
        assert any(s.get("exp_avg_q", torch.empty(0)).dtype == torch.uint8 for s in opt2.state.values())
    train(resumed, opt2, range(3, 6))
    for (n, a), b in zip(model.named_parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)


def test_galore_8bit_moments_track_the_32bit_ones():
    w = torch.randn(64, 96)
    results = []
    for eight_bit in (False, True):
        p = nn.Parameter(w.clone())
        extra = {"rank": 16, "update_proj_gap": 50, "scale": 0.25, "proj_type": "std"}
        opt = GaLoreAdamW([{"params": [p], **extra}], lr=1e-2, eight_bit=eight_bit, min_8bit_size=256)
        for step in range(5):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step))
            opt.step()
        results.append(p.detach() - w)
        if eight_bit:
            assert opt.state[p]["exp_avg_q"].dtype == torch.uint8  # 1 byte per moment entry
    full, eight = results
    assert (full - eight).norm() / full.norm() < 0.05


def test_adamw8bit_steps_and_its_state_loads_weights_only():
    ocfg = compose(["optimizer=adamw8bit"]).optimizer
    p = nn.Parameter(torch.randn(128, 64))
    opt = build_optimizer([{"params": [p], "weight_decay": 0.0}], ocfg)
    p.grad = torch.randn_like(p)
    before = p.detach().clone()
    opt.step()
    assert not torch.equal(p, before)
    assert opt.state[p]["state1"].dtype == torch.uint8
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    torch.load(buf, weights_only=True)


def test_projected_groups_turn_adamw_into_galore_and_refuse_an_optimizer_without_that_form():
    w, b = nn.Parameter(torch.randn(8, 8)), nn.Parameter(torch.zeros(8))
    groups = [
        {"params": [w], "weight_decay": 0.0, "rank": 2, "update_proj_gap": 1, "scale": 1.0}
        | {"proj_type": "std"},
        {"params": [b], "weight_decay": 0.0},
        {"params": [], "weight_decay": 0.0},  # empty groups are dropped, not handed to torch
    ]
    hyper = {"lr": 1e-2, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0, "momentum": 0.0}
    adamw = OmegaConf.create({"name": "adamw", **hyper})
    opt = build_optimizer(groups, adamw)
    assert isinstance(opt, GaLoreAdamW) and len(opt.param_groups) == 2
    plain = build_optimizer(groups[1:], adamw)
    assert type(plain) is torch.optim.AdamW
    sgd = OmegaConf.create({"name": "sgd", **hyper})
    with pytest.raises(UserError, match="no GaLore form"):
        build_optimizer(groups, sgd)
