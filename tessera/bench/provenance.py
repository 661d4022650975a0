"""What makes a benchmark result readable later: the card it ran on, torch's version and the commit."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def _git(*args: str) -> str:
    try:
        run = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False)
    except OSError:  # no git on this machine
        return ""
    return run.stdout.strip() if run.returncode == 0 else ""


def commit() -> str:
    """The checkout's commit ("+dirty" when tracked files have changes; "unknown" outside a checkout), or
    $TESSERA_COMMIT where set: a copy of the tree on another machine may carry a stale .git."""
    if os.environ.get("TESSERA_COMMIT"):
        return os.environ["TESSERA_COMMIT"]
    head = _git("rev-parse", "--short=10", "HEAD")
    if not head:
        return "unknown"
    return head + "+dirty" if _git("status", "--porcelain", "--untracked-files=no") else head


def provenance() -> dict[str, str]:
    """{"gpu", "torch", "commit"} of this process."""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU)"
    return {"gpu": gpu, "torch": torch.__version__, "commit": commit()}
