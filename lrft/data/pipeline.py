"""The scalable data path: rows -> validated -> tokenized once -> cached Arrow, memory-mapped.

:func:`prepare_split` replaces ``encode_rows(load_rows(...))`` in the training loop. The first launch
reads the rows one at a time (local files through :func:`~lrft.data.files.iter_rows`, which keeps
the exact row numbers of error messages; hub sets through ``datasets``), checks each with the same
function as :func:`~lrft.data.load.load_rows`, writes them to an Arrow file and tokenizes it with a
batched ``datasets.map`` (``dataset.num_proc`` processes) that calls
:func:`~lrft.data.encode.encode_rows` on each batch, so every dataset kind encodes exactly as the
list pipeline does. The result is kept under the cache folder, keyed by a fingerprint of the data's
content, the dataset settings, the tokenizer and the lrft version: later launches memory-map it in
about a second and hold no python lists. Where rows come from is :mod:`lrft.data.source`'s, the
cache key :mod:`lrft.data.fingerprint`'s.

Local files are not parsed by ``datasets``' own JSON/CSV builders on purpose: pyarrow and pandas
infer column types (a label column holding 1 and "equivalent" fails, a numeric-looking sentence
becomes a float) and drop blank lines, so a bad row could no longer be named by its line.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lrft.data.chat import chat_note, notes_off, resolve_template, say
from lrft.data.encode import encode_rows
from lrft.data.fingerprint import FORMAT, fingerprint
from lrft.data.load import SPLITS
from lrft.data.source import BATCH, RowSource
from lrft.errors import UserError


class Examples(Sequence):
    """Encoded examples backed by a memory-mapped ``datasets.Dataset``, read like the old list.

    ``examples[i]`` is the same dict :func:`~lrft.data.encode.encode_rows` made, a slice is a list
    of them (the evaluator slices), and ``__getitems__`` lets a torch DataLoader fetch a whole
    batch in one Arrow read. ``dataset`` is the underlying ``datasets.Dataset``.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return self.__getitems__(list(range(*index.indices(len(self)))))
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.dataset[int(index)]

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        if not indices:
            return []
        columns = self.dataset[list(indices)]
        return [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for start in range(0, len(self), BATCH):
            yield from self.__getitems__(list(range(start, min(start + BATCH, len(self)))))


def prepare_split(
    dcfg: Any,
    split: str,
    task: str,
    tokenizer: Any,
    *,
    cache_dir: str | Path | None = None,
    accelerator: Any = None,
    seed: int = 0,
) -> Any:
    """The encoded examples of ``split`` ("train" or "eval"): an :class:`Examples` sequence
    (map-style, stable order, so the loop's position-indexed sampler and exact resume work), or a
    ``datasets.IterableDataset`` for ``dataset.streaming=true`` train data.

    ``dataset.mix`` (train only) interleaves its sources with their weights as probabilities,
    drawn with ``seed``. With ``accelerator``, the local main process prepares the cache while the
    others wait, then every process memory-maps it.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    dcfg = _plain(dcfg)
    root = cache_root(dcfg, cache_dir)
    if split == "train" and dcfg.get("mix"):
        return _mixed(dcfg, task, tokenizer, root, accelerator, seed)
    if split == "train" and dcfg.get("streaming"):
        return _streamed(dcfg, task, tokenizer)
    return _cached(dcfg, split, task, tokenizer, root, accelerator)


def cache_root(dcfg: Any, cache_dir: str | Path | None = None) -> Path:
    """Where tokenized data lives: the argument, ``dataset.cache_dir``, ``$LRFT_CACHE``, or
    ``~/.cache/lrft`` (each with a ``data/`` subfolder)."""
    base = cache_dir or dcfg.get("cache_dir") or os.environ.get("LRFT_CACHE") or "~/.cache/lrft"
    return Path(base).expanduser() / "data"


def _plain(dcfg: Any) -> DictConfig:
    """A mutable DictConfig copy (from a dataclass or a struct-mode config): mix sources derive
    their own settings from it."""
    return OmegaConf.create(OmegaConf.to_container(OmegaConf.structured(dcfg), resolve=True))


# --- one map-style source, cached ----------------------------------------------------------------


def _cached(
    dcfg: DictConfig, split: str, task: str, tokenizer: Any, root: Path, accelerator: Any
) -> Examples:
    source = RowSource(dcfg, split)
    gate = accelerator.local_main_process_first() if accelerator is not None else contextlib.nullcontext()
    with gate:  # the main process hashes the file first: the others then find its hash by stat
        folder = root / fingerprint(dcfg, split, task, tokenizer, source.identity(root))
        if not (folder / "meta.json").is_file():
            try:
                _build(source, dcfg, task, tokenizer, folder)
            except _NoRows:
                if split == "eval":  # e.g. a small train file with nothing held out: no eval data
                    return Examples([])
                raise UserError(f"{source.name}: the training data has no rows.") from None
        return Examples(_load(folder))


class _NoRows(Exception):
    """The source yielded no row at all."""


def _load(folder: Path) -> Any:
    from datasets import Dataset, concatenate_datasets

    meta = json.loads((folder / "meta.json").read_text())
    parts = [Dataset.from_file(str(folder / name)) for name in meta["shards"]]
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def _build(source: RowSource, dcfg: DictConfig, task: str, tokenizer: Any, folder: Path) -> None:
    """Validated rows -> rows.arrow -> batched map -> examples shards; published by one rename."""
    from datasets import Dataset, Features, Value
    from datasets.arrow_writer import ArrowWriter

    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        rows = source.validated()
        first = next(rows, None)  # a missing source fails here, before any file is written
        if first is None:
            raise _NoRows
        with notes_off():  # chat notes are said once below, for the whole dataset
            features = _features(encode_rows([first], dcfg, task, tokenizer)[0])
        writer = ArrowWriter(features=Features({"row": Value("string")}), path=str(tmp / "rows.arrow"))
        pending = [json.dumps(first)]
        for row in rows:
            pending.append(json.dumps(row))
            if len(pending) >= BATCH:
                writer.write_batch({"row": pending})
                pending = []
        if pending:
            writer.write_batch({"row": pending})
        writer.finalize()
        writer.close()
        raw = Dataset.from_file(str(tmp / "rows.arrow"))
        num_proc = max(1, int(dcfg.get("num_proc") or 1))
        encoded = raw.map(
            _encode_batch,
            batched=True,
            batch_size=BATCH,
            num_proc=num_proc if num_proc > 1 and len(raw) > BATCH else None,
            remove_columns=["row"],
            features=features,
            fn_kwargs={"dcfg": dcfg, "task": task, "tokenizer": tokenizer},
            cache_file_name=str(tmp / "examples.arrow"),
            load_from_cache_file=False,
            new_fingerprint=folder.name,
            desc=f"tokenizing {source.name}",
        )
        if dcfg.kind == "chat":  # a chat row may give one example per assistant turn
            note = chat_note(resolve_template(tokenizer, dcfg.get("chat_template")), len(raw), len(encoded))
            if note:
                say(f"{source.name}: {note}")
        shards = [Path(f["filename"]).name for f in encoded.cache_files]
        meta = {"shards": shards, "rows": len(encoded), "source": source.name, "format": FORMAT}
        del raw, encoded
        (tmp / "rows.arrow").unlink()
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            tmp.rename(folder)
        except OSError:  # another process (another node on a shared disk) published it first
            if not (folder / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _encode_batch(batch: dict[str, list[Any]], dcfg: Any, task: str, tokenizer: Any) -> dict[str, list[Any]]:
    # a batch may give more examples than rows (chat: one per assistant turn); "row" is removed
    with notes_off():
        examples = encode_rows([json.loads(r) for r in batch["row"]], dcfg, task, tokenizer)
    return {key: [ex[key] for ex in examples] for key in examples[0]} if examples else {}


def _features(example: dict[str, Any]) -> Any:
    """Arrow types of an encoded example: token ids as int32 (half of python's int64 on disk)."""
    from datasets import Features, Sequence, Value

    def kind(value: Any) -> Any:
        if isinstance(value, list):
            return Sequence(Value("int32"))
        if isinstance(value, bool):
            return Value("bool")
        if isinstance(value, int):
            return Value("int64")
        if isinstance(value, float):
            return Value("float64")
        return Value("string")

    return Features({key: kind(value) for key, value in example.items()})


# --- streaming and mixtures ----------------------------------------------------------------------


def _streamed(dcfg: DictConfig, task: str, tokenizer: Any) -> Any:
    """Train examples encoded on the fly, in file / hub order. Resume skips the examples already
    seen: ``dataset.skip(n)`` (see docs/data.md)."""
    from datasets import IterableDataset

    source = RowSource(dcfg, "train")
    first = next(source.validated(streaming=True))  # fail now on a missing source or a bad first row
    with notes_off():
        encode_rows([first], dcfg, task, tokenizer)
    kwargs = {"dcfg": dcfg, "task": task, "tokenizer": tokenizer}
    return IterableDataset.from_generator(_stream_examples, gen_kwargs=kwargs)


def _stream_examples(dcfg: DictConfig, task: str, tokenizer: Any) -> Iterator[dict[str, Any]]:
    pending: list[dict[str, Any]] = []
    for row in RowSource(dcfg, "train").validated(streaming=True):
        pending.append(row)
        if len(pending) >= BATCH:
            with notes_off():  # a note per batch would break into the progress display
                examples = encode_rows(pending, dcfg, task, tokenizer)
            yield from examples
            pending = []
    if pending:
        with notes_off():
            examples = encode_rows(pending, dcfg, task, tokenizer)
        yield from examples


def _mixed(dcfg: DictConfig, task: str, tokenizer: Any, root: Path, accelerator: Any, seed: int) -> Any:
    """Each source prepared (and cached) alone, then interleaved with probabilities = weights,
    drawn with ``seed``; it stops when the first source runs out (no row is repeated)."""
    from datasets import interleave_datasets

    parts, weights = [], []
    for i, src in enumerate(dcfg.mix):
        if bool(src.get("data_files")) == bool(src.get("path")):
            raise UserError(
                f"dataset.mix[{i}]: give exactly one of data_files (a local file) or path (a hub id)."
            )
        weight = float(src.get("weight", 1.0))
        if not weight > 0:
            raise UserError(f"dataset.mix[{i}].weight must be > 0, got {weight}.")
        one = OmegaConf.create(OmegaConf.to_container(dcfg))
        one.mix = []
        one.max_train_samples = None
        one.data_files.train = src.get("data_files")
        one.path = src.get("path")
        one.train_split = src.get("split") or "train"
        if src.get("subset"):
            one.subset = src.subset
        if dcfg.get("streaming"):
            parts.append(_streamed(one, task, tokenizer))
        else:
            parts.append(_cached(one, "train", task, tokenizer, root, accelerator).dataset)
        weights.append(weight)
    probs = [w / sum(weights) for w in weights]
    mixed = interleave_datasets(parts, probabilities=probs, seed=seed, stopping_strategy="first_exhausted")
    limit = dcfg.max_train_samples
    if dcfg.get("streaming"):
        return mixed.take(limit) if limit is not None and limit >= 0 else mixed
    if limit is not None and 0 <= limit < len(mixed):
        mixed = mixed.select(range(limit))
    return Examples(mixed)
