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


def torchrun_nodes(
    args: list[list[str]], fault: str = "", cwd: Path | None = None
) -> list[subprocess.CompletedProcess]:
    """One torchrun "node" per entry of ``args`` (its overrides), all on localhost with one process
    each: ``--nnodes N --node_rank K`` and a static rendezvous on 127.0.0.1, as on a real cluster."""
    port = str(free_port())
    procs = []
    for rank, node_args in enumerate(args):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(len(args)), "--node_rank",
               str(rank), "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port,
               "-m", "lrft", "train", *node_args]  # fmt: skip
        env = dict(os.environ, LRFT_FAULT=fault, OMP_NUM_THREADS="1")
        procs.append(
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
        )
    done = []
    for p in procs:
        out, err = p.communicate(timeout=400)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done
