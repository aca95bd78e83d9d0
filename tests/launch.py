"""One launcher for the multi-process tests: torchrun with 2 CPU processes (gloo) on a free port."""

import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(
    args: list[str], fault: str = "", cwd: Path | None = None, nproc: int = 2
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), "-m", "lrft", "train", *args]  # fmt: skip
    env = dict(os.environ, LRFT_FAULT=fault, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=cwd)
