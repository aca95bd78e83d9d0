"""Issue 24, finding 2: one writer per merge/export output, and never into a run folder.

Two ``lrft merge`` into one output at once used to both print "wrote OUT", the second silently
replacing the first (the emptiness check and the publish were not one step); ``lrft merge
checkpoint=RUN output=RUN/adapter merge.overwrite=true`` replaced the run's own PEFT adapter."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lrft.cli.export import export_main
from lrft.cli.merge import merge_main
from lrft.config.compose import compose
from lrft.train import train

HOLD = (
    "import sys, time; from pathlib import Path; from lrft.run.lock import writing\n"
    "with writing(Path(sys.argv[1]), 'lrft merge'):\n"
    "    print('held', flush=True); time.sleep(600)"
)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("out") / "run"
    overrides = [
        "model=tiny_llama", "dataset=quickstart", "method=lora_fa", "trainer.max_steps=2",
        "trainer.progress=false", "trainer.eval_every=0", f"output_dir={run_dir}",
    ]  # fmt: skip
    train(compose(overrides), run_dir)
    return run_dir


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


@pytest.mark.parametrize("command", ["merge", "export"])
def test_an_output_another_lrft_process_writes_is_refused(run, tmp_path, capsys, command):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        main = merge_main if command == "merge" else export_main
        assert main([f"checkpoint={run}", f"output={out}", f"{command}.overwrite=true"]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert f"output {out} is in use by lrft merge (pid {holder.pid}" in err
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    # the killed holder left its lock file, but no lock: the output is free at once
    assert (tmp_path / ".out.lrft.lock").exists()
    assert merge_main([f"checkpoint={run}", f"output={out}"]) == 0
    assert not (tmp_path / ".out.lrft.lock").exists()  # a writer that finishes removes it


def test_two_merges_at_once_one_writes_the_other_is_refused(run, tmp_path):
    out = tmp_path / "merged"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LRFT_MERGE_SHARD_DELAY": "6"}
    cmd = [sys.executable, "-m", "lrft", "merge", f"checkpoint={run}", f"output={out}"]
    first = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (tmp_path / ".merged.lrft.lock").exists():  # the first is writing
        assert first.poll() is None and time.time() < deadline
        time.sleep(0.05)
    second = subprocess.run(cmd, env=env, stderr=subprocess.PIPE, text=True)
    first_err = first.communicate()[1]
    assert first.returncode == 0 and "wrote" in first_err
    assert second.returncode == 2 and "is in use by lrft merge" in " ".join(second.stderr.split())


@pytest.mark.parametrize("command", ["merge", "export"])
@pytest.mark.parametrize("where", ["adapter", "sub/new"])
def test_merge_or_export_into_a_run_folder_is_refused(run, capsys, command, where):
    before = digest(run)
    main = merge_main if command == "merge" else export_main
    assert main([f"checkpoint={run}", f"output={run / where}", f"{command}.overwrite=true"]) == 2
    assert f"is inside the run folder {run}" in " ".join(capsys.readouterr().err.split())
    assert digest(run) == before
