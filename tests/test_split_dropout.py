"""Issue 24: the same answer however a run is launched or split, with the shipped dropout.

The low-rank layers' dropout masks are keyed by (example, position, feature, layer, step, seed)
(lrft.methods.dropout_keys), so the README's promise holds with ``method.dropout`` at its shipped
0.05: batch 4, 2 x accumulation 2, 2 processes x 2 (torchrun as the README writes it, no
``trainer.cpu=true``) and packed rows train the same adapters. More split kinds with the defaults:
tests/test_loop_invariants.py (its runs no longer set ``method.dropout=0.0``).
"""

import json
import logging
import os

import pytest
import torch
from launch import torchrun
from test_loop_invariants import ADAMW, SGD, final_state, max_diff, run, uneven_data

from lrft.data.packing import PackedCollator, pack_examples
from lrft.errors import UserError
from lrft.methods.dropout_keys import WithIds, keyed
from lrft.methods.layers import LowRankLinear, key_layers
from lrft.run.topology import check_world, launched_world, use_cpu

DEFAULTS = ["trainer.log_every=1", "trainer.eval_every=0", "trainer.progress=false"]


def layer(p: float = 0.5) -> torch.nn.Module:
    torch.manual_seed(0)
    m = torch.nn.Sequential(LowRankLinear(torch.nn.Linear(16, 12), r=4, alpha=8, dropout=p))
    torch.nn.init.normal_(m[0].lora_B)
    key_layers(m)
    return m


def adapter_out(m, x, ids, positions=None, step=3):
    x = x.clone().requires_grad_()
    with keyed(ids, positions, seed=7, step=step):
        y = m[0].adapter(x, x.dtype)
        y.square().sum().backward()
    return y.detach(), x.grad


def test_a_mask_follows_its_example_not_its_row_padding_or_packing():
    """Example 5's tokens draw the same mask (forward and backward) in any row of any batch,
    padded to any width, or packed after another example; another step or layer draws another."""
    m = layer()
    torch.manual_seed(1)
    tokens = {e: torch.randn(n, 16) for e, n in ((5, 6), (9, 4), (2, 3))}

    def padded(order, width):
        x = torch.zeros(len(order), width, 16)
        for i, e in enumerate(order):
            x[i, : len(tokens[e])] = tokens[e]
        return x

    y1, g1 = adapter_out(m, padded([9, 5], 6), torch.tensor([9, 5]))
    y2, g2 = adapter_out(m, padded([5, 2, 9], 8), torch.tensor([5, 2, 9]))
    assert torch.equal(y1[1, :6], y2[0, :6]) and torch.equal(g1[1, :6], g2[0, :6])
    assert torch.equal(y1[0, :4], y2[2, :4])
    # packed: example 9 then example 5 in one row, positions restarting
    row = torch.cat([tokens[9], tokens[5]])[None]
    ids = torch.tensor([[9] * 4 + [5] * 6])
    pos = torch.tensor([list(range(4)) + list(range(6))])
    y3, g3 = adapter_out(m, row, ids, pos)
    assert torch.equal(y3[0, 4:], y1[1, :6]) and torch.equal(g3[0, 4:], g1[1, :6])
    # a real dropout: about half the inputs dropped, and the step and the layer are in the key
    x = padded([9, 5], 6)
    assert not torch.equal(adapter_out(m, x, torch.tensor([9, 5]), step=4)[0], y1)
    m[0].dropout_key += 1
    assert not torch.equal(adapter_out(m, x, torch.tensor([9, 5]))[0], y1)


def test_a_layer_fed_other_rows_falls_back_with_a_warning(caplog):
    m = layer()
    with caplog.at_level(logging.WARNING, logger="lrft.methods.dropout_keys"):
        y, _ = adapter_out(m, torch.randn(7, 16), torch.tensor([1, 2]))  # 7 routed tokens, 2 examples
        adapter_out(m, torch.randn(7, 16), torch.tensor([1, 2]))
    assert y.shape == (7, 12)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "not split-invariant" in warnings[0], warnings


def test_packed_rows_and_batches_carry_the_example_ids():
    exs = [{"input_ids": [3] * n, "labels": [3] * n} for n in (5, 2, 4)]
    rows = pack_examples(WithIds(exs), 8)
    batch = PackedCollator(0)(rows)
    for r, ids in zip(rows, batch["dropout_ids"], strict=True):
        assert ids[: len(r["input_ids"])].tolist() == r["dropout_ids"]
    assert sorted(set(batch["dropout_ids"].flatten().tolist())) == [-1, 0, 1, 2]
    assert "dropout_ids" not in pack_examples(exs, 8)[0]  # plain examples: unchanged rows


