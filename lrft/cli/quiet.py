"""Quiet by default: lrft prints its own progress and summary once; third-party progress bars
("Loading weights", "Writing model shards", dataset maps) and known harmless warnings are hidden.
``-v`` / ``--verbose`` / ``verbose=true`` (or ``LRFT_VERBOSE=1``) shows them all again.

Set through environment variables before transformers, datasets or huggingface_hub are imported
(each reads them once), so this costs no import; variables the user set win.
"""

from __future__ import annotations

import logging
import os
import warnings

VERBOSE_FLAGS = ("-v", "--verbose", "verbose=true", "verbose=True", "verbose=1")

QUIET_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' own bars follow huggingface_hub's switch
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "DATASETS_VERBOSITY": "error",
    "TOKENIZERS_PARALLELISM": "false",
}
# loggers that repeat one harmless line per layer or per import
NOISY_LOGGERS = ("bitsandbytes", "accelerate.utils.modeling", "torch.distributed.elastic", "kernels")


def split_verbose(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without the verbosity flags, and whether one was given (or LRFT_VERBOSE is set)."""
    rest = [a for a in argv if a not in VERBOSE_FLAGS]
    verbose = len(rest) != len(argv) or os.environ.get("LRFT_VERBOSE", "") not in ("", "0")
    return rest, verbose


def setup(verbose: bool) -> None:
    """Hide third-party bars and known warnings unless ``verbose``."""
    if verbose:
        os.environ["LRFT_VERBOSE"] = "1"  # child processes (accelerate launch) follow
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.showwarning = _show_warning
    # deprecation notices from dependencies are for their callers' authors, not for users
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", module=r"bitsandbytes(\.|$)")
    warnings.filterwarnings("ignore", message=r".*MatMul8bitLt.*")
    warnings.filterwarnings("ignore", message=r".*torch_dtype.*is deprecated.*")


_raw_show = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None):  # type: ignore[no-untyped-def]
    """lrft's own warnings as one ``warning: ...`` line, not ``file.py:139: UserWarning:`` with a
    source line: they are written for users. Other packages' warnings keep their usual form."""
    if issubclass(category, UserWarning) and f"{os.sep}lrft{os.sep}" in str(filename):
        import sys

        print(f"warning: {message}", file=file or sys.stderr)
        return
    _raw_show(message, category, filename, lineno, file, line)
