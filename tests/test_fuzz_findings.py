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
