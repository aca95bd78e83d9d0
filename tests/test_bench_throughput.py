"""scripts/bench_throughput.py drives lrft's real training loop and times it, and PEFT + Trainer
trains on the very batches of "lrft plain" (same ids, same order, same padding)."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from lrft.data.packing import pack_examples
from lrft.errors import UserError

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_throughput.py"


@pytest.fixture(scope="module")
def bench_module():
    spec = importlib.util.spec_from_file_location("bench_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


def test_lrft_loop_steps_are_timed_and_peft_trainer_sees_the_same_batches(tmp_path, bench_module):
    b = bench_module
    batch, max_length = 4, 64
    b.write_data(tmp_path / "data.jsonl", 24, max_length)
    bench = b.Bench(tmp_path, tmp_path / "data.jsonl", batch, max_length, steps=2)
    examples, tok, base = b.prepared(bench)
    rows = [json.loads(line) for line in (tmp_path / "data.jsonl").read_text().splitlines()]
    # the byte tokenizer: BOS + instruction + "\n" + output + EOS, one id per ASCII byte
    assert [len(ex["input_ids"]) for ex in examples] == [
        len(r["instruction"]) + len(r["output"]) + 3 for r in rows
    ]
    first = b.plain_order(len(examples))[:batch]
    expected_real = sum(len(examples[i]["input_ids"]) for i in first)

    steps, clock = b.lrft_run(bench, "plain", 0.0, [])
    assert len(steps) == 2  # each optimizer step of the loop went through the clock
    first_step = steps[0]
    assert math.isfinite(first_step.wall) and first_step.wall > 0
    assert math.isfinite(first_step.cpu) and first_step.cpu > 0
    assert first_step.real == expected_real
    assert steps[1].start - first_step.start >= first_step.wall  # the loop iteration holds the step

    hf = b.hf_run("peft", bench, examples, tok, base, 0.0)
    assert len(hf.steps) == 2 and hf.steps[0].wall > 0
    assert hf.steps[0].real == expected_real
    assert len(clock.batches) == 2  # the Trainer's loader collates ahead: it holds more
    for ours, theirs in zip(clock.batches, hf.batches[:2], strict=True):  # same rows, order, padding
        assert torch.equal(theirs["input_ids"], ours)

    packed, _ = b.lrft_run(bench, "packed", 0.05, [])
    rows = pack_examples(examples, max_length)
    assert len(rows) < len(examples)  # rows of several examples: the check below means something
    first_rows = b.plain_order(len(rows))[:batch]
    assert len(packed) == 2 and packed[0].wall > 0
    assert packed[0].real == sum(len(rows[i]["input_ids"]) for i in first_rows)  # pad excluded


def test_variant_overrides_reach_the_lrft_config(tmp_path, bench_module):
    b = bench_module
    bench = b.Bench(tmp_path, tmp_path / "data.jsonl", 8, 128, steps=3)
    cfg = bench.compose("grouped", 0.05, ["trainer.log_every=7"])
    assert (cfg.trainer.group_by_length, cfg.method.dropout, cfg.trainer.log_every) == (True, 0.05, 7)
    assert cfg.model.from_config.intermediate_size == b.SHAPE["intermediate_size"]
    with pytest.raises(UserError):
        b.lrft_system(bench, "lrft plain+trainer.no_such_key=1", 0.0)
