"""Training that survives: exact resume after SIGKILL, atomic checkpoints, guards.

Fault cases covered here (each must lose nothing): kill after a step, kill in the middle of a save,
Ctrl-C, a corrupted checkpoint file, a full disk, a NaN loss (stop and skip).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lrft.cli.main import main
from lrft.config.compose import compose
from lrft.errors import UserError
from lrft.methods import METHODS
from lrft.train import train
from lrft.train.guards import UntrainedWatch, check_gradients

# 40 rows, batch 4, grad_accum 2: 5 optimizer steps per epoch; checkpoints every 3 steps, so the
# step-6 checkpoint sits mid-epoch and step 12 ends past two epochs.
BASE = ["trainer.max_steps=12", "trainer.batch_size=4", "trainer.grad_accum=2", "trainer.save_every=3",
        "trainer.log_every=1", "trainer.eval_every=0", "trainer.keep_checkpoints=2", "trainer.progress=false",
        "optimizer.lr=5e-3", "trainer.warmup_ratio=0.1"]  # fmt: skip
RESUMABLE = ["lora_fa", "galore"]  # an adapter with dropout; whole weights with projected state


def data(tmp: Path) -> list[str]:
    path = tmp / "inst.jsonl"
    with path.open("w") as fh:
        for i in range(40):
            word = ["cat", "dog", "sun", "map", "tree"][i % 5] + "s" * (i % 3)
            fh.write(json.dumps({"instruction": "Upper case.", "input": word, "output": word.upper()}) + "\n")
    return [f"dataset.data_files.train={path}", f"dataset.data_files.validation={path}"]


def overrides(tmp: Path, method: str, out: Path, *extra: str) -> list[str]:
    from dataclasses import fields

    # dropout on where the method has it: resume must regenerate the same masks
    dropout = ["method.dropout=0.1"] if "dropout" in {f.name for f in fields(METHODS[method].config)} else []
    return [f"method={method}", *BASE, *dropout, *data(tmp), f"output_dir={out}", *extra]


def reference(tmp: Path, method: str):
    out = tmp / "ref"
    result = train(compose(overrides(tmp, method, out)), out)
    return losses(out), final_state(out), result


@pytest.fixture(scope="module")
def lora_fa_run(tmp_path_factory):
    """The uninterrupted lora_fa run, trained once for the module: (folder, losses, final state)."""
    tmp = tmp_path_factory.mktemp("lora_fa_ref")
    ref_losses, ref_state, _ = reference(tmp, "lora_fa")
    return tmp / "ref", ref_losses, ref_state


@pytest.fixture
def lora_fa_ref(lora_fa_run, tmp_path):
    """The shared reference, copied into this test's folder (tests may damage their copy)."""
    src, ref_losses, ref_state = lora_fa_run
    shutil.copytree(src, tmp_path / "ref")
    return ref_losses, ref_state


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    """The adapter, or for methods that train every weight (GaLore, full) the saved model."""
    adapter = run_dir / "final" / "trainable.safetensors"
    return load_file(adapter if adapter.exists() else run_dir / "final" / "model.safetensors")


def losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def cli(args: list[str], fault: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, LRFT_FAULT=fault or "")
    return subprocess.run([sys.executable, "-m", "lrft", "train", *args], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def resume(tmp: Path, method: str, out: Path, *extra: str):
    return train(compose(overrides(tmp, method, out, "trainer.resume=auto", *extra)), out)


def assert_same_run(out: Path, ref_losses, ref_state) -> None:
    assert losses(out) == ref_losses  # every step's loss, exactly
    state = final_state(out)
    assert state.keys() == ref_state.keys()
    for key, value in ref_state.items():
        assert torch.equal(state[key], value), f"{key} differs after resume"


def needs(method: str):
    return pytest.mark.skipif(method not in METHODS, reason=f"method {method} is not registered yet")


# lora with dropout: tests/test_resume_packing.py (packed and length-grouped, the same three runs);
# lora_fa with dropout, killed at step 7 and resumed in fresh processes to the same bits:
# tests/test_runs.py::test_a_bare_resume_after_sigkill_equals_the_uninterrupted_run
@pytest.mark.parametrize("method", [pytest.param(m, marks=needs(m)) for m in RESUMABLE if m != "lora_fa"])
def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path, method):
    """Every run in a fresh process, as a user runs them: the reference, the killed one and the
    resume (a long test session's process state must not decide bit-identity)."""
    ref = tmp_path / "ref"
    done = cli(overrides(tmp_path, method, ref))
    assert done.returncode == 0, done.stderr[-1500:]
    out = tmp_path / "killed"
    proc = cli(overrides(tmp_path, method, out), fault="kill_at_step:7")
    assert proc.returncode == -9, proc.stderr[-1500:]
    assert not (out / "final").exists()
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-00000003", "step-00000006"]
    again = cli(overrides(tmp_path, method, out, "trainer.resume=auto"))
    assert again.returncode == 0, again.stderr[-1500:]
    assert_same_run(out, losses(ref), final_state(ref))


def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path, lora_fa_ref):
    ref_losses, ref_state = lora_fa_ref
    out = tmp_path / "killed"
    proc = cli(overrides(tmp_path, "lora_fa", out), fault="kill_in_save:6")
    assert proc.returncode == -9
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == [".tmp-step-00000006", "step-00000003"]  # the half-written one is not marked
    with pytest.warns(UserWarning, match="unfinished checkpoint"):
        resume(tmp_path, "lora_fa", out)
    assert_same_run(out, ref_losses, ref_state)


