"""Preference objectives under ``trainer.sharding=fsdp2`` (issue 23) on 2 CPU processes (gloo).

The reference is the sharded model itself with its adapters switched off (no_grad forwards
between FSDP2's unshard/reshard hooks), KTO's KL estimate runs no-grad forwards before the
step's, and the held-out pairs are split in lockstep: a rank one batch short runs a filler batch
whose forwards keep the collectives in step but which adds no pair, example or metric.
"""

from pathlib import Path

import pytest
import torch
from launch import torchrun
from test_kto import rows
from test_loop_invariants import SGD, eval_records, final_state, max_diff, run
from test_preference import pairs

from lrft.config.compose import compose
from lrft.data.collate import Collator
from lrft.data.encode import encode_rows
from lrft.data.load import load_rows
from lrft.evaluate.preference import preference_metrics
from lrft.evaluate.shard import FILLER
from lrft.model.load import byte_tokenizer, load_model
from lrft.objectives import get_objective

COMMON = ["model=tiny_llama", "dataset=preference", "trainer.log_every=1", "trainer.progress=false",
          "trainer.max_grad_norm=0", "trainer.loss_chunk=7"]  # fmt: skip
# 2 processes x 1 example x 2 micro-batches = one process's batch of 4
FSDP = ["trainer.sharding=fsdp2", "trainer.batch_size=1", "trainer.grad_accum=2"]
WRITERS = {"dpo": pairs, "kto": rows}


def data(tmp: Path, objective: str) -> list[str]:
    """16 training rows; 5 held-out ones in batches of 2: 3 batches, so rank 0 scores 3 rows and
    rank 1 scores 2 rows plus one filler batch."""
    write = WRITERS[objective]
    train = write(tmp, 16)[0]
    (tmp / "heldout").mkdir()
    validation = write(tmp / "heldout", 5)[1]
    return [train, validation, "trainer.eval_batch_size=2"]


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_two_sharded_processes_train_and_evaluate_as_one(tmp_path, objective):
    args = [*COMMON, *data(tmp_path, objective), f"objective={objective}", *SGD]
    args += ["trainer.max_steps=2", "trainer.eval_every=2"]  # evaluations at steps 0 and 2
    one = run(tmp_path, "one", [*args, "trainer.batch_size=4"])
    sharded = tmp_path / "fsdp"
    proc = torchrun([*args, *FSDP, f"output_dir={sharded}"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    # the tolerance of the sharded SFT run against one process (tests/test_fsdp2.py): float32, SGD
    assert max_diff(final_state(sharded), one) < 1e-6
    assert max(v.abs().max().item() for k, v in one.items() if "lora_B" in k) > 1e-3  # it trained
    evals = [eval_records(d) for d in (tmp_path / "one", sharded)]
    assert [e["step"] for e in evals[1]] == [e["step"] for e in evals[0]] == [0, 2]
    for a, b in zip(*evals, strict=True):
        assert a.keys() == b.keys() and a["eval/n"] == b["eval/n"] == 5
        for key in a:
            if key.startswith("eval/"):
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    trained = evals[0][-1]
    assert trained["eval/rewards/margins"] != 0  # step 2 scores a trained policy, not π = π_ref


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_a_filler_batch_runs_its_forwards_and_counts_nothing(tmp_path, objective):
    """In one process: the held-out metrics with a lockstep filler batch added are the metrics
    without it (it would count 2 pairs, or 2 examples, and their log-probs, if it were summed)."""
    cfg = compose([*COMMON, *data(tmp_path, objective), f"objective={objective}"])
    tok = byte_tokenizer("llama")
    examples = encode_rows(load_rows(cfg.dataset, "eval"), cfg.dataset, "causal", tok)
    collate = Collator(tok, "causal")
    torch.manual_seed(0)
    model = load_model(cfg.model, None).eval()
    scorer = get_objective(cfg)

    def batches(filler: bool) -> list:
        out = [(collate(examples[i : i + 2]), None) for i in range(0, len(examples), 2)]
        if filler:
            pad = collate(examples[:2])
            pad["labels"] = torch.full_like(pad["labels"], -100)
            out.append((pad, FILLER))
        return out

    forwards = 0

    def count(*_: object) -> None:
        nonlocal forwards
        forwards += 1

    handle = model.register_forward_hook(count)
    with torch.no_grad():
        plain = preference_metrics(model, batches(False), scorer)
        n_plain, forwards = forwards, 0
        padded = preference_metrics(model, batches(True), scorer)
    handle.remove()
    assert padded == pytest.approx(plain, rel=1e-6)
    # a filler runs every forward a real batch of the objective runs (DPO: policy and reference;
    # KTO: and the KL rows' two), so the ranks' all-gathers stay in step
    assert forwards == n_plain + n_plain // 3


def test_ranks_without_a_scored_batch_still_merge(monkeypatch):
    """A rank holding only fillers (fewer held-out batches than ranks) has no metric sums at all:
    the merge adds the keys the other ranks have, the same on every rank."""
    import types

    import accelerate.utils

    from lrft.evaluate.shard import Shard

    parts = [(None, {"term0": 1.5, "count0": 2.0}), (None, {})]
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda _mine: parts)
    for rank, mine in enumerate(parts):
        shard = Shard(types.SimpleNamespace(process_index=rank, num_processes=2), lockstep=True)
        assert shard.merge(None, mine[1]) == (None, {"term0": 1.5, "count0": 2.0})


def test_a_precomputed_reference_under_fsdp2_is_one_process_table(tmp_path):
    """objective.precompute_ref=true with 2 sharded processes: the table is filled after
    fully_shard, the ranks' reference forwards in lockstep (17 rows: rank 1 runs a filler batch),
    and equals one process's table; the runs train the same adapters."""
    from safetensors.torch import load_file

    from lrft.objectives.reference_cache import FILE

    args = [*COMMON, *data(tmp_path, "dpo"), "objective=dpo", "objective.precompute_ref=true", *SGD,
            "trainer.max_steps=2", "trainer.eval_every=0"]  # fmt: skip
    args[args.index(next(a for a in args if a.startswith("dataset.data_files.train=")))] = (
        f"dataset.data_files.train={pairs(tmp_path / 'heldout', 17)[0].split('=', 1)[1]}"
    )
    one = run(tmp_path, "one", [*args, "trainer.batch_size=4"])
    sharded = tmp_path / "fsdp"
    proc = torchrun([*args, *FSDP, f"output_dir={sharded}"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    table = load_file(sharded / FILE)["ref_logps"]
    assert table.shape == (17, 2) and (table < 0).all()
    assert (table - load_file(tmp_path / "one" / FILE)["ref_logps"]).abs().max().item() < 1e-5
    assert max_diff(final_state(sharded), one) < 1e-6
