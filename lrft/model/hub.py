"""Fail fast, once, when a hub id cannot be fetched: offline and not in the local cache.

Without this, transformers and datasets retry each request (and warn twice per retry) for tens of
seconds before giving up. One check first: a local folder or a cached copy is fine; otherwise, with
``HF_HUB_OFFLINE`` set, or when one quick connection to the hub's host fails, a single
:class:`~lrft.errors.UserError` says what to do.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from lrft.errors import UserError
from lrft.schema import TRUTHY

OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
PROBE_TIMEOUT_S = 3.0
_reachable: dict[str, bool] = {}  # one probe per host and process


def offline_by_env(repo_type: str = "model") -> bool:
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if repo_type == "dataset" else OFFLINE_VARS[:2]
    return any(os.environ.get(n, "").strip().lower() in TRUTHY for n in names)


def cached(repo_id: str, repo_type: str = "model", revision: str | None = None) -> bool:
    """Whether ``repo_id`` has a local copy in the hub cache (or, for datasets, the datasets cache)."""
    from huggingface_hub import constants

    hub = Path(constants.HF_HUB_CACHE) / f"{repo_type}s--{repo_id.replace('/', '--')}"
    if (hub / "snapshots").is_dir() and any((hub / "snapshots").iterdir()):
        return True
    if repo_type == "dataset":
        root = Path(os.environ.get("HF_DATASETS_CACHE", Path(constants.HF_HOME) / "datasets"))
        return any(root.glob(f"{repo_id.replace('/', '___')}*")) if root.is_dir() else False
    return False


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """One TCP connection to the hub endpoint's host (``HF_ENDPOINT``), remembered per process."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    if host not in _reachable:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                _reachable[host] = True
        except OSError:
            _reachable[host] = False
    return _reachable[host]


def require_hub(
    repo_id: str | None, what: str, repo_type: str = "model", revision: str | None = None
) -> None:
    """Refuse at once when ``repo_id`` (a hub id, not a local folder) cannot be had.

    ``what`` names the config key for the message, e.g. ``model.name_or_path``.
    """
    if not repo_id or Path(str(repo_id)).expanduser().exists():
        return
    if cached(str(repo_id), repo_type, revision):
        return
    if offline_by_env(repo_type):
        why = "the hub is switched off (HF_HUB_OFFLINE=1 or TRANSFORMERS_OFFLINE / HF_DATASETS_OFFLINE)"
    elif not hub_reachable():
        why = "the hub cannot be reached from here (no network?)"
    else:
        return
    local = (
        "set dataset.data_files.train / dataset.data_files.validation to local files"
        if repo_type == "dataset"
        else f"point {what} at a local folder (or use a tiny_* model, which needs no download)"
    )
    raise UserError(
        f"{what}={repo_id} is a hub id, it is not in the local cache, and {why}. Either download it "
        f"once with network access (then HF_HUB_OFFLINE=1 uses the cached copy), or {local}."
    )
