"""The one way lrft publishes a folder: write it aside, flush it, rename it into place, mark it last.

Final states (``run_dir/final``), training checkpoints (``checkpoints/step-N``), merged models and
PEFT adapters are all written the same way, so a process killed at any point leaves either the
previous folder or a hidden ``.tmp-*`` sibling, never a folder that looks finished:

1. a staging sibling ``.tmp-<name>-<pid>`` is created (``shared=True``: ``.tmp-<name>``, a name
   every rank of a run can compute, so other ranks write their own files into it);
2. the caller writes into it;
3. ``seal`` runs on it (a record of what it holds, written inside the folder), every file in it
   is fsynced, and the completion mark's text is computed from it (e.g. a manifest of checksums);
4. an existing ``final`` is renamed aside, the staging folder renamed to ``final``, the old one
   removed: the previous version stays whole until the new one is in place;
5. the mark (``final/COMPLETE`` by default) is written and flushed last: readers that check it
   never see a folder whose files are still being written.

On an exception the staging folder is removed; after a kill it stays hidden (``.tmp-*``) and the
next writer of the same folder removes it once its process is gone.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

COMPLETE = "COMPLETE"

MarkText = str | Callable[[Path], str]


def staging_path(final: Path, shared: bool = False) -> Path:
    """Where ``final`` is staged: per process, or (``shared``) one name every rank computes alike."""
    return final.with_name(f".tmp-{final.name}" if shared else f".tmp-{final.name}-{os.getpid()}")


def fsync_tree(folder: Path) -> None:
    """Put every file's contents (and the folder entries) on disk before a rename publishes them."""
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(folder)


def normal_modes(folder: Path) -> None:
    """Give every file the mode the user's umask gives new files (0644 under umask 022).

    safetensors writes its files 0600: teammates on a shared filesystem could read a run's
    config and metrics but not its weights (issue 24, finding 10)."""
    mask = os.umask(0)
    os.umask(mask)
    mode = 0o666 & ~mask
    for f in folder.rglob("*"):
        if f.is_file() and not f.is_symlink() and (f.stat().st_mode & 0o777) != mode:
            with suppress(OSError):  # not ours to change: leave it
                os.chmod(f, mode)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform or filesystem that cannot open folders: the files are flushed
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class StagedDir:
    """The steps of :func:`staged_dir`, for writers that cannot wrap their work in one ``with``.

    Multi-process writers: the writing rank calls :meth:`open` and, after the others have written
    into :attr:`path` (``shared=True``, behind a barrier), :meth:`commit`; :meth:`abort` on failure.
    """

    def __init__(
        self,
        final: Path,
        *,
        mark: str | None = COMPLETE,
        mark_text: MarkText = "ok\n",
        seal: Callable[[Path], None] | None = None,
        shared: bool = False,
    ) -> None:
        self.final = Path(final)
        self.path = staging_path(self.final, shared)
        self.mark, self.mark_text, self.seal, self.shared = mark, mark_text, seal, shared

    def open(self) -> Path:
        """Create the (empty) staging folder; leftovers of killed writers of ``final`` are removed."""
        self.final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(self.final)
        shutil.rmtree(self.path, ignore_errors=True)  # ours from a killed run (shared name)
        self.path.mkdir()
        return self.path

    def commit(self) -> Path:
        """Seal, flush, rename into place (replacing ``final``), then write the mark; returns ``final``."""
        if self.seal is not None:
            self.seal(self.path)
        text = self.mark_text(self.path) if callable(self.mark_text) else self.mark_text
        normal_modes(self.path)
        fsync_tree(self.path)
        old = self.final.with_name(f".tmp-{self.final.name}.old-{os.getpid()}")
        if self.final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.final, old)
        os.replace(self.path, self.final)
        shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(self.final.parent)
        if self.mark is not None:  # the mark comes last
            with (self.final / self.mark).open("w") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
        return self.final

    def abort(self) -> None:
        """Remove the staging folder: nothing of this attempt stays behind."""
        shutil.rmtree(self.path, ignore_errors=True)


@contextmanager
def staged_dir(
    final: Path,
    *,
    mark: str | None = COMPLETE,
    mark_text: MarkText = "ok\n",
    seal: Callable[[Path], None] | None = None,
    shared: bool = False,
) -> Iterator[Path]:
    """Yield an empty staging folder; on leaving the block it becomes ``final`` (see the module doc).

    ``mark``: the completion file written after the rename (None: the rename alone publishes);
    ``mark_text``: its text, or a function of the staged folder computing it (a manifest);
    ``seal``: called on the staged folder before it is flushed (records written inside it).
    """
    stage = StagedDir(final, mark=mark, mark_text=mark_text, seal=seal, shared=shared)
    path = stage.open()
    try:
        yield path
        stage.commit()
    except BaseException:
        stage.abort()
        raise


def check_file_output(
    path: Path,
    *,
    overwrite: bool,
    flag: str,
    reads: tuple[str | Path | None, ...] = (),
    ours: Callable[[Path], bool] = lambda _: False,
) -> Path:
    """Refuse an output file that would replace what lrft must not: a file lrft did not write
    (``ours`` says which it did) unless ``overwrite`` (the user set ``flag``), a file this command
    reads (``reads``), a folder, or a path under a file. Returns the absolute path."""
    from lrft.errors import UserError

    path = Path(path).expanduser().absolute()
    for source in reads:
        if source is not None and path.exists() and Path(source).exists() and path.samefile(source):
            raise UserError(f"{path} is also the input this command reads: write to another file.")
    if path.is_dir():
        raise UserError(f"{path} is a folder: give a file name for the output.")
    if path.exists() and not overwrite and not ours(path):
        raise UserError(
            f"{path} exists and was not written by lrft: choose another file, or set {flag} to replace it."
        )
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"cannot write {path}: {parent} is a file, not a folder.")
            break
    return path


def publish_file(path: Path, write: Callable[[Path], None], **rules: Any) -> Path:
    """Write one output file (generations, a plot) aside, then rename it into place, after the
    checks of :func:`check_file_output` (``rules`` are its keywords). A file that cannot be made
    (/proc, no permission, disk full) is a :class:`UserError`; the hidden temporary file never
    outlives a failure."""
    from lrft.errors import UserError

    path = check_file_output(path, **rules)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror or err}.") from None
    finally:
        with suppress(OSError):  # absent after the rename, or never made
            tmp.unlink()
    return path


def remove_stale(final: Path) -> None:
    """Staging and set-aside folders of ``final`` left by killed processes (their pid is gone)."""
    name = final.name
    for path in final.parent.glob(f".tmp-{name}*"):
        rest = path.name[len(f".tmp-{name}") :]
        pid = rest.removeprefix("-") if rest.startswith("-") else rest.removeprefix(".old-")
        if rest and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
