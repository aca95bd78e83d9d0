"""trainer.dataloader_workers and pinned memory (issue 25): workers prepare batches ahead, the
sampler alone orders them, so a run with workers trains the bits of one without."""

import pytest
import torch
from test_loop_invariants import SGD, max_diff, run, uneven_data

from lrft.cli.main import main
from lrft.config.compose import compose
from lrft.train.setup import loader_options

COMMON = ["model=tiny_llama", "method=lora", "trainer.log_every=1",
          "trainer.eval_every=0", "trainer.progress=false", "trainer.max_steps=3",
          "trainer.batch_size=2"]  # fmt: skip


def test_workers_train_the_same_bits(tmp_path):
    args = [*COMMON, *uneven_data(tmp_path), *SGD]
    plain = run(tmp_path, "plain", [*args, "trainer.dataloader_workers=0"])
    workers = run(tmp_path, "workers", [*args, "trainer.dataloader_workers=2"])
    assert max_diff(plain, workers) == 0.0  # lora's dropout masks follow the example, not the worker


def test_auto_is_no_worker_on_cpu_and_pinned_workers_on_a_gpu():
    t = compose(["model=tiny_llama", "dataset.data_files.train=x.jsonl"]).trainer
    assert loader_options(t, torch.device("cpu")) == {"num_workers": 0, "pin_memory": False,
                                                      "persistent_workers": False}  # fmt: skip
    gpu = loader_options(t, torch.device("cuda"))
    assert gpu["pin_memory"] and 1 <= gpu["num_workers"] <= 4 and gpu["persistent_workers"]


@pytest.mark.parametrize("bad", ["-1", "many", "true"])
def test_a_bad_worker_count_is_a_usage_error(tmp_path, capsys, bad):
    args = [
        *COMMON,
        *uneven_data(tmp_path),
        f"trainer.dataloader_workers={bad}",
        f"output_dir={tmp_path / 'r'}",
    ]
    assert main(["train", *args]) == 2
    assert "trainer.dataloader_workers must be auto or an integer" in capsys.readouterr().err


def test_the_engine_copies_batches_without_a_sync(tmp_path):
    from lrft.train.engine import make_engine

    cfg = compose(["model=tiny_llama", "dataset.data_files.train=x.jsonl", f"output_dir={tmp_path}"])
    engine = make_engine(cfg, tmp_path)
    assert engine.accelerator.dataloader_config.non_blocking
