"""Issue 24, finding 1: a live run folder has one owner. A second ``lrft train`` into it (new,
resume or overwrite) is refused with exit 2 and the owner's pid and host, and nothing in the folder
changes; the lock dies with its process (a SIGKILLed run resumes at once); two runs started at
once into a new folder: the second is refused for the right reason."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lrft.cli.main import main
from lrft.errors import UserError
from lrft.run.folder import run_state
from lrft.run.lock import LOCK_NAME, acquire, holds, release

TINY = ["model=tiny_llama", "dataset=quickstart", "method=lora_fa", "trainer.progress=false"]
HOLD = (
    "import sys, time; from lrft.run.lock import acquire; acquire(sys.argv[1]); "
    "print('held', flush=True); time.sleep(600)"
)


def holder(folder: Path) -> subprocess.Popen:
    """Another process holding ``folder``'s lock (as a live ``lrft train`` does)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def files(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("extra", [[], ["trainer.overwrite=true"], ["trainer.resume=auto"]])
def test_a_held_folder_refuses_train_overwrite_and_resume_and_changes_nothing(tmp_path, capsys, extra):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: {name: tiny_llama}\n")  # an unfinished run's file
    proc = holder(run)
    try:
        before = files(run)
        assert main(["train", *TINY, f"output_dir={run}", *extra]) == 2
        err = capsys.readouterr().err
        assert f"is in use by lrft train (pid {proc.pid} on {socket.gethostname()}" in " ".join(err.split())
        assert "trainer.resume=auto" in err  # how to continue once the owner stopped
        assert files(run) == before
    finally:
        proc.kill()
        proc.wait()


def test_the_lock_dies_with_its_process_and_a_stale_lock_file_is_no_run(tmp_path):
    run = tmp_path / "run"
    proc = holder(run)
    with pytest.raises(UserError, match="is in use"):
        acquire(run)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert run_state(run) == "empty" and (run / LOCK_NAME).is_file()  # the file alone is no run
    assert acquire(run) and holds(run) and not acquire(run)  # re-entrant in one process
    release(run)
    assert not holds(run)


def test_a_live_lrft_train_owns_its_folder_then_resumes_after_sigkill(tmp_path, capsys):
    """The finding as reported: while ``lrft train ... output_dir=D`` trains, a second one with
    trainer.overwrite=true used to remove the first run's files and train into them."""
    run = tmp_path / "D"
    args = [*TINY, f"output_dir={run}", "trainer.max_steps=100000", "trainer.save_every=20"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = subprocess.Popen(
        [sys.executable, "-m", "lrft", "train", *args], env=env, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + 120
        while not (run / "checkpoints").is_dir():  # it is training and has saved
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.2)
        assert main(["train", *TINY, f"output_dir={run}", "trainer.overwrite=true", "method.r=2"]) == 2
        assert f"pid {first.pid}" in capsys.readouterr().err
        assert OmegaConf.load(run / "config.yaml").method.r == 8 and first.poll() is None
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the OS dropped the lock with the process: the folder is free at once
    assert acquire(run)
    release(run)


def test_two_runs_started_together_into_a_new_folder(tmp_path, capsys):
    run = tmp_path / "new"
    proc = holder(run)  # the first has just claimed the folder: nothing else in it yet
    try:
        assert main(["train", *TINY, f"output_dir={run}"]) == 2
        err = capsys.readouterr().err
        assert "is in use by lrft train" in err and "holds no lrft run" not in err
        assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]
    finally:
        proc.kill()
        proc.wait()
