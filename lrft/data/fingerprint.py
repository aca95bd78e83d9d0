"""Cache keys of tokenized data: the content, the settings that shape examples, the tokenizer.

A key changes whenever the examples :mod:`lrft.data.pipeline` would build change, and only then:
the data file's content (hashed once, remembered by size and mtime), the dataset settings except
the ones listed in ``_NOT_IN_KEY``, the tokenizer's whole serialised pipeline, task and versions.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

FORMAT = 1  # bump when the cached layout or the encoding changes in a way the key does not see
# dataset keys that do not change the tokenized examples of one source (or are keyed separately)
_NOT_IN_KEY = ("name", "cache_dir", "num_proc", "streaming", "mix", "data_files")


def fingerprint(dcfg: DictConfig, split: str, task: str, tokenizer: Any, content: str) -> str:
    """The cache key: data content, the settings that shape examples, tokenizer, task, versions."""
    from lrft import __version__

    settings = {k: v for k, v in OmegaConf.to_container(dcfg).items() if k not in _NOT_IN_KEY}
    settings.pop("max_eval_samples" if split == "train" else "max_train_samples", None)
    parts = [FORMAT, __version__, split, task, settings, content, tokenizer_fingerprint(tokenizer)]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """The tokenizer's identity: its class, name, full serialised pipeline (vocabulary, merges,
    normaliser, templates) or vocabulary, special tokens and chat template."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    h.update(str(getattr(tokenizer, "name_or_path", "")).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    specials = {k: str(v) for k, v in getattr(tokenizer, "special_tokens_map", {}).items()}
    h.update(json.dumps(specials, sort_keys=True).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    h.update(str(getattr(tokenizer, "truncation_side", "")).encode())
    return h.hexdigest()


def file_hash(path: Path, root: Path) -> str:
    """A data file's content hash, remembered by (size, mtime) in ``root/files.json`` so a warm
    launch does not reread a large file. A file changed in the last 2 s is always rehashed: a
    rewrite within one timestamp tick would otherwise keep its old stat."""
    import xxhash

    path = path.resolve()
    stat = path.stat()
    index_file = root / "files.json"
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError):
        index = {}
    known = index.get(str(path))
    if known and known[:2] == [stat.st_size, stat.st_mtime_ns]:
        return known[2]
    h = xxhash.xxh3_128()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 24):
            h.update(chunk)
    digest = h.hexdigest()
    if time.time() - stat.st_mtime > 2:
        index[str(path)] = [stat.st_size, stat.st_mtime_ns, digest]
        root.mkdir(parents=True, exist_ok=True)
        tmp = index_file.with_name(f"files.json.{os.getpid()}")
        tmp.write_text(json.dumps(index))
        tmp.replace(index_file)
    return digest
