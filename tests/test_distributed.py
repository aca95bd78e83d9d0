"""The shipped accelerate launch configs. Multi-process training itself is tested in
test_loop_invariants.py, test_multinode.py and test_fsdp2.py (gloo, 2 processes via torchrun)."""

import pytest

# 2 processes == 1 process with the same global batch: tests/test_loop_invariants.py (unequal
# lengths, epoch mode, eval split) and tests/test_fsdp2.py (sharded). Kill and exact resume of a
# multi-process run: tests/test_multinode.py (DDP) and tests/test_fsdp2.py (per-rank optimizer).


# one run folder for all ranks of a launch with the default (timestamped) output_dir:
# tests/test_multinode.py::test_two_nodes_on_a_shared_folder_equal_one_process


@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_accelerate_configs_load_and_say_what_they_shard(name):
    """Parsed by accelerate's own loader and checked (DeepSpeed is refused: tests/test_deepspeed.py)."""
    from accelerate.commands.config.config_args import load_config_from_file

    from lrft.config.compose import config_dir

    path = config_dir() / "accelerate" / f"{name}.yaml"
    cfg = load_config_from_file(str(path))
    assert cfg.num_processes > 1 and cfg.mixed_precision == "bf16"
    assert "accelerate launch --config_file configs/accelerate/" in path.read_text()
    if name == "fsdp":  # read by lrft as trainer.sharding=fsdp2 (tests/test_fsdp2.py)
        assert cfg.distributed_type.value == "FSDP"
        assert cfg.fsdp_config["fsdp_version"] == 2 and not cfg.fsdp_config["fsdp_offload_params"]
