"""Every recipe composes and trains 2 steps with its model swapped for the tiny one; every method
trains through ``lrft train``'s loop on each tiny architecture and reloads with the same outputs."""

import json
import math
from pathlib import Path

import pytest
import torch

from lrft.config.compose import compose, group_options
from lrft.run.final import load_run
from lrft.train import train

TINY = {"classification": "tiny_roberta", "seq2seq": "tiny_t5", "causal": "tiny_llama"}
WORDS = ["good", "great", "bad", "awful"]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def data_files(tmp: Path, kind: str) -> list[str]:
    path = tmp / f"{kind}.jsonl"
    with path.open("w") as fh:
        for i in range(16):
            word = WORDS[i % 4]
            if kind == "glue":  # every GLUE column a recipe may read (sentence, or a pair)
                row = {"sentence": f"it was {word}", "sentence1": "it was", "sentence2": word, "label": i % 2}
            else:
                row = {"instruction": "Repeat the word.", "input": word, "output": word}
            fh.write(json.dumps(row) + "\n")
    return [f"dataset.data_files.train={path}", f"dataset.data_files.validation={path}"]


def quick(tmp: Path) -> list[str]:
    return [
        "trainer.max_steps=2",
        "trainer.batch_size=4",
        "trainer.eval_every=0",
        "trainer.progress=false",
        "dataset.max_eval_samples=4",
        "dataset.max_length=32",
        f"output_dir={tmp / 'run'}",
    ]


def test_recipes_start_with_their_command_and_package_line():
    for name in group_options("recipes"):
        lines = (Path(__file__).parent.parent / "recipes" / f"{name}.yaml").read_text().splitlines()
        assert lines[0] == f"# lrft train recipes={name}", name
        assert lines[1].startswith("# @package _global_"), name


@pytest.mark.parametrize("recipe", group_options("recipes"))
def test_recipe_trains_two_steps_on_the_tiny_model(tmp_path, recipe):
    full = compose([f"recipes={recipe}"])  # the real setup composes and validates as written
    tiny = TINY[full.model.task]
    overrides = [
        f"recipes={recipe}",
        f"model={tiny}",
        *data_files(tmp_path, full.dataset.kind),
        *quick(tmp_path),
    ]
    # only what the tiny model cannot take changes: PiSSA's r=128 exceeds its layers' rank, and
    # LoRA-GA's 64-batch estimate is tested elsewhere
    shrink = {"pissa": ["method.r=8", "method.alpha=8"], "lora_ga": ["method.init_batches=2"]}
    cfg = compose(overrides + shrink.get(full.method.name, []))
    assert cfg.method == full.method or full.method.name in shrink
    assert cfg.optimizer == full.optimizer and cfg.quantization == full.quantization
    result = train(cfg, tmp_path / "run")
    assert result.summary["steps"] == 2 and math.isfinite(result.summary["train_loss"])


@pytest.mark.parametrize("model", ["tiny_roberta", "tiny_t5", "tiny_llama"])
@pytest.mark.parametrize(
    "method",
    [
        ["method=dora"],
        ["method=pissa", "method.svd_niter=2"],
        ["method=lora_ga", "method.init_batches=2"],
        ["method=galore", "optimizer=galore_adamw", "method.rank=8"],
    ],
    ids=lambda m: m[0].split("=")[1],
)
def test_method_trains_and_reloads(tmp_path, model, method):
    kind = "instruction" if model == "tiny_llama" else "glue"
    dataset = ["dataset=quickstart"] if kind == "instruction" else ["dataset=glue/sst2"]
    cfg = compose([f"model={model}", *dataset, *data_files(tmp_path, kind), *method, *quick(tmp_path)])
    result = train(cfg, tmp_path / "run")
    loaded = load_run(tmp_path / "run")
    ids = torch.tensor([[1, 77, 88, 225, 91, 69, 87, 2]])
    extra = {"decoder_input_ids": ids} if model == "tiny_t5" else {}
    result.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.model(input_ids=ids, **extra).logits, result.model(input_ids=ids, **extra).logits
        )
