"""Every config group's schema (:mod:`lrft.schema`), registered in Hydra's ConfigStore.

Each YAML option extends its group's schema (``defaults: [/schema/<group>/<name>@_here_]``), so a
misspelled key in a YAML file or on the command line fails at composition. :func:`compose` turns
Hydra's failures into :class:`~lrft.errors.UserError` messages that name the key and its closest
valid spellings; :func:`validate` checks values and cross-group combinations.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lrft.config import source
from lrft.config.validate import validate
from lrft.errors import UserError, did_you_mean
from lrft.model.resolve import checkpoint_name
from lrft.schema import GROUP_SCHEMAS, GROUPS, BudgetConfig, TrainConfig, TrainerConfig


def config_dir() -> Path:
    """The packaged ``configs/`` folder (works for editable and regular installs)."""
    return Path(str(resources.files("lrft") / "configs")) if _packaged() else _repo_configs()


def _packaged() -> bool:
    return (Path(str(resources.files("lrft"))) / "configs" / "train.yaml").is_file()


def _repo_configs() -> Path:
    return Path(__file__).resolve().parents[2] / "configs"


def searchpath_override() -> str:
    """Put recipes/ on Hydra's search path: its overlays become the ``recipes`` group."""
    return f"hydra.searchpath=[file://{recipes_dir().parent}]"


@contextmanager
def hydra_configs() -> Iterator[None]:
    """Hydra initialised on lrft's ``configs/`` and, behind them, the user's ``--config-dir``
    (:mod:`lrft.config.source`), where a ``--config-name`` finds its file as ``lrft train`` does."""
    from hydra import version
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    version.setbase("1.3")
    search = create_config_search_path(search_path_dir=str(config_dir()))
    user = source.current().user_dir
    if user:
        search.append("lrft-user", f"file://{user}", anchor=SearchPathQuery(provider="main"))
    Hydra.create_main_hydra2(task_name="app", config_search_path=search)
    try:
        yield
    finally:
        GlobalHydra.instance().clear()


def normalize_overrides(overrides: list[str]) -> list[str]:
    """``recipes=X`` -> ``recipes@_global_=X``: recipes are global overlays, named plainly."""
    return [("recipes@_global_" + o[len("recipes") :]) if o.startswith("recipes=") else o for o in overrides]


def recipes_dir() -> Path:
    packaged = Path(str(resources.files("lrft"))) / "recipes"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "recipes"


def register_schemas() -> None:
    """Store every group schema (and each method's own) under ``schema/<group>/<name>``."""
    from hydra.core.config_store import ConfigStore

    from lrft.methods.registry import METHODS

    if not OmegaConf.has_resolver("bundled"):
        # ${bundled:quickstart/train.jsonl}: a data file shipped inside the package
        OmegaConf.register_new_resolver(
            "bundled", lambda rel: str(Path(__file__).resolve().parents[1] / "data" / rel)
        )
    if not OmegaConf.has_resolver("checkpoint_name"):
        # model=hf: the run is named after the checkpoint's folder / hub id
        OmegaConf.register_new_resolver("checkpoint_name", checkpoint_name)
    if not OmegaConf.has_resolver("run_stamp"):
        OmegaConf.register_new_resolver("run_stamp", run_stamp)
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    for group, schema in GROUP_SCHEMAS.items():
        cs.store(group=f"schema/{group}", name="base", node=schema)
    for name, spec in METHODS.items():
        cs.store(group="schema/method", name=name, node=spec.config)
    from lrft.objectives.schemas import OBJECTIVES

    for name, objective in OBJECTIVES.items():
        cs.store(group="schema/objective", name=name, node=objective.config)


def run_stamp() -> str:
    """The launch's timestamp: ``LRFT_RUN_STAMP`` (set once per launch by the CLI) or now."""
    import os
    import time

    return os.environ.get("LRFT_RUN_STAMP") or time.strftime("%Y-%m-%d_%H-%M-%S")


