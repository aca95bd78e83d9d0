import os

os.environ["HF_HUB_OFFLINE"] = "1"

import csv
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lrft.data import GLUE_TASKS, Collator, TaskSpec, encode_rows, load_rows, num_labels
from lrft.data.encode import fit
from lrft.data.instruction import ALPACA_NO_INPUT, ALPACA_WITH_INPUT, build_prompt
from lrft.errors import UserError
from lrft.model.load import byte_tokenizer
from lrft.schema import DataFiles, DatasetConfig

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "lrft" / "data" / "quickstart"

MRPC = [
    {"sentence1": "The cat sat.", "sentence2": "A cat was sitting.", "label": 1},
    {"sentence1": "It rains.", "sentence2": "The sun shines.", "label": "not_equivalent"},
    {"sentence1": 'He left, "quietly".', "sentence2": "He went away.", "label": "equivalent"},
]
INSTR = [
    {"instruction": "Reverse the word.", "input": "cat", "output": "tac"},
    {"instruction": "What comes after 4?", "output": "5"},
]


def write(path: Path, rows: list[dict]) -> Path:
    """Write rows in the format the file extension names."""
    suffix = path.suffix
    if suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix in (".csv", ".tsv"):
        cols = list(dict.fromkeys(k for r in rows for k in r))
        with path.open("w", newline="") as fh:
            tsv = {"delimiter": "\t", "quoting": csv.QUOTE_NONE, "escapechar": "\\"}
            w = csv.DictWriter(fh, fieldnames=cols, **(tsv if suffix == ".tsv" else {}))
            w.writeheader()
            w.writerows(rows)
    elif suffix == ".parquet":
        cols = list(dict.fromkeys(k for r in rows for k in r))
        pq.write_table(pa.table({c: [str(r.get(c, "")) for r in rows] for c in cols}), path)
    return path


def glue_cfg(train=None, validation=None, subset="mrpc", **kw) -> DatasetConfig:
    return DatasetConfig(
        name=f"glue_{subset}", kind="glue", subset=subset, data_files=DataFiles(train, validation), **kw
    )


def instr_cfg(train=None, validation=None, **kw) -> DatasetConfig:
    return DatasetConfig(name="instr", kind="instruction", data_files=DataFiles(train, validation), **kw)


# --- loading ------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", [".json", ".jsonl", ".csv", ".tsv", ".parquet"])
def test_load_glue_every_format(tmp_path, ext):
    rows = MRPC if ext != ".tsv" else [dict(r, sentence1=r["sentence1"].replace('"', "'")) for r in MRPC]
    path = write(tmp_path / f"mrpc{ext}", rows)
    got = load_rows(glue_cfg(train=str(path)), "train")
    assert [r["label"] for r in got] == [1, 0, 1]  # ids and label names both work
    assert got[0] == {"sentence1": "The cat sat.", "sentence2": "A cat was sitting.", "label": 1}
    assert got[2]["sentence1"] == rows[2]["sentence1"]


@pytest.mark.parametrize("ext", [".json", ".jsonl", ".csv", ".tsv", ".parquet"])
def test_load_instruction_every_format(tmp_path, ext):
    path = write(tmp_path / f"data{ext}", INSTR)
    got = load_rows(instr_cfg(validation=str(path)), "eval")
    assert got == [
        {"instruction": "Reverse the word.", "input": "cat", "output": "tac"},
        {"instruction": "What comes after 4?", "input": "", "output": "5"},
    ]


def test_max_samples_keep_the_first_rows(tmp_path):
    path = write(tmp_path / "m.jsonl", MRPC)
    cfg = glue_cfg(train=str(path), validation=str(path), max_train_samples=2, max_eval_samples=1)
    assert len(load_rows(cfg, "train")) == 2
    assert load_rows(cfg, "eval") == load_rows(cfg, "train")[:1]


def test_stsb_float_labels(tmp_path):
    path = write(tmp_path / "s.csv", [{"sentence1": "a", "sentence2": "b", "label": "3.75"}])
    assert load_rows(glue_cfg(train=str(path), subset="stsb"), "train")[0]["label"] == 3.75
    assert num_labels(glue_cfg(subset="stsb")) == 1