@pytest.mark.parametrize(
    ("method", "opt", "tol"),
    [("lora_fa", SGD, 1e-6), ("lora", SGD, 1e-6), ("dora", SGD, 1e-6), ("lora", ADAMW, 1e-4)],
    ids=["lora_fa", "lora", "dora", "lora-adamw"],
)
def test_accumulation_with_the_shipped_dropout(tmp_path, method, opt, tol):
    """SGD shows the masks are the same (4e-8 measured for lora). AdamW's first steps move each
    element by about lr·g/(|g|+ε), which turns float32 rounding of a near-zero gradient into a
    visible difference: 3e-5 here with dropout (lr 1e-2, 3 steps), 2e-6 with method.dropout=0.0."""
    args = [f"method={method}", *DEFAULTS, *uneven_data(tmp_path), *opt, "trainer.max_steps=3"]
    whole = run(tmp_path, "whole", [*args, "trainer.batch_size=4"])
    split = run(tmp_path, "split", [*args, "trainer.batch_size=2", "trainer.grad_accum=2"])
    assert max_diff(whole, split) < tol
    if method == "lora_fa":  # the dropout is on and matters: without it the adapters differ
        off = run(tmp_path, "off", [*args, "trainer.batch_size=4", "method.dropout=0.0"])
        assert max_diff(whole, off) > 100 * tol


@pytest.mark.parametrize("method", ["lora_fa", "lora", "dora"])
def test_packed_rows_with_the_shipped_dropout(tmp_path, method):
    args = [f"method={method}", *DEFAULTS, *uneven_data(tmp_path, n=8), *SGD, "trainer.max_steps=1"]
    plain = run(tmp_path, "plain", [*args, "trainer.batch_size=8"])
    packed = run(tmp_path, "packed", [*args, "trainer.batch_size=8", "dataset.packing=true"])
    assert max_diff(plain, packed) < 1e-6


@pytest.mark.parametrize("method", ["lora_fa"])
def test_the_readme_torchrun_command_is_one_two_process_run(tmp_path, method):
    """`torchrun --nproc_per_node 2 -m lrft train ...` with no trainer.cpu=true, on a machine with
    no GPU: one run of 2 processes (gloo), half the steps of 1 process at half the batch each,
    equal to the 1-process run with the whole batch. lora_fa only (the suite's time): lora's
    dropout masks are the same LowRankFn keys, split-tested in one process above."""
    args = [f"method={method}", *DEFAULTS, *uneven_data(tmp_path), *SGD, "trainer.max_steps=-1"]
    args += ["trainer.epochs=1"]
    one = run(tmp_path, "one", [*args, "trainer.batch_size=4"])
    two = tmp_path / "two"
    proc = torchrun([*args, "trainer.batch_size=2", f"output_dir={two}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((two / "summary.json").read_text())
    assert (summary["world_size"], summary["steps"]) == (2, 4), summary
    assert max_diff(final_state(two), one) < 1e-6


def test_a_half_launched_process_stops_before_writing(tmp_path, monkeypatch):
    """WORLD_SIZE=2 without the launcher's RANK/LOCAL_RANK/MASTER_*: exit 2, nothing created."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(WORLD_SIZE="2", HF_HUB_OFFLINE="1")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "lrft", "train", *DEFAULTS, "trainer.max_steps=1", f"output_dir={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "WORLD_SIZE=2" in proc.stderr and "torchrun" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert launched_world() == 1 and use_cpu(False) is False and use_cpu(True) is True
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(UserError, match="not a number"):
        launched_world()


def test_a_run_that_sees_fewer_processes_than_launched_stops(monkeypatch):
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert use_cpu(False) is (not torch.accelerator.is_available())

    class OneProcess:
        num_processes, distributed_type = 1, "NO"

    with pytest.raises(UserError, match=r"started 2 processes .* sees 1"):
        check_world(OneProcess())
    check_world(type("Two", (), {"num_processes": 2})())


def test_dropout_keys_need_positions_for_packed_ids():
    with pytest.raises(ValueError, match="position_ids"), keyed(torch.zeros(1, 3), None, 0, 0):
        pass
