"""A benchmark result names the card, torch and the commit it measured."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from benchmarks.common import write_json
from tessera.bench import provenance

ROOT = Path(__file__).resolve().parents[1]


def test_results_name_the_commit_card_and_torch(tmp_path: Path) -> None:
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    out = tmp_path / "nested" / "r.json"
    write_json(out, {"benchmark": "x", "rows": [1.5], "torch": "kept"})
    report = json.loads(out.read_text())
    assert head.stdout.strip().startswith(report["commit"].removesuffix("+dirty"))
    assert report["gpu"] == (torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU)")
    assert (report["torch"], report["rows"]) == ("kept", [1.5])  # the report's own keys win


def test_outside_a_checkout_the_commit_is_unknown(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(provenance, "ROOT", tmp_path)
    assert provenance.commit() == "unknown"


def test_an_explicit_commit_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TESSERA_COMMIT", "abc1234")
    assert provenance.commit() == "abc1234"
