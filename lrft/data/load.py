"""Load a dataset split as validated rows, from local files or the Hugging Face hub."""

from __future__ import annotations

from typing import Any

from lrft.data.files import read_rows
from lrft.data.glue import check_glue_row, get_task, label_choices
from lrft.data.instruction import check_instruction_row
from lrft.errors import UserError

SPLITS = ("train", "eval")


def num_labels(dcfg: Any) -> int | None:
    """Classification head size: None for instruction data, 1 for STS-B (regression)."""
    if dcfg.kind == "instruction":
        return None
    if dcfg.kind == "glue":
        return get_task(dcfg.subset).num_labels
    raise UserError(f"dataset.kind={dcfg.kind!r} is not valid. Valid: glue, instruction.")


def load_rows(dcfg: Any, split: str) -> list[dict[str, Any]]:
    """The rows of the ``train`` or ``eval`` split, normalised and schema-checked.

    GLUE rows come back as the task's text columns plus ``label`` (class id, or float for STS-B);
    instruction rows as ``instruction``, ``input`` ("" when absent) and ``output``. Local files in
    ``dcfg.data_files`` win over the hub. ``max_train_samples`` / ``max_eval_samples`` keep the
    first N rows. Any problem raises :class:`UserError` naming the file, row and column.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if dcfg.kind not in ("glue", "instruction"):
        raise UserError(f"dataset.kind={dcfg.kind!r} is not valid. Valid: glue, instruction.")
    spec = get_task(dcfg.subset) if dcfg.kind == "glue" else None
    local = dcfg.data_files.train if split == "train" else dcfg.data_files.validation
    limit = dcfg.max_train_samples if split == "train" else dcfg.max_eval_samples
    if local:
        source = str(local)
        records = read_rows(local)
    else:
        source, records = _hub_rows(dcfg, split, spec)
    if limit is not None and limit >= 0:
        records = records[:limit]
    return [_check(number, record, source, spec) for number, record in records]


def expected_columns(spec: Any) -> str:
    if spec is None:
        return "instruction (text), input (optional text), output (text)"
    return ", ".join(spec.text_fields) + f", label ({label_choices(spec)})"


def _check(number: int, record: Any, source: str, spec: Any) -> dict[str, Any]:
    if spec is None:
        row, _column, problem = check_instruction_row(record)
    else:
        row, _column, problem = check_glue_row(record, spec)
    if row is None:
        what = f"{spec.name} data" if spec else "instruction data"
        raise UserError(
            f"{source}, row {number}: {problem}. Expected columns for {what}: {expected_columns(spec)}."
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

    from lrft.hub import require_hub  # offline: one message now, not a minute of retries

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
