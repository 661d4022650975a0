"""MoE routing and experts against HF transformers (Mixtral, DeepSeek-V2, DeepSeek-V3), and padded rows:
routed nowhere, computed by no expert, never reaching a real row."""

from __future__ import annotations

import pytest
import torch

from tessera.graphs import ForwardContext, forward_context
from tessera.layers.moe import Experts, RoutingConfig, route

transformers = pytest.importorskip("transformers")
E, H, INTER, T = 8, 32, 48, 13  # experts, hidden, expert MLP width, tokens


def _sorted(weights: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = ids.argsort(-1)
    return weights.gather(1, order), ids.gather(1, order)


def _check_router(hf_router: torch.nn.Module, cfg: RoutingConfig, bias: torch.Tensor | None = None) -> None:
    torch.nn.init.normal_(hf_router.weight, std=0.5)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(0))
    logits, hf_weights, hf_ids = hf_router(x)
    weights, ids = route(logits, cfg, bias)
    (w_ref, i_ref), (w, i) = _sorted(hf_weights.float(), hf_ids), _sorted(weights, ids)
    assert torch.equal(i, i_ref)
    assert torch.allclose(w, w_ref, atol=1e-6)


def test_mixtral_routing_matches_hf() -> None:
    from transformers.models.mixtral.modeling_mixtral import MixtralConfig, MixtralTopKRouter

    hf = MixtralTopKRouter(MixtralConfig(hidden_size=H, num_local_experts=E, num_experts_per_tok=2))
    _check_router(hf, RoutingConfig(top_k=2))


def test_deepseek_v2_group_limited_routing_matches_hf() -> None:
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Config, DeepseekV2TopkRouter

    config = DeepseekV2Config(
        hidden_size=H, n_routed_experts=E, num_experts_per_tok=3, n_group=4, topk_group=2,
        topk_method="group_limited_greedy", routed_scaling_factor=1.5,
    )  # fmt: skip
    cfg = RoutingConfig(top_k=3, renormalize=False, num_groups=4, topk_groups=2, routed_scaling_factor=1.5)
    _check_router(DeepseekV2TopkRouter(config), cfg)


def test_deepseek_v3_sigmoid_bias_routing_matches_hf() -> None:
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Config, DeepseekV3TopkRouter

    config = DeepseekV3Config(hidden_size=H, n_routed_experts=E, num_experts_per_tok=3, n_group=4,
                              topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5)  # fmt: skip
    hf = DeepseekV3TopkRouter(config)
    hf.e_score_correction_bias.copy_(torch.randn(E, generator=torch.Generator().manual_seed(1)) * 0.3)
    cfg = RoutingConfig(top_k=3, scoring="sigmoid", num_groups=4, topk_groups=2, group_score="top2_sum",
                        routed_scaling_factor=2.5)  # fmt: skip
    _check_router(hf, cfg, hf.e_score_correction_bias)


def _experts() -> Experts:
    experts = Experts(E, H, INTER)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(E, 2 * INTER, H, generator=gen) * 0.2)
        experts.down_proj.copy_(torch.randn(E, H, INTER, generator=gen) * 0.2)
    return experts


def test_experts_match_hf() -> None:
    from transformers.models.mixtral.modeling_mixtral import MixtralConfig, MixtralExperts

    ours = _experts()
    hf = MixtralExperts(MixtralConfig(hidden_size=H, intermediate_size=INTER, num_local_experts=E))
    hf.load_state_dict(ours.state_dict())
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(3))
    weights, ids = route(
        torch.randn(T, E, generator=torch.Generator().manual_seed(4)), RoutingConfig(top_k=2)
    )
    assert torch.allclose(ours(x, weights, ids), hf(x, ids, weights), atol=1e-6)


