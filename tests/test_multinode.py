"""Two torchrun "nodes" on localhost (``--nnodes 2 --nproc_per_node 1``, static rendezvous on
127.0.0.1, gloo): the same run as one process with the same global batch, one run folder on a
shared filesystem, node-local folders with ``trainer.shared_fs=false``, and kill + resume for both."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from launch import torchrun_nodes
from safetensors.torch import load_file

from lrft.config.compose import compose
from lrft.train import train

COMMON = [
    "method=lora_fa",
    "trainer.log_every=1",
    "trainer.eval_every=0",
    "trainer.progress=false",
    "optimizer=sgd",
    "optimizer.lr=0.5",
    "trainer.max_steps=6",
    "trainer.save_every=2",
]


def data(tmp: Path) -> list[str]:
    path = tmp / "inst.jsonl"
    with path.open("w") as fh:
        for i in range(24):
            word = "abcdefghij"[: 1 + i % 10]
            fh.write(json.dumps({"instruction": "Repeat.", "input": word, "output": word}) + "\n")
    return [f"dataset.data_files.train={path}", f"dataset.data_files.validation={path}"]


def state(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "trainable.safetensors")


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float) -> None:
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < tol


def ok(procs: list) -> None:
    for p in procs:
        assert p.returncode == 0, p.stderr[-3000:]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tmp_path_factory.mktemp("nodes")


def test_two_nodes_on_a_shared_folder_equal_one_process(base):
    tmp_path = base / "shared"
    tmp_path.mkdir()
    args = [*COMMON, *data(tmp_path), "trainer.batch_size=2"]
    one = tmp_path / "one"
    train(
        compose([*[a for a in args if "batch_size" not in a], "trainer.batch_size=4", f"output_dir={one}"]),
        one,
    )
    # default run folder (a timestamp): both nodes share the cwd, so one folder must appear
    ok(torchrun_nodes([args, args], cwd=tmp_path))
    (run,) = (tmp_path / "runs").iterdir()
    info = json.loads((run / "run_info.json").read_text())
    assert info["topology"] == {"world_size": 2, "nodes": 2, "processes_per_node": 1, "node_rank": 0,
                                "shared_fs": True}  # fmt: skip
    assert_close(state(run), state(one), 1e-6)
    # kill and exact resume across nodes: the node-local test below (and, for 2 processes writing
    # one shared checkpoint folder, tests/test_fsdp2.py)


def test_node_local_folders_resume_from_the_newest_step_every_node_has(base):
    """Runs after the shared-folder test, whose uninterrupted run is the reference here."""
    tmp_path = base / "local"
    tmp_path.mkdir()
    args = [*COMMON, *data(tmp_path), "trainer.batch_size=2", "trainer.shared_fs=false"]
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    per_node = [[*args, f"output_dir={d}"] for d in nodes]
    # the uninterrupted reference: the shared-folder test's run (same data, seed and global batch)
    shared_runs = tmp_path.parent / "shared" / "runs"
    if shared_runs.is_dir():
        ref = next(shared_runs.iterdir())
    else:  # run alone (-k): make the reference here
        ref = tmp_path / "ref"
        ok(torchrun_nodes([[*args, f"output_dir={ref}"]] * 2))
    procs = torchrun_nodes(per_node, fault="kill_at_step:5")
    assert all(p.returncode != 0 for p in procs)
    for rank, d in enumerate(nodes):  # each node wrote its own copy, with its own rank's RNG
        step4 = d / "checkpoints" / "step-00000004"
        assert (step4 / "COMPLETE").is_file() and (step4 / f"rng_rank{rank}.pt").is_file()
        assert (d / "config.yaml").is_file()
    shutil.rmtree(nodes[1] / "checkpoints" / "step-00000004")  # node 1 lost its newest checkpoint
    procs = torchrun_nodes([[*a, "trainer.resume=auto"] for a in per_node])
    ok(procs)
    summary = json.loads((nodes[0] / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step-00000002")  # the newest step both nodes have
    assert not (nodes[1] / "final").exists()  # the final adapter goes to global rank 0's disk
    got, want = state(nodes[0]), state(ref)
    assert all(torch.equal(got[k], want[k]) for k in want)
