"""``lrft merge`` end to end: every registered method on the three tiny architectures is trained a few
steps, merged, and reloaded by plain transformers in a process that never imports lrft; its logits
must match the adapter model's (``load_run``), and the PEFT export loaded by ``peft`` must too."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from lrft.cli.merge import merge_main
from lrft.config.compose import compose, group_options
from lrft.errors import UserError
from lrft.export.merge import MergeOptions, dequantize_rest, logits, merge_run
from lrft.export.peft import write_peft_adapter
from lrft.methods import METHODS
from lrft.model.load import byte_tokenizer, load_model
from lrft.run.final import load_run
from lrft.run.output import MARKER, SHARD_DELAY_ENV
from lrft.train import train

MODELS = ("tiny_llama", "tiny_roberta", "tiny_t5")
TASKS = {"tiny_llama": "causal", "tiny_roberta": "classification", "tiny_t5": "seq2seq"}
FAST = [
    "trainer.max_steps=3",
    "optimizer.lr=1e-2",  # B moves well away from zero in 3 steps: the merge has something to fold
    "trainer.batch_size=4",
    "trainer.log_every=1",
    "trainer.progress=false",
    "dataset.max_train_samples=8",
    "dataset.max_eval_samples=0",
    "dataset.max_length=32",
]
# GaLore needs its own optimizer; one calibration batch is enough for LoRA-GA's init here
EXTRA = {"galore": ["optimizer=galore_adamw", "method.rank=4"], "lora_ga": ["method.init_batches=1"]}
QUANTIZED = "nf4" in group_options("quantization")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine they lose a lot."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def data_overrides(tmp: Path, model: str) -> list[str]:
    """Tiny local data files: instructions for the causal LM, sentiment labels for the others."""
    if model == "tiny_llama":
        path = tmp / "inst.jsonl"
        rows = [
            {"instruction": "Shout it.", "input": w, "output": w.upper()} for w in ["cat", "dog", "sun"] * 4
        ]
        dataset = "quickstart"
    else:
        path = tmp / "sst2.jsonl"
        rows = [{"sentence": f"it was {w}", "label": i % 2} for i, w in enumerate(["bad", "good"] * 6)]
        dataset = "glue/sst2"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    files = [f"dataset.data_files.train={path}", f"dataset.data_files.validation={path}"]
    return [f"model={model}", f"dataset={dataset}", *files]


def train_run(tmp: Path, model: str, method: str, extra: tuple[str, ...] = (), name: str = "") -> Path:
    run_dir = tmp / (name or f"{model}-{method}")
    overrides = [*data_overrides(tmp, model), f"method={method}", *FAST, *EXTRA.get(method, []), *extra]
    train(compose([*overrides, f"output_dir={run_dir}"]), run_dir)
    return run_dir


def probe(task: str) -> dict[str, torch.Tensor]:
    """Random byte ids, one padded row: not the text the merge verifies itself with."""
    ids = torch.randint(5, 261, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    if task == "seq2seq":
        batch["decoder_input_ids"] = torch.cat([torch.zeros(2, 1, dtype=torch.long), ids[:, :4]], dim=1)
    return batch


# Run with `python -c`, started before training so its imports overlap it: it imports transformers,
# safetensors and peft, never lrft, then reads the jobs from stdin.
RELOAD = r"""
import json, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
import transformers as tf
from peft import PeftModel
from safetensors import safe_open

AUTO = {"causal": tf.AutoModelForCausalLM, "classification": tf.AutoModelForSequenceClassification,
        "seq2seq": tf.AutoModelForSeq2SeqLM}

def run(model, batch):
    with torch.no_grad():
        return model.eval()(**batch).logits.float()

