"""Rich progress bar and tables for training (main process only)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

console = Console(stderr=True)


class TrainProgress:
    """Steps, loss, learning rate, real (non-pad) tokens/s and the padding share in one line;
    notes printed above the bar."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.enabled = enabled
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            disable=not enabled,
        )
        self.task = self.progress.add_task("train", total=total, stats="")

    def __enter__(self) -> TrainProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def update(
        self,
        step: int,
        loss: float | None = None,
        lr: float | None = None,
        tps: float | None = None,
        pad: float | None = None,
    ) -> None:
        stats = {}
        if loss is not None:
            # padding: the share of computed positions that were pad (what packing or
            # trainer.group_by_length would win back)
            padding = f" (pad {pad:.0%})" if pad else ""
            stats["stats"] = f"loss {loss:.4f}  lr {lr:.2e}  {tps:,.0f} tok/s{padding}"
        self.progress.update(self.task, completed=step, **stats)

    def note(self, text: str) -> None:
        """Printed with or without the bar: notes say what the run did (resumed, started over)."""
        self.progress.console.print(text)

    def summary(self, summary: dict[str, Any]) -> None:
        if not self.enabled:
            return
        console.print(summary_table(summary))


def summary_table(summary: dict[str, Any]) -> Table:
    """The end-of-run table. The run folder is what eval, merge and export need: at any terminal
    width it is folded onto more lines, never cut with an ellipsis."""
    table = Table(title="run summary", show_header=False)
    table.add_column("what", no_wrap=True)
    table.add_column("value", overflow="fold")
    table.add_row("steps", str(summary["steps"]))
    table.add_row("final train loss", f"{summary['train_loss']:.4f}")
    for key, value in summary["eval"].items():
        table.add_row(f"eval {key}", f"{value:.4f}" if isinstance(value, float) else str(value))
    share = summary["trainable_params"] / max(1, summary["total_params"])
    table.add_row("trainable parameters", f"{summary['trainable_params']:,} ({share:.2%})")
    if summary.get("tokens_per_s"):
        pad = summary.get("padding", 0.0)
        table.add_row("real tokens/s", f"{summary['tokens_per_s']:,.0f} ({pad:.0%} of positions were pad)")
    table.add_row("run folder", summary["run_dir"])
    return table
