"""The PEFT export: the files PEFT itself would write (key names, adapter_config fields), and the
``lrft export`` command. That PEFT then reproduces lrft's outputs is checked for every method and
model in tests/test_merge.py, in its lrft-free reload process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_merge import one_thread, train_run  # noqa: F401  (one_thread: autouse fixture)

from lrft.cli.export import export_main
from lrft.errors import UserError
from lrft.export.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, write_peft_adapter
from lrft.run.output import MARKER

peft = pytest.importorskip("peft")


def shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(folder / ADAPTER_WEIGHTS), framework="pt") as fh:
        return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118


def peft_reference(adapter: Path, task_auto, out: Path) -> Path:
    """What PEFT writes for the same LoraConfig on the same base: the format to match."""
    config = peft.LoraConfig.from_pretrained(str(adapter))
    base = task_auto.from_pretrained(config.base_model_name_or_path)
    peft.get_peft_model(base, config).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("export")
    return {
        "roberta-lora": train_run(tmp, "tiny_roberta", "lora"),  # classifier head: modules_to_save
        "llama-dora": train_run(tmp, "tiny_llama", "dora"),
    }


@pytest.mark.parametrize(
    ("run", "auto"),
    [("roberta-lora", "AutoModelForSequenceClassification"), ("llama-dora", "AutoModelForCausalLM")],
)
def test_files_are_what_peft_itself_writes(runs, tmp_path, run, auto):
    import transformers

    ours = tmp_path / "ours"
    assert export_main([f"checkpoint={runs[run]}", f"output={ours}"]) == 0
    ref = peft_reference(ours, getattr(transformers, auto), tmp_path / "peft")
    assert shapes(ours) == shapes(ref)  # same key names, same shapes
    mine = json.loads((ours / ADAPTER_CONFIG).read_text())
    theirs = json.loads((ref / ADAPTER_CONFIG).read_text())
    assert set(mine) <= set(theirs)
    for key in (
        "peft_type",
        "task_type",
        "r",
        "lora_alpha",
        "use_dora",
        "use_rslora",
        "base_model_name_or_path",
    ):
        assert mine[key] == theirs[key], key
    assert set(mine["target_modules"]) == set(theirs["target_modules"])
    assert set(mine["modules_to_save"] or []) <= set(theirs["modules_to_save"] or [])
    assert Path(mine["base_model_name_or_path"]) == runs[run] / "base"
    if run == "llama-dora":
        assert mine["use_dora"] and any(k.endswith("lora_magnitude_vector") for k in shapes(ours))
    else:
        assert mine["task_type"] == "SEQ_CLS" and mine["modules_to_save"] == ["classifier"]
        assert "base_model.model.classifier.out_proj.weight" in shapes(ours)
        assert mine["target_modules"] == ["query", "value"]


def test_export_refuses_a_non_empty_folder_and_full_weights(runs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    run = runs["roberta-lora"]
    assert export_main([f"checkpoint={run}", f"output={out}"]) == 2
    assert "not empty" in capsys.readouterr().err
    # export.overwrite=true replaces only what lrft wrote: a foreign file is never deleted
    assert export_main([f"checkpoint={run}/final", f"output={out}", "export.overwrite=true"]) == 2
    err = capsys.readouterr().err
    assert "notes.txt" in err and "nothing was removed" in err and (out / "notes.txt").read_text() == "keep"
    (out / "notes.txt").unlink()
    assert export_main([f"checkpoint={run}/final", f"output={out}"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [MARKER, ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    assert export_main([f"checkpoint={run}", f"output={out}"]) == 2  # no silent replace
    assert "export.overwrite=true" in capsys.readouterr().err
    assert export_main([f"checkpoint={run}", f"output={out}", "export.overwrite=true"]) == 0
    assert export_main([f"checkpoint={run}", f"output={out}", "overwrite=true"]) == 2  # one spelling
    assert "Unknown config key 'overwrite'" in capsys.readouterr().err
    full = train_run(tmp_path, "tiny_roberta", "full")
    assert export_main([f"checkpoint={full}", f"output={tmp_path / 'f'}"]) == 2
    assert "no adapter" in capsys.readouterr().err and not (tmp_path / "f").exists()
    assert export_main(["--help"]) == 0 and "export.overwrite" in capsys.readouterr().out


def test_a_layer_whose_factors_do_not_reproduce_its_update_is_refused(runs, tmp_path, monkeypatch):
    from lrft.methods.layers import LowRankLinear
    from lrft.run.final import load_run

    loaded = load_run(runs["roberta-lora"])
    # a variant whose update is not the s·B·A of the factors it exports would be exported silently wrong
    monkeypatch.setattr(LowRankLinear, "delta", lambda self: torch.zeros(self.out_features, self.in_features))
    with pytest.raises(UserError, match="do not reproduce"):
        write_peft_adapter(loaded.model, loaded.method, loaded.cfg, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_full_weight_methods_have_no_adapter(runs, tmp_path):
    from lrft.methods import get_method

    model = torch.nn.Linear(2, 2)
    assert write_peft_adapter(model, get_method("full")(None), None, tmp_path / "a") is None
    assert not (tmp_path / "a").exists()


def test_layers_named_by_full_path_when_their_names_match_more_layers(tmp_path):
    """Only layer 0's q_proj is adapted: "q_proj" would make PEFT adapt layer 1's too."""
    from transformers import AutoModelForCausalLM

    from lrft.export.merge import logits
    from lrft.run.final import load_run

    run = train_run(
        tmp_path, "tiny_llama", "lora", ("method.target_modules=[model.layers.0.self_attn.q_proj]",)
    )
    assert export_main([f"checkpoint={run}", f"output={tmp_path / 'a'}"]) == 0
    config = json.loads((tmp_path / "a" / ADAPTER_CONFIG).read_text())
    assert config["target_modules"] == ["model.layers.0.self_attn.q_proj"]
    batch = {
        "input_ids": torch.tensor([[1, 80, 90, 100, 110]]),
        "attention_mask": torch.ones(1, 5, dtype=torch.long),
    }
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    theirs = logits(peft.PeftModel.from_pretrained(base, str(tmp_path / "a")).eval(), batch)
    torch.testing.assert_close(theirs, logits(load_run(run).model, batch), atol=1e-5, rtol=1e-5)