def test_num_labels_and_task_table():
    assert num_labels(glue_cfg(subset="mnli")) == 3
    assert num_labels(glue_cfg(subset="cola")) == 2
    assert num_labels(instr_cfg()) is None
    assert set(GLUE_TASKS) == {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte"}
    mnli = GLUE_TASKS["mnli"]
    assert isinstance(mnli, TaskSpec) and mnli.hub_eval_split == "validation_matched"
    assert mnli.text_fields == ("premise", "hypothesis")
    assert GLUE_TASKS["stsb"].label_names is None and GLUE_TASKS["stsb"].is_regression


def _error(cfg, split="train") -> str:
    with pytest.raises(UserError) as info:
        load_rows(cfg, split)
    return str(info.value)


def test_missing_file(tmp_path):
    msg = _error(glue_cfg(train=str(tmp_path / "nope.jsonl")))
    assert "nope.jsonl" in msg and "not found" in msg


def test_empty_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    msg = _error(glue_cfg(train=str(tmp_path / "empty.jsonl")))
    assert "empty.jsonl" in msg and "empty" in msg
    (tmp_path / "empty.csv").write_text("sentence1,sentence2,label\n")
    assert "empty" in _error(glue_cfg(train=str(tmp_path / "empty.csv")))


def test_malformed_json_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(MRPC[0]) + "\n" + '{"sentence1": "x", "sentence2": \n')
    msg = _error(glue_cfg(train=str(path)))
    assert "bad.jsonl, row 2" in msg and "malformed JSON" in msg


def test_missing_column_names_file_row_column_and_expected(tmp_path):
    rows = [MRPC[0], MRPC[1], {"sentence1": "only one", "label": 0}]
    msg = _error(glue_cfg(validation=str(write(tmp_path / "m.jsonl", rows))), "eval")
    assert "m.jsonl, row 3" in msg
    assert "missing column 'sentence2'" in msg
    assert "Expected columns for mrpc data: sentence1, sentence2, label" in msg


def test_csv_short_line_and_missing_header_column(tmp_path):
    (tmp_path / "short.csv").write_text("sentence1,sentence2,label\na,b,1\nc,d\n")
    msg = _error(glue_cfg(train=str(tmp_path / "short.csv")))
    assert "short.csv, row 2: missing column 'label'" in msg
    (tmp_path / "nohead.csv").write_text("sentence1,label\na,1\n")
    msg = _error(glue_cfg(train=str(tmp_path / "nohead.csv")))
    assert "nohead.csv, row 1: missing column 'sentence2'" in msg


def test_instruction_missing_output(tmp_path):
    msg = _error(instr_cfg(train=str(write(tmp_path / "i.jsonl", [INSTR[0], {"instruction": "x"}]))))
    assert "i.jsonl, row 2: missing column 'output'" in msg
    assert "instruction (text), input (optional text), output (text)" in msg


def test_instruction_wrong_type(tmp_path):
    rows = [{"instruction": "What comes after 4?", "output": 5}]
    msg = _error(instr_cfg(train=str(write(tmp_path / "i.json", rows))))
    assert "i.json, row 1: column 'output' must be a string, got int" in msg


@pytest.mark.parametrize("label", [2, "equivalentt", 1.5, True])
def test_label_outside_the_task(tmp_path, label):
    rows = [MRPC[0], dict(MRPC[1], label=label)]
    msg = _error(glue_cfg(train=str(write(tmp_path / "m.jsonl", rows))))
    assert "m.jsonl, row 2: column 'label'" in msg
    assert "0 or 'not_equivalent', 1 or 'equivalent'" in msg


def test_test_split_label_minus_one(tmp_path):
    msg = _error(glue_cfg(train=str(write(tmp_path / "test.tsv", [dict(MRPC[0], label=-1)]))))
    assert "test.tsv, row 1: column 'label'" in msg and "unlabelled GLUE test split" in msg


def test_stsb_label_out_of_range(tmp_path):
    path = write(tmp_path / "s.jsonl", [{"sentence1": "a", "sentence2": "b", "label": 5.5}])
    msg = _error(glue_cfg(train=str(path), subset="stsb"))
    assert "s.jsonl, row 1: column 'label': 5.5 is outside [0, 5]" in msg


def test_unknown_subset_lists_valid_ones(tmp_path):
    msg = _error(glue_cfg(train=str(write(tmp_path / "m.jsonl", MRPC)), subset="mrcp"))
    assert "Unknown GLUE task 'mrcp'" in msg and "mrpc" in msg and "Valid: cola, mnli, mrpc" in msg


def test_unsupported_extension_and_no_source(tmp_path):
    assert "Supported: .json, .jsonl" in _error(glue_cfg(train=str(tmp_path / "m.txt")))
    assert "neither dataset.path" in _error(instr_cfg())


def test_json_that_is_not_a_list_of_objects(tmp_path):
    (tmp_path / "m.json").write_text("[1, 2]")
    assert "m.json, row 1: expected an object" in _error(glue_cfg(train=str(tmp_path / "m.json")))


# --- prompts and encoding -----------------------------------------------------------------------


