"""Load a dataset split as validated rows, from local files or the Hugging Face hub."""

from __future__ import annotations

from typing import Any

from lrft.data.chat import check_chat_row
from lrft.data.files import read_rows
from lrft.data.glue import check_glue_row, get_task, label_choices
from lrft.data.instruction import check_instruction_row
from lrft.errors import UserError

SPLITS = ("train", "eval")


TRAIN_KINDS = ("glue", "instruction", "chat", "preference")


def num_labels(dcfg: Any) -> int | None:
    """Classification head size: None for instruction data, 1 for STS-B (regression)."""
    if dcfg.kind in ("instruction", "chat", "preference"):
        return None
    if dcfg.kind == "glue":
        return get_task(dcfg.subset).num_labels
    raise UserError(f"dataset.kind={dcfg.kind!r} is not valid. Valid: {', '.join(TRAIN_KINDS)}.")


def load_rows(dcfg: Any, split: str) -> list[dict[str, Any]]:
    """The rows of the ``train`` or ``eval`` split, normalised and schema-checked.

    GLUE rows come back as the task's text columns plus ``label`` (class id, or float for STS-B);
    instruction rows as ``instruction``, ``input`` ("" when absent) and ``output``. Local files in
    ``dcfg.data_files`` win over the hub. ``max_train_samples`` / ``max_eval_samples`` keep the
    first N rows. Any problem raises :class:`UserError` naming the file, row and column. Chat rows
    come back as ``messages`` (roles system/user/assistant) and ``_where`` (file and row, for errors).

    Only a local train file (no validation file): ``dataset.eval_holdout`` of its rows are held out,
    the same ones on every launch; ``train`` leaves them out and ``eval`` returns them.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if dcfg.kind not in TRAIN_KINDS:
        raise UserError(f"dataset.kind={dcfg.kind!r} is not valid. Valid: {', '.join(TRAIN_KINDS)}.")
    spec = get_task(dcfg.subset) if dcfg.kind == "glue" else None
    local = dcfg.data_files.train if split == "train" else dcfg.data_files.validation
    limit = dcfg.max_train_samples if split == "train" else dcfg.max_eval_samples
    if not local and dcfg.data_files.train and split == "eval":
        local = dcfg.data_files.train  # eval rows held out of the train file
    if local:
        source = str(local)
        records = read_rows(local)
        if holding_out(dcfg):
            for number, record in records:  # a bad row is named wherever the holdout puts it
                _check(number, record, source, spec, dcfg.kind)
            records = holdout(records, dcfg, split, source)
    else:
        source, records = _hub_rows(dcfg, split, spec)
    if limit is not None and limit >= 0:
        records = records[:limit]
    return [_check(number, record, source, spec, dcfg.kind) for number, record in records]


def holding_out(dcfg: Any) -> bool:
    """Only a local train file: evaluation rows come out of it."""
    return bool(dcfg.data_files.train) and not dcfg.data_files.validation


def holdout(records: list[tuple[int, Any]], dcfg: Any, split: str, source: str) -> list[tuple[int, Any]]:
    """The train or the held-out part of ``records``: a fixed random subset (seeded by nothing
    but the row count, so every launch and every rank holds out the same rows)."""
    import random

    share = float(getattr(dcfg, "eval_holdout", 0.05) or 0)
    n = len(records)
    count = min(500, round(share * n)) if share < 1 else int(share)
    count = min(count, n - 1)  # keep at least one row to train on
    if count <= 0:
        if split == "eval":
            _say(f"{source}: no validation file and dataset.eval_holdout={share:g}: no evaluation data")
        return [] if split == "eval" else records
    held = set(random.Random(n).sample(range(n), count))
    if split == "eval":
        _say(
            f"{source}: no validation file: {count} of its {n} rows held out for evaluation "
            f"(dataset.eval_holdout={share:g}; set dataset.data_files.validation=FILE to choose)"
        )
        return [r for i, r in enumerate(records) if i in held]
    return [r for i, r in enumerate(records) if i not in held]


def _say(text: str) -> None:
    import os

    if os.environ.get("RANK", "0") == "0":
        from rich.console import Console

        Console(stderr=True).print(text, highlight=False, soft_wrap=True)


def expected_columns(spec: Any, kind: str = "instruction") -> str:
    if kind == "preference":
        from lrft.data.preference import EXPECTED

        return EXPECTED
    if kind == "chat":
        return (
            "messages: [{role: system|user|assistant, content: text}, ...] (or ShareGPT conversations), "
            "system (optional)"
        )
    if spec is None:
        return "instruction (text), input (optional text), output (text)"
    return ", ".join(spec.text_fields) + f", label ({label_choices(spec)})"


def _check(number: int, record: Any, source: str, spec: Any, kind: str = "instruction") -> dict[str, Any]:
    if kind in ("chat", "preference"):
        if kind == "chat":
            row, _column, problem = check_chat_row(record)
        else:
            from lrft.data.preference import check_preference_row

            row, _column, problem = check_preference_row(record)
        if row is not None:
            row["_where"] = f"{source}, row {number}"
    elif spec is None:
        row, _column, problem = check_instruction_row(record)
    else:
        row, _column, problem = check_glue_row(record, spec)
    if row is None:
        what = f"{spec.name} data" if spec else f"{kind} data"
        raise UserError(
            f"{source}, row {number}: {problem.rstrip('.')}. "
            f"Expected columns for {what}: {expected_columns(spec, kind)}."
        )
    return row


def _hub_rows(dcfg: Any, split: str, spec: Any) -> tuple[str, list[tuple[int, Any]]]:
    """Rows from ``datasets.load_dataset`` (needs the network or a warm hub cache)."""
    if not dcfg.path:
        which = "train" if split == "train" else "validation"
        raise UserError(
            f"dataset '{dcfg.name}' has neither dataset.path (a hub id) nor dataset.data_files.{which}."
        )
    hub_split = dcfg.train_split if split == "train" else dcfg.eval_split
    if spec is not None and split == "eval" and hub_split == "validation":
        hub_split = spec.hub_eval_split  # MNLI has no plain "validation" split
    source = f"{dcfg.path}" + (f" ({dcfg.subset})" if dcfg.subset else "") + f" split '{hub_split}'"
    import datasets

    from lrft.model.hub import require_hub  # offline: one message now, not a minute of retries

    require_hub(dcfg.path, "dataset.path", repo_type="dataset")
    try:
        ds = datasets.load_dataset(dcfg.path, dcfg.subset, split=hub_split)
    except Exception as err:  # network, unknown id/split: all user-fixable, so no traceback
        raise UserError(
            f"Cannot load {source} from the hub: {err}\n"
            "Offline? Set dataset.data_files.train / dataset.data_files.validation to local files."
        ) from None
    limit = dcfg.max_train_samples if split == "train" else dcfg.max_eval_samples
    if limit is not None and 0 <= limit < len(ds):
        ds = ds.select(range(limit))
    if len(ds) == 0:
        raise UserError(f"{source}: the split is empty (no rows).")
    return source, list(enumerate(ds.to_list(), start=1))
