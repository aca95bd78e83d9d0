"""Fault injection for the reliability tests. ``LRFT_FAULT=kill_in_save:4`` SIGKILLs the process at
that point (as the OOM killer or a lost node would); ``interrupt_at_step:5`` sends SIGINT (Ctrl-C),
``term_at_step:5`` SIGTERM (a preempted job). Faults that change numbers instead of killing:
``nan_loss_at_step:3`` makes the loss of step 3 non-finite and ``grad_inf_at_step:3`` puts an inf in
a gradient of step 3 (what an fp16 overflow does); ``@R`` limits either to rank R
(``nan_loss_at_step:3@1``). Off, and free, unless the environment variable is set; never set it in
real runs."""

from __future__ import annotations

import os
import signal

_SPEC = os.environ.get("LRFT_FAULT", "")
_SIGNALS = {"interrupt": signal.SIGINT, "term": signal.SIGTERM}


def armed(point: str, step: int, rank: int = 0) -> bool:
    """Whether the fault ``point:step`` (optionally ``@rank``) is set for this process."""
    if not _SPEC:
        return False
    spec, _, only = _SPEC.partition("@")
    return spec == f"{point}:{step}" and (not only or int(only) == rank)


def maybe(point: str, step: int) -> None:
    """Fire the armed fault if it is ``point:step``: a signal to this process."""
    if not armed(point, step):
        return
    os.kill(os.getpid(), _SIGNALS.get(point.split("_")[0], signal.SIGKILL))