def test_prompt_templates():
    with_input = build_prompt({"instruction": "Do it.", "input": "x"}, "alpaca")
    assert with_input == ALPACA_WITH_INPUT.format(instruction="Do it.", input="x")
    assert with_input.startswith("Below is an instruction that describes a task, paired with an input")
    assert with_input.endswith("### Instruction:\nDo it.\n\n### Input:\nx\n\n### Response:\n")
    no_input = build_prompt({"instruction": "Do it.", "input": ""}, "alpaca")
    assert no_input == ALPACA_NO_INPUT.format(instruction="Do it.")
    assert "### Input" not in no_input
    assert build_prompt({"instruction": "Do it.", "input": "x"}, "plain") == "Do it.\nx\n"
    assert build_prompt({"instruction": "Do it.", "input": ""}, "plain") == "Do it.\n"
    with pytest.raises(UserError, match="alpaca"):
        build_prompt({"instruction": "Do it."}, "alpacca")


@pytest.mark.parametrize("template", ["alpaca", "plain"])
def test_causal_masks_the_prompt_exactly(template):
    tok = byte_tokenizer("llama")
    cfg = instr_cfg(prompt_template=template, max_length=512)
    rows = [dict(INSTR[0]), {"instruction": "What comes after 4?", "input": "", "output": "5"}]
    for row, ex in zip(rows, encode_rows(rows, cfg, "causal", tok), strict=True):
        ids, labels = ex["input_ids"], ex["labels"]
        assert len(ids) == len(labels)
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        n_masked = sum(1 for x in labels if x == -100)
        assert labels[:n_masked] == [-100] * n_masked  # the mask is one leading block
        assert tok.decode(ids[1:n_masked]) == build_prompt(row, template)
        assert labels[n_masked:] == ids[n_masked:]
        assert tok.decode(labels[n_masked:]) == row["output"] + "</s>"


def test_causal_truncation_keeps_part_of_the_response():
    tok = byte_tokenizer("llama")
    rows = [{"instruction": "x" * 100, "input": "", "output": "abcdefghij"}]
    ex = encode_rows(rows, instr_cfg(prompt_template="plain", max_length=32), "causal", tok)[0]
    assert len(ex["input_ids"]) == 32
    kept = [x for x in ex["labels"] if x != -100]
    assert len(kept) == 31 // 4 and tok.decode(kept) == "abcdefg"
    assert fit([1, 2], [3, 4], 10) == ([1, 2], [3, 4])
    assert fit([1, 2, 3, 4], [5, 6, 7, 8], 6) == ([1, 2, 3, 4], [5, 6])
    # the prompt loses its start, the response keeps a quarter of the budget
    assert fit(list(range(10)), [20, 21, 22, 23], 8) == ([4, 5, 6, 7, 8, 9], [20, 21])


def test_seq2seq_glue_target_is_the_label_word():
    tok = byte_tokenizer("t5")
    rows = [
        {"sentence1": "a b", "sentence2": "c", "label": 1},
        {"sentence1": "x", "sentence2": "y", "label": 0},
    ]
    ex = encode_rows(rows, glue_cfg(), "seq2seq", tok)
    assert tok.decode(ex[0]["input_ids"], skip_special_tokens=True) == "mrpc sentence1: a b sentence2: c"
    assert tok.decode(ex[0]["labels"]) == "equivalent</s>"
    assert tok.decode(ex[1]["labels"], skip_special_tokens=True) == "not_equivalent"
    assert [e["ref"] for e in ex] == [1, 0]


def test_seq2seq_stsb_target_rounds_to_a_fifth():
    tok = byte_tokenizer("t5")
    rows = [{"sentence1": "a", "sentence2": "b", "label": s} for s in (3.75, 0.0, 4.92)]
    ex = encode_rows(rows, glue_cfg(subset="stsb"), "seq2seq", tok)
    assert [tok.decode(e["labels"], skip_special_tokens=True) for e in ex] == ["3.8", "0.0", "5.0"]
    assert [e["ref"] for e in ex] == [3.75, 0.0, 4.92]


def test_seq2seq_instruction_and_eos_appended_for_any_tokenizer():
    cfg = instr_cfg(prompt_template="plain")
    ex = encode_rows([INSTR[0]], cfg, "seq2seq", byte_tokenizer("t5"))[0]
    tok = byte_tokenizer("t5")
    assert tok.decode(ex["input_ids"]) == "Reverse the word.\ncat\n</s>"
    assert tok.decode(ex["labels"]) == "tac</s>"
    assert "ref" not in ex
    llama_style = encode_rows([INSTR[0]], cfg, "seq2seq", byte_tokenizer("llama"))[0]
    assert llama_style["labels"][-1] == 2  # a template without EOS still gets one


