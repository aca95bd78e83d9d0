"""Where a run's configs come from: lrft's own ``configs/``, plus a user's ``--config-dir``.

A user folder may hold options of lrft's groups (``yc/method/mygood.yaml``, then
``method=mygood``) and whole run configs named with ``--config-name`` (``yc/myrun.yaml``, which
usually starts from lrft's: ``defaults: [train, override method: lora, _self_]``). The folder is
put on Hydra's search path behind lrft's own configs, so every packaged option stays available.

The source is part of the run: ``run_info.json`` records it, and a resume composes from it again,
so ``lrft train output_dir=RUN trainer.resume=auto`` needs no flags (issue 24, finding 4).
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from lrft.errors import UserError, did_you_mean


@dataclass(frozen=True)
class Source:
    """``user_dir``: an absolute user config folder or None; ``name``: the primary config."""

    user_dir: str | None = None
    name: str = "train"
    command: list[str] = field(default_factory=list)  # the user's argv after ``lrft train``

    def flags(self) -> list[str]:
        """The ``lrft train`` flags that select this source (none for lrft's own configs)."""
        out = ["--config-dir", self.user_dir] if self.user_dir else []
        return out + (["--config-name", self.name] if self.name != "train" else [])

    def command_line(self, overrides: list[str]) -> str:
        return shlex.join(["lrft", "train", *self.flags(), *overrides])


_current = Source()


def current() -> Source:
    return _current


def use(source: Source) -> None:
    """Compose every later config of this process from ``source`` (the CLI sets it once)."""
    global _current
    _current = source


def from_flags(config_dir: str | None, config_name: str | None, config_path: str | None) -> Source:
    """The source Hydra's ``--config-dir`` / ``--config-name`` flags ask for, checked."""
    if config_path:
        raise UserError(
            "--config-path replaces lrft's own configs (and their schemas): use --config-dir DIR, "
            "which adds DIR's options and run configs to lrft's."
        )
    user_dir = None
    if config_dir:
        path = Path(config_dir).expanduser().resolve()
        if not path.is_dir():
            raise UserError(f"--config-dir {config_dir}: no such folder.")
        user_dir = str(path)
    name = (config_name or "train").removesuffix(".yaml")
    if name != "train":
        names = primary_names(user_dir)
        if name not in names:
            where = f"in {user_dir}" if user_dir else "(give --config-dir DIR for your own configs)"
            raise UserError(f"--config-name {name}: no {name}.yaml {where}.{did_you_mean(name, names)}")
    return Source(user_dir, name)


def primary_names(user_dir: str | None) -> list[str]:
    """Run configs a ``--config-name`` may name: the user folder's top-level YAML files."""
    if not user_dir:
        return ["train"]
    return sorted({"train", *(p.stem for p in Path(user_dir).glob("*.yaml"))})


def user_options(group: str) -> list[str]:
    """Options of ``group`` in the user folder (nested ones as ``glue/cola``)."""
    if not _current.user_dir:
        return []
    root = Path(_current.user_dir) / group
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def saved(run_dir: Path) -> Source | None:
    """The source ``run_dir`` was composed from (None: lrft's own, or not recorded)."""
    try:
        info = json.loads((run_dir / "run_info.json").read_text())
    except (OSError, ValueError):
        return None
    user_dir, name = info.get("config_dir"), info.get("config_name") or "train"
    if not user_dir and name == "train":
        return None
    if user_dir and not Path(user_dir).is_dir():
        raise UserError(
            f"{run_dir} was composed with --config-dir {user_dir}, which no longer exists: restore "
            "that folder to resume the run."
        )
    return Source(user_dir, name)
