"""Issue 24's fuzzing pass: regression tests named after the finding they reproduce.

Findings 1 (a live run folder has no owner) and 2 (merge/export outputs) are in test_run_lock.py and
test_output_lock.py; 3 (generate/plot outputs), 4 (user configs and their resume), 5 (disk full at
the base or final write), 6 (tracebacks where a message belongs), 7 (nonsense values), 8 (a failed
attempt blocks its retry), 9 (resume with every checkpoint corrupt) and 10 (polish) are here.
"""

import pytest

from lrft.cli.main import main
from lrft.config.compose import compose, config_dir
from lrft.config.validate import validate
from lrft.errors import UserError

TINY = ["model=tiny_llama", "dataset=quickstart", "trainer.progress=false", "trainer.max_steps=1"]


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("method.alpha=0", "alpha must be > 0"),
        ("method.alpha=-4", "alpha must be > 0"),
        ("method.target_modules=[]", "names no layer"),
        ("trainer.warmup_ratio=2", "warmup_ratio"),
    ],
)
def test_finding_7_nonsense_values_are_refused(override, says):
    with pytest.raises(UserError, match=says):
        validate(compose([*TINY, override]))


def test_finding_7_rank_wider_than_the_layer_is_refused(tmp_path, capsys):
    assert main(["train", *TINY, "method.r=200", f"output_dir={tmp_path / 'r'}"]) == 2
    assert "method.r <= 64" in " ".join(capsys.readouterr().err.split())


def test_finding_8_a_failed_attempt_leaves_no_folder_and_the_fix_runs(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "method.target_modules=[nonexistent]", f"output_dir={out}"]) == 2
    assert not out.exists()  # its base/ no longer keeps the folder
    out.mkdir()  # an older attempt's leftovers: setup files and error.txt only
    (out / "config.yaml").write_text("x: 1\n")
    (out / "error.txt").write_text("boom\n")
    assert main(["train", *TINY, f"output_dir={out}"]) == 0
    assert (out / "summary.json").is_file() and not (out / "error.txt").exists()


@pytest.mark.parametrize(("override", "says"), [("temperature=-1", "temperature"), ("top_p=2", "top_p")])
def test_finding_7_generate_sampling_values_are_refused(override, says, capsys):
    assert main(["generate", "checkpoint=nowhere", "prompt=hi", override]) == 2
    assert says in capsys.readouterr().err


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "run"
    assert main(["train", *TINY, f"output_dir={out}"]) == 0
    return out


def test_finding_3_generate_never_replaces_a_file_it_did_not_write(small_run, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Say hi"}\n')
    notes = tmp_path / "notes.jsonl"
    notes.write_text("my own notes\n")
    gen = ["generate", f"checkpoint={small_run}", f"input_file={prompts}", "max_new_tokens=2"]
    # the input itself, even when asked to overwrite: the prompts would be gone
    for extra in ([], ["overwrite=true"]):
        assert main([*gen, f"output_file={prompts}", *extra]) == 2
        assert "also the input" in capsys.readouterr().err
    assert prompts.read_text() == '{"prompt": "Say hi"}\n'
    assert main([*gen, f"output_file={notes}"]) == 2
    assert "overwrite=true" in capsys.readouterr().err and notes.read_text() == "my own notes\n"
    assert main([*gen, f"output_file={tmp_path}"]) == 2  # a folder
    assert main([*gen, f"output_file={notes}/x.jsonl"]) == 2  # under a file
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main([*gen, f"output_file={notes}", "overwrite=true"]) == 0  # asked for: replaced
    assert '"response"' in notes.read_text()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_finding_3_plot_replaces_only_its_own_png(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0}\n')
    photo = tmp_path / "photo.png"
    photo.write_bytes(b"\x89PNG not drawn by lrft")
    assert main(["plot", str(run), "--out", str(photo)]) == 2
    assert "--overwrite" in capsys.readouterr().err and photo.read_bytes() == b"\x89PNG not drawn by lrft"
    assert main(["plot", str(run), "--out", str(photo), "--overwrite"]) == 0
    drawn = photo.read_bytes()
    assert main(["plot", str(run), "--out", str(photo)]) == 0  # its own plot: redrawn without asking
    assert photo.read_bytes()[:8] == drawn[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(run), "--out", str(tmp_path)]) == 0  # a folder: <metric>.png in it
    assert (tmp_path / "loss.png").is_file()
    assert main(["plot", str(run), "--out", str(photo / "x.png")]) == 2  # finding 6: under a file
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main(["plot", str(run), "--out", "/proc/lrft.png"]) == 2  # finding 6: no traceback
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "photo.png", "run"]