def test_classification_pairs():
    tok = byte_tokenizer("roberta")
    rows = [{"sentence1": "ab", "sentence2": "c", "label": 1}]
    ex = encode_rows(rows, glue_cfg(), "classification", tok)[0]
    assert ex["input_ids"] == tok("ab", "c")["input_ids"] == [1, 69, 70, 2, 2, 71, 2]
    assert ex["labels"] == 1
    single = encode_rows([{"sentence": "ab", "label": 0}], glue_cfg(subset="sst2"), "classification", tok)
    assert single[0]["input_ids"] == [1, 69, 70, 2]
    long = [{"sentence": "z" * 50, "label": 0}]
    truncated = encode_rows(long, glue_cfg(subset="sst2", max_length=16), "classification", tok)
    assert len(truncated[0]["input_ids"]) == 16


@pytest.mark.parametrize(
    ("task", "kind"), [("causal", "glue"), ("classification", "instruction"), ("translation", "glue")]
)
def test_invalid_task_kind_pairs(task, kind):
    cfg = glue_cfg() if kind == "glue" else instr_cfg()
    with pytest.raises(UserError, match="Combinations that work: classification model \\+ glue data"):
        encode_rows([], cfg, task, byte_tokenizer("llama"))


# --- collation ----------------------------------------------------------------------------------


def test_collator_causal_padding():
    tok = byte_tokenizer("llama")
    ex = [
        {"input_ids": [1, 5, 6, 2], "labels": [-100, -100, 6, 2]},
        {"input_ids": [1, 7], "labels": [-100, 7]},
    ]
    batch = Collator(tok, "causal")(ex)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].tolist() == [[1, 5, 6, 2], [1, 7, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 6, 2], [-100, 7, -100, -100]]
    assert batch["input_ids"].dtype == torch.long


def test_collator_refs_only_when_asked():
    tok = byte_tokenizer("t5")
    rows = [{"sentence": "ok", "label": 1}, {"sentence": "no", "label": 0}]
    ex = encode_rows(rows, glue_cfg(subset="cola"), "seq2seq", tok)
    train_batch = Collator(tok, "seq2seq")(ex)
    assert "refs" not in train_batch and "ref" not in train_batch
    eval_batch = Collator(tok, "seq2seq", with_refs=True)(ex)
    assert eval_batch.pop("refs") == [1, 0]
    assert set(eval_batch) == {"input_ids", "attention_mask", "labels"}
    assert eval_batch["labels"][1].tolist() == tok("unacceptable")["input_ids"]
    assert eval_batch["labels"][0].tolist()[-2:] == [-100, -100]  # "acceptable" is two bytes shorter


def test_collator_classification_labels():
    tok = byte_tokenizer("roberta")
    collate = Collator(tok, "classification")
    batch = collate([{"input_ids": [1, 2], "labels": 1}, {"input_ids": [1], "labels": 0}])
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [1, 0]
    assert batch["input_ids"].tolist() == [[1, 2], [1, 0]]
    reg = collate([{"input_ids": [1], "labels": 2.5}, {"input_ids": [1], "labels": 4.0}])
    assert reg["labels"].dtype == torch.float32 and reg["labels"].tolist() == [2.5, 4.0]


# --- bundled quickstart data --------------------------------------------------------------------


def test_quickstart_files_load_and_validate():
    cfg = instr_cfg(str(QUICKSTART / "train.jsonl"), str(QUICKSTART / "validation.jsonl"))
    train, val = load_rows(cfg, "train"), load_rows(cfg, "eval")
    assert 350 <= len(train) <= 450 and 50 <= len(val) <= 70
    for row in train + val:
        assert len("".join(row.values()).encode()) < 80
    key = lambda r: (r["instruction"], r["input"])  # noqa: E731
    assert not {key(r) for r in train} & {key(r) for r in val}
    ex = encode_rows(
        train,
        DatasetConfig(**{**cfg.__dict__, "prompt_template": "plain", "max_length": 128}),
        "causal",
        byte_tokenizer("llama"),
    )
    assert max(len(e["input_ids"]) for e in ex) <= 128


def test_quickstart_files_are_up_to_date():
    script = ROOT / "scripts" / "make_quickstart_data.py"
    done = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_hub_loading_path_without_network(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        rows = [{"premise": f"p{i}", "hypothesis": "h", "label": i % 3, "idx": i} for i in range(5)]
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr("lrft.model.hub.require_hub", lambda *a, **k: None)  # as if the hub were reachable
    cfg = DatasetConfig(name="glue_mnli", kind="glue", path="nyu-mll/glue", subset="mnli", max_eval_samples=2)
    got = load_rows(cfg, "eval")
    assert calls == [("nyu-mll/glue", "mnli", "validation_matched")]
    assert got == [{"premise": f"p{i}", "hypothesis": "h", "label": i} for i in range(2)]
    assert len(load_rows(cfg, "train")) == 5 and calls[-1][2] == "train"

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    msg = _error(cfg)
    assert "Cannot load nyu-mll/glue (mnli) split 'train'" in msg and "data_files" in msg
