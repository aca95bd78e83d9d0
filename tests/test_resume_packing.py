"""Exact resume with packed rows and with length-grouped batches: a run killed (SIGKILL) or
interrupted (Ctrl-C) mid-training and resumed with trainer.resume=auto ends with the same losses
and bit-identical adapters as the run that was never stopped. Every run in a fresh process."""

import json
from pathlib import Path

import pytest
from test_resume import assert_same_run, cli, final_state, losses, overrides

# 40 rows of 21-27 tokens. Packed at 48 tokens: 20 rows of two examples, batch 2; grouped: batch 4.
# Both: 10 batches per epoch, 5 steps of grad_accum 2, so the checkpoints resumed from (step 6
# after the SIGKILL at 7, step 4 saved by Ctrl-C) sit mid-epoch and step 12 is in the third epoch.
PACKED = ["dataset.packing=true", "dataset.max_length=48", "trainer.batch_size=2"]
GROUPED = ["trainer.group_by_length=true"]


# length-grouped batches resume through the same sampler protocol (use_epoch + skipping consumed
# batches): tests/test_sampling.py::test_resume_skips_consumed_batches_exactly, and the loop's
# Ctrl-C path: tests/test_resume.py. Kept here as a row, run on demand: pytest -m slow_resume.
@pytest.mark.parametrize(
    ("extra", "fault", "resumes_from"),
    [
        (PACKED, "kill_at_step:7", "step-00000006"),
        pytest.param(GROUPED, "interrupt_at_step:4", "step-00000004", marks=pytest.mark.slow_resume),
    ],
    ids=["packed-sigkill", "grouped-ctrl-c"],
)
def test_stopped_then_resumed_is_bit_identical(tmp_path: Path, extra, fault, resumes_from):
    ref = tmp_path / "ref"
    done = cli(overrides(tmp_path, "lora", ref, *extra))
    assert done.returncode == 0, done.stderr[-1500:]
    out = tmp_path / "stopped"
    proc = cli(overrides(tmp_path, "lora", out, *extra), fault=fault)
    assert proc.returncode in (-9, 130), proc.stderr[-1500:]
    assert not (out / "final").exists()
    assert resumes_from in [p.name for p in (out / "checkpoints").iterdir()]
    again = cli(overrides(tmp_path, "lora", out, "trainer.resume=auto", *extra))
    assert again.returncode == 0, again.stderr[-1500:]
    assert len(losses(ref)) == 12
    records = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r.get("step") == 5 and "loss" in r] == [1.0]  # 5 per epoch
    assert_same_run(out, losses(ref), final_state(ref))
