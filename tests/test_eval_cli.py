"""``lrft eval`` end to end on tiny models and fixture files: a finished training run, base
models, a merged-export folder; eval.json's schema; determinism; exit code 2 on bad input."""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lrft.cli.eval import compose_eval, eval_main
from lrft.config.compose import compose
from lrft.model.load import load_model, load_tokenizer
from lrft.train import train

ROOT = Path(__file__).resolve().parent.parent
GOOD, BAD = ["good", "great", "fine", "nice"], ["bad", "awful", "sad", "poor"]
TOP_KEYS = {
    "checkpoint",
    "model",
    "dataset",
    "splits",
    "seed",
    "batch_size",
    "max_samples",
    "n",
    "results",
    "notes",
    "started",
    "seconds",
    "lrft_version",
}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sst2_file(path: Path, n: int = 24) -> Path:
    words = [(GOOD if i % 2 else BAD)[i % 4] for i in range(n)]
    return jsonl(path, [{"sentence": f"it was {w}", "label": i % 2} for i, w in enumerate(words)])


def mnli_file(path: Path, n: int = 9) -> Path:
    rows = [
        {"premise": f"a {w} cat sits", "hypothesis": "a cat sits", "label": i % 3}
        for i, w in enumerate(GOOD * 3)
    ]
    return jsonl(path, rows[:n])


def mmlu_dir(root: Path, n: int = 4) -> Path:
    for split, count in (("dev", 5), ("test", n)):
        for subject in ("college_biology", "philosophy"):
            path = root / split / f"{subject}_{split}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w", newline="") as fh:
                for i in range(count):
                    csv.writer(fh).writerow([f"{subject} q{i}?", "w", "x", "y", "z", "ABCD"[i % 4]])
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    sst2_file(root / "sst2.jsonl")
    mnli_file(root / "mnli.jsonl")
    mmlu_dir(root / "mmlu")
    rows = [{"instruction": "Capitalise.", "input": w, "output": w.upper()} for w in GOOD + BAD]
    jsonl(root / "inst.jsonl", rows)
    return root


@pytest.fixture(scope="module")
def roberta_run(tmp_path_factory, data) -> tuple[Path, dict]:
    """A finished 2-step training run (tiny RoBERTa, LoRA-FA, SST-2 fixture)."""
    run_dir = tmp_path_factory.mktemp("runs") / "roberta"
    sst2 = data / "sst2.jsonl"
    cfg = compose(
        [
            "model=tiny_roberta",
            "dataset=glue/sst2",
            f"dataset.data_files.train={sst2}",
            f"dataset.data_files.validation={sst2}",
            "trainer.max_steps=2",
            "trainer.batch_size=8",
            "trainer.progress=false",
            f"output_dir={run_dir}",
        ]
    )
    return run_dir, train(cfg, run_dir).summary


def evaluate(*overrides: str) -> int:
    return eval_main([*overrides, "progress=false"])


def test_checkpoint_eval_matches_training_and_writes_eval_json(roberta_run, capsys):
    run_dir, summary = roberta_run
    assert evaluate(f"checkpoint={run_dir}") == 0
    record = json.loads((run_dir / "eval.json").read_text())
    assert set(record) == TOP_KEYS
    assert record["checkpoint"] == str(run_dir.resolve())
    assert record["model"] == {"name": "tiny_roberta", "name_or_path": None, "task": "classification"}
    assert record["dataset"]["name"] == "glue_sst2" and record["splits"] == ["validation"]
    assert record["n"] == 24 and record["seed"] == 0 and record["seconds"] > 0
    result = record["results"]["validation"]
    # the same code scored the run at the end of training: the numbers agree
    expected = {k: v for k, v in summary["eval"].items() if k != "n"}
    assert result == {"n": 24, "metrics": pytest.approx(expected, abs=1e-6)}
    assert "accuracy" in capsys.readouterr().out


