"""``lrft train checkpoint=RUN``: a new run that starts from a finished run's final model, MERGED.

Alignment after SFT needs π_ref = the SFT model. lrft's reference is the policy with its low-rank
adapters switched off (:func:`lrft.methods.layers.adapters_off`), so the SFT model must be the new
run's *base*: the finished run's base weights with its trained adapter folded in (what ``lrft merge``
computes, :mod:`lrft.export.merge`), or its final weights for a run that trained every weight. A
fresh adapter of the new run's method then trains on top. Nothing is continued: the old adapter,
optimizer and schedule are gone, and "adapters off" is exactly the merged SFT model.

The merged model is written to ``OUTPUT/base/``, the folder a run keeps its own base weights in
(:mod:`lrft.run.folder` knows it: a failed attempt and ``trainer.overwrite=true`` remove it with the
rest of the run), published atomically (:func:`lrft.run.atomic.staged_dir`, ``base/COMPLETE`` last)
with a record, ``base/lrft_start.json``. ``checkpoint=`` is translated here, before Hydra, into
ordinary overrides: the finished run's model section with ``model.name_or_path=OUTPUT/base``, and
``start_from.run/step/fingerprint``. They are what ``run_info.json`` saves, so a resume re-composes
the same run and finds the merged start in place instead of merging again.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lrft.errors import UserError

KEY = "checkpoint"
START = "base"  # the run folder's own base-weights folder (lrft.run.folder.RUN_FILES)
RECORD = "lrft_start.json"
# model keys the new run may still set: how the merged model is loaded, where the new adapter goes
CHANGEABLE = ("name", "dtype", "device_map", "attn_implementation", "target_modules", "modules_to_save",
              "trust_remote_code")  # fmt: skip
# what the merged model is: fixed by the finished run (its weights and tokenizer are in base/)
FIXED = ("name_or_path", "from_config", "arch", "task", "tokenizer", "revision")
PREFERENCE = ("dpo", "ipo", "orpo", "simpo", "kto")
WAIT_ENV = "LRFT_START_WAIT"  # seconds the other processes wait for rank 0's merge (default 3 h)


def _key(text: str) -> str:
    return text.partition("=")[0].lstrip("+~")


def _value(overrides: list[str], key: str) -> str | None:
    found = None
    for text in overrides:
        if "=" in text and _key(text) == key:
            found = text.partition("=")[2]
    return found


def requested(overrides: list[str]) -> str | None:
    """The ``checkpoint=`` value among ``overrides`` (the last one), or None."""
    return _value(overrides, KEY)


def without(overrides: list[str]) -> list[str]:
    """``overrides`` minus ``checkpoint=`` (the config has no such key: it is this module's)."""
    return [o for o in overrides if _key(o) != KEY]


def refuse_given(argv: list[str]) -> None:
    """``start_from.*`` records what ``checkpoint=`` merged: typed by hand it would claim a start
    that never happened."""
    for text in argv:
        key = _key(text)
        if "=" in text and (key == "start_from" or key.startswith("start_from.")):
            raise UserError(f"{key} is set by checkpoint=RUN, not a key to give: use checkpoint=RUN.")


def finished_run(value: str) -> Path:
    """The run folder ``checkpoint=value`` names, checked to be a finished ``lrft train`` run."""
    from lrft.run.folder import checkpoint_step, resume_command

    path = Path(value).expanduser().resolve()
    if path.name == "final" and (path.parent / "config.yaml").is_file():
        path = path.parent
    if not path.exists():
        raise UserError(
            f"checkpoint={value}: {path} does not exist. Give the folder of a finished lrft train run."
        )
    if not path.is_dir():
        raise UserError(
            f"checkpoint={value} is a file: give the folder of a finished lrft train run (it holds "
            "config.yaml and final/), not one of its files."
        )
    if not (path / "config.yaml").is_file():
        raise UserError(f"checkpoint={value}: {path} is not an lrft run folder (no config.yaml).")
    if not (path / "final" / "COMPLETE").is_file():
        step = checkpoint_step(path)
        if step is None:
            how = "it has no checkpoint either: train it again (trainer.overwrite=true), then start from it."
        else:
            how = (
                f"its newest checkpoint is step {step}, so it needs a resume to finish:\n  "
                f"{resume_command(path)}\nthen start from it."
            )
        raise UserError(
            f"checkpoint={value}: {path} is not a finished run (no final state, final/COMPLETE); {how}"
        )
    return path


def fingerprint(final: Path) -> str:
    """sha256 over ``final/``: every file's name and contents (files over 256 MiB, a full model's
    shards: name, size and mtime, so a resume does not re-read gigabytes)."""
    h = hashlib.sha256()
    for path in sorted(p for p in final.rglob("*") if p.is_file()):
        stat = path.stat()
        h.update(f"{path.relative_to(final)}\0{stat.st_size}\0".encode())
        if stat.st_size > 256 << 20:
            h.update(str(stat.st_mtime_ns).encode())
            continue
        with path.open("rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def _fmt(value: Any) -> str:
    """A value in Hydra's override grammar (strings quoted: paths, names with any character)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(_fmt(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


def _model_group(run_dir: Path) -> str | None:
    """The ``model=`` option the finished run was launched with (None: the default one)."""
    from lrft.run.folder import saved_overrides

    return _value(saved_overrides(run_dir) or [], "model")


def _refuse_contradictions(user: list[str], run_dir: Path, group: str | None, sft: Any) -> None:
    """Model overrides that would describe another model than the one merged into base/."""
    what = f"checkpoint={run_dir} starts from that run's model ({sft.model.name}, merged)"
    for text in user:
        key = _key(text)
        if key == "model" and text.partition("=")[2] not in (group, sft.model.name):
            raise UserError(
                f"{what}; {text} asks for another model. Drop {text} to start from that run, or drop "
                "checkpoint= to train that model from its own weights."
            )
        leaf = key.removeprefix("model.").split(".")[0]
        if key.startswith("model.") and leaf in FIXED:
            raise UserError(
                f"{what}, with its weights and tokenizer; {text} would change what that model is. Drop "
                f"it (the start sets model.{leaf}), or drop checkpoint= to train another model. A start "
                f"may still set model.{{{','.join(CHANGEABLE)}}}."
            )


def _refuse_task(run_dir: Path, sft: Any, user: list[str]) -> None:
    objective = _value(user, "objective") or "sft"
    if objective in PREFERENCE and sft.model.task != "causal":
        raise UserError(
            f"checkpoint={run_dir} is a {sft.model.task} run (model {sft.model.name}, dataset "
            f"{sft.dataset.name}); objective={objective} tunes a causal language model. Start from a "
            "causal run (an SFT run on dataset=instruction or dataset=chat)."
        )


def translate(overrides: list[str], compose: Callable[[list[str]], Any]) -> list[str]:
    """``overrides`` with ``checkpoint=RUN`` replaced by what it means: the finished run's model
    section, loaded from ``OUTPUT/base`` (merged there after the run folder is claimed, see
    :func:`ensure_start`), and ``start_from.*``; ``output_dir`` made explicit (the merge needs it)."""
    from lrft.run.final import read_run_config

    value = requested(overrides)
    assert value is not None
    run_dir = finished_run(value)
    sft = read_run_config(run_dir)
    user = without(overrides)
    refuse_given(user)
    group = _model_group(run_dir)
    _refuse_contradictions(user, run_dir, group, sft)
    _refuse_task(run_dir, sft, user)
    given = {_key(o) for o in user}
    summary = _read_json(run_dir / "summary.json")
    step = summary.get("steps") if isinstance(summary.get("steps"), int) else None
    made = [f"model={group}"] if group else []
    from omegaconf import OmegaConf

    for key, val in OmegaConf.to_container(sft.model, resolve=True).items():  # type: ignore[union-attr]
        if key not in ("name_or_path", "from_config") and f"model.{key}" not in given:
            made.append(f"model.{key}={_fmt(val)}")
    made += [
        "model.from_config=null",
        f"start_from.run={_fmt(str(run_dir))}",
        f"start_from.step={_fmt(step)}",
        f"start_from.fingerprint={_fmt(fingerprint(run_dir / 'final'))}",
    ]
    out_text = _value(user, "output_dir")
    if out_text is None:  # the default, timestamped folder: named now, since the merge goes into it
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UserError(
                "checkpoint=RUN with several processes needs output_dir=: each reads the start there."
            )
        os.environ.setdefault("LRFT_RUN_STAMP", time.strftime("%Y-%m-%d_%H-%M-%S"))
        probe = [*made, f"model.name_or_path={_fmt(str(run_dir / 'final'))}", *user]
        out_text = str(_compose(compose, probe, run_dir, sft).output_dir)
        user = [*user, f"output_dir={out_text}"]  # as typed: lrft.run.folder reads it unparsed
    out = Path(out_text).expanduser().resolve()
    if out == run_dir or run_dir in out.parents:
        raise UserError(
            f"output_dir={out} is (inside) checkpoint={run_dir}: choose a folder outside that run."
        )
    result = [*made, f"model.name_or_path={_fmt(str(out / START))}", *user]
    cfg = _compose(compose, result, run_dir, sft)
    changed = [k for k in FIXED if k not in ("name_or_path", "from_config") and cfg.model[k] != sft.model[k]]
    if changed:
        lines = ", ".join(f"model.{k}: {sft.model[k]!r} -> {cfg.model[k]!r}" for k in changed)
        raise UserError(
            f"checkpoint={run_dir}: the overrides change the model it starts from ({lines}); drop them."
        )
    return result


def _compose(compose: Callable[[list[str]], Any], overrides: list[str], run_dir: Path, sft: Any) -> Any:
    try:
        return compose(overrides)
    except UserError as err:
        raise UserError(f"checkpoint={run_dir} ({sft.model.task} model {sft.model.name}): {err}") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def is_complete(dest: Path, fp: str | None) -> bool:
    """``dest`` holds a whole merged start of the finished run with fingerprint ``fp``."""
    return (dest / "COMPLETE").is_file() and _read_json(dest / RECORD).get("fingerprint") == fp


def tidy_unstarted(out: Path) -> None:
    """A start merged (or half merged, a killed process) into ``out`` whose training never began:
    the folder holds nothing a run folder is recognised by, and would be refused as foreign.
    Removed, so the same command merges again. Only lrft's own names are touched."""
    import shutil

    from lrft.run.lock import LOCK_NAME

    if not out.is_dir() or int(os.environ.get("RANK", "0")) != 0:
        return
    names = {p.name for p in out.iterdir()} - {LOCK_NAME}
    staged = {n for n in names if n.startswith(f".tmp-{START}")}
    ours = names <= {START, ".hydra", "cli.log", "train.log", *staged}
    if names and ours and (START not in names or (out / START / RECORD).is_file()):
        from lrft.run.atomic import _alive

        for name in staged:  # a staging folder of a live merge (another process) is not ours
            pid = name.rpartition("-")[2]
            if pid.isdigit() and _alive(int(pid)) and int(pid) != os.getpid():
                return
        for name in names:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def ensure_start(cfg: Any, say: Callable[[str], None]) -> None:
    """After the run folder is claimed (:func:`lrft.run.folder.prepare`): make ``OUTPUT/base`` the
    merged start, unless it already is (a resume, or a retry after the merge). Rank 0 merges; the
    other processes wait for its ``COMPLETE`` (each node's local rank 0 with trainer.shared_fs=false)."""
    run = cfg.start_from.run
    if not run:
        return
    dest = Path(str(cfg.model.name_or_path))
    fp, step = cfg.start_from.fingerprint, cfg.start_from.step
    what = f"{run} (step {step})"
    if is_complete(dest, fp):
        say(f"start: {what}, merged earlier into {dest} (reused, not merged again)")
        return
    if (dest / "COMPLETE").is_file():
        raise UserError(f"{dest} holds another start than {what}: remove it or start a new run.")
    local = cfg.trainer.get("shared_fs") is False
    rank = int(os.environ.get("LOCAL_RANK" if local else "RANK", "0"))
    if rank != 0:
        _wait(dest, fp)
        return
    now = fingerprint(Path(run) / "final")
    if now != fp:
        raise UserError(
            f"{run}'s final state changed since this run started from it (fingerprint {fp} -> {now}) "
            f"and {dest} is gone: the start cannot be rebuilt. Start a new run from it."
        )
    say(start_line(cfg, what, dest))
    record = merge_start(Path(run), dest, say)
    if record.get("fingerprint") != fp:  # the run changed while it was read
        raise UserError(f"{run} changed while it was merged: run the same command again.")


def start_line(cfg: Any, what: str, dest: Path) -> str:
    """What the start is, said once when it is merged: merged, and not a continuation."""
    sft_method = _read_json(Path(str(cfg.start_from.run)) / "final" / "lrft.json").get("method", {})
    sft_method = str(sft_method.get("name", "?"))
    how = (
        f"its final weights as they are ({sft_method} trains every weight)"
        if _full_weights(sft_method)
        else f"its {sft_method} adapter folded into its base weights"
    )
    method = str(cfg.method.name)
    if _full_weights(method):
        then = f"{method} trains every weight from there"
    else:
        ref = f", the {cfg.objective.name} reference" if _has_reference(cfg) else ""
        then = (
            f"A fresh {method} adapter trains on top, so with adapters off the model is that run's model{ref}"
        )
    return f"start: {what} MERGED into {dest}: {how}. {then} (not a continuation of that run)."


def _has_reference(cfg: Any) -> bool:
    from lrft.objectives import get_objective

    objective = get_objective(cfg)
    return bool(objective is not None and getattr(objective, "reference", False))


def _full_weights(method: str) -> bool:
    from lrft.methods import get_method

    try:
        return bool(get_method(method).full_weights)
    except Exception:  # a method this lrft does not have: the merge says so
        return False


def _wait(dest: Path, fp: str | None) -> None:
    limit = float(os.environ.get(WAIT_ENV) or 3 * 3600)
    start = time.monotonic()
    while not is_complete(dest, fp):
        if time.monotonic() - start > limit:
            raise UserError(f"waited {limit:.0f} s for rank 0 to merge the start into {dest}.")
        time.sleep(1.0)


def merge_start(run_dir: Path, dest: Path, say: Callable[[str], None]) -> dict[str, Any]:
    """Merge the finished run into ``dest`` as ``lrft merge`` does (:func:`lrft.export.merge.merge_run`:
    the ORIGINAL full-precision base, so a quantized run is dequantized; its stored dtype), verify
    the reloaded logits against the unmerged model, and publish it atomically with its record."""
    import torch

    from lrft.export.merge import (
        TOLERANCE,
        dequantize_rest,
        fold_adapters,
        load_source,
        logits,
        probe_batch,
        verify,
    )
    from lrft.model.resolve import prequantized_checkpoint
    from lrft.run.atomic import staged_dir
    from lrft.run.final import read_run_config
    from lrft.run.output import check_free_space, check_plain_keys, shard_progress

    cfg = read_run_config(run_dir)
    quant = str(cfg.get("quantization", {}).get("name", "none"))
    # a base stored quantized has no full-precision weights: merge into the base training saw
    base = "dequantized" if quant != "none" and prequantized_checkpoint(cfg.model) else "original"
    begun = time.perf_counter()
    fp = fingerprint(run_dir / "final")
    try:
        with staged_dir(dest) as tmp:
            src = load_source(run_dir, cfg, base)
            model, task = src.model, cfg.model.task
            batch = probe_batch(src.tokenizer, model.config, task)
            reference = logits(model, batch)
            n_layers = fold_adapters(model, src.base_dtype, src.changed, src.base_path, cfg.model.revision)
            dequantize_rest(model, src.base_dtype)
            model.to(src.base_dtype)
            check_free_space(dest.parent, sum(p.numel() * p.element_size() for p in model.parameters()))
            _chat_template(src.tokenizer, cfg, say)
            with shard_progress():
                model.save_pretrained(tmp)
            src.tokenizer.save_pretrained(tmp)
            del model, src.model
            gc.collect()
            check_plain_keys(tmp)
            rtol = max(TOLERANCE.get(src.base_dtype, TOLERANCE[torch.bfloat16]), src.rtol)
            diff, tol = verify(tmp, task, batch, reference, rtol, None)
            record = {
                "run": str(run_dir),
                "step": _read_json(run_dir / "summary.json").get("steps"),
                "fingerprint": fp,
                "method": src.method.name,
                "base": base,
                "base_model": src.base_path,
                "dtype": str(src.base_dtype).removeprefix("torch."),
                "quantization": quant,
                "adapted_layers": n_layers,
                "max_logit_diff": diff,
                "tolerance": tol,
                "seconds": round(time.perf_counter() - begun, 2),
            }
            (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    except OSError as err:  # a full disk while writing: nothing is left half written
        raise UserError(
            f"Writing the start {dest} failed: {err.strerror or err}. Nothing was trained: free space and "
            "run the same command again."
        ) from None
    trained_on = f"; that run trained on a {quant} copy of it" if quant != "none" else ""
    done = f"merged {n_layers} adapted layers into the {base} base" if n_layers else "saved its final weights"
    say(f"start: {done} ({record['dtype']}{trained_on})")
    return record


def _chat_template(tokenizer: Any, cfg: Any, say: Callable[[str], None]) -> None:
    """The finished run's chat template on the start's tokenizer: ``dataset.chat_template`` when it
    set one (the final tokenizer holds it only when that run encoded its data itself, not from the
    cache), else whatever template the final tokenizer has."""
    choice = cfg.get("dataset", {}).get("chat_template")
    if not choice:
        return
    from lrft.data.chat import install_template

    try:
        install_template(tokenizer, str(choice))
    except UserError as err:
        say(
            f"note: the finished run's chat template was not installed ({err}); the final tokenizer's is kept"
        )
