"""End to end: each tiny model trains with full, lora and lora_fa, and the run folder is complete."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file

from lrft.cli.main import main
from lrft.config.compose import compose
from lrft.methods import LowRankLinear, get_method
from lrft.model.load import byte_tokenizer, load_model
from lrft.train import train

WORDS_POS = ["good", "great", "fine", "nice", "happy", "bright"]
WORDS_NEG = ["bad", "awful", "sad", "poor", "ugly", "dark"]


def sentiment_file(path: Path, n: int = 64) -> Path:
    """A learnable SST-2-style set: the label is which word list the sentence uses."""
    g = torch.Generator().manual_seed(0)
    with path.open("w") as fh:
        for i in range(n):
            label = i % 2
            words = WORDS_POS if label else WORDS_NEG
            w = words[int(torch.randint(len(words), (1,), generator=g))]
            fh.write(json.dumps({"sentence": f"it was {w}", "label": label}) + "\n")
    return path


def instruction_file(path: Path, n: int = 64) -> Path:
    with path.open("w") as fh:
        for i in range(n):
            word = ["cat", "dog", "sun", "map"][i % 4]
            fh.write(
                json.dumps(
                    {"instruction": "Write the word in capitals.", "input": word, "output": word.upper()}
                )
                + "\n"
            )
    return path


def overrides_for(model: str, tmp: Path) -> list[str]:
    if model == "tiny_llama":
        data = instruction_file(tmp / "inst.jsonl")
        return [
            f"model={model}",
            "dataset=quickstart",
            f"dataset.data_files.train={data}",
            f"dataset.data_files.validation={data}",
        ]
    data = sentiment_file(tmp / "sst2.jsonl")
    return [
        f"model={model}",
        "dataset=glue/sst2",
        f"dataset.data_files.train={data}",
        f"dataset.data_files.validation={data}",
    ]


def run(tmp: Path, overrides: list[str]):
    cfg = compose([*overrides, f"output_dir={tmp / 'run'}", "trainer.progress=false"])
    return cfg, train(cfg, tmp / "run")


def losses(run_dir: Path) -> list[float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "loss" in r]


@pytest.mark.parametrize("method", ["full", "lora", "lora_fa"])
@pytest.mark.parametrize("model", ["tiny_llama", "tiny_roberta", "tiny_t5"])
def test_loss_goes_down(tmp_path, model, method):
    extra = [
        "trainer.max_steps=40",
        "trainer.batch_size=8",
        "trainer.log_every=1",
        "trainer.eval_every=0",
        f"method={method}",
        "optimizer.lr=" + ("3e-3" if method == "full" else "1e-2"),
    ]
    _cfg, result = run(tmp_path, overrides_for(model, tmp_path) + extra)
    seen = losses(tmp_path / "run")
    assert len(seen) == 40
    first, last = sum(seen[:4]) / 4, sum(seen[-4:]) / 4
    assert last < 0.9 * first, f"{model}/{method}: loss {first:.3f} -> {last:.3f}"
    assert result.summary["eval"]["n"] == 64


def test_lora_fa_trains_only_b(tmp_path):
    overrides = [*overrides_for("tiny_llama", tmp_path), "trainer.max_steps=5", "method=lora_fa"]
    cfg, result = run(tmp_path, overrides)
    # rebuild the starting point exactly as train() does: same seed, same order of draws
    set_seed(cfg.trainer.seed)
    start = load_model(cfg.model)
    method = get_method("lora_fa")(__import__("omegaconf").OmegaConf.to_object(cfg.method))
    start = method.apply(start, {"target_modules": list(cfg.model.target_modules), "modules_to_save": []})
    trained = dict(result.model.named_parameters())
    b_changed = 0
    for name, p in start.named_parameters():
        if name.endswith("lora_B"):
            b_changed += not torch.equal(p, trained[name])
        else:  # A and every base weight: bit-identical
            assert torch.equal(p, trained[name]), name
    assert b_changed == sum(isinstance(m, LowRankLinear) for m in start.modules())
    saved = load_file(tmp_path / "run" / "final" / "trainable.safetensors")
    assert set(saved) == {n for n, _ in start.named_parameters() if "lora_" in n}
    for name, value in saved.items():
        assert torch.equal(value, trained[name])


def test_run_folder_has_config_versions_metrics_and_final_state(tmp_path):
    overrides = [
        *overrides_for("tiny_roberta", tmp_path),
        "trainer.max_steps=4",
        "trainer.save_every=2",
        "trainer.log_every=2",
        "trainer.eval_every=2",
    ]
    run(tmp_path, overrides)
    rd = tmp_path / "run"
    info = json.loads((rd / "run_info.json").read_text())
    assert info["versions"]["torch"] and info["versions"]["transformers"]
    assert "model: tiny_roberta" not in (rd / "config.yaml").read_text()  # resolved, nested
    assert "name: tiny_roberta" in (rd / "config.yaml").read_text()
    records = [json.loads(x) for x in (rd / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "lr", "tokens_per_s"} <= set(records[1]) or {"loss", "lr"} <= set(records[0])
    assert any("eval/accuracy" in r for r in records)
    assert (rd / "checkpoints" / "step-00000002" / "COMPLETE").exists()
    final = rd / "final"
    assert (final / "COMPLETE").exists() and (final / "trainable.safetensors").exists()
    saved = load_file(final / "trainable.safetensors")
    assert any(k.startswith("classifier.") for k in saved)  # the head trains and is saved
    assert json.loads((final / "lrft.json").read_text())["method"]["name"] == "lora_fa"


def test_full_saves_a_transformers_model(tmp_path):
    run(tmp_path, [*overrides_for("tiny_t5", tmp_path), "trainer.max_steps=2", "method=full"])
    from transformers import AutoModelForSeq2SeqLM

    AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "run" / "final")


def test_local_folder_through_from_pretrained(tmp_path):
    """model.name_or_path=DIR exercises the real loading code (hub ids use the same call)."""
    cfg = compose(["model=tiny_llama"])
    model = load_model(cfg.model)
    model.save_pretrained(tmp_path / "base")
    byte_tokenizer("llama").save_pretrained(tmp_path / "base")
    overrides = [
        *overrides_for("tiny_llama", tmp_path),
        f"model.name_or_path={tmp_path / 'base'}",
        "model.tokenizer=null",
        "model.dtype=bfloat16",
        "trainer.max_steps=2",
    ]
    _, result = run(tmp_path, overrides)
    assert result.model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert result.model.model.layers[0].self_attn.q_proj.lora_B.dtype == torch.float32


def test_mixed_precision_and_gradient_checkpointing(tmp_path):
    overrides = [
        *overrides_for("tiny_llama", tmp_path),
        "trainer.max_steps=3",
        "trainer.mixed_precision=bf16",
        "trainer.gradient_checkpointing=1",  # one of the two blocks
        "trainer.grad_accum=2",
    ]
    _, result = run(tmp_path, overrides)
    assert [b.gradient_checkpointing for b in result.model.model.layers] == [True, False]
    assert result.summary["steps"] == 3 and result.summary["train_loss"] == result.summary["train_loss"]


def test_bad_data_file_exits_2_naming_file_and_row(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"sentence": "ok", "label": 1}\n{"sentence": "no label"}\n')
    code = main(
        [
            "train",
            "model=tiny_roberta",
            "dataset=glue/sst2",
            f"dataset.data_files.train={bad}",
            f"dataset.data_files.validation={bad}",
            f"output_dir={tmp_path / 'r'}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "bad.jsonl" in err and "row 2" in err and "label" in err and "Traceback" not in err


def test_missing_data_file_exits_2(tmp_path, capsys):
    code = main(["train", f"dataset.data_files.train={tmp_path / 'nope.jsonl'}", f"output_dir={tmp_path}/r"])
    assert code == 2 and "nope.jsonl" in capsys.readouterr().err


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lrft", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_quickstart_command_runs_offline(tmp_path):
    proc = run_cli(["train", "trainer.max_steps=6", "trainer.eval_every=3"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "final" / "trainable.safetensors").exists()
    assert (run_dir / ".hydra" / "overrides.yaml").exists()
    assert "run summary" in proc.stderr


def test_sweep_makes_one_run_folder_per_job(tmp_path):
    proc = run_cli(
        [
            "train",
            "-m",
            "method=lora,lora_fa",
            "trainer.max_steps=2",
            "trainer.eval_every=0",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    jobs = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert len(jobs) == 2 and "lora_fa" in jobs[1]
    for job in jobs:
        assert (tmp_path / "sweep" / job / "final" / "COMPLETE").exists()


@pytest.mark.parametrize("method", ["lora_fa", "full"])
def test_a_finished_run_reloads_with_the_same_outputs(tmp_path, method):
    from lrft.run.final import load_run

    _, result = run(
        tmp_path, [*overrides_for("tiny_roberta", tmp_path), "trainer.max_steps=3", f"method={method}"]
    )
    loaded = load_run(tmp_path / "run")
    ids = torch.tensor([[1, 77, 88, 225, 91, 69, 87, 2]])
    result.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, result.model(input_ids=ids).logits)


def test_tensorboard_logging_through_accelerate(tmp_path):
    pytest.importorskip("tensorboard")
    run(
        tmp_path,
        [
            *overrides_for("tiny_llama", tmp_path),
            "trainer.max_steps=2",
            "trainer.log_every=1",
            "trainer.report_to=tensorboard",
        ],
    )
    assert list((tmp_path / "run").rglob("events.out.tfevents.*"))


def test_logged_tokens_per_second_leave_out_evaluation_and_checkpoints(monkeypatch):
    """A 3 s log window with a 1.5 s evaluation inside: its tokens/s are over the 1.5 s of
    training, and the run's summary adds windows up the same way."""
    from types import SimpleNamespace

    from lrft.train import callbacks
    from lrft.train.step import StepResult

    # window start, evaluation start and end, flush, next window's start
    clock = iter([0.0, 1.0, 2.5, 3.0, 3.0])
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: next(clock))
    acc = SimpleNamespace(device=torch.device("cpu"), is_main_process=False, num_processes=1)
    bar = SimpleNamespace(update=lambda *a, **k: None)
    logger = callbacks.Logger(acc, Path("unused"), SimpleNamespace(report_to=None), bar)
    one, real, padded = torch.tensor(1.0), torch.tensor(300.0), torch.tensor(400.0)
    logger.add(StepResult(loss_sum=one, count=one, real_tokens=real, padded_tokens=padded, bad=one * 0))
    with logger.paused():
        pass
    state = SimpleNamespace(last_loss=None, pos=SimpleNamespace(step=1), steps_per_epoch=1, skipped=0)
    logger.flush(state, lr=1e-4, scale=None)
    assert logger.throughput() == pytest.approx({"tokens_per_s": 300 / 1.5, "padding": 0.25})
