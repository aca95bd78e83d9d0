"""The cached Arrow pipeline (lrft.data.pipeline) against the list pipeline it replaces."""

import json
import os
from pathlib import Path

import pytest
import torch

from lrft.config.compose import compose
from lrft.data import Collator, encode_rows, load_rows
from lrft.data.pipeline import Examples, prepare_split
from lrft.errors import UserError
from lrft.model.load import byte_tokenizer
from lrft.schema import DataFiles, DatasetConfig, MixSource

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "lrft" / "data" / "quickstart"
MRPC = [
    {"sentence1": "The cat sat.", "sentence2": "A cat was sitting.", "label": 1},
    {"sentence1": "It rains.", "sentence2": "The sun shines.", "label": "not_equivalent"},
    {"sentence1": 'He left, "quietly".', "sentence2": "He went away.", "label": "equivalent"},
    {"sentence1": "12", "sentence2": "Twelve.", "label": 0},
]


class CountingTokenizer:
    """Forwards to a real tokenizer and counts the encode calls."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def instr_cfg(train, validation=None, **kw) -> DatasetConfig:
    return DatasetConfig(
        name="instr", kind="instruction", data_files=DataFiles(str(train), validation), max_length=64, **kw
    )


def write_jsonl(path: Path, rows: list, blank_every: int = 0) -> Path:
    lines = []
    for i, row in enumerate(rows):
        lines.append(json.dumps(row))
        if blank_every and i % blank_every == 0:
            lines.append("")
    path.write_text("\n".join(lines) + "\n")
    return path


def instr_rows(n: int, tag: str = "x") -> list[dict]:
    return [
        {"instruction": f"Say {tag} {i}.", "input": "" if i % 2 else "ctx", "output": tag} for i in range(n)
    ]


@pytest.mark.parametrize("split", ["train", "eval"])
def test_quickstart_equals_the_list_pipeline(tmp_path, split):
    cfg = compose([]).dataset
    tok = byte_tokenizer("llama")
    old = encode_rows(load_rows(cfg, split), cfg, "causal", tok)
    new = prepare_split(cfg, split, "causal", tok, cache_dir=tmp_path)
    assert isinstance(new, Examples) and len(new) == len(old)
    assert list(new) == old
    assert new[5] == old[5] and new[-1] == old[-1] and new[3:9] == old[3:9]


@pytest.mark.parametrize(("task", "style"), [("classification", "roberta"), ("seq2seq", "t5")])
def test_glue_file_equals_the_list_pipeline(tmp_path, task, style):
    path = write_jsonl(tmp_path / "mrpc.jsonl", MRPC * 5, blank_every=3)
    cfg = DatasetConfig(name="mrpc", kind="glue", subset="mrpc", data_files=DataFiles(str(path)))
    tok = byte_tokenizer(style)
    old = encode_rows(load_rows(cfg, "train"), cfg, task, tok)
    new = prepare_split(cfg, "train", task, tok, cache_dir=tmp_path / "cache")
    assert list(new) == old
    if task == "seq2seq":
        # a lone train file: 5% held out for evaluation, the same rows in both pipelines
        assert [ex["ref"] for ex in new] == [ex["ref"] for ex in old] and len(old) == 19
    # the loop's batches are the same too
    collate = Collator(tok, task)
    a, b = collate(old[:6]), collate(new[0:6])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_second_call_hits_the_cache_without_tokenizing(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", instr_rows(50))
    os.utime(path, (1_000_000_000, 1_000_000_000))  # an old file: its stat is remembered
    cfg, cache = instr_cfg(path), tmp_path / "cache"
    first_tok = CountingTokenizer(byte_tokenizer())
    first = list(prepare_split(cfg, "train", "causal", first_tok, cache_dir=cache))
    assert first_tok.calls > 0
    (folder,) = [p for p in (cache / "data").iterdir() if p.is_dir()]
    stamp = (folder / "examples.arrow").stat().st_mtime_ns
    again = CountingTokenizer(byte_tokenizer())
    assert list(prepare_split(cfg, "train", "causal", again, cache_dir=cache)) == first
    assert again.calls == 0
    assert (folder / "examples.arrow").stat().st_mtime_ns == stamp
    # a setting that shapes the examples is part of the key
    shorter = instr_cfg(path)
    shorter.max_length = 16
    prepare_split(shorter, "train", "causal", again, cache_dir=cache)
    assert again.calls > 0
    assert len([p for p in (cache / "data").iterdir() if p.is_dir()]) == 2


def test_changed_content_is_a_cache_miss(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", instr_rows(20, "a"))
    old_stat = path.stat()
    cfg, cache = instr_cfg(path), tmp_path / "cache"
    tok = byte_tokenizer()
    first = prepare_split(cfg, "train", "causal", tok, cache_dir=cache)
    # same size, same mtime: only the content tells them apart
    write_jsonl(path, instr_rows(20, "b"))
    os.utime(path, ns=(old_stat.st_atime_ns, old_stat.st_mtime_ns))
    assert path.stat().st_size == old_stat.st_size
    second = prepare_split(cfg, "train", "causal", tok, cache_dir=cache)
    assert list(second) == encode_rows(load_rows(cfg, "train"), cfg, "causal", tok)
    assert list(second) != list(first)


def test_another_tokenizer_is_a_cache_miss(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", instr_rows(10))
    cfg = instr_cfg(path)
    llama = prepare_split(cfg, "train", "seq2seq", byte_tokenizer("llama"), cache_dir=tmp_path)
    t5_tok = byte_tokenizer("t5")
    t5 = prepare_split(cfg, "train", "seq2seq", t5_tok, cache_dir=tmp_path)
    assert len([p for p in (tmp_path / "data").iterdir() if p.is_dir()]) == 2
    assert list(t5) == encode_rows(load_rows(cfg, "train"), cfg, "seq2seq", t5_tok) != list(llama)


def test_bad_row_names_file_and_line(tmp_path):
    rows = instr_rows(30)
    rows[17] = {"instruction": "no output here"}
    path = write_jsonl(tmp_path / "bad.jsonl", rows, blank_every=10)  # blank lines count as lines
    with pytest.raises(UserError) as err:
        prepare_split(instr_cfg(path), "train", "causal", byte_tokenizer(), cache_dir=tmp_path)
    with pytest.raises(UserError) as ref:
        load_rows(instr_cfg(path), "train")
    assert str(err.value) == str(ref.value)
    assert f"{path}, row 20: missing column 'output'" in str(err.value)
    assert not [p for p in (tmp_path / "data").iterdir() if p.is_dir()]  # nothing half-written kept


def test_missing_file_is_named(tmp_path):
    cfg = instr_cfg(tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match=r"nope\.jsonl: data file not found"):
        prepare_split(cfg, "train", "causal", byte_tokenizer(), cache_dir=tmp_path)


def test_several_processes_keep_the_order(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", instr_rows(2500))
    cfg = instr_cfg(path, num_proc=2)
    tok = byte_tokenizer()
    new = prepare_split(cfg, "train", "causal", tok, cache_dir=tmp_path / "cache")
    assert len(new.dataset.cache_files) == 2  # one shard per process
    assert list(new) == encode_rows(load_rows(cfg, "train"), cfg, "causal", tok)


def test_mix_draws_by_weight(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", instr_rows(3000, "A"))
    b = write_jsonl(tmp_path / "b.jsonl", instr_rows(3000, "B"))
    cfg = DatasetConfig(name="mix", kind="instruction", max_length=32)
    cfg.mix = [MixSource(data_files=str(a), weight=3.0), MixSource(data_files=str(b), weight=1.0)]
    tok = byte_tokenizer()
    mixed = prepare_split(cfg, "train", "causal", tok, cache_dir=tmp_path, seed=1)
    a_id = tok("A", add_special_tokens=False)["input_ids"][0]
    labels = [next(t for t in ex["labels"] if t != -100) for ex in mixed]
    share = sum(t == a_id for t in labels) / len(labels)
    assert 0.72 < share < 0.78, share
    assert 3000 <= len(mixed) < 4200  # stops when A runs out: no row repeats
    again = prepare_split(cfg, "train", "causal", tok, cache_dir=tmp_path, seed=1)
    assert list(again)[:50] == list(mixed)[:50]  # seeded: the same order every launch
    other = prepare_split(cfg, "train", "causal", tok, cache_dir=tmp_path, seed=2)
    assert list(other)[:50] != list(mixed)[:50]


def test_mix_source_needs_a_file_or_a_hub_id(tmp_path):
    cfg = DatasetConfig(name="mix", kind="instruction")
    cfg.mix = [MixSource(weight=1.0)]
    with pytest.raises(UserError, match=r"dataset.mix\[0\]: give exactly one of data_files"):
        prepare_split(cfg, "train", "causal", byte_tokenizer(), cache_dir=tmp_path)


def test_streaming_is_refused_without_max_steps():
    with pytest.raises(UserError, match=r"streaming=true .* set trainer\.max_steps > 0"):
        compose(["dataset.streaming=true"])
    assert compose(["dataset.streaming=true", "trainer.max_steps=10"]).dataset.streaming


def test_streaming_yields_the_same_examples_in_order(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", instr_rows(1200))
    cfg = instr_cfg(path, streaming=True)
    tok = byte_tokenizer()
    stream = prepare_split(cfg, "train", "causal", tok, cache_dir=tmp_path)
    assert isinstance(stream, torch.utils.data.IterableDataset)
    old = encode_rows(load_rows(cfg, "train"), cfg, "causal", tok)
    assert list(stream) == old
    assert next(iter(stream.skip(1100))) == old[1100]  # how a streaming run resumes
    loader = torch.utils.data.DataLoader(stream, batch_size=4, collate_fn=Collator(tok, "causal"))
    assert next(iter(loader))["input_ids"].shape[0] == 4
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


def test_the_loop_sampler_and_loader_take_it(tmp_path):
    from lrft.train import EpochSampler

    cfg = compose([]).dataset
    tok = byte_tokenizer()
    old = encode_rows(load_rows(cfg, "train"), cfg, "causal", tok)
    new = prepare_split(cfg, "train", "causal", tok, cache_dir=tmp_path)
    batches = []
    for data in (old, new):
        loader = torch.utils.data.DataLoader(
            data, batch_size=8, sampler=EpochSampler(len(data), 3), collate_fn=Collator(tok, "causal")
        )
        batches.append(list(loader)[:3])
    for a, b in zip(*batches, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_main_process_prepares_first_then_all_load(tmp_path):
    """The gate: the local main process builds the cache inside the accelerator's
    ``local_main_process_first``; a process entering after it finds the cache and tokenizes nothing."""
    from contextlib import contextmanager

    class Gate:
        entered = 0

        @contextmanager
        def local_main_process_first(self):
            self.entered += 1
            yield

    path = write_jsonl(tmp_path / "train.jsonl", instr_rows(30))
    os.utime(path, (1_000_000_000, 1_000_000_000))
    main_tok, other_tok, gate = (
        CountingTokenizer(byte_tokenizer()),
        CountingTokenizer(byte_tokenizer()),
        Gate(),
    )
    first = prepare_split(instr_cfg(path), "train", "causal", main_tok, cache_dir=tmp_path, accelerator=gate)
    other = prepare_split(instr_cfg(path), "train", "causal", other_tok, cache_dir=tmp_path, accelerator=gate)
    assert gate.entered == 2 and main_tok.calls > 0 and other_tok.calls == 0
    assert list(other) == list(first)


@pytest.mark.parametrize("streaming", [False, True])
def test_hub_style_source_equals_the_list_pipeline(tmp_path, streaming):
    """dataset.path goes through datasets.load_dataset (a local folder stands in for a hub id)."""
    folder = tmp_path / "hubset"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", instr_rows(40))
    cfg = DatasetConfig(name="hub", kind="instruction", path=str(folder), max_length=48, max_train_samples=30)
    tok = byte_tokenizer()
    old = encode_rows(load_rows(cfg, "train"), cfg, "causal", tok)
    cfg.streaming = streaming
    new = prepare_split(cfg, "train", "causal", tok, cache_dir=tmp_path / "cache")
    assert len(old) == 30 and list(new) == old
