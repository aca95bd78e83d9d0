"""DeepSpeed is refused at launch, with a clear message, exit 2 and nothing written.

DeepSpeed was tried on CPU (deepspeed 0.19.8, 2 gloo processes, the shipped ZeRO-2 config with
use_cpu): with lrft's ``cpu=True`` accelerate ran it as MULTI_CPU DDP without a word; on a real
DeepSpeed engine it matched DDP only after the config's ``gradient_clipping`` was set to
``trainer.max_grad_norm``, and only after a ~3 minute JIT build of DeepSpeed's shared-memory op
(48 s a run after that). ZeRO-3 and resume were never run, so the configs were removed and a
DeepSpeed launch (``accelerate launch`` sets ACCELERATE_USE_DEEPSPEED=true for
``distributed_type: DEEPSPEED``) is refused. deepspeed itself is not needed for this test.
"""

import os
import subprocess
import sys

import pytest

from lrft.config.compose import compose, config_dir
from lrft.errors import UserError
from lrft.train.engine import DEEPSPEED_REFUSED, make_engine


def test_deepspeed_launch_is_refused_with_exit_2_and_nothing_written(tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE="2")
    args = ["trainer.cpu=true", "trainer.max_steps=1", f"output_dir={run}"]
    proc = subprocess.run(
        [sys.executable, "-m", "lrft", "train", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    out = " ".join((proc.stdout + proc.stderr).split())  # the console wraps long lines
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error:" in out and "DeepSpeed is not supported" in out, out[-3000:]
    assert "configs/accelerate/fsdp.yaml" in out and "trainer.sharding=fsdp2" in out
    assert "Traceback" not in out
    assert not run.exists()  # nothing trained: no folder left behind


@pytest.mark.parametrize("value", ["true", "1", "TRUE"])
def test_refused_before_the_accelerator(monkeypatch, tmp_path, value):
    """Also for the API (lrft.train.train): the refusal comes before accelerate is touched."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", value)
    with pytest.raises(UserError, match="DeepSpeed is not supported") as err:
        make_engine(compose(["trainer.cpu=true"]), tmp_path)
    assert str(err.value) == DEEPSPEED_REFUSED
    assert not any(tmp_path.iterdir())


def test_no_deepspeed_config_is_shipped():
    """A config that was never run is not shipped: only ddp and fsdp remain."""
    shipped = sorted(p.name for p in (config_dir() / "accelerate").glob("*.yaml"))
    assert shipped == ["ddp.yaml", "fsdp.yaml"], shipped
    for path in (config_dir() / "accelerate").glob("*.yaml"):
        assert "DEEPSPEED" not in path.read_text().upper()