jobs, out = json.load(sys.stdin), {}
for job in jobs["jobs"]:
    auto, batch = AUTO[job["task"]], torch.load(job["batch"])
    merged = auto.from_pretrained(job["merged"])
    keys = [k for f in Path(job["merged"]).glob("*.safetensors") for k in safe_open(str(f), "pt").keys()]
    config = json.loads(Path(job["merged"], "config.json").read_text())
    base = auto.from_pretrained(job["base"])
    r = {"merged": run(merged, batch), "base": run(base, batch), "peft": None,
         "bad_keys": [k for k in keys if "base_layer" in k or "lora_" in k or "adapter" in k],
         "dtypes": sorted({str(p.dtype) for p in merged.parameters()}),
         "quantization_config": "quantization_config" in config}
    if job["adapter"]:
        config = json.loads(Path(job["adapter"], "adapter_config.json").read_text())
        assert Path(config["base_model_name_or_path"]) == Path(job["base"]), config
        r["peft"] = run(PeftModel.from_pretrained(base, job["adapter"]), batch)
    out[job["id"]] = r
out["lrft imported"] = any(m == "lrft" or m.startswith("lrft.") for m in sys.modules)
torch.save(out, jobs["out"])
"""


def start_reloader(tmp: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", RELOAD], stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp
    )


def reload_without_lrft(proc: subprocess.Popen, tmp: Path, jobs: list[dict]) -> dict:
    _, err = proc.communicate(json.dumps({"jobs": jobs, "out": str(tmp / "out.pt")}), timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return torch.load(tmp / "out.pt")


def add_job(
    jobs: list, refs: dict, tmp: Path, key: str, run_dir: Path, merged: Path, dense: bool = False
) -> None:
    """Queue ``merged`` for the lrft-free reload; its reference is the adapter model (``load_run``),
    with ``dense`` its quantized layers replaced by their float32 dequantization."""
    loaded = load_run(run_dir)
    task = loaded.cfg.model.task
    batch = probe(task)
    torch.save(batch, tmp / f"{key}.batch.pt")
    if dense:
        dequantize_rest(loaded.model, torch.float32)
    refs[key] = logits(loaded.model, batch)
    adapter = run_dir / "adapter"  # written by every run once save_final calls write_peft_adapter
    if not (adapter / "adapter_config.json").is_file():
        adapter = write_peft_adapter(loaded.model, loaded.method, loaded.cfg, tmp / f"{key}.adapter")
    base = loaded.cfg.model.name_or_path or str(run_dir / "base")
    jobs.append(
        {"id": key, "task": task, "batch": str(tmp / f"{key}.batch.pt"), "merged": str(merged), "base": base}
        | {"adapter": str(adapter) if adapter else None}
    )


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Train, merge and export every (model, method); reload everything in ONE lrft-free process."""
    tmp = tmp_path_factory.mktemp("merge")
    proc = start_reloader(tmp)
    jobs: list[dict] = []
    refs: dict[str, torch.Tensor] = {}
    records: dict[str, dict] = {}
    for model in MODELS:
        for method in METHODS:
            key = f"{model}-{method}"
            run_dir = train_run(tmp, model, method)
            records[key] = merge_run(run_dir, tmp / f"{key}.merged")
            add_job(jobs, refs, tmp, key, run_dir, tmp / f"{key}.merged")
    if QUANTIZED:
        # QLoRA (nf4, float32 matmuls) on a full-precision local base: merge into that base, or into
        # the dequantized one training saw
        base = tmp / "fp-base"
        load_model(compose(["model=tiny_llama"]).model).save_pretrained(base)
        byte_tokenizer("llama").save_pretrained(base)
        extra = (f"model.name_or_path={base}", "model.tokenizer=null", "quantization=nf4")
        run_dir = train_run(
            tmp, "tiny_llama", "lora", (*extra, "quantization.compute_dtype=float32"), "qlora"
        )
        for mode in ("original", "dequantized"):
            records[f"nf4-{mode}"] = merge_run(run_dir, tmp / f"nf4-{mode}", MergeOptions(base=mode))
            add_job(jobs, refs, tmp, f"nf4-{mode}", run_dir, tmp / f"nf4-{mode}")
        # int8 LoRA-FA on a random-init base (the run keeps it in full precision): both merges
        run_dir = train_run(tmp, "tiny_llama", "lora_fa", ("quantization=int8",), "int8")
        for mode in ("original", "dequantized"):
            records[f"int8-{mode}"] = merge_run(run_dir, tmp / f"int8-{mode}", MergeOptions(base=mode))
            add_job(
                jobs, refs, tmp, f"int8-{mode}", run_dir, tmp / f"int8-{mode}", dense=mode == "dequantized"
            )
        # a base stored quantized has no full precision to merge into: only the dequantized merge
        prequantized = tmp / "prequantized"
        shutil.copytree(run_dir, prequantized, ignore=shutil.ignore_patterns("base"))
        quantize = BitsAndBytesConfig(load_in_4bit=True)
        AutoModelForCausalLM.from_pretrained(run_dir / "base", quantization_config=quantize).save_pretrained(
            prequantized / "base"
        )
        with pytest.raises(UserError, match=r"stored quantized.*merge\.base=dequantized"):
            merge_run(prequantized, tmp / "prequantized.merged")
    return refs, reload_without_lrft(proc, tmp, jobs), records


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("model", MODELS)
def test_merged_model_loads_without_lrft_and_matches_the_adapter_model(cases, model, method):
    refs, out, records = cases
    key = f"{model}-{method}"
    got = out[key]
    assert out["lrft imported"] is False
    assert got["bad_keys"] == [] and got["dtypes"] == ["torch.float32"]
    torch.testing.assert_close(got["merged"], refs[key], atol=1e-4, rtol=1e-4)
    # not vacuous: what was merged moves the logits far more than the tolerance
    assert (got["merged"] - got["base"]).abs().max() > 1e-2, key
    assert records[key]["verified"] and records[key]["max_logit_diff"] < 1e-4


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("model", MODELS)
def test_peft_loads_the_exported_adapter_with_the_same_outputs(cases, model, method):
    refs, out, _ = cases
    got = out[f"{model}-{method}"]
    if getattr(METHODS[method].cls, "full_weights", False):
        assert got["peft"] is None  # nothing to export: the trained weights are the model
        pytest.skip(f"{method} trains the weights themselves: no adapter")
    torch.testing.assert_close(got["peft"], refs[f"{model}-{method}"], atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not QUANTIZED, reason="quantization configs (nf4) are not in this checkout yet")
