"""``lrft export``: a finished run's adapter in PEFT's format (:mod:`lrft.export.peft`), into a
folder only lrft may replace; bad input prints one error and exits 2.
"""

from __future__ import annotations

from pathlib import Path

from lrft.cli.jobs import compose_job, print_help
from lrft.errors import EXIT_USAGE, UserError
from lrft.export.peft import ExportJob, write_peft_adapter
from lrft.run.lock import writing
from lrft.run.output import check_output, refuse_inside_run, refuse_overlap, resolve_run, say


def export_main(argv: list[str]) -> int:
    """``lrft export``: Hydra-style ``key=value`` arguments; prints errors and returns 2 on bad input."""
    if any(a in ("-h", "--help") for a in argv):
        print_help("export", ExportJob)
        return 0
    try:
        from lrft.run.final import load_run

        job = compose_job(argv, "export", ExportJob)
        run_dir = resolve_run(job.checkpoint)
        output = Path(job.output).resolve()
        refuse_overlap(output, run_dir)
        refuse_inside_run(output, "export")
        with writing(output, "lrft export"):  # the check and the publish: one step (lrft.run.lock)
            check_output(output, job.export.overwrite)
            run = load_run(run_dir)
            base = run.cfg.model.name_or_path or str(run_dir / "base")
            if write_peft_adapter(run.model, run.method, run.cfg, output, base_path=base) is None:
                raise UserError(
                    f"method '{run.method.name}' trains the weights themselves: there is no adapter to "
                    "export (`lrft merge` writes the trained model)."
                )
    except UserError as err:
        say(f"[bold red]error:[/] {err}")
        return EXIT_USAGE
    say(f"wrote PEFT adapter {output}")
    return 0
