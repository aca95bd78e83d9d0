"""Fault injection for the reliability tests. ``LRFT_FAULT=kill_in_save:4`` SIGKILLs the process at
that point (as the OOM killer or a lost node would); ``interrupt_at_step:5`` sends SIGINT (Ctrl-C).
Off, and free, unless the environment variable is set; never set it in real runs."""

from __future__ import annotations

import os
import signal

_SPEC = os.environ.get("LRFT_FAULT", "")


def maybe(point: str, step: int) -> None:
    """Fire the armed fault if it is ``point:step``."""
    if not _SPEC or f"{point}:{step}" != _SPEC:
        return
    os.kill(os.getpid(), signal.SIGINT if point.startswith("interrupt") else signal.SIGKILL)