def test_padded_rows_are_routed_nowhere_and_never_reach_real_rows() -> None:
    experts, cfg = _experts(), RoutingConfig(top_k=2)
    real = torch.randn(T, H, generator=torch.Generator().manual_seed(5))
    router = torch.randn(E, H, generator=torch.Generator().manual_seed(6))
    alone = experts(real, *route(real @ router.T, cfg))
    padded = torch.cat((real, torch.full((16 - T, H), float("nan"))))  # padded up to a capture size
    # as inside a runner: the count of real rows also lives on the device, for captured graphs
    with forward_context(ForwardContext(num_tokens=16, raw_num_tokens=T, num_real=torch.tensor(T))):
        weights, ids = route(padded @ router.T, cfg)
    assert (ids[T:] == -1).all() and (weights[T:] == 0).all()
    out = experts(padded, weights, ids)
    assert torch.equal(out[:T], alone)  # bit-identical: the padded rows changed nothing
    assert (out[T:] == 0).all()  # and cost nothing: no expert computed them


class _MoEStack(torch.nn.Module):
    """Router + experts; also returns how many rows any expert computed (a 0-d tensor: not sliced)."""

    def __init__(self) -> None:
        super().__init__()
        self.router = torch.nn.Linear(H, E, bias=False)
        self.experts = _experts()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.experts(x, *route(self.router(x), RoutingConfig(top_k=2)))
        return out, (out != 0).any(-1).sum()


@pytest.mark.parametrize("strategy", ["breakable", "compile"])
def test_replayed_graphs_route_padded_rows_nowhere(strategy: str) -> None:
    """Captured at 8 and 16 tokens, replayed with 5 and 11 real rows (the padding NaN-poisoned): the mask
    is recomputed at every replay, so no expert touches a padded row and real rows match eager."""
    from tessera.graphs import GraphConfig, PiecewiseGraphRunner

    model = _MoEStack()
    config = GraphConfig(strategy=strategy, capture_sizes=[8, 16], progress=False, poison_padding=True)
    runner = PiecewiseGraphRunner(model, config)
    runner.capture([torch.randn(8, H, generator=torch.Generator().manual_seed(7))])
    for n in (5, 11, 16):
        x = torch.randn(n, H, generator=torch.Generator().manual_seed(n))
        out, computed = runner(x)
        assert int(computed) == n  # rows an expert computed: the real ones only
        with forward_context(ForwardContext(n, n)):
            ref, _ = model(x)
        assert torch.equal(out, ref)
    stats = runner.stats.as_dict()
    assert stats["replays"] == {"piecewise": {"8": 1, "16": 2}}
    assert runner.reads_num_real  # its graphs' masks read the device count: refreshed every replay
    assert not stats["eager_fallbacks"]  # compile: a mask read as a Python int would have recompiled


