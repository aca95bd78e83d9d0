"""scripts/gpu_check.py --tiny: the GPU check's code paths, run on CPU in one subprocess.

The report must have one row per configuration, each with numbers (or an explicit ``failed:``
reason), so a GPU session runs a script whose every section has already run somewhere.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NUMBER = re.compile(r"^[\d,]+(\.\d+)?")

TRAIN_ROWS = [
    "lrft lora", "lrft lora_fa", "lrft lora_fa, eager dropout kernel", "lrft QLoRA-FA (nf4 base)",
    "PEFT LoRA", "PEFT LoRA, A frozen",
]  # fmt: skip
INIT_ROWS = ["PiSSA, randomized SVD", "LoRA-GA"]


def rows(md: str, section: str) -> dict[str, list[str]]:
    """{first cell: other cells} of the table under the heading starting with ``section``."""
    block = md.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in block.splitlines() if ln.startswith("|")][2:]  # header, separator
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    return {c[0]: c[1:] for c in cells}


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("gpu") / "gpu.md"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--tiny", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out.read_text()


def test_cpu_run_is_labelled(report: str) -> None:
    assert "CPU smoke run (no GPU was lent to this session)" in report
    assert "bash scripts/gpu_check.sh" in report
    assert "Unfinished" not in report


def test_training_rows_have_speed_and_prediction(report: str) -> None:
    table = rows(report, "Training step")
    assert list(table) == TRAIN_ROWS
    for label, (trainable, ms, tps, peak, predicted, _ratio) in table.items():
        for cell in (trainable, ms, tps):
            value = NUMBER.match(cell)
            assert value and float(value.group().replace(",", "")) > 0, (label, cell)
        assert peak == "n/a (CPU)"
        if label.startswith("lrft"):  # the planner's total for the same composed config
            assert NUMBER.match(predicted) and float(NUMBER.match(predicted).group()) > 0, (label, predicted)
        else:
            assert predicted.startswith("-")
    # LoRA-FA trains only B: fewer trainable parameters than LoRA, the same as PEFT with A frozen
    n = {k: float(v[0].rstrip("M")) for k, v in table.items()}
    assert n["lrft lora_fa"] < n["lrft lora"] == n["PEFT LoRA"]
    assert n["lrft lora_fa"] == n["PEFT LoRA, A frozen"] == n["lrft QLoRA-FA (nf4 base)"]
    assert n["lrft lora_fa"] == n["lrft lora_fa, eager dropout kernel"]


def test_dropout_mask_rows(report: str) -> None:
    table = rows(report, "Dropout masks")
    labels = [k.split(" [")[0] for k in table]
    assert labels == [
        "lrft hash, eager (~15 ops)", "lrft hash, fused (one compiled kernel)", "torch.nn.functional.dropout"
    ]  # fmt: skip
    for label, (ms, equal) in table.items():
        assert NUMBER.match(ms) and float(ms) > 0, (label, ms)
        assert equal == ("True" if "fused" in label else "-"), (label, equal)


def test_init_and_fp16_rows(report: str) -> None:
    inits = rows(report, "Data-aware inits")
    assert [next(k for k in inits if k.startswith(p)) for p in INIT_ROWS]
    for label, (seconds, layers, *_rest) in inits.items():
        assert NUMBER.match(seconds), (label, seconds)
        assert int(layers) == 14  # 2 layers x 7 projections of tiny_llama
    ((label, fp16),) = rows(report, "fp16").items()
    steps, overflow, scales = fp16[:3]
    assert int(steps) == 3 and int(overflow) >= 0
    assert float(scales.split(",")[-1]) > 0, scales


def test_a_failing_or_late_row_is_written_not_raised() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "scripts"))

    def boom() -> dict[str, str]:
        raise RuntimeError("CUDA out of memory | tried 2 GiB")

    failed = gpu_check.guarded(boom, gpu_check.Budget(600))
    assert failed["status"].startswith("failed: RuntimeError: CUDA out of memory")
    late = gpu_check.guarded(lambda: {"x": "1"}, gpu_check.Budget(-1))
    assert late["status"].startswith("skipped: time budget spent")
    md = gpu_check.table([("a", failed), ("b", {"x": "1"})], ["x", "y"])
    lines = md.splitlines()
    assert all(ln.count("|") == 4 for ln in lines[2:]), md  # a "|" in a reason cannot break the table
    assert lines[3] == "| b | 1 |  |"
