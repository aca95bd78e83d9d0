"""``lrft plot RUN [RUN ...]``: overlay the curves of run folders into one PNG (:mod:`lrft.run.plots`)."""

from __future__ import annotations

import argparse

from lrft.run.plots import plot_runs


def plot_main(argv: list[str]) -> int:
    """``lrft plot RUN [RUN ...] [--out FILE] [--metric loss]``."""
    parser = argparse.ArgumentParser(
        prog="lrft plot", description="Overlay the curves of one or more run folders into one PNG."
    )
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders (holding metrics.jsonl)")
    parser.add_argument(
        "--out",
        default=None,
        help="PNG file (or folder) to write (default: <metric>.png here); a file lrft drew is replaced",
    )
    parser.add_argument(
        "--metric", default="loss", help="loss (train + eval), or an eval metric: accuracy, f1, ..."
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing --out file lrft did not draw"
    )
    args = parser.parse_args(argv)
    out = args.out or f"{args.metric.replace('/', '_')}.png"
    path = plot_runs(args.runs, out, args.metric, overwrite=args.overwrite)
    print(f"wrote {path}")
    return 0
