"""trainer.report_to through accelerate's trackers, each checked offline for the metrics it wrote;
and the loss plots (lrft.run.plots, ``lrft plot``)."""

import json
import time
from pathlib import Path

import pytest

from lrft.cli.main import main
from lrft.config.compose import compose
from lrft.errors import UserError
from lrft.run.plots import curve, plot_runs, read_metrics, write_loss_plot
from lrft.train import train

STEPS = 4


def tiny_run(tmp: Path, report_to: str) -> Path:
    data = tmp / "inst.jsonl"
    rows = [{"instruction": "Capitalise.", "input": w, "output": w.upper()} for w in ("cat", "dog") * 8]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_dir = tmp / "run"
    cfg = compose(
        [
            f"dataset.data_files.train={data}",
            f"dataset.data_files.validation={data}",
            f"trainer.max_steps={STEPS}",
            "trainer.log_every=1",
            "trainer.eval_every=2",
            f"trainer.report_to={report_to}",
            "trainer.progress=false",
            f"output_dir={run_dir}",
        ]
    )
    train(cfg, run_dir)
    return run_dir


def logged_losses(run_dir: Path) -> dict[int, float]:
    return dict(zip(*curve(read_metrics(run_dir), "loss"), strict=True))


def test_report_to_is_validated(monkeypatch):
    with pytest.raises(UserError, match=r"report_to='wandbb' is not valid.*Did you mean: wandb"):
        compose(["trainer.report_to=wandbb"])
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_mlflow_available", lambda: False)
    with pytest.raises(UserError, match="needs the mlflow-skinny package: pip install mlflow-skinny"):
        compose(["trainer.report_to=mlflow"])


def test_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tiny_run(tmp_path, "tensorboard")
    scalars = {}
    for folder in {p.parent for p in run_dir.rglob("events.out.tfevents.*")}:  # hparams get their own
        acc = EventAccumulator(str(folder))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars[tag] = {e.step: e.value for e in acc.Scalars(tag)}
    assert scalars["loss"] == pytest.approx(logged_losses(run_dir), rel=1e-6)
    assert sorted(scalars["eval/loss"]) == [0, 2, 4]


def wandb_history(path: Path) -> list[dict]:
    """The history rows of an offline run file. wandb ships no reader for it any more; the format
    is a LevelDB-style log: a 7-byte ':W&B' header, then 32 KiB blocks of chunks, each with a
    7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) around a protobuf."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending, rows = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # block padding
            pos += left
            continue
        if pos + 7 + length > len(data):  # the writer is mid-record
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                )
    return rows


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tiny_run(tmp_path, "wandb")
    (log,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    expected = logged_losses(run_dir)
    for _ in range(30):  # wandb's service process may still be flushing the file after finish()
        history = wandb_history(log)
        got = {row["_step"]: row["loss"] for row in history if "loss" in row}
        if len(got) == len(expected):
            break
        time.sleep(0.5)
    assert got == pytest.approx(expected, rel=1e-6)
    assert sorted(row["_step"] for row in history if "eval/loss" in row) == [0, 2, 4]


def test_mlflow_file_store(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 keeps the file store opt-in
    run_dir = tiny_run(tmp_path, "mlflow")
    client = MlflowClient(store.as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "lrft"]
    (run,) = client.search_runs([experiment.experiment_id])
    got = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert got == pytest.approx(logged_losses(run_dir), rel=1e-6)
    assert run.data.params["trainer.max_steps"] == str(STEPS)


# --- plots --------------------------------------------------------------------------------------


def fake_run(folder: Path, records: list[dict]) -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 9, "lo')
    return folder


def test_loss_plot_of_a_run(tmp_path):
    from PIL import Image

    run = fake_run(
        tmp_path / "run",
        [{"step": 0, "eval/loss": 3.0, "eval/accuracy": 0.5}]
        + [{"step": s, "loss": 3.0 / s, "lr": 1e-3} for s in range(1, 9)]
        + [{"step": 8, "eval/loss": 1.0, "eval/accuracy": 0.75, "eval/n": 10}],
    )
    records = read_metrics(run)  # the half-written last line is skipped
    assert curve(records, "eval/loss") == ([0, 8], [3.0, 1.0])
    png = write_loss_plot(run)
    assert png == run / "loss.png"
    width, height = Image.open(png).size
    assert width > 1.8 * height  # the accuracy got its own panel next to the losses
    assert write_loss_plot(fake_run(tmp_path / "empty", [])) is None


def test_plot_command_overlays_runs(tmp_path, capsys):
    from PIL import Image

    a = fake_run(tmp_path / "a" / "run", [{"step": s, "loss": 1 / s} for s in range(1, 5)])
    b = fake_run(
        tmp_path / "b" / "run", [{"step": s, "loss": 2 / s, "eval/f1": 0.1 * s} for s in range(1, 5)]
    )
    out = tmp_path / "both.png"
    assert main(["plot", str(a), str(b), "--out", str(out)]) == 0
    assert Image.open(out).size[0] > 0
    assert main(["plot", str(b), "--metric", "f1", "--out", str(tmp_path / "f1.png")]) == 0
    assert main(["plot", str(a), "--metric", "accuracy", "--out", str(tmp_path / "x.png")]) == 2
    assert "No run has the metric 'accuracy'. Metrics in these runs: loss" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "nope")]) == 2
    with pytest.raises(UserError, match=r"no metrics\.jsonl"):
        plot_runs([tmp_path], tmp_path / "y.png")


def test_real_run_gets_a_readable_plot(tmp_path):
    run_dir = tiny_run(tmp_path, "null")
    png = write_loss_plot(run_dir)
    assert png is not None and png.stat().st_size > 5000
