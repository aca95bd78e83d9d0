"""Turn validated rows into token ids for one model task (classification, seq2seq or causal).

Each encoded example is a dict of python lists/numbers: ``input_ids``, ``labels`` (and
``token_type_ids`` when the tokenizer makes them). Text-to-text GLUE examples also carry ``ref``,
the label as a class id (or float for STS-B), which the evaluator compares generations with; the
:class:`~lrft.data.collate.Collator` only passes it on when asked (``with_refs=True``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from lrft.data.glue import TaskSpec, get_task, label_word, seq2seq_source
from lrft.data.instruction import build_prompt, fit
from lrft.errors import UserError
from lrft.schema import COMPATIBLE

IGNORE_INDEX = -100
_CHUNK = 1000  # rows per tokenizer call: batched calls are far faster with fast tokenizers


def encode_rows(rows: list[dict[str, Any]], dcfg: Any, task: str, tokenizer: Any) -> list[dict[str, Any]]:
    """Encode rows from :func:`~lrft.data.load.load_rows` for a model of type ``task``."""
    if (task, dcfg.kind) not in COMPATIBLE:
        works = "; ".join(f"{t} model + {k} data ({how})" for (t, k), how in COMPATIBLE.items())
        raise UserError(f"A {task} model cannot use {dcfg.kind} data. Combinations that work: {works}.")
    max_length = int(dcfg.max_length)
    if max_length < 2:
        raise UserError(f"dataset.max_length must be >= 2, got {max_length}.")
    if dcfg.kind == "chat":
        from lrft.data.chat import encode_chat

        return encode_chat(rows, dcfg, tokenizer, max_length)
    if dcfg.kind == "preference":
        from lrft.data.preference import encode_preference

        return encode_preference(rows, dcfg, tokenizer, max_length)
    out: list[dict[str, Any]] = []
    for chunk in _chunks(rows):
        if dcfg.kind == "glue":
            spec = get_task(dcfg.subset)
            if task == "classification":
                out += _classification(chunk, spec, tokenizer, max_length)
            else:
                out += _seq2seq_glue(chunk, spec, tokenizer, max_length)
        else:
            prompts = [build_prompt(r, dcfg.prompt_template) for r in chunk]
            outputs = [r["output"] for r in chunk]
            if task == "causal":
                out += _causal(prompts, outputs, tokenizer, max_length)
            else:
                out += _seq2seq(prompts, outputs, tokenizer, max_length)
    return out


def _chunks(rows: list[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    for start in range(0, len(rows), _CHUNK):
        yield rows[start : start + _CHUNK]


def _classification(
    rows: list[dict[str, Any]], spec: TaskSpec, tokenizer: Any, max_length: int
) -> list[dict[str, Any]]:
    texts = [[r[f] for r in rows] for f in spec.text_fields]
    enc = tokenizer(*texts, truncation=True, max_length=max_length)
    examples = []
    for i, row in enumerate(rows):
        label = float(row["label"]) if spec.is_regression else int(row["label"])
        ex: dict[str, Any] = {"input_ids": list(enc["input_ids"][i]), "labels": label}
        if "token_type_ids" in enc:
            ex["token_type_ids"] = list(enc["token_type_ids"][i])
        examples.append(ex)
    return examples


def _seq2seq_glue(
    rows: list[dict[str, Any]], spec: TaskSpec, tokenizer: Any, max_length: int
) -> list[dict[str, Any]]:
    sources = [seq2seq_source(r, spec) for r in rows]
    targets = [label_word(r["label"], spec) for r in rows]
    examples = _seq2seq(sources, targets, tokenizer, max_length)
    for ex, row in zip(examples, rows, strict=True):
        ex["ref"] = float(row["label"]) if spec.is_regression else int(row["label"])
    return examples


def _seq2seq(sources: list[str], targets: list[str], tokenizer: Any, max_length: int) -> list[dict[str, Any]]:
    enc = tokenizer(sources, truncation=True, max_length=max_length)
    labels = target_ids(tokenizer, targets, max_length)
    pairs = zip(enc["input_ids"], labels, strict=True)
    return [{"input_ids": list(ids), "labels": lab} for ids, lab in pairs]


def target_ids(tokenizer: Any, targets: Sequence[str], max_length: int) -> list[list[int]]:
    """Decoder targets ending in EOS: the tokenizer's own target template (T5 appends EOS), with an
    EOS added where the template has none, so that every model learns where an answer stops."""
    enc = tokenizer(text_target=list(targets), truncation=True, max_length=max_length)
    eos = tokenizer.eos_token_id
    out = []
    for ids in enc["input_ids"]:
        ids = list(ids)
        if eos is not None and (not ids or ids[-1] != eos):
            ids = [*ids[: max_length - 1], eos]
        out.append(ids)
    return out


def _causal(prompts: list[str], outputs: list[str], tokenizer: Any, max_length: int) -> list[dict[str, Any]]:
    # prompt and response are encoded apart so the loss mask falls exactly on the response tokens
    p_enc = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    r_enc = tokenizer(outputs, add_special_tokens=False)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    head = [bos] if bos is not None else []
    tail = [eos] if eos is not None else []
    examples = []
    for p_ids, r_ids in zip(p_enc, r_enc, strict=True):
        prompt, response = fit(list(p_ids), list(r_ids) + tail, max_length - len(head))
        examples.append(
            {
                "input_ids": head + prompt + response,
                "labels": [IGNORE_INDEX] * (len(head) + len(prompt)) + response,
            }
        )
    return examples