def test_ctrl_c_saves_and_resumes_exactly(tmp_path, lora_fa_ref):
    ref_losses, ref_state = lora_fa_ref
    out = tmp_path / "stopped"
    proc = cli(overrides(tmp_path, "lora_fa", out), fault="interrupt_at_step:5")
    assert proc.returncode == 130, proc.stderr[-1500:]
    assert "interrupted at step 5" in proc.stderr and "Traceback" not in proc.stderr
    assert (out / "checkpoints" / "step-00000005" / "COMPLETE").exists()
    resume(tmp_path, "lora_fa", out)
    assert_same_run(out, ref_losses, ref_state)


def test_corrupt_checkpoint_falls_back_or_fails_clearly(tmp_path, capsys, lora_fa_ref):
    ref_losses, ref_state = lora_fa_ref
    out = tmp_path / "ref"
    newest = out / "checkpoints" / "step-00000009"
    blob = bytearray((newest / "trainable.safetensors").read_bytes())
    blob[-8:] = b"\x00" * 8
    (newest / "trainable.safetensors").write_bytes(bytes(blob))
    (out / "summary.json").unlink()  # as if it had stopped after its last checkpoint
    shutil.rmtree(out / "final")
    code = main(["train", *overrides(tmp_path, "lora_fa", out, f"trainer.resume={newest}")])
    assert code == 2 and "corrupt" in capsys.readouterr().err
    (out / "metrics.jsonl").write_text("")  # the fallback replays steps 7..12 from step 6
    with pytest.warns(UserWarning, match="corrupt"):
        resume(tmp_path, "lora_fa", out)
    assert losses(out) == ref_losses[6:]
    state = load_file(out / "final" / "trainable.safetensors")
    assert all(torch.equal(state[k], v) for k, v in ref_state.items())


def test_disk_full_stops_before_writing_and_loses_nothing(tmp_path, monkeypatch, lora_fa_ref):
    ref_losses, ref_state = lora_fa_ref
    import lrft.train.checkpoint

    real = lrft.train.checkpoint.free_bytes
    out = tmp_path / "full"

    def full_after_first(path):  # the base weights and checkpoint 3 fit; then the disk is full
        return 1024 if (out / "checkpoints" / "step-00000003").is_dir() else real(path)

    monkeypatch.setattr(lrft.train.checkpoint, "free_bytes", full_after_first)
    with pytest.raises(UserError, match="Not enough disk space for checkpoint step 6"):
        train(compose(overrides(tmp_path, "lora_fa", out)), out)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000003"]
    monkeypatch.setattr(lrft.train.checkpoint, "free_bytes", real)
    resume(tmp_path, "lora_fa", out)
    assert_same_run(out, ref_losses, ref_state)


@pytest.fixture
def nan_at_micro_batch(monkeypatch):
    """The 9th forward (step 5's first micro-batch) returns NaN hidden states, so a NaN loss
    (the chunked loss reads the decoder body's output, not the model's logits)."""
    import lrft.train.setup

    real = lrft.train.setup.load_model

    def load(*args, **kwargs):
        model = real(*args, **kwargs)
        body = model.base_model
        forward, calls = body.forward, {"n": 0}

        def poisoned(*a, **kw):
            out = forward(*a, **kw)
            if model.training:
                calls["n"] += 1
                if calls["n"] == 9:
                    out.last_hidden_state = out.last_hidden_state * float("nan")
            return out

        body.forward = poisoned
        return model

    monkeypatch.setattr(lrft.train.setup, "load_model", load)


def test_nan_loss_stops_without_touching_good_checkpoints(tmp_path, nan_at_micro_batch):
    out = tmp_path / "nan"
    with pytest.raises(UserError, match="loss is nan at step 5"):
        train(compose(overrides(tmp_path, "lora_fa", out)), out)
    assert not (out / "final").exists()
    ckpt = out / "checkpoints" / "step-00000003"
    state = load_file(ckpt / "trainable.safetensors")
    assert all(torch.isfinite(v).all() for v in state.values())


def test_nan_loss_skip_mode_skips_the_step(tmp_path, nan_at_micro_batch):
    out = tmp_path / "nan"
    result = train(compose(overrides(tmp_path, "lora_fa", out, "trainer.on_nan=skip")), out)
    assert result.summary["skipped_steps"] == 1 and result.summary["steps"] == 12
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


def test_resume_with_another_method_says_what_differs(tmp_path, capsys, lora_fa_ref):
    code = main(["train", *overrides(tmp_path, "lora", tmp_path / "ref", "trainer.resume=auto")])
    err = capsys.readouterr().err
    assert code == 2 and "Cannot resume" in err and "lora_fa" in err


def test_checkpoints_hold_only_the_adapter(tmp_path):
    _, _, result = reference(tmp_path, "lora")
    ckpt = tmp_path / "ref" / "checkpoints" / "step-00000009" / "trainable.safetensors"
    trainable = sum(p.numel() * 4 for p in result.model.parameters() if p.requires_grad)
    assert trainable < ckpt.stat().st_size < trainable * 1.02 + 16_384
    base = sum(p.numel() * 4 for p in result.model.parameters())
    assert ckpt.stat().st_size < base / 5


def test_gradient_guard_lists_parameters_without_gradients():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    net(torch.randn(2, 4)).sum().backward()
    unused = torch.nn.Linear(4, 4)
    holder = torch.nn.ModuleDict({"used": net, "unused": unused})
    with pytest.raises(UserError, match=r"received no gradient.*unused\.weight"):
        check_gradients(holder)


def test_untrained_adapter_warning():
    layer = torch.nn.Linear(4, 4)
    torch.nn.init.zeros_(layer.weight)
    watch = UntrainedWatch(layer, after_steps=3)
    watch.check(2)
    with pytest.warns(UserWarning, match="still exactly zero after 3 steps"):
        watch.check(3)
