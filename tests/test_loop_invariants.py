"""The loop's arithmetic does not depend on how a global batch is split.

The same 4 examples per optimizer step as one batch of 4, as 2 micro-batches of 2 (accumulation)
or as 2 processes x 2 (torchrun, gloo) must give the same update: the loss of a step is the sum of
per-token losses over the whole global batch divided by its number of loss tokens. The data has
responses of unequal lengths, where a per-micro-batch mean would weigh tokens differently.
"""

import json
from pathlib import Path

import pytest
import torch
from launch import torchrun
from safetensors.torch import load_file

from lrft.config.compose import compose
from lrft.errors import UserError
from lrft.train import faults, train
from lrft.train.engine import resolve_precision

COMMON = [
    "trainer.log_every=1",
    "trainer.eval_every=0",
    "trainer.progress=false",
    "trainer.max_grad_norm=0",
    "trainer.loss_chunk=7",  # the chunked loss in many chunks of positions, not one
]
WITH_EVAL = [a for a in COMMON if "eval_every" not in a]
SGD = ["optimizer=sgd", "optimizer.lr=0.5"]
ADAMW = ["optimizer=adamw", "optimizer.lr=1e-2"]


def uneven_data(tmp: Path, n: int = 16) -> list[str]:
    """Responses of 1 to 12 characters: every micro-batch has its own number of loss tokens."""
    path = tmp / "uneven.jsonl"
    with path.open("w") as fh:
        for i in range(n):
            word = "abcdefghijkl"[: 1 + (i * 5) % 12]
            fh.write(json.dumps({"instruction": "Repeat.", "input": word, "output": word}) + "\n")
    return [f"dataset.data_files.train={path}", f"dataset.data_files.validation={path}"]


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "trainable.safetensors")


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def run(tmp: Path, name: str, args: list[str]) -> dict[str, torch.Tensor]:
    out = tmp / name
    train(compose([*args, f"output_dir={out}"]), out)
    return final_state(out)


@pytest.mark.parametrize(
    ("method", "opt", "tol"),
    # AdamW: 1e-4, not 1e-5: with the shipped dropout a few gradient elements are near zero, and
    # Adam's first steps (about lr·g/(|g|+eps)) magnify their float32 rounding (3e-5 measured)
    [("lora_fa", SGD, 1e-6), ("lora_fa", ADAMW, 1e-4), ("lora", ADAMW, 1e-4), ("dora", SGD, 1e-6)],
    ids=["lora_fa-sgd", "lora_fa-adamw", "lora-adamw", "dora-sgd"],
)
def test_accumulation_equals_one_big_batch(tmp_path, method, opt, tol):
    args = [f"method={method}", *COMMON, *uneven_data(tmp_path), *opt, "trainer.max_steps=4"]
    whole = run(tmp_path, "whole", [*args, "trainer.batch_size=4"])
    split = run(tmp_path, "split", [*args, "trainer.batch_size=2", "trainer.grad_accum=2"])
    assert max_diff(whole, split) < tol
    # and the update is not trivially zero: B started at zero
    assert max(v.abs().max().item() for k, v in whole.items() if "lora_B" in k) > 1e-3


def test_logged_loss_is_token_weighted_over_the_window(tmp_path):
    args = [*COMMON, *uneven_data(tmp_path), *SGD, "trainer.max_steps=2"]
    for name, extra in (
        ("a", ["trainer.batch_size=4"]),
        ("b", ["trainer.batch_size=1", "trainer.grad_accum=4"]),
    ):
        train(compose([*args, *extra, f"output_dir={tmp_path / name}"]), tmp_path / name)
    losses = [
        [
            r["loss"]
            for r in map(json.loads, (tmp_path / n / "metrics.jsonl").read_text().splitlines())
            if "loss" in r
        ]
        for n in ("a", "b")
    ]
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=1e-5, atol=1e-6)


