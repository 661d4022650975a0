"""tessera: an LLM inference engine built around piecewise CUDA graphs."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["LLM", "EngineConfig", "RequestOutput", "SamplingParams"]

# NOTE: resolved lazily so that `import tessera.graphs` stays free of the engine (and its loaders).
_LAZY = {
    "EngineConfig": "tessera.engine.config",
    "LLM": "tessera.engine.llm",
    "RequestOutput": "tessera.engine.llm",
    "SamplingParams": "tessera.engine.sampling",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'tessera' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
