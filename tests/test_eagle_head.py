"""The EAGLE-1 draft head against a reference built from HF transformers' Llama layer (float32, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from tessera.engine.batch import build_rows
from tessera.engine.kv_cache import KVCache
from tessera.graphs.context import ForwardContext, forward_context
from tessera.layers.attention import AttentionLayer
from tessera.loader.eagle import load_eagle_head
from tessera.models.decoder import CausalLM
from tessera.models.eagle import EagleHead
from tessera.testing.eagle_checkpoint import save_random_eagle_head

from .conftest import rel_err

transformers = pytest.importorskip("transformers")
from transformers.models.llama import modeling_llama  # noqa: E402

from .test_llama import hf_and_ours  # noqa: E402

PAGE = 4
T = 10


class Reference(nn.Module):
    """EAGLE's head as its own code computes it: fc over cat(embedding, feature), an HF Llama layer whose
    input norm is an identity, dense causal attention, no final norm, the target's lm_head."""

    def __init__(self, folder: Path, target: nn.Module) -> None:
        super().__init__()
        raw = json.loads((folder / "config.json").read_text())
        cfg = transformers.LlamaConfig(**{k: v for k, v in raw.items() if k not in ("bias", "torch_dtype")})
        cfg._attn_implementation = "eager"
        self.layer = modeling_llama.LlamaDecoderLayer(cfg, layer_idx=0)
        self.layer.input_layernorm = nn.Identity()
        self.rotary = modeling_llama.LlamaRotaryEmbedding(cfg)
        self.fc = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=raw["bias"])
        self.target = target
        from safetensors.torch import load_file

        state = load_file(str(folder / "model.safetensors"))
        self.fc.load_state_dict({k.removeprefix("fc."): v for k, v in state.items() if k.startswith("fc.")})
        layer = {k.removeprefix("layers.0."): v for k, v in state.items() if k.startswith("layers.0.")}
        self.layer.load_state_dict(layer)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        """ids [T], feature [T, H] -> logits [T, vocab]; row i at position i."""
        x = self.fc(torch.cat((self.target.model.embed_tokens(ids), feature), dim=-1))[None]
        positions = torch.arange(len(ids))[None]
        causal = torch.full((len(ids), len(ids)), float("-inf")).triu(1)[None, None]
        out = self.layer(
            x, attention_mask=causal, position_ids=positions, position_embeddings=self.rotary(x, positions)
        )
        return self.target.lm_head(out[0]).float()


class HeadCache:
    """The head's one-layer paged KV cache with one sequence on pages 1.. (slot 0 is the dummy slot)."""

    def __init__(self, head: EagleHead, num_pages: int = 8) -> None:
        cfg = head.config
        kv = KVCache.allocate(1, num_pages, PAGE, cfg.num_kv_heads, cfg.head_dim, torch.float32, "cpu")
        self.head, self.pages = head, list(range(1, num_pages))
        self.layers = {(0, "attn"): AttentionLayer(kv.k[0], kv.v[0], cfg.head_dim**-0.5, PAGE, "torch")}

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, feature: torch.Tensor, start: int) -> torch.Tensor:
        """The head's hidden [n, H] of the rows ids/feature [n] at positions start...; their K/V stay."""
        batch = build_rows([(ids.tolist(), start, self.pages)], PAGE, torch.device("cpu"))
        n = len(ids)
        with forward_context(ForwardContext(n, n, batch.metadata, self.layers)):
            return self.head(batch.input_ids, batch.positions, feature)

    def run(self, ids: torch.Tensor, feature: torch.Tensor, start: int) -> torch.Tensor:
        """Logits [n, vocab] of `forward`'s rows."""
        return self.head.compute_logits(self.forward(ids, feature, start))


def _setup(tmp_path: Path, fc_bias: bool, with_embedding: bool) -> tuple[CausalLM, EagleHead, Reference]:
    hf, target = hf_and_ours("LlamaForCausalLM")
    embedding = target.model.embed_tokens.weight if with_embedding else None
    save_random_eagle_head(tmp_path, target.config, seed=1, fc_bias=fc_bias, embedding=embedding)
    head = load_eagle_head(tmp_path, target, torch.float32, "cpu")
    return target, head, Reference(tmp_path, hf)


