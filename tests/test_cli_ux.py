"""A CLI that starts fast and speaks once: no torch for help and config errors, effective defaults in
``lrft train --help``, versions, ``--info``, readable merge/export help, quiet third-party output,
offline hub ids refused at once, the run path never cut."""

from __future__ import annotations

import io
import re
import subprocess
import sys

import pytest
from rich.console import Console

from lrft.cli.help import _show, schema_rows, train_defaults
from lrft.cli.main import main
from lrft.config.compose import compose
from lrft.errors import UserError
from lrft.train.progress import summary_table


def test_help_and_config_errors_do_not_import_torch():
    code = (
        "import sys\n"
        "from lrft.cli.main import main\n"
        "codes = [main(['--help']), main(['train', '--help']), main(['memory', '--help']),\n"
        "         main(['train', 'method=lora_faa']),\n"
        "         main(['train', 'trainer.max_step=3']), main(['train', 'dataset=glue/sst2'])]\n"
        "heavy = [m for m in ('torch', 'transformers', 'datasets', 'accelerate') if m in sys.modules]\n"
        "print('CODES', codes, 'HEAVY', heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "CODES [0, 0, 0, 2, 2, 2] HEAVY []" in proc.stdout, proc.stdout[-800:] + proc.stderr[-2000:]
    assert "Did you mean: lora_fa" in proc.stderr and "Did you mean: max_steps" in proc.stderr
    assert "Combinations that work" in proc.stderr  # the full composition ran, still without torch


def test_train_help_shows_the_defaults_lrft_train_really_uses(capsys):
    cfg = compose([])
    choices, values = train_defaults()
    for group, option in choices.items():
        assert cfg[group].name == option.replace("/", "_") or option in str(cfg[group].name)
    for key, shown, _ in schema_rows(type(cfg.trainer._metadata.object_type()), "trainer.", values):
        real = cfg.trainer[key.removeprefix("trainer.")]
        assert shown == _show(real) or float(shown) == float(real), key
    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    for key in ("epochs", "batch_size", "eval_every"):
        row = re.search(rf"trainer\.{key}\s+│\s+(\S+)", text)
        assert row and float(row.group(1)) == float(cfg.trainer[key]), key
    assert "[group=option ...]" in text


def test_versions_and_info(capsys):
    from importlib import metadata

    assert main(["--version"]) == 0
    top = capsys.readouterr().out
    assert main(["train", "--version"]) == 0
    assert capsys.readouterr().out == top
    assert top.startswith("lrft ") and f"torch {metadata.version('torch')}" in top and "transformers" in top
    assert main(["train", "--info"]) == 0
    out = capsys.readouterr()
    assert (
        "invalid choice" not in out.err and "hydra.searchpath" not in out.err and "Defaults List" in out.out
    )


def test_merge_and_export_help_are_tables_not_raw_yaml(capsys):
    from lrft.cli.export import export_main
    from lrft.cli.merge import merge_main

    assert merge_main(["--help"]) == 0
    text = capsys.readouterr().out
    assert (
        "???" not in text and "(required)" in text and "merge.overwrite" in text and "defaults:" not in text
    )
    assert re.search(r"merge\.dtype\s+│\s+auto", text)
    assert export_main(["-h"]) == 0 and "export.overwrite" in capsys.readouterr().out


def test_the_run_path_is_folded_never_cut():
    path = (
        "/very/long/"
        + "/".join(f"folder_{i:02d}" for i in range(12))
        + "/2026-12-01_20-29-04_lora_fa_tiny_llama"
    )
    summary = {"steps": 3, "train_loss": 1.0, "eval": {"loss": 2.0}, "trainable_params": 1, "total_params": 9}
    console = Console(file=io.StringIO(), width=60, record=True)
    console.print(summary_table({**summary, "run_dir": path}))
    text = console.export_text()
    assert "…" not in text
    cells = "".join(line.split("│")[2].strip() for line in text.splitlines() if line.count("│") == 3)
    assert path in cells


def test_verbose_flags_are_global_and_quiet_is_the_default(monkeypatch):
    from lrft.cli import quiet

    monkeypatch.delenv("LRFT_VERBOSE", raising=False)
    assert quiet.split_verbose(["train", "-v", "trainer.max_steps=2"]) == (
        ["train", "trainer.max_steps=2"],
        True,
    )
    assert quiet.split_verbose(["train", "verbose=true"]) == (["train"], True)
    assert quiet.split_verbose(["train"]) == (["train"], False)
    for key in quiet.QUIET_ENV:
        monkeypatch.delenv(key, raising=False)
    quiet.setup(False)
    import os

    assert (
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1" and os.environ["TRANSFORMERS_VERBOSITY"] == "error"
    )


def test_offline_hub_ids_fail_at_once_with_one_message(tmp_path):
    from lrft.model.hub import cached

    if cached("FacebookAI/roberta-base") or cached("nyu-mll/glue", "dataset"):
        pytest.skip("roberta-base or GLUE is in this machine's hub cache")
    run = tmp_path / "run"
    data = tmp_path / "d.jsonl"
    data.write_text('{"sentence": "ok", "label": 1}\n')
    files = [f"dataset.data_files.train={data}", f"dataset.data_files.validation={data}"]
    for args, needle in (
        (["model=roberta_base", "dataset=glue/sst2", *files], "local folder"),
        (["model=tiny_roberta", "dataset=glue/sst2"], "dataset.data_files.train"),  # a hub dataset
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "lrft", "train", *args, f"output_dir={run}"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        err = proc.stderr
        assert proc.returncode == 2, err[-2000:]
        assert err.count("error:") == 1 and "HF_HUB_OFFLINE" in err and needle in err
        assert "Traceback" not in err and "Retrying" not in err and "Warning" not in err
        assert not run.exists()  # nothing trained: no folder left behind


def test_an_unreachable_hub_is_probed_once(monkeypatch):
    import socket

    from lrft.model import hub

    for name in hub.OFFLINE_VARS:
        monkeypatch.delenv(name, raising=False)
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(hub, "_reachable", {})
    for _ in range(3):
        with pytest.raises(UserError, match="cannot be reached"):
            hub.require_hub("someone/not-cached-model", "model.name_or_path")
    assert len(calls) == 1
    hub.require_hub(None, "model.name_or_path")  # nothing to fetch: no question asked
