"""lrft.run.atomic: the one folder writer behind final states, checkpoints, merge and export."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lrft.run.atomic import COMPLETE, StagedDir, remove_stale, staged_dir, staging_path


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_publishes_renames_over_the_old_folder_and_marks_last(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    seen: list[list[str]] = []

    def manifest(folder: Path) -> str:
        seen.append(_names(folder))  # computed from the staged files, before the mark exists
        files = sorted(f for f in folder.iterdir() if f.is_file())
        return json.dumps({f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files})

    with staged_dir(final, mark_text=manifest) as tmp:
        assert tmp.parent == final.parent and tmp.name == f".tmp-out-{os.getpid()}"
        (tmp / "a").write_text("A")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b").write_text("B")
    assert seen == [["a", "sub"]]
    assert _names(final) == [COMPLETE, "a", "sub"] and (final / "sub" / "b").read_text() == "B"
    assert json.loads((final / COMPLETE).read_text()) == {"a": hashlib.sha256(b"A").hexdigest()}
    assert _names(tmp_path) == ["out"]  # no staging or set-aside folder left


def test_an_exception_keeps_the_previous_folder_and_leaves_nothing(tmp_path):
    final = tmp_path / "out"
    with staged_dir(final, mark=None, seal=lambda d: (d / "record").write_text("r")) as tmp:
        (tmp / "v1").write_text("1")
    with pytest.raises(RuntimeError), staged_dir(final) as tmp:
        (tmp / "v2").write_text("2")
        raise RuntimeError("disk full")
    assert _names(tmp_path) == ["out"] and _names(final) == ["record", "v1"]  # mark=None: no COMPLETE


def test_shared_staging_lets_other_writers_fill_it_before_commit(tmp_path):
    final = tmp_path / "checkpoints" / "step-00000004"
    stage = StagedDir(final, shared=True, mark_text=lambda d: ",".join(_names(d)))
    path = stage.open()
    assert path == staging_path(final, shared=True) == final.with_name(".tmp-step-00000004")
    for rank in (0, 1):  # what the other ranks do behind a barrier, knowing only ``final``
        (staging_path(final, shared=True) / f"rng_rank{rank}.pt").write_bytes(b"x")
    assert stage.commit() == final
    assert (final / COMPLETE).read_text() == "rng_rank0.pt,rng_rank1.pt"
    stage2 = StagedDir(final, shared=True)
    stage2.open()
    stage2.abort()
    assert _names(final.parent) == ["step-00000004"]


def test_a_killed_writer_leaves_only_a_hidden_folder_which_the_next_writer_removes(tmp_path):
    final = tmp_path / "out"
    with staged_dir(final) as tmp:
        (tmp / "v1").write_text("1")
    code = (
        "import os, sys, time\n"
        "from pathlib import Path\n"
        "from lrft.run.atomic import staged_dir\n"
        "with staged_dir(Path(sys.argv[1])) as tmp:\n"
        "    (tmp / 'half').write_text('h')\n"
        "    print('STAGED', flush=True)\n"
        "    time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(final)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "STAGED"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _names(tmp_path) == [f".tmp-out-{proc.pid}", "out"] and _names(final) == [COMPLETE, "v1"]
    (tmp_path / f".tmp-out-{os.getpid()}.keep").mkdir()  # not a staging name: never touched
    remove_stale(final)
    assert _names(tmp_path) == [f".tmp-out-{os.getpid()}.keep", "out"]
