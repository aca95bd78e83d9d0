"""A non-editable install finds its configs, recipes and bundled data from any working directory."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_carries_configs_recipes_and_data_and_runs_from_elsewhere(tmp_path):
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("lrft-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in (
        "lrft/configs/train.yaml",
        "lrft/configs/model/llama7b.yaml",
        "lrft/configs/dataset/glue/cola.yaml",
        "lrft/recipes/lora_fa/roberta_base_mrpc.yaml",
        "lrft/data/quickstart/train.jsonl",
    ):
        assert needed in names, needed
    target = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(target)  # a wheel is installed by unpacking it
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(target))
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import lrft, sys; from lrft.cli.main import main; print(lrft.__file__); "
            "sys.exit(main(['train', 'recipes=lora_fa/roberta_base_mrpc', '--cfg', 'job']))",
        ],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert str(target) in proc.stdout  # the installed copy, not the checkout
    assert "FacebookAI/roberta-base" in proc.stdout and "lr: 0.0004" in proc.stdout
    assert "quickstart" not in proc.stdout
