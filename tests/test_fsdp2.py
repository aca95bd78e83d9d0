"""Sharded data parallel (FSDP2, ``trainer.sharding=fsdp2``) on 2 CPU processes (gloo).

The same global batch split over 2 sharded processes must give one process's update (the
tolerance of the accumulation tests), and a run killed mid-way resumes bit-identically from
checkpoints whose optimizer state is one file per rank.
"""

import json

import pytest
import torch
from launch import torchrun
from test_loop_invariants import COMMON, SGD, eval_records, final_state, max_diff, run, uneven_data

from lrft.config.compose import compose
from lrft.errors import UserError
from lrft.train import sharding
from lrft.train.engine import make_engine
from lrft.train.setup import setup

FSDP = ["trainer.sharding=fsdp2", "trainer.batch_size=1", "trainer.grad_accum=2"]


def ok(proc) -> None:
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_two_sharded_processes_equal_one_and_resume_bit_identically(tmp_path):
    # clipping on (the norm is over sharded gradients), accumulation (FSDP2's deferred
    # reduce-scatter): each process sees 1 example per micro-batch, 2 per step, 4 globally. SGD with
    # momentum: optimizer state to shard and to restore. (AdamW+clipping amplifies float32 noise to
    # ~5e-5 against one process, the same for DDP and FSDP2, which agree to 2e-9.)
    args = [a for a in COMMON if "max_grad_norm" not in a and "eval_every" not in a]
    args += ["trainer.max_grad_norm=0.05", "method=lora_fa", *uneven_data(tmp_path), *SGD]
    args += ["optimizer.momentum=0.9", "trainer.max_steps=4", "trainer.save_every=2"]
    # evaluation at steps 0, 2, 4: 16 rows in 3 batches of 6, split in lockstep (2 forwards each)
    args += ["trainer.eval_every=2", "trainer.eval_batch_size=6"]
    one = run(tmp_path, "one", [*args, "trainer.batch_size=4"])
    ref = tmp_path / "fsdp"
    ok(torchrun([*args, *FSDP, f"output_dir={ref}"]))
    summary = json.loads((ref / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    assert max_diff(final_state(ref), one) < 1e-6
    assert max(v.abs().max().item() for k, v in one.items() if "lora_B" in k) > 1e-3  # it trained
    evals = [eval_records(d) for d in (tmp_path / "one", ref)]
    assert [e["step"] for e in evals[1]] == [e["step"] for e in evals[0]] == [0, 2, 4]
    for a, b in zip(*evals, strict=True):
        assert a["eval/n"] == b["eval/n"] == 16
        assert b["eval/loss"] == pytest.approx(a["eval/loss"], rel=1e-5)

    # each rank saved its dim-0 share of the momentum; no whole copy was written
    ckpt = ref / "checkpoints" / "step-00000002"
    assert "optimizer" not in torch.load(ckpt / "optim.pt", weights_only=True)
    shards = [
        torch.load(ckpt / f"optim_rank{r:05d}.pt", weights_only=True)["optimizer"]["state"] for r in (0, 1)
    ]
    joined = sorted(
        (a["momentum_buffer"].shape[0] + b["momentum_buffer"].shape[0], *a["momentum_buffer"].shape[1:])
        for a, b in zip(shards[0].values(), shards[1].values(), strict=True)
    )
    trained = {k: v for k, v in final_state(ref).items() if "lora_B" in k}  # lora_fa trains B only
    assert joined == sorted(tuple(v.shape) for v in trained.values())
    # the PEFT adapter was written from whole layers
    assert (ref / "adapter" / "adapter_model.safetensors").is_file()

    # resumed from the sharded checkpoint of step 2 into a new folder (one launch: a SIGKILL and a
    # bare resume=auto are tested unsharded in tests/test_resume.py and tests/test_runs.py)
    resumed = tmp_path / "resumed"
    ok(torchrun([*args, *FSDP, f"output_dir={resumed}", f"trainer.resume={ckpt}"]))
    got, want = final_state(resumed), final_state(ref)
    assert json.loads((resumed / "summary.json").read_text())["resumed_from"] == str(ckpt)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_an_fsdp1_launch_is_refused_with_the_fix(monkeypatch):
    cfg = compose(["trainer.cpu=true"])
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(UserError, match="fsdp_version: 2"):
        sharding.requested(cfg.trainer)
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert sharding.requested(cfg.trainer) == "fsdp2"  # taken over: accelerate no longer sees FSDP
    import os

    assert "ACCELERATE_USE_FSDP" not in os.environ and "FSDP_VERSION" not in os.environ


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["quantization=nf4"], "cannot be split into DTensor shards"),
        (["trainer.mixed_precision=fp16"], "ranks could disagree"),
        (["trainer.sharding=zero9"], "not valid. Valid: fsdp2, none"),
    ],
)
def test_combinations_fsdp2_cannot_train_are_refused(tmp_path, extra, match):
    args = ["trainer.cpu=true", "trainer.sharding=fsdp2", *extra, f"output_dir={tmp_path}"]
    with pytest.raises(UserError, match=match):
        cfg = compose(args)
        setup(cfg, tmp_path, make_engine(cfg, tmp_path))


def test_rank0_loads_alone_bf16_pissa_dora_shards_like_one_process(tmp_path):
    """Sharded runs load the model on rank 0 only; the others build it on meta
    (lrft.train.materialize). PiSSA moves the base and adds B₀/A₀ buffers on rank 0, which the meta
    rank must hold and receive; a bfloat16 base with float32 DoRA factors and magnitudes under bf16
    autocast is also what FSDP1 could not wrap (one dtype per flattened block)."""
    args = [*COMMON, "method=pissa", "method.dora=true", "model.dtype=bfloat16"]
    args += ["trainer.mixed_precision=bf16", *uneven_data(tmp_path), *SGD, "trainer.max_steps=2"]
    one = run(tmp_path, "one", [*args, "trainer.batch_size=4"])
    two = tmp_path / "two"
    ok(torchrun([*args, *FSDP, f"output_dir={two}"]))
    got = final_state(two)
    assert {v.dtype for v in got.values()} == {torch.float32}
    assert {k.rsplit(".", 1)[1] for k in got} == {"lora_A", "lora_B", "lora_A0", "lora_B0", "lora_magnitude"}
    # bf16 autocast over other batch splits: 2.8e-3 from one process (measured); a rank holding
    # wrong or missing weights is off by O(0.1-1)
    assert max_diff(got, one) < 1e-2
    summary = json.loads((two / "summary.json").read_text())
    assert summary["mixed_precision"] == "bf16" and torch.isfinite(torch.tensor(summary["train_loss"]))


def test_a_failure_on_rank0_reaches_the_other_ranks(tmp_path):
    """Rank 0 alone loads and applies the method: its error must stop the meta ranks too (exit 2,
    the reason), not leave them waiting for weights."""
    proc = torchrun([*COMMON, "method.target_modules=[no_such_proj]", *FSDP, f"output_dir={tmp_path / 'r'}"])
    assert proc.returncode != 0 and "exitcode: 2" in proc.stderr, proc.stderr[-3000:]  # UserError's code
    said = "rank 0 failed while loading the model: UserError: method.target_modules=['no_such_proj']"
    assert said in proc.stderr
