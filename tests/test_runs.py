"""Run folders are never silently reused, and a bare resume continues the run with its own config.

Covers: a finished run rerun (refused; resume says nothing left to do; overwrite removes only lrft's
files), an unfinished run (refused with a resume command that works verbatim, from another folder,
bit-identical to the uninterrupted run after SIGKILL), math-changing overrides at resume, a resume
past its schedule, edited config files, and a run that fails before training.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from test_resume import BASE, data, final_state, losses

from lrft.cli.main import main
from lrft.config.compose import compose
from lrft.errors import Interrupted, UserError
from lrft.run.folder import failed_before_training, prepare, resume_command, run_state
from lrft.run.lock import LOCK_NAME
from lrft.train import train

QUICK = ["trainer.eval_every=0", "trainer.progress=false", "trainer.log_every=1"]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with its content hash: equal snapshots = nothing touched."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != LOCK_NAME  # its owner record names the last process to lock
    }


def test_a_finished_run_is_refused_resume_has_nothing_to_do_and_overwrite_keeps_foreign_files(
    tmp_path, capsys
):
    run = tmp_path / "run"
    assert main(["train", f"output_dir={run}", "trainer.max_steps=2", *QUICK]) == 0
    assert run_state(run) == "finished"
    before = snapshot(run)
    capsys.readouterr()

    assert main(["train", f"output_dir={run}", "trainer.max_steps=3", *QUICK]) == 2
    err = capsys.readouterr().err
    assert "finished run" in err and "trainer.overwrite=true" in err
    assert snapshot(run) == before

    assert main(["train", f"output_dir={run}", "trainer.resume=auto"]) == 0
    assert "nothing left to do" in capsys.readouterr().err
    assert snapshot(run) == before

    (run / "notes.txt").write_text("my notes")
    assert main(["train", f"output_dir={run}", "trainer.max_steps=3", "trainer.overwrite=true", *QUICK]) == 0
    assert (run / "notes.txt").read_text() == "my notes"  # not lrft's: never removed
    assert "kept what lrft did not write: notes.txt" in capsys.readouterr().err
    assert json.loads((run / "summary.json").read_text())["steps"] == 3
    assert [s for s, _ in losses(run)] == [1, 2, 3]  # one run's metrics, not two appended


def test_a_non_run_folder_is_refused(tmp_path, capsys):
    (tmp_path / "thesis.tex").write_text("x")
    assert main(["train", f"output_dir={tmp_path}", "trainer.max_steps=1"]) == 2
    assert "holds no lrft run" in capsys.readouterr().err and (tmp_path / "thesis.tex").exists()


def overrides(tmp: Path, out: Path) -> list[str]:
    return ["method=lora_fa", "method.dropout=0.1", *BASE, *data(tmp), f"output_dir={out}"]


def test_a_bare_resume_after_sigkill_equals_the_uninterrupted_run(tmp_path, capsys):
    ref = tmp_path / "ref"
    train(compose(overrides(tmp_path, ref)), ref)
    killed = tmp_path / "killed"
    env = dict(os.environ, LRFT_FAULT="kill_at_step:7")
    cmd = [sys.executable, "-m", "lrft", "train", *overrides(tmp_path, killed)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-1500:]
    assert run_state(killed) == "unfinished"

    # rerun without resume: refused, and the message carries the command that continues the run
    assert main(["train", *overrides(tmp_path, killed)]) == 2
    err = capsys.readouterr().err
    assert "unfinished run (last checkpoint: step 6)" in err
    assert resume_command(killed) in err.replace("\n", " ")

    # a resume that changes the math is refused, naming the keys; the folder is left alone
    before = snapshot(killed)
    bad = ["train", f"output_dir={killed}", "trainer.resume=auto", "trainer.max_steps=20", "method.r=4"]
    assert main(bad) == 2
    err = capsys.readouterr().err
    assert "trainer.max_steps: run 12 -> now 20" in err and "method.r: run 8 -> now 4" in err
    assert snapshot(killed) == before

    # the printed command, verbatim, from another folder: the original 12-step schedule continues
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    args = shlex.split(resume_command(killed))
    assert args[:2] == ["lrft", "train"]
    # armed at step 3: a restart from scratch would be killed there, a resume from step 6 never sees it
    env = dict(os.environ, LRFT_FAULT="kill_at_step:3")
    proc = subprocess.run(
        [sys.executable, "-m", "lrft", *args[1:]],
        env=env,
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "with its original overrides" in proc.stderr and "trainer.max_steps=12" in proc.stderr
    assert losses(killed) == losses(ref)
    got, want = final_state(killed), final_state(ref)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(got[key], value), f"{key} differs after the bare resume"
    assert OmegaConf.load(killed / "config.yaml").trainer.max_steps == 12


def fake_run(tmp: Path, saved: list[str], step: int, epoch: int = 0) -> Path:
    """A run folder as lrft leaves it after a kill: config, overrides, one complete checkpoint."""
    run = tmp / "run"
    ckpt = run / "checkpoints" / f"step-{step:08d}"
    ckpt.mkdir(parents=True)
    cfg = compose([*saved, f"output_dir={run}"])
    (run / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (run / "run_info.json").write_text(json.dumps({"overrides": [*saved, f"output_dir={run}"]}))
    position = {"step": step, "epoch": epoch, "batch_in_epoch": 0, "world_size": 1}
    (ckpt / "state.json").write_text(json.dumps({"position": position}))
    (ckpt / "COMPLETE").write_text("{}")
    return run


def test_resume_recomposes_the_saved_overrides_and_lists_the_extra_ones(tmp_path):
    run = fake_run(tmp_path, ["method=lora", "trainer.max_steps=24", "optimizer.lr=3e-3"], step=10)
    said: list[str] = []
    got = prepare([f"output_dir={run}", "trainer.resume=auto", "trainer.log_every=5"], say=said.append)
    cfg = compose(got)
    assert cfg.method.name == "lora" and cfg.trainer.max_steps == 24 and cfg.optimizer.lr == 3e-3
    assert cfg.trainer.log_every == 5 and cfg.trainer.resume == "auto"
    assert "trainer.max_steps=24" in said[0] and "trainer.log_every=5" in said[1]
    # repeating an original override with its original value is not a change
    prepare([f"output_dir={run}", "trainer.resume=auto", "method=lora", "optimizer.lr=3e-3"], say=said.append)
    with pytest.raises(UserError, match=r"optimizer\.lr"):
        prepare([f"output_dir={run}", "trainer.resume=auto", "optimizer.lr=1e-3"], say=said.append)
    with pytest.raises(UserError, match=r"trainer\.batch_size"):
        prepare([f"output_dir={run}", "trainer.resume=auto", "trainer.batch_size=2"], say=said.append)


def test_data_paths_are_stored_absolute_and_a_resume_elsewhere_keeps_them(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    rows = tmp_path / "data" / "inst.jsonl"
    rows.write_text(json.dumps({"instruction": "Up.", "input": "a", "output": "A"}) + "\n")
    monkeypatch.chdir(tmp_path)
    saved = ["dataset.data_files.train=data/inst.jsonl", "trainer.max_steps=4"]
    cfg = compose(saved)
    assert cfg.dataset.data_files.train == str(rows)
    run = fake_run(tmp_path, saved, step=2)
    assert OmegaConf.load(run / "config.yaml").dataset.data_files.train == str(rows)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    got = prepare([f"output_dir={run}", "trainer.resume=auto"], say=lambda _: None)
    assert compose(got).dataset.data_files.train == str(rows)


def test_max_steps_zero_is_refused():
    with pytest.raises(UserError, match="would train nothing"):
        compose(["trainer.max_steps=0"])


def test_a_resume_past_its_schedule_is_refused(tmp_path):
    run = fake_run(tmp_path, ["trainer.max_steps=4"], step=9)
    with pytest.raises(UserError, match=r"step 9, past the schedule's trainer\.max_steps=4"):
        prepare([f"output_dir={run}", "trainer.resume=auto"], say=lambda _: None)


def test_config_files_edited_since_the_run_started_are_caught(tmp_path):
    run = fake_run(tmp_path, ["trainer.max_steps=4"], step=2)
    cfg = OmegaConf.load(run / "config.yaml")
    cfg.optimizer.lr = 0.5  # as if the packaged default changed after the run started
    (run / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    with pytest.raises(UserError, match="config files changed since the run started"):
        prepare([f"output_dir={run}", "trainer.resume=auto"], say=lambda _: None)


def test_a_run_from_before_a_new_config_key_still_resumes(tmp_path):
    run = fake_run(tmp_path, ["trainer.max_steps=4"], step=2)
    cfg = OmegaConf.load(run / "config.yaml")
    del cfg.trainer["overwrite"]  # written by an lrft that did not have this key yet
    (run / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    got = prepare([f"output_dir={run}", "trainer.resume=auto"], say=lambda _: None)
    assert compose(got).trainer.max_steps == 4


def test_resume_command_is_absolute_and_quoted(tmp_path):
    run = tmp_path / "my runs" / "a"
    cmd = resume_command(run)
    assert shlex.split(cmd) == ["lrft", "train", f"output_dir={run.resolve()}", "trainer.resume=auto"]


def test_a_run_that_fails_before_training_leaves_no_folder(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x"}\n')
    run = tmp_path / "run"
    args = [
        "train",
        f"dataset.data_files.train={bad}",
        f"dataset.data_files.validation={bad}",
        f"output_dir={run}",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "nothing was trained" in err
    assert not run.exists()


def test_a_run_that_fails_after_training_started_keeps_everything_and_says_why(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-00000002").mkdir(parents=True)
    (run / "config.yaml").write_text("x: 1\n")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    done = failed_before_training(run, "loss is NaN at step 3")
    assert "error.txt" in done
    assert (run / "error.txt").read_text() == "loss is NaN at step 3\n"
    assert (run / "metrics.jsonl").exists() and (run / "checkpoints" / "step-00000002").is_dir()


def test_interrupted_carries_its_exit_code():
    assert Interrupted("x").code == 130 and Interrupted("x", code=143).code == 143


def test_sigterm_exits_143_with_a_resume_command_that_works_verbatim(tmp_path):
    """A preempted job (SIGTERM at step 2, from the fault hook) saves, exits 143 and prints a
    command that, run as printed, finishes the run."""
    out = tmp_path / "run"
    args = [*overrides(tmp_path, out), "trainer.max_steps=4", "trainer.save_every=0"]
    env = dict(os.environ, LRFT_FAULT="term_at_step:2")
    cmd = [sys.executable, "-m", "lrft", "train", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 143, proc.stderr[-2000:]
    err = " ".join(proc.stderr.split())
    hint = resume_command(out)
    assert hint in err
    again = subprocess.run(
        [sys.executable, "-m", *shlex.split(hint)], capture_output=True, text=True, cwd=tmp_path, timeout=600
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
