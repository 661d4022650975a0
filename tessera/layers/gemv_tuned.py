"""Tuned decode-GEMM configs per GPU model, as measured by `python -m benchmarks.decode_gemm --sweep
--save-configs DIR`: one JSON file a device name (`NVIDIA_H100_80GB_HBM3.json`), mapping a format
("bf16", "fp16", "fp8", "fp8_block", "mxfp4"; "mxfp4_m1": MXFP4 at one row of x, whose best kernel
and tiles differ from more rows') and a weight shape "N,K" to a `GemvConfig`'s fields. Quantized
shapes without an entry take the shape rule (`tessera.layers.gemv`); dense ones without an entry stay
with cuBLAS.

Files are read from `TESSERA_GEMV_CONFIGS` (a folder, searched first: a tuning run's own output) and
this package's `gemv_configs/`. A device's table is read once, on its first decode GEMM (a dict lookup
after that, so graph capture is unaffected).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch

log = logging.getLogger(__name__)

PACKAGED = Path(__file__).with_name("gemv_configs")
ENV = "TESSERA_GEMV_CONFIGS"
Table = dict[str, dict[str, dict[str, int]]]
# what a sweep found, per format and shape: a config, or None where the shape should have none (a dense
# weight cuBLAS reads faster), which removes an earlier run's entry
Found = dict[str, dict[str, dict[str, int] | None]]
_TABLES: dict[torch.device, Table] = {}


def file_name(device_name: str) -> str:
    """The table's file name for a device name, as `torch.cuda.get_device_name` spells it."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", device_name.strip()) + ".json"


def shape_key(n: int, k: int) -> str:
    return f"{n},{k}"


def folders() -> list[Path]:
    env = os.environ.get(ENV)
    return ([Path(env)] if env else []) + [PACKAGED]


def load(device_name: str) -> Table:
    """The first table found for `device_name` (empty when none is)."""
    for folder in folders():
        path = folder / file_name(device_name)
        if path.is_file():
            table = json.loads(path.read_text())
            log.info("decode GEMM configs for %s from %s", device_name, path)
            return {fmt: shapes for fmt, shapes in table.items() if isinstance(shapes, dict)}
    return {}


def lookup(device: torch.device, fmt: str, n: int, k: int) -> dict[str, int] | None:
    """The tuned config fields of (`fmt`, [n, k]) on `device`, or None."""
    if device.type != "cuda":
        return None
    if device not in _TABLES:
        index = device.index if device.index is not None else torch.cuda.current_device()
        _TABLES[device] = load(torch.cuda.get_device_name(index))
    return _TABLES[device].get(fmt, {}).get(shape_key(n, k))


def save(folder: Path, device_name: str, found: Found) -> Path:
    """Merge what a sweep `found` into `folder`'s table for `device_name` (new entries win, None
    removes one); returns its path."""
    path = folder / file_name(device_name)
    table: Table = json.loads(path.read_text()) if path.is_file() else {}
    for fmt, shapes in found.items():
        for shape, fields in shapes.items():
            if fields is None:
                table.get(fmt, {}).pop(shape, None)
            else:
                table.setdefault(fmt, {})[shape] = fields
    folder.mkdir(parents=True, exist_ok=True)
    ordered = {fmt: dict(sorted(table[fmt].items())) for fmt in sorted(table) if table[fmt]}
    path.write_text(json.dumps(ordered, indent=1) + "\n")
    return path
