"""``lrft merge``: compose the job from ``configs/merge.yaml`` and ``key=value`` overrides, run
:func:`lrft.export.merge.merge_run`; bad input prints one error and exits 2.
"""

from __future__ import annotations

from lrft.cli.jobs import compose_job, print_help
from lrft.errors import EXIT_USAGE, UserError
from lrft.export.merge import MergeJob, merge_run
from lrft.run.output import say


def merge_main(argv: list[str]) -> int:
    """``lrft merge``: Hydra-style ``key=value`` arguments; prints errors and returns 2 on bad input."""
    if any(a in ("-h", "--help") for a in argv):
        print_help("merge", MergeJob)
        return 0
    try:
        job = compose_job(argv, "merge", MergeJob)
        merge_run(job.checkpoint, job.output, job.merge)
    except UserError as err:
        say(f"[bold red]error:[/] {err}")
        return EXIT_USAGE
    return 0
