"""User-facing errors: a clear message and exit code 2, never a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

EXIT_USAGE = 2


class UserError(Exception):
    """Bad input from the user (config, data file, combination). The CLI prints it and exits 2."""


class Interrupted(Exception):
    """Training stopped by Ctrl-C or SIGTERM after saving what it could.

    ``code`` is the process exit status the CLI returns: 130 for Ctrl-C (SIGINT), 143 for SIGTERM
    (128 + the signal number, what shells and schedulers expect).
    """

    def __init__(self, message: str = "", code: int = 130) -> None:
        super().__init__(message)
        self.code = code


def closest(word: str, options: Iterable[str], n: int = 3) -> list[str]:
    """The valid names nearest to ``word``, best first (may be empty)."""
    options = sorted(set(options))
    hits = difflib.get_close_matches(word, options, n=n, cutoff=0.5)
    if not hits:
        # a prefix or substring match still helps ("lora_" -> lora, lora_fa)
        hits = [o for o in options if o.startswith(word) or word in o][:n]
    return hits


def did_you_mean(word: str, options: Iterable[str]) -> str:
    options = sorted(set(options))
    hits = closest(word, options)
    hint = f" Did you mean: {', '.join(hits)}?" if hits else ""
    return f"{hint} Valid: {', '.join(options)}."


def one_of(key: str, value: Any, valid: tuple[str, ...]) -> None:
    """Refuse ``key=value`` unless value is one of ``valid``, naming the closest."""
    if value not in valid:
        raise UserError(f"{key}={value!r} is not valid.{did_you_mean(str(value), valid)}")
