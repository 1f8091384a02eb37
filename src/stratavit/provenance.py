"""What a run ran on: versions, machine, command line and source commit, kept in ``environment.json``.

``RUN_DIR/environment.json`` is ``{"sessions": [entry, ...]}``: one entry per start of
:func:`stratavit.engine.train.pretrain` in that folder, the first run first, then one per resume (so the
versions a run was started with are never overwritten by those of a later resume). The resolved
config is beside it in ``config.yaml``.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

import stratavit
from stratavit.run_folder import ENVIRONMENT

ENVIRONMENT_FILE = ENVIRONMENT
PACKAGES = ("torch", "torchvision", "timm", "lightning", "numpy")
"""Distributions whose versions are recorded (``None`` when one is not installed)."""


def _version(module: str) -> str | None:
    mod = sys.modules.get(module)
    version = getattr(mod, "__version__", None) if mod is not None else None
    if version is None:
        try:
            version = metadata.version(module)
        except metadata.PackageNotFoundError:
            return None
    return str(version)


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        res = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False,
            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},  # a status must not take the index lock
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def git_info(source: Path | None = None) -> dict[str, Any]:
    """``{"commit": 40-hex or None, "dirty": bool or None}`` of the git checkout holding ``source``.

    ``source`` defaults to the stratavit package folder. ``None`` values outside a checkout, without
    git, or when the package is not tracked by the repository around it (e.g. installed into a
    virtual environment inside some other project's checkout). ``dirty``: tracked files differ from
    the commit (untracked files are ignored).
    """
    source = Path(source) if source is not None else Path(__file__).resolve().parent
    none: dict[str, Any] = {"commit": None, "dirty": None}
    if not source.is_dir():
        return none
    if _git(["ls-files", "--error-unmatch", "--", "__init__.py"], source) is None:
        return none
    commit = _git(["rev-parse", "HEAD"], source)
    if commit is None:
        return none
    status = _git(["status", "--porcelain", "--untracked-files=no"], source)
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def _cuda() -> dict[str, Any]:
    info: dict[str, Any] = {
        "available": torch.cuda.is_available(),
        "cuda_version": torch.version.cuda,
        "cudnn_version": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "devices": [],
    }
    if info["available"]:
        info["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def environment(seed: int | None = None, world_size: int | None = None, **extra: Any) -> dict[str, Any]:
    """One entry of ``environment.json`` for this process, JSON-safe.

    Keys: ``started_at`` (UTC, ISO 8601), ``seed``, ``argv``, ``cwd``, ``stratavit`` (version,
    source folder, git commit and dirty flag), ``python``, ``packages`` (name -> version),
    ``platform``, ``hostname``, ``cuda`` (availability, CUDA and cuDNN versions, device names),
    ``world_size`` and any ``extra`` keyword.
    """
    source = Path(stratavit.__file__).resolve().parent
    return {
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seed": seed,
        "argv": list(sys.argv),
        "cwd": os.getcwd(),
        "stratavit": {"version": stratavit.__version__, "source": str(source), **git_info(source)},
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation(),
                   "executable": sys.executable},
        "packages": {name: _version(name) for name in PACKAGES},
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "cuda": _cuda(),
        "world_size": world_size,
        **extra,
    }


def read_environment(run_dir: Path) -> list[dict[str, Any]]:
    """The sessions recorded in ``run_dir/environment.json`` (``[]`` if none or unreadable)."""
    path = Path(run_dir) / ENVIRONMENT_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    sessions = data.get("sessions") if isinstance(data, dict) else None
    return [s for s in sessions if isinstance(s, dict)] if isinstance(sessions, list) else []


def record_environment(run_dir: Path, entry: dict[str, Any]) -> Path:
    """Append ``entry`` to ``run_dir/environment.json`` (created if needed, written atomically)."""
    path = Path(run_dir) / ENVIRONMENT_FILE
    sessions = read_environment(run_dir)
    sessions.append(entry)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"sessions": sessions}, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


__all__ = ["ENVIRONMENT_FILE", "PACKAGES", "environment", "git_info", "read_environment", "record_environment"]
