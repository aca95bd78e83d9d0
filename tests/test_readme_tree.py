"""The run folder the README shows is the one a real run leaves (parsed from README.md's tree)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "lrft" / "data" / "quickstart"


def readme_tree() -> tuple[str, list[str], dict[str, list[str]]]:
    """(root line's path, top-level names, {folder: child names}) from the README's tree block."""
    text = (ROOT / "README.md").read_text()
    block = text.split("### The run folder", 1)[1].split("```", 2)[1]
    lines = [line for line in block.splitlines() if line.strip()]
    root = lines[0].split()[0]
    top: list[str] = []
    children: dict[str, list[str]] = {}
    for line in lines[1:]:
        indent = len(line) - len(line.lstrip(" "))
        name = line.split()[0]
        if indent == 2:
            top.append(name)
        elif indent == 4:
            children.setdefault(top[-1], []).append(name)
        # deeper lines continue a description
    return root, top, children


def pattern(name: str) -> re.Pattern[str]:
    """README names with digits (timestamps, steps) stand for any digits."""
    return re.compile(re.sub(r"\\d|\d", r"\\d", re.escape(name)) + r"\Z")


def lrft(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="60", LRFT_FAULT="")
    return subprocess.run(
        [sys.executable, "-m", "lrft", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_a_real_run_has_exactly_the_tree_the_readme_shows(tmp_path):
    root, top, children = readme_tree()
    assert {"config.yaml", "checkpoints/", "final/", "base/", "adapter/", "cli.log", "eval.json"} <= set(top)

    (tmp_path / "data").mkdir()
    for split in ("train", "validation"):
        shutil.copy(QUICKSTART / f"{split}.jsonl", tmp_path / "data" / f"{split}.jsonl")
    train = lrft(
        [
            "train",
            "dataset.data_files.train=data/train.jsonl",  # relative: stored absolute
            "dataset.data_files.validation=data/validation.jsonl",
            "trainer.max_steps=4",
            "trainer.save_every=2",
            "trainer.eval_every=2",
        ],
        tmp_path,
    )
    assert train.returncode == 0, train.stderr[-2000:]
    (run,) = (tmp_path / "runs").iterdir()
    assert pattern(root).match(f"{run.relative_to(tmp_path)}/"), (root, run)

    # quiet by default: lrft's own lines only; the run path in full (folded at 60 columns)
    for noise in ("Loading weights", "Writing model shards", "FutureWarning", "it/s]"):
        assert noise not in train.stderr, noise
    cells = "".join(x.split("│")[2].strip() for x in train.stderr.splitlines() if x.count("│") == 3)
    assert str(run) in cells

    # eval from another folder finds the data through the absolute paths saved in config.yaml
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    evaluated = lrft(["eval", f"checkpoint={run}"], elsewhere)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]

    got = sorted(p.name + ("/" if p.is_dir() else "") for p in run.iterdir())
    assert sorted(top) == got
    for folder, names in children.items():
        real = [p.name + "/" for p in (run / folder).iterdir()]
        assert real, folder
        for name in real:
            assert any(pattern(n).match(name) for n in names), (folder, name, names)
    assert json.loads((run / "summary.json").read_text())["steps"] == 4