def test_quantized_runs_merge_into_a_full_precision_model(cases):
    refs, out, records = cases
    for key in ("nf4-original", "nf4-dequantized", "int8-original", "int8-dequantized"):
        got, rec = out[key], records[key]
        assert (rec["quantization"], rec["base"], rec["verified"]) == (*key.split("-"), True)
        assert got["dtypes"] == ["torch.float32"] and not got["quantization_config"]  # never a 4-bit model
        assert got["bad_keys"] == []
    exact = {"atol": 1e-4, "rtol": 1e-4}
    # the dequantized merge is exactly the model training saw (nf4 with float32 matmuls) ...
    torch.testing.assert_close(out["nf4-dequantized"]["merged"], refs["nf4-dequantized"], **exact)
    # ... and, for int8, that model's weights (its int8 matmuls also round the activations)
    torch.testing.assert_close(out["int8-dequantized"]["merged"], refs["int8-dequantized"], **exact)
    for quant in ("nf4", "int8"):
        # the original merge adds the same adapter to the unquantized weights instead: what PEFT
        # computes with the exported adapter on that base (nothing of lrft involved)
        original, dequantized = out[f"{quant}-original"], out[f"{quant}-dequantized"]
        torch.testing.assert_close(original["merged"], original["peft"], **exact)
        assert (original["merged"] - dequantized["merged"]).abs().max() > 1e-3


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("lora")
    return train_run(tmp, "tiny_llama", "lora_fa")


