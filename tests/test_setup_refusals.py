"""Combinations the loop refuses before training, with what to use instead."""

from types import SimpleNamespace

import pytest
import torch

from lrft.config.compose import compose
from lrft.errors import UserError
from lrft.methods import get_method
from lrft.model.load import load_model

ONE, TWO = SimpleNamespace(num_processes=1), SimpleNamespace(num_processes=2)


def method(overrides: list[str]):
    cfg = compose(overrides)
    from omegaconf import OmegaConf

    return get_method(cfg.method.name)(OmegaConf.to_object(cfg.method)), cfg


def test_layerwise_galore_is_refused_with_several_processes():
    m, cfg = method(
        ["method=galore", "optimizer=galore_adamw", "method.layerwise=true", "trainer.max_grad_norm=0"]
    )
    model = load_model(cfg.model)
    m.refuse(ONE, model)  # one process: fine
    with pytest.raises(UserError, match="before DDP has averaged"):
        m.refuse(TWO, model)


@pytest.mark.parametrize("name", ["full", "galore"])
def test_full_weight_methods_refuse_a_half_precision_base(name):
    extra = ["optimizer=galore_adamw"] if name == "galore" else []
    m, cfg = method([f"method={name}", *extra])
    model = load_model(cfg.model)
    m.refuse(ONE, model)  # float32: fp32 master weights exist
    with pytest.raises(UserError, match=r"model\.dtype=float32"):
        m.refuse(ONE, model.to(torch.bfloat16))
    lora, _ = method(["method=lora"])
    lora.refuse(ONE, model)  # adapters are float32 whatever the base