def _padded_batch(tokens: int, topk: int) -> tuple[Experts, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Experts, x, routing weights and ids with the last rows padded (id -1, weight 0), real rows."""
    experts = _experts()
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, H, generator=gen)
    weights, ids = route(torch.randn(tokens, E, generator=gen), RoutingConfig(top_k=topk))
    real = max(tokens - 3, 1)
    ids[real:], weights[real:] = -1, 0.0
    return experts, x, weights, ids, real


@pytest.mark.parametrize(("tokens", "topk"), [(13, 2), (40, 3), (1, 1)])
def test_triton_grouped_gemm_experts_match_the_reference(tokens: int, topk: int) -> None:
    """The capture-safe Triton path (Triton's interpreter here) against the reference loop, padded rows
    (id -1) included: they must come out zero and cost nothing."""
    fused_moe = pytest.importorskip("tessera.layers.fused_moe")
    from tessera.layers.moe import moe_experts

    experts, x, weights, ids, real = _padded_batch(tokens, topk)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: Triton's interpreter (conftest)
    args = tuple(
        t.to(device) for t in (x, experts.gate_up_proj.detach(), experts.down_proj.detach(), weights, ids)
    )
    got, ref = fused_moe.fused_experts(*args).cpu(), moe_experts(*(t.cpu() for t in args))
    tol = 1e-5 if device == "cpu" else 2e-2  # a float32 tl.dot runs in TF32 on the GPU
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
    got, ids = got.cpu(), ids.cpu()
    assert (got[real:] == 0).all()
    pair_of_slot, expert_of_block = fused_moe._layout(ids, E)
    used = (pair_of_slot < ids.numel()).nonzero().flatten()  # slots holding a pair
    laid_out = pair_of_slot[used]
    assert sorted(laid_out.tolist()) == [i for i, e in enumerate(ids.flatten().tolist()) if e >= 0]
    assert torch.equal(expert_of_block[used // fused_moe.BLOCK_M], ids.flatten()[laid_out])  # right block


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("tokens", "topk"), [(13, 2), (40, 3), (1, 1)])
def test_grouped_mm_experts_match_the_reference(tokens: int, topk: int, dtype: torch.dtype) -> None:
    """torch._grouped_mm experts against the reference loop; padded rows (id -1) sort past every
    expert's run and come out zero."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    from tessera.layers.grouped_mm_moe import grouped_mm_experts
    from tessera.layers.moe import moe_experts

    experts, x, weights, ids, real = _padded_batch(tokens, topk)
    x[real:] = float("nan")  # a padded row's garbage must not reach anything
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args = [x, experts.gate_up_proj.detach(), experts.down_proj.detach(), weights, ids]
    args[:3] = [t.to(dtype) for t in args[:3]]
    got = grouped_mm_experts(*(t.to(device) for t in args)).cpu()
    ref = moe_experts(*(t.double() if t.is_floating_point() else t for t in args))
    assert (got[real:] == 0).all()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got[:real].double(), ref[:real], rtol=tol, atol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [16, 1024])
def test_auto_experts_pick_by_rows_per_expert(tokens: int) -> None:
    """ "auto" on a GPU: the Triton kernels while experts get few rows, torch._grouped_mm (on Hopper)
    from GROUPED_MM_MIN_ROWS_PER_EXPERT on; either way the result is the chosen backend's, bit for bit."""
    from tessera.layers import moe

    gen = torch.Generator().manual_seed(tokens)
    num_experts, topk, hidden, inter = 64, 6, 256, 128
    x = torch.randn(tokens, hidden, generator=gen).cuda().bfloat16()
    gate_up = (torch.randn(num_experts, 2 * inter, hidden, generator=gen) * 0.05).cuda().bfloat16()
    down = (torch.randn(num_experts, hidden, inter, generator=gen) * 0.05).cuda().bfloat16()
    ids = torch.randint(0, num_experts, (tokens, topk), generator=gen).cuda()
    weights = torch.rand(tokens, topk, generator=gen).cuda()
    run = {b: moe.moe_experts(x, gate_up, down, weights, ids, b) for b in moe.EXPERT_BACKENDS}
    many = tokens * topk >= moe.GROUPED_MM_MIN_ROWS_PER_EXPERT * num_experts
    chosen = "grouped_mm" if many and moe.grouped_mm_capture_safe(gate_up.dtype, x.device) else "triton"
    assert torch.equal(run["auto"], run[chosen])
    torch.testing.assert_close(run["triton"].float(), run["grouped_mm"].float(), rtol=3e-2, atol=3e-2)


def test_grouped_mm_is_captured_only_where_torch_has_its_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch._grouped_mm outside bfloat16 on sm90/sm100 loops over the groups on the host, which no CUDA
    graph captures (float32 MoE models failed at start-up): "auto" never picks it there."""
    from tessera.layers import moe

    cuda = torch.device("cuda")
    monkeypatch.setattr(moe, "_cutlass_grouped_mm", lambda device: True)
    assert moe.grouped_mm_capture_safe(torch.bfloat16, cuda)
    assert not moe.grouped_mm_capture_safe(torch.float32, cuda)
    monkeypatch.setattr(moe, "_cutlass_grouped_mm", lambda device: False)
    assert not moe.grouped_mm_capture_safe(torch.bfloat16, cuda)
    assert moe.grouped_mm_capture_safe(torch.float32, torch.device("cpu"))
