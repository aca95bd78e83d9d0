"""objective.precompute_ref=true: the reference log-probs are computed once, kept with the run, and
the run trains what the per-step reference trains, without a reference forward per step."""

import pytest
import torch
from safetensors.torch import load_file
from test_kto import COMMON as KTO
from test_kto import rows
from test_loop_invariants import SGD, final_state, max_diff, run
from test_preference import COMMON, pairs

from lrft.objectives import kto, preference
from lrft.objectives.reference_cache import FILE


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_precomputed_reference_trains_the_same_adapters(tmp_path, monkeypatch, objective):
    data = pairs(tmp_path) if objective == "dpo" else rows(tmp_path)
    common = [*COMMON, "objective=dpo"] if objective == "dpo" else KTO
    args = [*common, *data, *SGD, "trainer.max_steps=3", "trainer.batch_size=4"]
    calls = []  # reference forwards inside training steps: adapters switched off by an objective
    for module in (preference, kto):
        real = module.adapters_off
        monkeypatch.setattr(module, "adapters_off", lambda m, real=real: calls.append(1) or real(m))
    per_step = run(tmp_path, "per_step", args)
    n_per_step, _ = len(calls), calls.clear()
    cached = run(tmp_path, "cached", [*args, "objective.precompute_ref=true"])
    # the 3 steps no longer run a reference (KTO: neither its KL pass nor its rows), the table
    # did once (16 examples in 2 batches of 8), the final eval's held-out rows still do
    n_eval = n_per_step - (3 if objective == "dpo" else 6)
    assert len(calls) == 2 + n_eval
    calls.clear()
    assert max_diff(per_step, cached) < 1e-6
    table = load_file(tmp_path / "cached" / FILE)["ref_logps"]
    assert table.shape == (16, 2) and (table < 0).all()


def test_a_resumed_run_reads_its_table_back(tmp_path):
    """Killed after its step-2 checkpoint and resumed in fresh processes: the table written before
    step 1 is read, not recomputed (same file, same bits), and the run ends as an uninterrupted one."""
    from test_resume import cli

    args = [*COMMON, "objective=dpo", *pairs(tmp_path), *SGD, "trainer.max_steps=4", "trainer.batch_size=4",
            "trainer.save_every=2", "objective.precompute_ref=true"]  # fmt: skip
    whole = run(tmp_path, "whole", args)
    out = tmp_path / "killed"
    proc = cli([*args, f"output_dir={out}"], fault="kill_at_step:3")
    assert proc.returncode == -9, proc.stderr[-1500:]
    written = (out / FILE).stat().st_mtime_ns
    table = load_file(out / FILE)["ref_logps"]
    again = cli([*args, f"output_dir={out}", "trainer.resume=auto"])
    assert again.returncode == 0, again.stderr[-1500:]
    assert (out / FILE).stat().st_mtime_ns == written
    assert torch.equal(load_file(out / FILE)["ref_logps"], table)
    assert torch.equal(load_file(tmp_path / "whole" / FILE)["ref_logps"], table)
    assert max_diff(final_state(out), whole) == 0.0
