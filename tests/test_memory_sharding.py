"""`lrft memory` per device of a sharded job: FSDP divides weights, gradients and optimizer state,
plus one gathered block; replicated (DDP) changes nothing; the DeepSpeed stages are refused."""

import copy

import pytest

from lrft.cli.memory import compose_memory
from lrft.errors import UserError
from lrft.memory.choose import shard_plan
from lrft.memory.plan import Planner

BASE = ["model=tiny_llama", "method=lora", "dataset=quickstart", "trainer.batch_size=2"]


def plans(sharding: str, nodes: int = 2, per_node: int = 2):
    cfg = compose_memory([*BASE, f"memory.sharding={sharding}", f"memory.nodes={nodes}",
                          f"memory.processes_per_node={per_node}"])  # fmt: skip
    planner = Planner(cfg)
    full = planner.plan()
    return full, shard_plan(copy.deepcopy(full), planner, cfg.memory), planner


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_stages_are_refused_naming_fsdp(stage):
    with pytest.raises(UserError, match=rf"memory\.sharding={stage}: DeepSpeed is not supported.*fsdp"):
        plans(stage)


def test_fsdp_divides_weights_and_adds_one_gathered_block():
    full, sharded, planner = plans("fsdp", nodes=1, per_node=4)
    block = planner.largest_block()
    layer = sum(p.numel() * p.element_size() for p in planner.model.model.layers[0].parameters())
    assert block == layer > 0
    assert sharded.weights.pop("gathered block") == block
    assert sum(sharded.weights.values()) <= sum(full.weights.values()) // 4 + len(full.weights)
    assert sharded.total(False) < full.total(False)
    assert sharded.gradients == -(-full.gradients // 4) and sharded.optimizer == -(-full.optimizer // 4)
    assert any("fsdp over 4 devices" in n for n in sharded.notes)


def test_replicated_and_bad_values():
    full, same, _ = plans("ddp")
    assert same.total(False) == full.total(False)
    with pytest.raises(UserError, match=r"memory\.sharding='zero4' is not valid"):
        plans("zero4")
