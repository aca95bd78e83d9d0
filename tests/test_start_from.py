"""``lrft train checkpoint=SFT_RUN`` (issue 23): a run starts from a finished run's model MERGED, so
the DPO reference (the model with its adapters off) is the SFT model, not the pretrained base."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from test_loop_invariants import max_diff
from test_preference import pairs

from lrft.cli.main import main
from lrft.methods.layers import adapters_off
from lrft.run.final import load_run
from lrft.train import faults

COMMON = ["trainer.log_every=1", "trainer.eval_every=0", "trainer.progress=false", "trainer.max_grad_norm=0",
          "trainer.batch_size=4"]  # fmt: skip
PROBE = torch.tensor([[1, 40, 77, 90, 120, 33, 8, 200, 150], [1, 60, 61, 62, 63, 64, 65, 66, 67]])


def instructions(tmp: Path) -> list[str]:
    path = tmp / "inst.jsonl"
    with path.open("w") as fh:
        for i in range(16):
            word = ["cat", "dog", "sun", "map"][i % 4] + "s" * (i % 3)
            fh.write(json.dumps({"instruction": "Upper case.", "input": word, "output": word.upper()}) + "\n")
    return [f"dataset.data_files.train={path}", f"dataset.data_files.validation={path}"]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """The SFT run (LoRA on instruction data, checkpoints at steps 2 and 4) and the DPO run started
    from it, trained once for the module."""
    tmp = tmp_path_factory.mktemp("start_from")
    sft = ["model=tiny_llama", "method=lora", *COMMON, *instructions(tmp), "trainer.max_steps=4",
           "trainer.save_every=2", "optimizer.lr=2e-2", f"output_dir={tmp / 'sft'}"]  # fmt: skip
    assert main(["train", *sft]) == 0
    assert main(["train", *dpo_args(tmp, tmp / "dpo")]) == 0
    return tmp


def dpo_args(tmp: Path, out: Path) -> list[str]:
    return [f"checkpoint={tmp / 'sft'}", "objective=dpo", "dataset=preference", *COMMON, *pairs(tmp, 8),
            "trainer.max_steps=3", "trainer.save_every=1", "optimizer.lr=1e-2",
            f"output_dir={out}"]  # fmt: skip


@torch.no_grad()
def probe(model: torch.nn.Module) -> torch.Tensor:
    return model.eval()(input_ids=PROBE).logits.float()


def test_dpo_from_sft_has_the_sft_model_as_reference(work, capsys):
    sft, dpo = work / "sft", work / "dpo"
    first = json.loads((dpo / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # π = π_ref = the SFT model at step 0
    run = load_run(dpo)  # the DPO run: the merged start in dpo/base plus its trained lora_fa adapter
    with adapters_off(run.model) as n:
        reference = probe(run.model)
    assert n > 0
    sft_model = probe(load_run(sft).model)  # the SFT run: its base plus its trained LoRA adapter
    pretrained = probe(_base(sft))
    assert (reference - sft_model).abs().max() < 1e-5  # the reference IS the SFT model
    assert (reference - pretrained).abs().max() > 1e-2  # and not the pretrained base
    assert (probe(run.model) - reference).abs().max() > 1e-4  # the new adapter trained
    record = json.loads((dpo / "base" / "lrft_start.json").read_text())
    assert record["run"] == str(sft) and record["method"] == "lora" and record["step"] == 4
    cfg = (dpo / "config.yaml").read_text()
    assert f"run: {sft}" in cfg and f"name_or_path: {dpo / 'base'}" in cfg
    saved = json.loads((dpo / "run_info.json").read_text())["overrides"]
    assert f"start_from.run='{sft}'" in saved and not any(o.startswith("checkpoint=") for o in saved)


def _base(sft: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(sft / "base")  # the SFT run's pretrained (random) base


def test_an_interrupted_start_from_run_resumes_without_merging_again(work, monkeypatch, capsys):
    out = work / "stopped"
    monkeypatch.setattr(faults, "_SPEC", "interrupt_at_step:2")
    assert main(["train", *dpo_args(work, out)]) == 130
    merged = (out / "base" / "model.safetensors").stat().st_mtime_ns
    assert "MERGED" in capsys.readouterr().err
    monkeypatch.setattr(faults, "_SPEC", "")
    assert main(["train", f"output_dir={out}", "trainer.resume=auto"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "reused, not merged again" in err and "MERGED" not in err
    assert (out / "base" / "model.safetensors").stat().st_mtime_ns == merged
    from test_loop_invariants import final_state

    assert max_diff(final_state(out), final_state(work / "dpo")) == 0  # the uninterrupted run, exactly


def _unfinished(work: Path) -> Path:
    run = work / "unfinished"
    if not run.exists():
        shutil.copytree(work / "sft", run)
        shutil.rmtree(run / "final")
        (run / "summary.json").unlink()
    return run


def _classification(work: Path) -> Path:
    run = work / "classifier"
    if not run.exists():
        shutil.copytree(work / "sft", run)
        text = (run / "config.yaml").read_text().replace("task: causal", "task: classification")
        (run / "config.yaml").write_text(text)
    return run


@pytest.mark.parametrize(
    ("make", "extra", "says"),
    [
        (_unfinished, [], "is not a finished run (no final state, final/COMPLETE); its newest checkpoint is "
                          "step 2, so it needs a resume to finish: lrft train output_dir="),
        (lambda w: w / "sft" / "config.yaml", [], "is a file: give the folder of a finished lrft train run"),
        (lambda w: w / "nowhere", [], "does not exist"),
        (_classification, [], "is a classification run (model tiny_llama, dataset quickstart); "
                              "objective=dpo tunes a causal language model"),
        (lambda w: w / "sft", ["model=tiny_t5"], "model=tiny_t5 asks for another model. Drop model=tiny_t5"),
        (lambda w: w / "sft", ["model.tokenizer=gpt2"], "would change what that model is. Drop it"),
        (lambda w: w / "sft", ["start_from.run=/x"], "start_from.run is set by checkpoint=RUN, not a key"),
    ],
)  # fmt: skip
def test_bad_starts_exit_2_and_touch_nothing(work, capsys, make, extra, says):
    out = work / "refused"
    args = [a for a in dpo_args(work, out) if not a.startswith("checkpoint=")]
    assert main(["train", f"checkpoint={make(work)}", *args, *extra]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert says in err, err
    assert not out.exists() and (work / "sft" / "final" / "COMPLETE").is_file()
