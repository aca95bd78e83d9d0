"""What ``lrft merge`` and ``lrft export`` share on the command line: composing the job from its
YAML with did-you-mean for wrong keys, and the ``--help`` page of its schema.
"""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from lrft.errors import UserError


def compose_job(argv: list[str], name: str, schema: type) -> Any:
    """Compose ``configs/<name>.yaml`` with ``key=value`` overrides, then type it with ``schema``.

    The YAML needs no registered schema (any tool can compose it); unknown keys still fail in
    Hydra's struct mode, with did-you-mean, and wrong types fail here.
    """
    from omegaconf.errors import OmegaConfBaseException

    from lrft.config.compose import compose

    cfg = compose(argv, name)
    try:
        typed = OmegaConf.merge(OmegaConf.structured(schema), cfg)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise UserError(f"Invalid value for {key}: {str(err).splitlines()[0]}") from None
    for key in ("checkpoint", "output"):
        if OmegaConf.is_missing(typed, key):
            raise UserError(f"lrft {name} needs {key}=PATH: lrft {name} checkpoint=RUN_DIR output=OUT_DIR")
    return OmegaConf.to_object(typed)


def print_help(name: str, schema: type) -> None:
    """``lrft merge|export --help``: every key of the command's schema, its default and meaning."""
    from lrft.cli.help import print_command_help

    usage = f"lrft {name} checkpoint=RUN_DIR output=DIR [key=value ...]"
    print_command_help(name, schema, usage)
