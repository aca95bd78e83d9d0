"""One writer per run folder: an exclusive lock held for the whole run.

A run folder is written by one run only. ``lrft train`` (its global rank 0) takes an exclusive
``flock`` on ``RUN/.lrft.lock`` before it looks at, removes or writes anything there, and holds
it until the run ends. A second ``lrft train`` into the same folder (a new run, ``trainer.resume``
or ``trainer.overwrite``) is refused with exit 2 and the owner's pid and host, and nothing is
touched. The kernel drops the lock when the owning process dies, however it dies, so a SIGKILLed
run can be resumed at once; the file itself stays (removing it would let two processes lock two
different files of the same name).

What the lock relies on: ``flock`` is exact on local filesystems. On NFS (Linux >= 2.6.12 maps it
to POSIX byte-range locks) it holds across clients when the server supports locking (NFSv4, or
v3 with lockd); Lustre needs ``-o flock``; some FUSE mounts ignore locks. Where the filesystem
ignores them, two runs are no longer kept apart: give each run its own ``output_dir``.

The other ranks of a run take no lock: they write only where rank 0 tells them to, and a second
launch is refused on its own rank 0, which makes the launcher stop the rest of that launch. On
node-local disks (``trainer.shared_fs=false``) each node's local rank 0 writes its own copy of the
folder, so it locks that copy too. The owner record names the launch (torchrun's run id) and its
world size.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lrft.errors import UserError

LOCK_NAME = ".lrft.lock"
_held: dict[Path, int] = {}  # run folder -> the open descriptor holding its lock (this process)


class Held(UserError):
    """Another process holds the folder; ``owner`` is what it recorded (pid, host, command...)."""

    def __init__(self, folder: Path, owner: dict[str, object], what: str | None = None) -> None:
        self.folder, self.owner = folder, owner
        who = f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}"
        since = f", since {owner['started']}" if owner.get("started") else ""
        what = what or f"output_dir={folder}"
        super().__init__(f"{what} is in use by {owner.get('command', 'lrft')} ({who}{since}).")


def _owner(command: str) -> dict[str, object]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "launch": os.environ.get("TORCHELASTIC_RUN_ID"),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
    }


def holds(run_dir: Path) -> bool:
    return Path(run_dir).resolve() in _held


def acquire(run_dir: str | Path, any_rank: bool = False) -> bool:
    """Lock ``run_dir`` (created if absent) for this process; False if it already held it.

    Raises :class:`Held` when another process holds it. Only the global rank 0 locks (the
    other ranks return False at once), unless ``any_rank``: a node's local rank 0 locks its own
    node-local copy of the run folder (``trainer.shared_fs=false``)."""
    try:
        import fcntl  # noqa: F401
    except ImportError:  # not POSIX: no advisory locks to take
        return False
    folder = Path(run_dir).resolve()
    if folder in _held or (not any_rank and int(os.environ.get("RANK", "0")) != 0):
        return False
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = _lock_path(folder / LOCK_NAME, "lrft train")
    except Held as held:
        raise Held(folder, held.owner) from None
    except OSError as err:
        raise UserError(f"output_dir={folder} cannot be created or locked: {why(folder, err)}.") from None
    _held[folder] = fd
    return True


def _lock_path(path: Path, command: str) -> int:
    """An open descriptor holding ``path``'s exclusive lock, with this process's owner record."""
    import fcntl

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = _read(fd)
            os.close(fd)
            raise Held(path.parent, owner) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else the holder removed the file as we locked it: lock the new one
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(_owner(command)) + "\n").encode(), 0)
    return fd


def why(path: Path, err: OSError) -> str:
    """What stops ``path`` being made, in the user's terms (a parent that is a file says
    "File exists" or "Not a directory" otherwise)."""
    for parent in path.parents:
        if parent.exists():
            return f"{parent} is a file, not a folder" if not parent.is_dir() else str(err.strerror or err)
    return str(err.strerror or err)


def release(run_dir: str | Path) -> None:
    fd = _held.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the last descriptor drops the lock


def _read(fd: int) -> dict[str, object]:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


@contextmanager
def writing(output: Path, command: str) -> Iterator[None]:
    """Hold ``output``'s lock while ``command`` (``lrft merge``, ``lrft export``) checks and
    writes it, so that the emptiness check and the publish are one step for lrft writers: a
    second writer of the same output is refused with the owner. The lock is a hidden sibling,
    ``.NAME.lrft.lock``, removed when the writer is done."""
    try:
        import fcntl  # noqa: F401
    except ImportError:
        yield
        return
    output = output.resolve()
    path = output.parent / f".{output.name}.lrft.lock"
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        fd = _lock_path(path, command)
    except Held as held:
        raise Held(output, held.owner, what=f"output {output}") from None
    except OSError as err:
        raise UserError(f"output {output} cannot be created or locked: {why(output, err)}.") from None
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # while still held: a writer that opened it retries (_lock_path)
        os.close(fd)
