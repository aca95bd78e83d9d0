"""Whole-weight reads under DeepSpeed ZeRO-3, with a stand-in for its partitioning.

ZeRO-3 keeps each weight partitioned (its local shape reads as 0) except inside its own module's
forward or a ``deepspeed.zero.GatheredParameters`` block. DeepSpeed needs GPUs, so a stand-in
module with the same contract checks that DoRA's norm, the base offset (PiSSA, LoRA-GA) and the
checkpoint gather read whole weights, and that what they read outlives the gather.
"""

import sys
import types
from contextlib import contextmanager

import torch
from torch import nn

from lrft.methods.layers import DoraLinear, LowRankLinear
from lrft.model.quantization import dense_weight


class FakeZero3:
    """Partitions parameters by emptying ``.data``; GatheredParameters restores them for the block."""

    def __init__(self) -> None:
        self.whole: dict[int, torch.Tensor] = {}
        self.gathers = 0

    def partition(self, p: nn.Parameter) -> None:
        p.ds_id = len(self.whole)
        self.whole[p.ds_id] = p.data.clone()
        p.data = torch.empty(0, dtype=p.dtype)

    @contextmanager
    def GatheredParameters(self, params, modifier_rank=None):
        self.gathers += 1
        for p in params:
            p.data = self.whole[p.ds_id].clone()
        yield
        for p in params:
            if modifier_rank is not None:
                self.whole[p.ds_id] = p.data.clone()
            p.data = torch.empty(0, dtype=p.dtype)


def install(monkeypatch) -> FakeZero3:
    zero = FakeZero3()
    monkeypatch.setitem(sys.modules, "deepspeed", types.SimpleNamespace(zero=zero))
    return zero


def test_dora_norm_and_base_offset_read_the_whole_partitioned_weight(monkeypatch):
    torch.manual_seed(0)
    base = nn.Linear(6, 4, bias=False)
    want = base.weight.detach().clone()
    dora = DoraLinear(base, r=2, alpha=4)
    nn.init.normal_(dora.lora_B)
    expected_norm = (want + dora.scale * dora.lora_B @ dora.lora_A).norm(dim=1)
    zero = install(monkeypatch)
    zero.partition(base.weight)
    assert base.weight.numel() == 0  # what an unguarded read would see
    torch.testing.assert_close(dora.direction().norm(dim=1), expected_norm)
    assert dense_weight(base).shape == (4, 6) and zero.gathers == 2  # copies outlive the gather

    plain = LowRankLinear(nn.Linear(6, 4, bias=False), r=2, alpha=4)
    w0 = plain.base_layer.weight.detach().clone()
    zero.partition(plain.base_layer.weight)
    a0, b0 = torch.randn(2, 6), torch.randn(4, 2)
    plain.offset_base(a0, b0)  # PiSSA / LoRA-GA: W <- W - s B0 A0, written back to the partitions
    torch.testing.assert_close(zero.whole[plain.base_layer.weight.ds_id], w0 - plain.scale * b0 @ a0)


def test_checkpoint_gathers_only_the_trainable_partitions(monkeypatch):
    from lrft.train.checkpoint import gather_trainable

    model = nn.Sequential(LowRankLinear(nn.Linear(6, 4), r=2, alpha=4))
    model[0].base_layer.weight.requires_grad_(False)
    model[0].base_layer.bias.requires_grad_(False)
    nn.init.normal_(model[0].lora_B)
    want = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    zero = install(monkeypatch)
    for p in model.parameters():
        zero.partition(p)

    class Method:
        def trainable_state_dict(self, m):
            return {n: p for n, p in m.named_parameters() if p.requires_grad}

    acc = types.SimpleNamespace(unwrap_model=lambda m: m)
    got = gather_trainable(acc, model, Method())
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert model[0].base_layer.weight.numel() == 0  # the frozen base was never gathered