def unfinished_run(out, *extra):
    """A run folder as a stopped run leaves it: checkpoints, metrics, no final state."""
    import shutil

    args = [*TINY, "trainer.max_steps=4", "trainer.save_every=2", "trainer.log_every=1", *extra]
    assert main(["train", *args, f"output_dir={out}"]) == 0
    (out / "summary.json").unlink()
    shutil.rmtree(out / "final")
    return args


def steps_logged(out):
    import json

    return [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_finding_9_resume_with_every_checkpoint_corrupt_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    args = unfinished_run(out)
    for ckpt in (out / "checkpoints").iterdir():
        (ckpt / "trainable.safetensors").write_bytes(b"\0" * 64)
    before, history = {str(p.relative_to(out)) for p in out.rglob("*")}, steps_logged(out)
    capsys.readouterr()
    assert main(["train", f"output_dir={out}", "trainer.resume=auto"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "no checkpoint" in err and "step-00000002: trainable.safetensors is corrupt" in err
    assert "trainer.overwrite=true" in err and "Nothing was changed" in err
    after = {str(p.relative_to(out)) for p in out.rglob("*")}
    assert after - before == {"error.txt"} and after >= before and steps_logged(out) == history
    # the printed way out: the same run again, from step 0, with one clean history
    assert main(["train", *args, f"output_dir={out}", "trainer.overwrite=true"]) == 0
    assert steps_logged(out) == history


def test_finding_9_resume_before_any_checkpoint_starts_a_clean_history(tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    unfinished_run(out)
    history = steps_logged(out)  # one uninterrupted run's records
    shutil.rmtree(out / "checkpoints")  # stopped before its first save: only metrics records
    assert main(["train", f"output_dir={out}", "trainer.resume=auto"]) == 0
    assert steps_logged(out) == history  # not the old records followed by the new ones
    assert "starts over from step 0" in " ".join(capsys.readouterr().err.split())


def user_configs(root):
    """A user's config folder: an option of lrft's method group, and a whole run config."""
    (root / "method").mkdir(parents=True)
    lora = (config_dir() / "method" / "lora.yaml").read_text()
    (root / "method" / "mygood.yaml").write_text(lora.replace("r: 8", "r: 4"))
    (root / "myrun.yaml").write_text(
        "defaults:\n  - train\n  - override method: lora\n  - _self_\n"
        "trainer:\n  max_steps: 2\n  save_every: 1\n  progress: false\n"
    )
    return root


def test_finding_4_user_config_groups_and_run_configs_train_and_resume(tmp_path, capsys):
    import json
    import shutil

    from omegaconf import OmegaConf

    yc = user_configs(tmp_path / "yc")
    a = tmp_path / "a"
    assert main(["train", "--config-dir", str(yc), *TINY, "method=mygood", f"output_dir={a}"]) == 0
    assert OmegaConf.load(a / "config.yaml").method.r == 4  # the user's option, not refused
    b = tmp_path / "b"
    assert main(["train", "--config-dir", str(yc), "--config-name", "myrun", "model=tiny_llama",
                 "dataset=quickstart", f"output_dir={b}"]) == 0  # fmt: skip
    info = json.loads((b / "run_info.json").read_text())
    assert (info["config_dir"], info["config_name"]) == (str(yc.resolve()), "myrun")
    assert info["command"].startswith("lrft train --config-dir")  # finding 10: with `train`
    run = OmegaConf.load(b / "config.yaml")
    assert (run.method.name, run.trainer.max_steps) == ("lora", 2)
    # stopped after step 1: the printed resume command, without flags, composes myrun again
    (b / "summary.json").unlink()
    shutil.rmtree(b / "final")
    shutil.rmtree(b / "checkpoints" / "step-00000002", ignore_errors=True)
    capsys.readouterr()
    assert main(["train", f"output_dir={b}", "trainer.resume=auto"]) == 0
    assert "resumed from" in capsys.readouterr().err and (b / "summary.json").is_file()
    # the next command in this process composes from lrft's own configs again
    assert compose(TINY).method.name == "lora_fa"


@pytest.mark.parametrize(
    ("files", "args", "says"),
    [
        ({"method/bad.yaml": "r: [4\n"}, ["method=bad"], "YAML syntax error in {yc}/method/bad.yaml, line 2"),
        (
            {"method/typo.yaml": "defaults:\n  - /schema/method/lora@_here_\n  - _self_\nrr: 4\n"},
            ["method=typo"],
            "Unknown config key 'method.rr' in the config file method/typo.yaml. Did you mean: r",
        ),
        (
            {"typorun.yaml": "defaults:\n  - train\n  - _self_\ntrainer:\n  max_stepz: 3\n"},
            ["--config-name", "typorun"],
            "'trainer.max_stepz' in the config file typorun.yaml. Did you mean: max_steps",
        ),
        ({}, ["--config-name", "nosuch"], "--config-name nosuch: no nosuch.yaml in {yc}"),
    ],
)
def test_finding_6_user_config_mistakes_are_messages(tmp_path, capsys, files, args, says):
    yc = tmp_path / "yc"
    for name, text in files.items():
        (yc / name).parent.mkdir(parents=True, exist_ok=True)
        (yc / name).write_text(text)
    yc.mkdir(exist_ok=True)
    out = tmp_path / "run"
    assert main(["train", "--config-dir", str(yc), *args, *TINY, f"output_dir={out}"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert says.format(yc=yc.resolve()) in err and "Traceback" not in err
    assert not out.exists()


def test_finding_6_fsdp2_without_a_launcher_is_a_message(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "trainer.sharding=fsdp2", f"output_dir={out}"]) == 2
    assert "this run has one" in " ".join(capsys.readouterr().err.split()) and not out.exists()


@pytest.mark.parametrize("where", ["under_a_file", "/proc/lrft-run"])
def test_finding_6_unwritable_outputs_are_messages(small_run, tmp_path, capsys, where):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    target = blocker / "out" if where == "under_a_file" else where
    says = f"{blocker} is a file, not a folder" if where == "under_a_file" else "cannot be created"
    for argv in (
        ["train", *TINY, f"output_dir={target}"],
        ["merge", f"checkpoint={small_run}", f"output={target}"],
        ["export", f"checkpoint={small_run}", f"output={target}"],
    ):
        assert main(argv) == 2, argv
        assert says in " ".join(capsys.readouterr().err.split()), argv


@pytest.mark.parametrize("damage", ["config", "base"])
def test_finding_6_a_damaged_run_folder_is_a_message(small_run, tmp_path, capsys, damage):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    if damage == "config":
        (run / "config.yaml").write_text("model: [\n")
        says = "config.yaml: while parsing"
    else:
        weights = run / "base" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
        says = f"Cannot read the weights in {run / 'base'}"
    for argv in (
        ["eval", f"checkpoint={run}"],
        ["merge", f"checkpoint={run}", f"output={tmp_path / 'merged'}"],
        ["export", f"checkpoint={run}", f"output={tmp_path / 'exported'}"],
        ["generate", f"checkpoint={run}", "prompt=hi", "max_new_tokens=2"],
    ):
        assert main(argv) == 2, argv
        assert says in " ".join(capsys.readouterr().err.split()), argv
    assert not (tmp_path / "merged").exists() and not (tmp_path / "exported").exists()


def test_finding_10_checkpoint_that_is_a_file_says_so(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    for argv in (
        ["eval", f"checkpoint={notes}"],
        ["merge", f"checkpoint={notes}", f"output={tmp_path / 'm'}"],
        ["export", f"checkpoint={notes}", f"output={tmp_path / 'e'}"],
        ["generate", f"checkpoint={notes}", "prompt=hi"],
    ):
        assert main(argv) == 2, argv
        assert "is a file: give the run folder" in capsys.readouterr().err, argv


def test_finding_5_disk_full_at_the_final_write_keeps_the_run_resumable(tmp_path, monkeypatch, capsys):
    import errno

    import lrft.run.final
    import lrft.train.checkpoint

    ref = tmp_path / "ref"
    args = [*TINY, "trainer.max_steps=4", "trainer.save_every=3", "trainer.log_every=1"]
    assert main(["train", *args, f"output_dir={ref}"]) == 0
    want = (ref / "final" / "trainable.safetensors").read_bytes()

    # 1. too little space, known before writing: nothing written, the newest checkpoint named
    real = lrft.train.checkpoint.free_bytes
    out = tmp_path / "full"

    def full_at_the_end(path):  # the step-3 checkpoint finds a roomy disk, the final write a full one
        return 4096 if (out / "checkpoints" / "step-00000003").is_dir() else real(path)

    monkeypatch.setattr(lrft.train.checkpoint, "free_bytes", full_at_the_end)
    assert main(["train", *args, f"output_dir={out}"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "Not enough disk space for the final state" in err and "step-00000003, is intact" in err
    assert "retrains steps 4-4" in err and "trainer.resume=auto" in err
    assert not (out / "final").exists() and not (out / "summary.json").exists()
    monkeypatch.setattr(lrft.train.checkpoint, "free_bytes", real)

    # 2. the disk fills while final/ is written: the same message, no half-written final state
    def enospc(state, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(lrft.run.final, "save_state", enospc)
        assert main(["train", f"output_dir={out}", "trainer.resume=auto"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "Writing the final state" in err and "No space left on device" in err and "Traceback" not in err
    assert not (out / "final").exists() and (out / "checkpoints" / "step-00000003").is_dir()

    # 3. with space again, the printed command finishes the run to the uninterrupted run's bits
    assert main(["train", f"output_dir={out}", "trainer.resume=auto"]) == 0
    assert (out / "final" / "trainable.safetensors").read_bytes() == want


def test_finding_5_disk_full_before_the_base_weights_is_a_message(tmp_path, monkeypatch, capsys):
    import lrft.train.checkpoint

    monkeypatch.setattr(lrft.train.checkpoint, "free_bytes", lambda path: 4096)
    out = tmp_path / "run"
    assert main(["train", *TINY, f"output_dir={out}"]) == 2
    assert "Not enough disk space for the base weights" in " ".join(capsys.readouterr().err.split())
    assert not out.exists()  # nothing was trained: the folder goes


def test_finding_10_a_run_on_a_nearly_full_disk_and_its_files(tmp_path, monkeypatch):
    """The free-space margin scales with what is written (a 0.3 MiB checkpoint fits in 5 MiB, which
    the old fixed 16 MiB margin refused); weight files get the umask's mode like every other file
    (safetensors writes 0600); a finished run keeps no error.txt of an earlier failed attempt."""
    import os

    import lrft.train.checkpoint

    monkeypatch.setattr(lrft.train.checkpoint, "free_bytes", lambda path: 5 << 20)
    out = tmp_path / "run"
    unfinished_run(out)  # trains 4 steps with checkpoints at 2 and 4 on the "5 MiB" disk
    (out / "error.txt").write_text("an earlier attempt failed after step 2\n")
    assert main(["train", f"output_dir={out}", "trainer.resume=auto"]) == 0
    assert (out / "summary.json").is_file() and not (out / "error.txt").exists()
    mask = os.umask(0)
    os.umask(mask)
    weights = [*out.rglob("*.safetensors")]
    assert {p.parent.name for p in weights} >= {"base", "final", "adapter", "step-00000002"}
    assert {oct(p.stat().st_mode & 0o777) for p in weights} == {oct(0o666 & ~mask)}


def test_finding_10_data_messages(tmp_path):
    import json

    from lrft.data.files import read_rows
    from lrft.data.instruction import check_instruction_row
    from lrft.data.load import _check

    _, col, problem = check_instruction_row({"instruction": "a", "output": None})
    assert (col, problem) == ("output", "column 'output' has no value (null, or a short line)")
    assert check_instruction_row({"instruction": "a"})[2] == "missing column 'output'"
    listed = tmp_path / "rows.jsonl"  # one JSON list saved as .jsonl: read as the list it is
    listed.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]))
    assert [n for n, _ in read_rows(str(listed))] == [1, 2]
    bad = {"messages": [{"role": "usr", "content": "hi"}, {"role": "assistant", "content": "x"}]}
    with pytest.raises(UserError) as err:
        _check(1, bad, "chat.jsonl", None, kind="chat")
    assert "Valid: assistant, system, user. Expected columns" in str(err.value)


def test_finding_10_lrft_warnings_are_one_plain_line(capsys):
    import warnings

    from lrft.cli import quiet
    from lrft.cli.quiet import setup

    saved, raw = warnings.showwarning, quiet._raw_show
    try:
        setup(verbose=False)
        warnings.showwarning("skipping checkpoint step-3", UserWarning, "/x/lrft/train/setup.py", 126)
        assert capsys.readouterr().err == "warning: skipping checkpoint step-3\n"
        seen = []
        quiet._raw_show = lambda *args: seen.append(args[:4])  # the usual form, for other packages
        warnings.showwarning("theirs", UserWarning, "/x/site-packages/pkg/mod.py", 9)
        assert seen == [("theirs", UserWarning, "/x/site-packages/pkg/mod.py", 9)]
        assert capsys.readouterr().err == ""
    finally:
        warnings.showwarning, quiet._raw_show = saved, raw


def test_finding_10_no_third_party_warning_on_a_plain_run(tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    argv = [sys.executable, "-m", "lrft", "train", *TINY, f"output_dir={tmp_path / 'run'}"]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "WARNING" not in proc.stdout + proc.stderr and "Warning:" not in proc.stdout + proc.stderr
