"""Every preference objective on every low-rank method, and on NF4 / int8 quantized bases (PEFT's
table style: one row per combination, shared contract checks).

Contract of a row: the run trains (the adapters move), and at step 1 the policy is its reference
(B = 0, or PiSSA's offset base), so reference objectives log their value at π = π_ref exactly:
DPO −log σ(0) = log 2, IPO (1/2β)² (β 0.1: 25), KTO 1 − σ(0) = ½."""

import json
import math

import pytest
from test_kto import COMMON as KTO
from test_kto import rows
from test_loop_invariants import SGD
from test_preference import COMMON, pairs

from lrft.config.compose import compose
from lrft.train import train

AT_REFERENCE = {"dpo": math.log(2), "ipo": 25.0, "kto": 0.5, "orpo": None, "simpo": None}

# each objective and each method at least once; quantized bases for most (the heavier path)
ROWS = [
    ("lora_fa", "ipo", "none"),
    ("dora", "kto", "none"),
    ("pissa", "dpo", "none"),
    ("lora_ga", "simpo", "none"),
    ("lora_fa", "dpo", "nf4"),
    ("lora_fa", "kto", "nf4"),
    ("pissa", "ipo", "nf4"),
    ("dora", "simpo", "nf4"),
    ("lora", "orpo", "int8"),
]


@pytest.mark.parametrize(("method", "objective", "quant"), ROWS, ids=["-".join(r) for r in ROWS])
def test_each_objective_trains_on_each_method(tmp_path, method, objective, quant):
    data = rows(tmp_path, 8) if objective == "kto" else pairs(tmp_path, 8)
    base = [c for c in (KTO if objective == "kto" else COMMON) if not c.startswith("objective=")]
    extra = ["method.init_batches=1"] if method == "lora_ga" else []
    out = tmp_path / "run"
    args = [*base, *data, f"objective={objective}", f"method={method}", f"quantization={quant}", *SGD,
            "optimizer.lr=0.05", "trainer.max_steps=2", "trainer.batch_size=2", *extra,
            f"output_dir={out}"]  # fmt: skip
    train(compose(args), out)
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    if AT_REFERENCE[objective] is not None:
        assert losses[0] == pytest.approx(AT_REFERENCE[objective], rel=1e-5)
    assert losses[1] != losses[0]  # the first update changed the policy
    assert (out / "final").is_dir()
