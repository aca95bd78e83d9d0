"""Real multi-process training on CPU (gloo, 2 processes via torchrun), in the normal suite."""

import json
from pathlib import Path

import pytest
import torch
from launch import torchrun
from safetensors.torch import load_file

from lrft.config import compose
from lrft.methods import METHODS
from lrft.train import train

# Same-length examples (3-letter words) so every rank's mean loss covers as many tokens as the
# single process's: then 2 x batch 2 averages to exactly what 1 x batch 4 computes.
COMMON = [
    "trainer.max_steps=6",
    "trainer.log_every=1",
    "trainer.eval_every=0",
    "trainer.progress=false",
    "method.dropout=0.0",
    "optimizer.lr=1e-2",
    "trainer.cpu=true",
]


def data(tmp: Path) -> list[str]:
    path = tmp / "inst.jsonl"
    words = ["cat", "dog", "sun", "map", "owl", "fig", "jar", "kit"]
    with path.open("w") as fh:
        for i in range(32):
            w = words[i % 8]
            fh.write(json.dumps({"instruction": "Upper case.", "input": w, "output": w.upper()}) + "\n")
    return [f"dataset.data_files.train={path}", f"dataset.data_files.validation={path}"]


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def state(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "trainable.safetensors")


@pytest.mark.parametrize("method", [m for m in ("lora_fa", "dora") if m in METHODS] or ["lora_fa"])
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, method):
    """SGD keeps the comparison linear in the gradients (Adam's normalisation would amplify the
    all-reduce's float32 rounding), so the tolerance stays at float32 level: 1e-5 relative."""
    args = [f"method={method}", *COMMON, *data(tmp_path), "optimizer=sgd", "optimizer.lr=0.5"]
    one = tmp_path / "one"
    train(compose([*args, "trainer.batch_size=4", f"output_dir={one}"]), one)
    two = tmp_path / "two"
    proc = torchrun([*args, "trainer.batch_size=2", f"output_dir={two}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((two / "summary.json").read_text())["world_size"] == 2
    torch.testing.assert_close(torch.tensor(losses(two)), torch.tensor(losses(one)), rtol=1e-5, atol=1e-5)
    ref = state(one)
    for key, value in state(two).items():
        torch.testing.assert_close(value, ref[key], rtol=1e-5, atol=1e-6, msg=key)


def test_two_process_launch_writes_one_run_folder_and_resumes_exactly(tmp_path):
    args = [
        "method=lora_fa",
        *COMMON,
        *data(tmp_path),
        "trainer.batch_size=2",
        "trainer.save_every=2",
        "trainer.max_steps=8",
    ]
    ref = tmp_path / "ref"
    proc = torchrun([*args, f"output_dir={ref}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    (tmp_path / "cwd").mkdir()
    killed = tmp_path / "killed"
    proc = torchrun([*args, f"output_dir={killed}"], fault="kill_at_step:5")
    assert proc.returncode != 0
    assert (killed / "checkpoints" / "step-00000004" / "rng_rank1.pt").exists()
    proc = torchrun([*args, f"output_dir={killed}", "trainer.resume=auto"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(killed) == losses(ref)
    ref_state = state(ref)
    for key, value in state(killed).items():
        assert torch.equal(value, ref_state[key]), key


def test_default_run_folder_is_shared_by_all_ranks(tmp_path):
    proc = torchrun([*COMMON, *data(tmp_path), "trainer.max_steps=1", "trainer.batch_size=2"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "final" / "COMPLETE").exists() and (run_dir / ".hydra").is_dir()


@pytest.mark.parametrize("name", ["ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"])
def test_accelerate_configs_load_and_say_what_they_shard(name):
    """FSDP and DeepSpeed need GPUs: here they are parsed by accelerate's own loader and checked."""
    from accelerate.commands.config.config_args import load_config_from_file

    from lrft.config import config_dir

    path = config_dir() / "accelerate" / f"{name}.yaml"
    cfg = load_config_from_file(str(path))
    assert cfg.num_processes > 1 and cfg.mixed_precision == "bf16"
    assert "accelerate launch --config_file configs/accelerate/" in path.read_text()
    if name == "fsdp":  # read by lrft as trainer.sharding=fsdp2 (tests/test_fsdp2.py)
        assert cfg.distributed_type.value == "FSDP"
        assert cfg.fsdp_config["fsdp_version"] == 2 and not cfg.fsdp_config["fsdp_offload_params"]
    if name.startswith("deepspeed"):
        assert cfg.distributed_type.value == "DEEPSPEED"
        assert cfg.deepspeed_config["zero_stage"] == int(name[-1])