def test_checkpoint_on_an_adjusted_or_another_dataset(roberta_run, data, tmp_path):
    run_dir, _ = roberta_run
    assert (
        evaluate(f"checkpoint={run_dir}", "dataset.max_eval_samples=5", f"output_dir={tmp_path / 'a'}") == 0
    )
    assert json.loads((tmp_path / "a" / "eval.json").read_text())["n"] == 5
    cola = jsonl(
        tmp_path / "cola.jsonl", [{"sentence": f"it {w}", "label": i % 2} for i, w in enumerate(GOOD)]
    )
    args = [f"checkpoint={run_dir}", "dataset=glue/cola", f"dataset.data_files.validation={cola}"]
    assert evaluate(*args, f"output_dir={tmp_path / 'b'}") == 0
    record = json.loads((tmp_path / "b" / "eval.json").read_text())
    assert set(record["results"]["validation"]["metrics"]) == {"matthews_corrcoef", "loss"}


def test_causal_run_then_its_own_data_and_mmlu(tmp_path, data):
    inst = data / "inst.jsonl"
    cfg = compose(
        [
            "model=tiny_llama",
            "method=lora",
            "dataset=quickstart",
            f"dataset.data_files.train={inst}",
            f"dataset.data_files.validation={inst}",
            "trainer.max_steps=2",
            "trainer.eval_every=0",
            "trainer.progress=false",
            f"output_dir={tmp_path / 'run'}",
        ]
    )
    summary = train(cfg, tmp_path / "run").summary
    assert evaluate(f"checkpoint={tmp_path / 'run'}") == 0
    own = json.loads((tmp_path / "run" / "eval.json").read_text())["results"]["validation"]
    assert own["metrics"]["loss"] == pytest.approx(summary["eval"]["loss"], rel=1e-5)
    mmlu = [f"checkpoint={tmp_path / 'run'}", "dataset=mmlu", f"dataset.data_dir={data / 'mmlu'}"]
    assert evaluate(*mmlu, "dataset.shots=2", f"output_dir={tmp_path / 'm'}") == 0
    result = json.loads((tmp_path / "m" / "eval.json").read_text())["results"]["test"]
    assert result["n"] == 8 and set(result["metrics"]) == {"accuracy", "accuracy_macro"}
    assert set(result["categories"]) == {"STEM", "humanities"}
    assert result["shots"]["requested"] == 2


def test_base_models_on_glue_t5_and_causal_mnli(data, tmp_path):
    t5 = ["model=tiny_t5", "dataset=glue/sst2", f"dataset.data_files.validation={data / 'sst2.jsonl'}"]
    assert evaluate(*t5, "max_samples=6", f"output_dir={tmp_path / 't5'}") == 0
    t5_result = json.loads((tmp_path / "t5" / "eval.json").read_text())["results"]["validation"]
    assert t5_result["n"] == 6 and t5_result["metrics"]["invalid"] == 6  # untrained: no valid label
    mnli = data / "mnli.jsonl"
    llama = ["model=tiny_llama", "dataset=glue/mnli", f"dataset.data_files.validation={mnli}"]
    both = [*llama, f"dataset.data_files.validation_mismatched={mnli}", f"output_dir={tmp_path / 'mnli'}"]
    assert evaluate(*both) == 0
    record = json.loads((tmp_path / "mnli" / "eval.json").read_text())
    assert record["splits"] == ["validation_matched", "validation_mismatched"] and record["n"] == 18
    assert evaluate(*llama, f"output_dir={tmp_path / 'one'}") == 0  # no mismatched file: said, not fatal
    record = json.loads((tmp_path / "one" / "eval.json").read_text())
    assert record["splits"] == ["validation_matched"] and "validation_mismatched" in record["notes"][0]


def test_merged_export_folder_and_default_output_dir(data, tmp_path, monkeypatch):
    cfg = compose(["model=tiny_llama"])
    torch.manual_seed(0)
    load_model(cfg.model).save_pretrained(tmp_path / "merged")
    load_tokenizer(cfg.model).save_pretrained(tmp_path / "merged")
    monkeypatch.chdir(tmp_path)
    args = [f"model.name_or_path={tmp_path / 'merged'}", "dataset=mmlu", f"dataset.data_dir={data / 'mmlu'}"]
    assert compose_eval(args).model.task == "causal"  # read from the folder's config.json
    assert evaluate(*args, "dataset.shots=1") == 0
    [written] = list((tmp_path / "eval").glob("*/eval.json"))
    assert json.loads(written.read_text())["model"]["name"] == "merged"


