"""Selective gradient checkpointing and activation offloading (lrft.model.activations), on CPU."""

import logging

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lrft.memory.measure import LiveBytes
from lrft.model.activations import (
    Offloader,
    blocks,
    checkpoint_blocks,
    offload_blocks,
    resolve_count,
    spread,
)

LAYERS = 4


def tiny(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).train()


def grads_and_peak(model: torch.nn.Module, ids: torch.Tensor) -> tuple[list[torch.Tensor], int]:
    model.zero_grad(set_to_none=True)
    with LiveBytes(model) as live:
        model(input_ids=ids, labels=ids).loss.backward()
    return [p.grad.clone() for p in model.parameters()], live.peak


def test_spread_and_counts():
    assert spread(0, 8) == [] and spread(8, 8) == list(range(8))
    assert spread(2, 8) == [0, 4] and spread(3, 8) == [0, 2, 5] and spread(1, 8) == [0]
    assert spread(12, 8) == list(range(8))  # capped at the blocks there are
    assert [resolve_count(s, 8) for s in (False, True, 0, 3, 20)] == [0, 8, 0, 3, 8]
    assert resolve_count(True, 0) == 1 and resolve_count(5, 0) == 1 and resolve_count(0, 0) == 0
    with pytest.raises(ValueError, match="planner"):
        resolve_count("auto", 8)


def test_n_checkpointed_blocks_same_gradients_less_memory():
    model = tiny()
    assert len(blocks(model)) == LAYERS
    ids = torch.randint(3, 97, (2, 48))
    peaks, reference = {}, None
    for n in (0, 2, LAYERS, 0):
        chosen = checkpoint_blocks(model, n)
        assert [b.gradient_checkpointing for b in blocks(model)] == [i in chosen for i in range(LAYERS)]
        assert len(chosen) == n
        grads, peaks[n] = grads_and_peak(model, ids)
        if reference is None:
            reference = grads
        for g, r in zip(grads, reference, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)
    assert not model.is_gradient_checkpointing  # n = 0 turned it off again
    # each checkpointed block keeps its input instead of everything it saves
    assert peaks[0] > peaks[2] > peaks[LAYERS]


def test_offloader_moves_block_activations_not_parameters():
    model, copies = tiny(), []

    def to_host(t: torch.Tensor) -> torch.Tensor:  # a stand-in for the device -> host copy
        host = t.detach().clone()
        copies.append(t.untyped_storage().data_ptr())
        return host

    ids = torch.randint(3, 97, (2, 48))
    reference, _ = grads_and_peak(model, ids)
    off = Offloader(model, to_host=to_host, to_device=lambda h: h, min_bytes=1024, stay_on=())
    handles = offload_blocks(model, off)
    assert len(handles) == 2 * LAYERS
    grads, _ = grads_and_peak(model, ids)
    for g, r in zip(grads, reference, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-8)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert off.moved > 48 * 2 * 64 * 4 * LAYERS  # at least every block's input
    assert copies and not params.intersection(copies)  # weights are never copied out
    moved = off.moved
    with torch.no_grad():  # nothing is saved without autograd: nothing moves
        model(input_ids=ids)
    assert off.moved == moved
    for h in handles:
        h.remove()


def test_offloaded_checkpointed_blocks_recompute_once():
    model, calls = tiny(), []
    ids = torch.randint(3, 97, (2, 48))
    checkpoint_blocks(model, LAYERS)
    reference, _ = grads_and_peak(model, ids)
    off = Offloader(model, to_host=lambda t: calls.append(1) or t.clone(), to_device=lambda h: h, stay_on=())
    off.min_bytes = 1
    offload_blocks(model, off)
    grads, _ = grads_and_peak(model, ids)
    for g, r in zip(grads, reference, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-8)
    # checkpointed: a block saves only its inputs, once, not again during the backward recompute
    assert 0 < len(calls) <= 4 * LAYERS


def test_offload_is_a_no_op_on_cpu_and_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger="lrft.model.activations"):
        assert offload_blocks(tiny()) == []
    assert "does nothing here" in caplog.text
    t = torch.ones(1024, 1024)  # default stay_on: host tensors stay as they are
    off = Offloader(tiny(), to_host=lambda x: pytest.fail("copied a host tensor"))
    assert off.unpack(off.pack(t)) is t and off.kept == t.numel() * 4