@pytest.mark.parametrize("with_embedding", [False, True])
@pytest.mark.parametrize("fc_bias", [False, True])
def test_logits_match_reference(tmp_path: Path, fc_bias: bool, with_embedding: bool) -> None:
    target, head, ref = _setup(tmp_path, fc_bias, with_embedding)
    assert head.config.num_layers == 1
    assert head.embed_tokens is target.model.embed_tokens and head.lm_head is target.lm_head
    torch.manual_seed(2)
    ids, feature = torch.randint(0, 256, (T,)), torch.randn(T, head.config.hidden_size)
    want = ref(ids, feature)
    assert rel_err(HeadCache(head).run(ids, feature, 0), want) < 1e-4
    # a prefill of 6, then 4 single-row steps over the cached K/V
    cache = HeadCache(head)
    got = [cache.run(ids[:6], feature[:6], 0)]
    got += [cache.run(ids[i : i + 1], feature[i : i + 1], i) for i in range(6, T)]
    assert rel_err(torch.cat(got), want) < 1e-4


def test_head_output_feeds_the_next_step(tmp_path: Path) -> None:
    """A draft chain: each step's input feature is the head's own output of the row before."""
    _, head, ref = _setup(tmp_path, fc_bias=False, with_embedding=False)
    torch.manual_seed(3)
    ids, feature = torch.randint(0, 256, (4,)), torch.randn(4, head.config.hidden_size)
    cache = HeadCache(head)
    own = cache.forward(ids, feature, 0)[-1:]
    token = head.compute_logits(own).argmax(-1)
    step = cache.run(token, own, 4)
    want = ref(torch.cat((ids, token)), torch.cat((feature, own)))[-1:]
    assert rel_err(step, want) < 1e-4


def test_load_weights_refuses_unknown_and_missing_tensors(tmp_path: Path) -> None:
    _, head, _ = _setup(tmp_path, fc_bias=False, with_embedding=False)
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "model.safetensors"))
    fresh = EagleHead(head.config, fc_bias=False)
    with pytest.raises(KeyError, match="input_layernorm"):
        fresh.load_weights([*state.items(), ("layers.0.input_layernorm.weight", torch.ones(64))])
    fresh = EagleHead(head.config, fc_bias=False)
    with pytest.raises(KeyError, match="misses 1 tensors"):
        fresh.load_weights([(k, v) for k, v in state.items() if k != "fc.weight"])
    fresh = EagleHead(head.config, fc_bias=True)  # a bias the checkpoint does not have
    with pytest.raises(KeyError, match=r"fc\.bias"):
        fresh.load_weights(state.items())


def test_pytorch_model_bin_loads_like_safetensors(tmp_path: Path) -> None:
    target, head, _ = _setup(tmp_path, fc_bias=True, with_embedding=True)
    from safetensors.torch import load_file

    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    (bin_folder / "config.json").write_text((tmp_path / "config.json").read_text())
    torch.save(load_file(str(tmp_path / "model.safetensors")), bin_folder / "pytorch_model.bin")
    from_bin = load_eagle_head(bin_folder, target, torch.float32, "cpu")
    for (name, a), (_, b) in zip(head.state_dict().items(), from_bin.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_a_hot_vocabulary_keeps_its_rows_of_the_head_in_its_order(tmp_path: Path) -> None:
    """With a token map the head's logits are the full head's columns of those tokens, in the map's
    order, and the target's own head is untouched."""
    target, head, _ = _setup(tmp_path, fc_bias=False, with_embedding=False)
    torch.manual_seed(4)
    hidden = torch.randn(3, head.config.hidden_size)
    full = head.compute_logits(hidden)
    hot = torch.randperm(head.config.vocab_size)[:40]
    torch.save(hot, tmp_path / "map.pt")
    mapped = load_eagle_head(tmp_path, target, torch.float32, "cpu", token_map=tmp_path / "map.pt")
    assert torch.equal(mapped.draft_vocab, hot)
    assert rel_err(mapped.compute_logits(hidden), full[:, hot]) < 1e-6
    assert mapped.lm_head is target.lm_head and target.lm_head(hidden).shape == full.shape


@pytest.mark.parametrize(
    ("saved", "message"),
    [
        (torch.tensor([[1, 2]]), "2-D"),
        (torch.tensor([1.0, 2.0]), "float"),
        (torch.tensor([], dtype=torch.long), "non-empty"),
        (torch.tensor([3, 5, 3]), "ids repeat"),
        (torch.tensor([0, 256]), r"in \[0, 256\)"),
        ([1, 2, 3], "list"),
    ],
)
def test_a_bad_token_map_is_refused(tmp_path: Path, saved: object, message: str) -> None:
    from tessera.loader.eagle import load_token_map

    torch.save(saved, tmp_path / "map.pt")
    with pytest.raises(ValueError, match=message):
        load_token_map(tmp_path / "map.pt", vocab_size=256)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_token_map(tmp_path / "absent.pt", vocab_size=256)
    (tmp_path / "text.pt").write_text("not a tensor")
    with pytest.raises(ValueError, match=r"not a tensor saved with torch\.save"):
        load_token_map(tmp_path / "text.pt", vocab_size=256)