def test_two_runs_give_identical_numbers(data, tmp_path):
    args = ["model=tiny_llama", "dataset=mmlu", f"dataset.data_dir={data / 'mmlu'}", "dataset.shots=2"]
    records = []
    for name in ("one", "two"):
        assert evaluate(*args, f"output_dir={tmp_path / name}") == 0
        records.append(json.loads((tmp_path / name / "eval.json").read_text()))
    assert records[0]["results"] == records[1]["results"]
    assert records[0]["results"]["test"]["subjects"]["philosophy"]["n"] == 4


def test_bad_input_exits_2_with_a_message(roberta_run, data, tmp_path, capsys):
    run_dir, _ = roberta_run
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run_dir, unfinished)
    (unfinished / "final" / "COMPLETE").unlink()
    sst2 = f"dataset.data_files.validation={data / 'sst2.jsonl'}"
    bad_csv = mmlu_dir(tmp_path / "mmlu")
    with (bad_csv / "test" / "philosophy_test.csv").open("a") as fh:
        fh.write("a question,w,x,y,z\n")
    cases = [
        ([f"checkpoint={unfinished}"], "no complete final state"),
        ([f"checkpoint={tmp_path / 'nowhere'}"], "no such run folder"),
        (["model=tiny_roberta", "dataset=glue/sst2", sst2, "split=test"], "has no 'test' split"),
        (["model=tiny_llama", "dataset=mmlu", f"dataset.data_dir={bad_csv}"], "philosophy_test.csv, row 5"),
        ([], "Say what to evaluate"),
        (["model=tiny_llama"], "Choose a dataset"),
        (["model=tiny_llama", "dataset=mmlu", "chekpoint=x"], "Did you mean: checkpoint"),
        ([f"checkpoint={run_dir}", "model=tiny_llama"], "evaluates the run's own model"),
        (["model=tiny_roberta", "dataset=mmlu"], "cannot score model 'tiny_roberta'"),
        (
            [
                f"checkpoint={run_dir}",
                "dataset=glue/mnli",
                f"dataset.data_files.validation={data / 'mnli.jsonl'}",
            ],
            "head has 2",
        ),
        (["model.name_or_path=some/hub-id", "dataset=mmlu"], "set model.task"),
        (["model=tiny_llama", "dataset=mmlu", "batch_size=abc"], "Invalid value for batch_size"),
        ([f"checkpoint={run_dir}", "dataset.max_eval_sample=3"], "Did you mean: max_eval_samples"),
    ]
    for args, message in cases:
        assert evaluate(*args) == 2, args
        assert message in " ".join(capsys.readouterr().err.split()), args


def test_help_and_exit_code_of_a_real_process(tmp_path):
    assert eval_main(["--help"]) == 0
    # a fresh process: the eval config composes with nothing registered beforehand
    code = (
        "import sys; from lrft.config.compose import compose\n"
        "assert compose(['model=tiny_llama', 'dataset=mmlu'], 'eval').dataset.shots == 5\n"
        "from lrft.cli.eval import eval_main; sys.exit(eval_main(sys.argv[1:]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, f"checkpoint={tmp_path}"], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 2 and "not an lrft run folder" in proc.stderr and "Traceback" not in proc.stderr


def test_merged_classifier_scores_its_own_task_and_refuses_another(data, tmp_path, capsys):
    cfg = compose(["model=tiny_roberta", "dataset=glue/sst2"])
    load_model(cfg.model, num_labels=2).save_pretrained(tmp_path / "merged")
    load_tokenizer(cfg.model).save_pretrained(tmp_path / "merged")
    folder = f"model.name_or_path={tmp_path / 'merged'}"
    sst2 = [folder, "dataset=glue/sst2", f"dataset.data_files.validation={data / 'sst2.jsonl'}"]
    assert evaluate(*sst2, f"output_dir={tmp_path / 'o'}") == 0
    assert json.loads((tmp_path / "o" / "eval.json").read_text())["model"]["task"] == "classification"
    mnli = [folder, "dataset=glue/mnli", f"dataset.data_files.validation={data / 'mnli.jsonl'}"]
    assert evaluate(*mnli) == 2
    assert "head has 2 outputs but mnli needs 3" in capsys.readouterr().err
