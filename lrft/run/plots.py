"""Loss curves as PNG files: one run's ``loss.png`` and ``lrft plot`` overlays of several runs.

Both read ``RUN/metrics.jsonl`` (train records carry ``step`` and ``loss``; evaluation records
``step`` and ``eval/<metric>``). matplotlib is imported only here, lazily, and drawn through its
Agg canvas directly, so no GUI backend is needed and a caller's own pyplot backend is left alone.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

from lrft.errors import UserError
from lrft.run.atomic import check_file_output, publish_file

# evaluation keys that are counts or restate the loss: not curves worth a panel
_NOT_CURVES = {"eval/loss", "eval/n", "eval/perplexity", "eval/invalid", "eval/truncated"}
Curve = tuple[list[int], list[float]]


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl``; a half-written last line (a live run) is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int | float):
            records.append(record)
    return records


def curve(records: list[dict[str, Any]], key: str) -> Curve:
    """(steps, values) of one metric, in step order, the last record winning for a repeated step
    (a resumed run rewrites the steps after its checkpoint)."""
    points: dict[int, float] = {}
    for record in records:
        value = record.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            points[int(record["step"])] = float(value)
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def write_loss_plot(run_dir: str | Path) -> Path | None:
    """Draw ``run_dir/loss.png``: train and eval loss, plus the other eval metrics (accuracy,
    F1...) in a second panel when there are any. Returns the file, or None before the first
    record (or without matplotlib: a plot is never worth failing a run). The file is replaced
    atomically, so a viewer never sees half of it."""
    run_dir = Path(run_dir)
    if importlib.util.find_spec("matplotlib") is None:  # a runtime dependency, but never fail a run
        return None
    records = read_metrics(run_dir)
    train, evals = curve(records, "loss"), curve(records, "eval/loss")
    others = sorted({k for r in records for k in r if k.startswith("eval/") and k not in _NOT_CURVES})
    if not train[0] and not evals[0] and not others:
        return None
    fig, canvas = _figure(2 if others else 1)
    ax = fig.axes[0]
    _line(ax, train, "train", "tab:blue", "-")
    _line(ax, evals, "eval", "tab:orange", "--", marker="o")
    _style(ax, "loss", f"{run_dir.name}: loss")
    if others:
        metrics = fig.axes[1]
        for i, key in enumerate(others):
            _line(metrics, curve(records, key), key[len("eval/") :], f"C{(i + 2) % 10}", "--", marker="o")
        _style(metrics, "eval metric", "evaluation")
    try:
        return _save(fig, canvas, run_dir / "loss.png")
    except UserError as err:  # a full disk: the caller's own writes say so where it matters
        print(f"warning: loss plot not drawn: {err}", file=sys.stderr)
        return None


def plot_runs(
    run_dirs: list[str | Path], out: str | Path, metric: str = "loss", overwrite: bool = False
) -> Path:
    """Overlay ``metric`` of several runs in one PNG: ``loss`` draws each run's train loss (solid)
    and eval loss (dashed, same colour); any other name draws ``metric`` or ``eval/<metric>``.

    ``out`` may be a folder (the PNG is ``<metric>.png`` in it). An existing file is replaced only
    if lrft plot wrote it, or with ``overwrite``."""
    if not run_dirs:
        raise UserError("lrft plot needs at least one run folder.")
    out = Path(out).expanduser()
    if out.is_dir():
        out = out / f"{metric.replace('/', '_')}.png"
    rules = dict(overwrite=overwrite, flag="--overwrite", ours=written_by_lrft)
    check_file_output(out, **rules)  # before any drawing
    runs = [Path(r) for r in run_dirs]
    labels = _labels(runs)
    fig, canvas = _figure(1)
    ax = fig.axes[0]
    missing = []
    for i, (run, label) in enumerate(zip(runs, labels, strict=True)):
        if not run.is_dir():
            raise UserError(f"{run}: folder not found.")
        records = read_metrics(run)
        if not records:
            raise UserError(f"{run}: no metrics.jsonl records (not a run folder, or no step logged yet).")
        colour = f"C{i % 10}"
        if metric == "loss":
            lines = _line(ax, curve(records, "loss"), f"{label} train", colour, "-")
            lines += _line(ax, curve(records, "eval/loss"), f"{label} eval", colour, "--", marker="o")
        else:
            key = metric if any(metric in r for r in records) else f"eval/{metric}"
            lines = _line(ax, curve(records, key), label, colour, "-", marker="o")
        if not lines:
            missing.append(label)
    if len(missing) == len(runs):
        found = sorted({k for run in runs for r in read_metrics(run) for k in r if k != "step"})
        raise UserError(f"No run has the metric '{metric}'. Metrics in these runs: {', '.join(found)}.")
    shown = len(runs) - len(missing)
    _style(ax, metric, f"{metric}: {shown} run" + ("s" if shown > 1 else ""))
    for label in missing:
        print(f"note: {label} has no '{metric}'; left out", file=sys.stderr)
    return _save(fig, canvas, out, **rules)


def _figure(panels: int) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4 * panels, 4.2), dpi=110, layout="constrained")
    canvas = FigureCanvasAgg(fig)
    fig.subplots(1, panels, squeeze=False)
    return fig, canvas


def _line(ax: Any, points: Curve, label: str, colour: str, style: str, marker: str | None = None) -> int:
    steps, values = points
    if not steps:
        return 0
    # markers only where points are sparse (evaluations), or a lone point would be invisible
    show = marker if marker and len(steps) <= 60 else ("o" if len(steps) == 1 else None)
    ax.plot(steps, values, style, color=colour, label=label, marker=show, markersize=4, linewidth=1.6)
    return 1


def _style(ax: Any, ylabel: str, title: str) -> None:
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend(fontsize="small")


def _labels(runs: list[Path]) -> list[str]:
    """Folder names, lengthened with their parents until they differ (sweeps share leaf names)."""
    depth = 1
    while True:
        labels = ["/".join(run.resolve().parts[-depth:]) for run in runs]
        if len(set(labels)) == len(labels) or depth > 4:
            return labels
        depth += 1


SOFTWARE = "lrft plot"  # the PNG's Software text: how a later plot knows the file is its own


def written_by_lrft(path: Path) -> bool:
    """A PNG lrft drew (its tEXt chunk, within the first bytes, names :data:`SOFTWARE`)."""
    try:
        with path.open("rb") as fh:
            head = fh.read(4096)
    except OSError:
        return False
    return head.startswith(b"\x89PNG") and SOFTWARE.encode() in head


def _save(fig: Any, canvas: Any, path: Path, **rules: Any) -> Path:
    """The PNG written aside and renamed into place (:func:`lrft.run.atomic.publish_file`)."""
    rules = rules or dict(overwrite=True, flag="--overwrite")  # a run's own loss.png

    def draw(tmp: Path) -> None:
        canvas.print_png(str(tmp), metadata={"Software": SOFTWARE})

    return publish_file(path, draw, **rules)
