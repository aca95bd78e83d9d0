"""Where one split's rows come from (a local file or a hub split), read in order and checked one
at a time, and the identity of their content (the file's hash or the hub set's fingerprint) that
:mod:`lrft.data.pipeline` keys its cache with.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from lrft.data.files import iter_rows
from lrft.data.fingerprint import file_hash
from lrft.data.glue import get_task
from lrft.data.load import _check, holding_out, holdout
from lrft.errors import UserError

BATCH = 1000  # rows per encode_rows call and per Arrow record batch


class RowSource:
    """Where one split's rows come from (a local file or a hub split) and its identity."""

    def __init__(self, dcfg: DictConfig, split: str) -> None:
        self.dcfg, self.split = dcfg, split
        self.spec = get_task(dcfg.subset) if dcfg.kind == "glue" else None
        self.local = dcfg.data_files.train if split == "train" else dcfg.data_files.validation
        if split == "eval" and not self.local and dcfg.data_files.train:
            self.local = dcfg.data_files.train  # eval rows held out of the train file (load.holdout)
        self.limit = dcfg.max_train_samples if split == "train" else dcfg.max_eval_samples
        if self.local:
            self.name = str(self.local)
        else:
            self.hub_split = _hub_split(dcfg, split, self.spec)
            subset = f" ({dcfg.subset})" if dcfg.subset else ""
            self.name = f"{dcfg.path}{subset} split '{self.hub_split}'"

    def identity(self, root: Path) -> str:
        """The content's fingerprint: the file's hash, or the hub set's own datasets fingerprint."""
        if self.local:
            path = Path(self.local).expanduser()
            if not path.is_file():
                list(iter_rows(path))  # raises the reader's own "not found" / "unsupported" error
            return file_hash(path, root)
        return str(getattr(self._hub(streaming=False), "_fingerprint", self.name))

    def records(self, streaming: bool = False) -> Iterator[tuple[int, Any]]:
        rows = iter_rows(self.local) if self.local else _hub_records(self._hub(streaming), self.name)
        if self.local and holding_out(self.dcfg):  # only a train file: the same rows as load_rows
            everything = list(rows)
            for number, record in everything:  # a bad row is named wherever the holdout puts it
                _check(number, record, self.name, self.spec, self.dcfg.kind)
            rows = iter(holdout(everything, self.dcfg, self.split, self.name))
        for count, item in enumerate(rows):
            if self.limit is not None and 0 <= self.limit <= count:
                return
            yield item

    def validated(self, streaming: bool = False) -> Iterator[dict[str, Any]]:
        for number, record in self.records(streaming):
            yield _check(number, record, self.name, self.spec, self.dcfg.kind)

    def _hub(self, streaming: bool) -> Any:
        if not self.dcfg.path:
            which = "train" if self.split == "train" else "validation"
            raise UserError(
                f"dataset '{self.dcfg.name}' has neither dataset.path (a hub id) "
                f"nor dataset.data_files.{which}."
            )
        if getattr(self, "_loaded", None) is not None and not streaming:
            return self._loaded
        import datasets

        from lrft.model.hub import require_hub  # offline: one message now, not a minute of retries

        require_hub(self.dcfg.path, "dataset.path", repo_type="dataset")
        try:
            ds = datasets.load_dataset(
                self.dcfg.path, self.dcfg.subset, split=self.hub_split, streaming=streaming
            )
        except Exception as err:  # network, unknown id/split: all user-fixable, so no traceback
            raise UserError(
                f"Cannot load {self.name} from the hub: {err}\n"
                "Offline? Set dataset.data_files.train / dataset.data_files.validation to local files."
            ) from None
        if not streaming:
            self._loaded = ds
        return ds


def _hub_split(dcfg: DictConfig, split: str, spec: Any) -> str:
    hub_split = dcfg.train_split if split == "train" else dcfg.eval_split
    if spec is not None and split == "eval" and hub_split == "validation":
        hub_split = spec.hub_eval_split  # MNLI has no plain "validation" split
    return hub_split


def _hub_records(ds: Any, name: str) -> Iterator[tuple[int, Any]]:
    number = 0
    for batch in ds.iter(batch_size=BATCH):
        for values in zip(*batch.values(), strict=True):
            number += 1
            yield number, dict(zip(batch, values, strict=True))
    if not number:
        raise UserError(f"{name}: the split is empty (no rows).")