# lora_fa over 2 processes: tests/test_fsdp2.py (sharded) and tests/test_multinode.py (DDP)
@pytest.mark.parametrize(("method", "opt", "tol"), [("dora", SGD, 1e-6)], ids=["dora-sgd"])
def test_two_processes_equal_one_in_epoch_mode(tmp_path, method, opt, tol):
    """Epoch mode too: the schedule length is measured after the loader is sharded, so 2 processes
    with batch 2 take the same 4 steps over 16 rows as 1 process with batch 4. The evaluation at
    step 0 (same weights) is split across the 2 processes and merged: the same loss."""
    args = [f"method={method}", *WITH_EVAL, *uneven_data(tmp_path), *opt, "trainer.max_steps=-1"]
    args += ["trainer.epochs=1", "trainer.eval_every=2"]
    one = run(tmp_path, "one", [*args, "trainer.batch_size=4"])
    two = tmp_path / "two"
    proc = torchrun([*args, "trainer.batch_size=2", f"output_dir={two}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((two / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    assert json.loads((tmp_path / "one" / "summary.json").read_text())["steps"] == 4
    assert max_diff(final_state(two), one) < tol
    evals = [eval_records(d)[0] for d in (tmp_path / "one", two)]
    assert evals[0]["step"] == evals[1]["step"] == 0, evals
    assert evals[0]["eval/n"] == evals[1]["eval/n"] == 16, evals
    # a padded row's hidden states move at float32 rounding with its batch's padding (~7e-7 here),
    # so the merged loss agrees to ~1e-8, not bit for bit; a wrong merge (a mean of means) is ~1e-2
    assert evals[1]["eval/loss"] == pytest.approx(evals[0]["eval/loss"], rel=1e-6)


def eval_records(run_dir: Path) -> list[dict]:
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [r for r in rows if "eval/n" in r]


def test_glue_eval_split_across_processes_equals_one(tmp_path):
    """Classification metrics come from merged confusion matrices: exactly one process's."""
    rows = [{"sentence": f"it was {w} {i}", "label": i % 2} for i, w in enumerate(["good", "bad"] * 13)]
    path = tmp_path / "sst2.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["model=tiny_roberta", "dataset=glue/sst2", f"dataset.data_files.train={path}",
            f"dataset.data_files.validation={path}", *WITH_EVAL, "trainer.eval_every=1",
            "trainer.max_steps=1", "trainer.eval_batch_size=4"]  # fmt: skip
    one = tmp_path / "one"
    train(compose([*args, "trainer.batch_size=4", f"output_dir={one}"]), one)
    proc = torchrun([*args, "trainer.batch_size=2", f"output_dir={tmp_path / 'two'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, second = eval_records(one)[0], eval_records(tmp_path / "two")[0]
    assert first["eval/n"] == 26 and first.keys() == second.keys()
    for key in ("eval/accuracy",):
        assert second[key] == first[key]
    assert second["eval/loss"] == pytest.approx(first["eval/loss"], rel=1e-12)


def test_a_nan_on_one_rank_is_skipped_by_every_rank(tmp_path, monkeypatch):
    """Rank 1 alone sees a non-finite loss at step 2: both ranks skip that update (no hang, no
    divergence), so the result equals one process skipping the same step."""
    args = [
        "method=lora_fa",
        *COMMON,
        *uneven_data(tmp_path),
        *SGD,
        "trainer.max_steps=4",
        "trainer.on_nan=skip",
    ]
    two = tmp_path / "two"
    proc = torchrun([*args, "trainer.batch_size=2", f"output_dir={two}"], fault="nan_loss_at_step:2@1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((two / "summary.json").read_text())["skipped_steps"] == 1
    monkeypatch.setattr(faults, "_SPEC", "nan_loss_at_step:2")
    one = run(tmp_path, "one", [*args, "trainer.batch_size=4"])
    assert max_diff(final_state(two), one) < 1e-6
    stop = torchrun(
        [*args[:-1], "trainer.batch_size=2", f"output_dir={tmp_path / 'stop'}"], fault="nan_loss_at_step:2@1"
    )
    # torchrun exits 1 when its workers fail; both workers stopped with the same message, no hang
    assert stop.returncode != 0 and stop.stderr.count("loss is nan at step 2") == 2, stop.stderr[-3000:]


def test_fp16_overflow_is_the_scalers_business(tmp_path, monkeypatch):
    """fp16 through torch's CPU autocast and GradScaler: an overflow (an inf gradient at step 2)
    skips that update and lowers the scale; on_nan=stop does not stop the run."""
    monkeypatch.setattr(faults, "_SPEC", "grad_inf_at_step:2")
    out = tmp_path / "fp16"
    args = [*COMMON, *uneven_data(tmp_path), *ADAMW, "trainer.max_steps=4", "trainer.batch_size=4"]
    summary = train(compose([*args, "trainer.mixed_precision=fp16", f"output_dir={out}"]), out).summary
    assert summary["steps"] == 4 and summary["overflow_steps"] >= 1 and summary["skipped_steps"] == 0
    assert summary["mixed_precision"] == "fp16"
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    scales = [r["loss_scale"] for r in records if "loss" in r]
    assert scales == sorted(scales, reverse=True) and scales[-1] < scales[0]
    assert json.loads((out / "run_info.json").read_text())["mixed_precision"] == "fp16"


def test_precision_follows_the_launcher_and_refuses_contradictions(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert resolve_precision(None) == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert resolve_precision(None) == "bf16"
    assert resolve_precision("bf16") == "bf16"
    with pytest.raises(UserError, match="contradicts the launcher's mixed precision bf16"):
        resolve_precision("no")


def test_run_info_records_how_the_run_ran(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    out = tmp_path / "r"
    args = [*COMMON, *uneven_data(tmp_path), "trainer.max_steps=1", "trainer.batch_size=2"]
    train(compose([*args, f"output_dir={out}"]), out)
    info = json.loads((out / "run_info.json").read_text())
    assert (info["mixed_precision"], info["world_size"], info["distributed_type"]) == ("bf16", 1, "NO")


def test_packed_step_equals_unpacked_step(tmp_path):
    """One SGD step over the same 8 examples, packed into rows or padded into a batch: with the
    token-weighted loss and packed attention (position ids restart per example) the update is one."""
    args = [*COMMON, *uneven_data(tmp_path, n=8), *SGD, "trainer.max_steps=1", "trainer.batch_size=8"]
    plain = run(tmp_path, "plain", args)
    packed = run(tmp_path, "packed", [*args, "dataset.packing=true"])
    assert max_diff(plain, packed) < 1e-6
    names = ("plain", "packed")
    first = {n: json.loads((tmp_path / n / "metrics.jsonl").read_text().splitlines()[0]) for n in names}
    assert first["packed"]["padding"] < first["plain"]["padding"]
    for n in names:  # the summary's run-long numbers: here one step, one log window
        summary = json.loads((tmp_path / n / "summary.json").read_text())
        assert summary["padding"] == pytest.approx(first[n]["padding"]) and summary["tokens_per_s"] > 0


def test_compiled_training_matches_eager(tmp_path):
    """trainer.compile=true: torch.compile over the whole model (the low-rank layer has no graph
    breaks) trains the same adapters as eager, within float32 kernel differences. Packed rows
    under compile (the explicit block mask): tests/test_packing_mask.py."""
    args = [*COMMON, *uneven_data(tmp_path, n=8), *SGD, "trainer.max_steps=2", "trainer.batch_size=4"]
    eager = run(tmp_path, "eager", args)
    # aot_eager: the same dynamo graphs and AOTAutograd tracing of the custom autograd function,
    # without inductor's C++ code generation (cold, that alone takes minutes on 2 CPU cores)
    compiled = run(tmp_path, "compiled", [*args, "trainer.compile=true", "trainer.compile_backend=aot_eager"])
    assert max_diff(compiled, eager) < 1e-5