def test_refuses_a_non_empty_output_unless_overwrite(lora_run, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert merge_main([f"checkpoint={lora_run}", f"output={out}"]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "merge.overwrite=true" in err and (out / "keep.txt").read_text() == "mine"
    # a folder lrft did not write is never replaced, even when asked
    args = [f"checkpoint={lora_run}/final", f"output={out}", "merge.overwrite=true", "merge.dtype=bfloat16"]
    assert merge_main(args) == 2
    err = capsys.readouterr().err
    assert "keep.txt" in err and "nothing was removed" in err and (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    assert merge_main(args) == 0  # empty now
    assert (out / "config.json").exists() and (out / MARKER).exists()
    record = json.loads((out / "lrft_merge.json").read_text())
    assert record["dtype"] == "bfloat16" and record["verified"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left
    assert merge_main(args) == 0  # lrft's own output: replaced
    (out / "notes.txt").write_text("added by hand")
    assert merge_main(args) == 2  # ... but not once something else was added
    assert "notes.txt" in capsys.readouterr().err and (out / "notes.txt").read_text() == "added by hand"
    assert (out / "config.json").exists()


def test_a_broken_merge_fails_verification_and_writes_nothing(lora_run, tmp_path, monkeypatch):
    from lrft.methods.layers import LowRankLinear

    # a merge that forgot the adapters: the probe batch must catch it
    monkeypatch.setattr(LowRankLinear, "delta", lambda self: torch.zeros(self.out_features, self.in_features))
    with pytest.raises(UserError, match="differ from the adapter model"):
        merge_run(lora_run, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_refuses_when_the_disk_is_too_small(lora_run, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(UserError, match="GiB free"):
        merge_run(lora_run, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_a_killed_merge_leaves_no_output(lora_run, tmp_path):
    out = tmp_path / "out"
    code = "import sys; from lrft.cli.merge import merge_main; sys.exit(merge_main(sys.argv[1:]))"
    args = [f"checkpoint={lora_run}", f"output={out}", "merge.max_shard_size=200KB", "merge.verify=false"]
    env = dict(os.environ, **{SHARD_DELAY_ENV: "30"})
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args], stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path
    )
    try:
        deadline = time.monotonic() + 120
        line = ""
        while "wrote shard" not in line and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "merge ended before writing a shard"
        proc.send_signal(signal.SIGKILL)  # mid-write: one shard on disk, the rest not
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "wrote shard" in line
    assert not out.exists()
    staging = [p for p in tmp_path.iterdir() if p.name == f".tmp-out-{proc.pid}"]  # lrft.run.atomic's name
    assert staging and any(staging[0].glob("*.safetensors"))  # the half-written shards stayed hidden
    assert merge_main([f"checkpoint={lora_run}", f"output={out}", "merge.verify=false"]) == 0
    assert out.is_dir() and not staging[0].exists()  # the next merge cleans up after the killed one


def test_command_line_errors_exit_2(tmp_path, capsys):
    assert merge_main(["--help"]) == 0 and "merge.dtype" in capsys.readouterr().out
    assert merge_main([f"output={tmp_path}/o"]) == 2 and "checkpoint=" in capsys.readouterr().err
    assert merge_main(["checkpoint=x", "output=y", "merge.dtyp=float16"]) == 2
    assert "Did you mean: dtype" in capsys.readouterr().err
    assert merge_main(["checkpoint=x", "output=y", "merge.verify=maybe"]) == 2
    assert "merge.verify" in capsys.readouterr().err
    assert merge_main([f"checkpoint={tmp_path}", f"output={tmp_path}/o"]) == 2
    assert "not an lrft run" in capsys.readouterr().err


def test_never_overwrites_the_run_it_reads(lora_run, capsys):
    args = [f"checkpoint={lora_run}", f"output={lora_run.parent}", "merge.overwrite=true"]
    assert merge_main(args) == 2 and "would replace" in capsys.readouterr().err
    assert (lora_run / "final" / "COMPLETE").exists()