def group_options(group: str) -> list[str]:
    """Options of a config group, read from the config folder (nested ones as ``glue/cola``)."""
    root = recipes_dir() if group == "recipes" else config_dir() / group
    own = {str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml")}
    return sorted(own | set(source.user_options(group)))


def compose(overrides: list[str] | None = None, config_name: str = "train") -> DictConfig:
    """Compose the real configs with Hydra overrides, as ``lrft train`` does, and validate.

    Raises :class:`UserError` with the closest valid names for unknown groups, options or keys.
    ``train`` means the run's primary config: a user's ``--config-name`` (:mod:`lrft.config.source`).
    """
    from hydra import compose as hydra_compose

    overrides = list(overrides or [])
    primary = config_name == "train"
    config_name = source.current().name if primary else config_name
    check_overrides(overrides)  # group options; unknown keys are caught by Hydra's struct mode below
    register_schemas()
    try:
        with hydra_configs():
            cfg = hydra_compose(
                config_name, overrides=[*normalize_overrides(overrides), searchpath_override()]
            )
    except Exception as err:  # Hydra/OmegaConf composition errors -> one clear message
        raise UserError(explain_compose_error(err, overrides, config_name)) from None
    if primary:
        validate(cfg)
    elif config_name == "memory":  # train's groups: model=hf's task and targets come from the checkpoint
        from lrft.model.resolve import resolve_model_config

        resolve_model_config(cfg)
    absolute_paths(cfg)
    return cfg


PATH_KEYS = (
    "dataset.data_files.train",
    "dataset.data_files.validation",
    "dataset.data_files.validation_mismatched",
    "dataset.data_dir",
)


def absolute_paths(cfg: DictConfig, base: Path | None = None) -> None:
    """Store local data paths absolute, so the saved config works from any folder (``lrft eval
    checkpoint=RUN`` run elsewhere); hub ids and URLs are left as they are."""
    base = base or Path.cwd()
    for key in PATH_KEYS:
        value = OmegaConf.select(cfg, key, default=None)
        if not isinstance(value, str) or not value or "://" in value or Path(value).is_absolute():
            continue
        OmegaConf.update(cfg, key, str((base / Path(value).expanduser()).resolve()), merge=False)


_SIMPLE = re.compile(r"^([A-Za-z_]\w*)((?:\.\w+)*)=([\w./-]*)$")
# the sections a command line may set (TrainConfig's, less start_from: checkpoint='s record);
# ``memory``: memory.budget_gb, the budget trainer.memory_plan=auto plans for (lrft.memory.choose)
TOP_KEYS = (*GROUPS, "trainer", "memory", "output_dir", "recipes")
# lrft memory's own keys (lrft.cli.memory.MemorySection), named where lrft train is given one
MEMORY_ONLY = {
    "sharding": "a run's is trainer.sharding",
    "nodes": "a run's come from the launcher",
    "processes_per_node": "a run's come from the launcher",
}


def quick_check(overrides: list[str]) -> None:
    """Plain ``group=option`` and ``group.key=value`` overrides checked against the option files and
    the schemas, without Hydra: the common typos get their did-you-mean at once. Anything else
    (sweeps, ``+``/``~``, interpolations) is left to :func:`compose`, which checks everything."""
    from dataclasses import fields, is_dataclass

    from lrft.methods.registry import METHODS

    parsed = [m.groups() for m in map(_SIMPLE.match, overrides) if m]
    method = "lora_fa"
    for top, rest, value in parsed:
        if top not in TOP_KEYS:
            raise UserError(f"Unknown config key '{top}{rest}'.{did_you_mean(top, TOP_KEYS)}")
        if top in (*GROUPS, "recipes") and not rest and value:
            options = group_options(top)
            if value not in options:
                raise UserError(f"Unknown option '{value}' for {top}.{did_you_mean(value, options)}")
            method = value if top == "method" else method
    if any(top == "recipes" for top, _, _ in parsed):
        return  # a recipe may switch the method: leave its keys to the full composition
    schemas = dict(GROUP_SCHEMAS, trainer=TrainerConfig, memory=BudgetConfig, method=METHODS[method].config)
    for top, rest, _ in parsed:
        node: Any = schemas.get(top)
        parts = rest.split(".")[1:]
        for depth, part in enumerate(parts):
            if node is None or not is_dataclass(node):
                break  # a free-form dict (model.from_config) takes any key
            by_name = {f.name: f for f in fields(node)}
            if part not in by_name:
                dotted = ".".join([top, *parts[: depth + 1]])
                if top == "memory" and depth == 0 and part in MEMORY_ONLY:
                    raise UserError(
                        f"'{dotted}' is a key of lrft memory (the job a plan is per device of), not "
                        f"of lrft train: {MEMORY_ONLY[part]}. lrft train reads memory.budget_gb "
                        "(trainer.memory_plan=auto) and memory.target_length."
                    )
                raise UserError(f"Unknown config key '{dotted}'.{did_you_mean(part, by_name)}")
            f = by_name[part]
            node = f.default_factory() if callable(f.default_factory) else None


def check_overrides(overrides: list[str]) -> None:
    """Catch unknown groups, options and keys before Hydra does, to suggest the closest names."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as err:
        raise UserError(f"Cannot parse the overrides {overrides}: {err}") from None
    for ov in parsed:
        key = ov.key_or_group
        if key.startswith("hydra") or ov.is_delete():
            continue
        top, _, rest = key.partition(".")
        if top in (*GROUPS, "recipes") and not rest:
            values = _override_values(ov)
            options = group_options(top)
            for value in values:
                if value not in options and value is not None:
                    raise UserError(f"Unknown option '{value}' for {top}.{did_you_mean(value, options)}")


def _override_values(ov: Any) -> list[Any]:
    if ov.is_sweep_override():
        return [str(v) for v in ov.sweep_string_iterator()]
    value = ov.value()
    return [None if value is None else str(value)]


_KEY_RE = re.compile(r"Key '([^']+)' is not in struct")
_OVERRIDE_RE = re.compile(r"Could not override '([^']+)'")


def explain_compose_error(err: Exception, overrides: list[str], config_name: str = "train") -> str:
    """Turn a Hydra/OmegaConf composition error into a message with did-you-mean names."""
    text = str(err)
    cause = err.__cause__ or err.__context__
    full = f"{text}\n{cause}" if cause else text
    in_file = _IN_FILE_RE.search(full)
    syntax = _yaml_error(err)
    if syntax:
        return syntax
    if in_file:  # a key a config file (a user's, under --config-dir) sets that its schema lacks
        dotted, schema = in_file.group(2), in_file.group(3)
        hint = did_you_mean(dotted.rpartition(".")[2], _fields_of(schema))
        return f"Unknown config key '{dotted}' in the config file {in_file.group(1)}.yaml.{hint}"
    key_match = _OVERRIDE_RE.search(full)
    bad = _KEY_RE.search(full)
    if key_match or bad:
        dotted = key_match.group(1) if key_match else bad.group(1)
        parent, _, leaf = dotted.rpartition(".")
        valid = _keys_of(parent, overrides, config_name)
        hint = did_you_mean(leaf, valid) if valid else ""
        return f"Unknown config key '{dotted}'.{hint}"
    detail = str(cause).split("\n")[0] if cause else ""
    first = (text.strip().splitlines() or [type(err).__name__])[0]
    return f"Invalid configuration: {first}" + (f" ({detail})" if detail else "")


_IN_FILE_RE = re.compile(r"In '([^']+)': ConfigKeyError.*?full_key: (\S+).*?object_type=(\w+)", re.S)


def _yaml_error(err: BaseException | None) -> str | None:
    """A YAML syntax error anywhere in the chain, with its file and line."""
    import yaml

    while err is not None:
        if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
            mark = err.problem_mark
            return (
                f"YAML syntax error in {mark.name}, line {mark.line + 1}: {err.problem}"
                + (f" ({err.context})" if err.context else "")
                + "."
            )
        err = err.__cause__ or err.__context__
    return None


def _fields_of(type_name: str) -> list[str]:
    """The keys of the schema dataclass named ``type_name`` (a group's, a method's, a nested one)."""
    from dataclasses import fields, is_dataclass

    from lrft.methods.registry import METHODS

    todo: list[Any] = [TrainConfig, TrainerConfig, *GROUP_SCHEMAS.values()]
    todo += [m.config for m in METHODS.values()]
    seen = set()
    while todo:
        cls = todo.pop()
        if cls in seen or not is_dataclass(cls):
            continue
        seen.add(cls)
        if cls.__name__ == type_name:
            return [f.name for f in fields(cls)]
        todo += [f.default_factory for f in fields(cls) if callable(f.default_factory)]
    return []


def _keys_of(parent: str, overrides: list[str], config_name: str) -> list[str]:
    """The keys that exist under ``parent`` once the group choices among ``overrides`` apply."""
    from hydra import compose as hydra_compose

    groups_only = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in GROUPS]
    try:
        with hydra_configs():
            cfg = hydra_compose(config_name, overrides=[*groups_only, searchpath_override()])
        node = OmegaConf.select(cfg, parent) if parent else cfg
        return list(node.keys()) if isinstance(node, DictConfig) else []
    except Exception:
        return []
