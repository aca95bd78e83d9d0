"""Issue 24's fuzzing pass: one regression test per finding fixed here (findings 1-2: test_run_lock.py,
test_output_lock.py)."""

import pytest

from lrft.cli.main import main
from lrft.config.compose import compose
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
