"""How long the CLI takes to answer without training: ``lrft --help``, ``lrft train --help`` and a
config error (``lrft train method=lora_faa``), each in a fresh process, N times; prints medians.

None of these may import torch (tests/test_cli_ux.py checks that); this measures what is left
(Python start-up, rich, Hydra's compose). Usage: python scripts/bench_cli_latency.py [-n 7]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "lrft --help": ["--help"],
    "lrft train --help": ["train", "--help"],
    "lrft train method=lora_faa (exit 2)": ["train", "method=lora_faa"],
    "lrft --version": ["--version"],
}


def once(args: list[str]) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of the child, exit code). On a shared machine the CPU time is
    what an idle one would take; the wall time includes waiting for a core."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lrft", *args], capture_output=True, env=os.environ)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=7, help="runs per command (median reported)")
    n = parser.parse_args().n
    once(["--help"])  # warm the file cache and the bytecode
    for name, args in COMMANDS.items():
        walls, cpus, codes = zip(*(once(args) for _ in range(n)), strict=True)
        print(
            f"{name:38s} wall median {statistics.median(walls):.3f} s (min {min(walls):.3f})  "
            f"CPU median {statistics.median(cpus):.3f} s  exit {codes[0]}"
        )
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average at the end: {load:.2f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
