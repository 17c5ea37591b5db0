"""The linearized model f(x;θ0) + J·Δ: finite differences, Δ = 0, gradients, fallbacks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

from tvtool.errors import InvalidInputError
from tvtool.linearize import (
    LinearizedModule,
    jvp_reference,
    linearized_forward,
    linearized_parts,
    supports_fast_path,
)


@pytest.fixture(autouse=True)
def _one_thread():
    # The machines running the suite are shared; one thread keeps timings stable.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def visual() -> nn.Module:
    from tvtool.models import load_clip

    return load_clip("tvtool-tiny:random").model.visual.eval()


def _random_delta(params: dict[str, torch.Tensor], scale: float, seed: int,
                  names: list[str] | None = None) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    chosen = names if names is not None else list(params)
    return {n: scale * torch.randn(params[n].shape, generator=gen, dtype=params[n].dtype)
            for n in chosen}


def _central_difference(module: nn.Module, params: dict[str, torch.Tensor],
                        delta: dict[str, torch.Tensor], x: torch.Tensor,
                        eps: float = 1e-6) -> torch.Tensor:
    with torch.no_grad():
        plus = functional_call(module, {n: p + eps * delta.get(n, 0) for n, p in params.items()},
                               (x,))
        minus = functional_call(module, {n: p - eps * delta.get(n, 0) for n, p in params.items()},
                                (x,))
    return (plus - minus) / (2 * eps)


@pytest.mark.parametrize("method", ["dual", "jvp"])
@pytest.mark.parametrize("subset", ["all", "attn", "mlp_ln_embed"])
def test_linearized_output_matches_float64_finite_differences(visual, method, subset):
    vis = copy.deepcopy(visual).double()
    params = {n: p.detach() for n, p in vis.named_parameters()}
    names = {
        "all": None,
        "attn": [n for n in params if ".attn." in n],
        "mlp_ln_embed": [n for n in params if ".mlp." in n or "ln_" in n
                         or n in ("class_embedding", "positional_embedding", "conv1.weight",
                                  "proj")],
    }[subset]
    delta = _random_delta(params, 1e-2, seed=1, names=names)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    f0, tangent = linearized_parts(vis, params, delta, x, method=method)
    with torch.no_grad():
        base = vis(x)
    torch.testing.assert_close(f0, base, rtol=0, atol=1e-12)
    expected = _central_difference(vis, params, delta, x)
    torch.testing.assert_close(tangent, expected, rtol=1e-6, atol=1e-7)
    out = linearized_forward(vis, params, delta, x, method=method)
    torch.testing.assert_close(out, base + expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("pool", ["tok", "avg"])
def test_tangent_entering_late_and_average_pooling(visual, pool):
    # Only the last block moves (the tangent is zero until then); with "avg" pooling every
    # token of the last block matters, with "tok" only the class token is computed there.
    vis = copy.deepcopy(visual).double()
    vis.pool_type = pool
    params = {n: p.detach() for n, p in vis.named_parameters()}
    names = [n for n in params if n.startswith("transformer.resblocks.2.")]
    delta = _random_delta(params, 1e-2, 11, names=names)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    f0, tangent = linearized_parts(vis, params, delta, x, method="dual")
    with torch.no_grad():
        torch.testing.assert_close(f0, vis(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(tangent, _central_difference(vis, params, delta, x),
                               rtol=1e-6, atol=1e-7)


def test_fast_path_is_used_for_open_clip_vit(visual):
    assert supports_fast_path(visual)
    assert not supports_fast_path(nn.Sequential(nn.Linear(4, 4)))


def test_zero_delta_equals_base_model(visual):
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = visual(x)
    params = {n: p.detach() for n, p in visual.named_parameters()}
    zeros = {n: torch.zeros_like(p) for n, p in params.items()}
    for method in ("dual", "jvp"):
        torch.testing.assert_close(linearized_forward(visual, params, zeros, x, method=method),
                                   base, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(linearized_forward(visual, params, {}, x, method=method),
                                   base, rtol=1e-5, atol=1e-5)
    wrapped = LinearizedModule(copy.deepcopy(visual))
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), base, rtol=1e-5, atol=1e-5)


def test_dual_gradients_match_jvp_reference(visual):
    vis = copy.deepcopy(visual).double()
    params = {n: p.detach() for n, p in vis.named_parameters()}
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    weights = torch.randn(2, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    grads = {}
    for method in ("dual", "jvp"):
        delta = {n: t.requires_grad_() for n, t in _random_delta(params, 1e-2, 5).items()}
        (linearized_forward(vis, params, delta, x, method=method) * weights).sum().backward()
        grads[method] = {n: t.grad for n, t in delta.items()}
    for name, grad in grads["jvp"].items():
        assert grads["dual"][name] is not None, name
        torch.testing.assert_close(grads["dual"][name], grad, rtol=1e-9, atol=1e-11)


def test_gradients_flow_through_a_computed_delta(visual):
    # aTLAS-style: δ = λ·τ, the gradient reaches λ.
    params = {n: p.detach() for n, p in visual.named_parameters()}
    tau = _random_delta(params, 1e-2, 6)
    lam = torch.zeros((), requires_grad=True)
    x = torch.randn(2, 3, 32, 32)
    out = linearized_forward(visual, params, {n: lam * t for n, t in tau.items()}, x)
    out.square().sum().backward()
    assert lam.grad is not None and torch.isfinite(lam.grad)


class _QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class _LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, dim, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def test_fast_path_handles_other_activations_and_layer_scale(visual):
    vis = copy.deepcopy(visual).double()
    for block in vis.transformer.resblocks:
        block.mlp.gelu = _QuickGELU()
        block.ls_1 = _LayerScale(64)
    assert supports_fast_path(vis)
    params = {n: p.detach() for n, p in vis.named_parameters()}
    delta = _random_delta(params, 1e-2, 7)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    _, tangent = linearized_parts(vis, params, delta, x, method="dual")
    torch.testing.assert_close(tangent, _central_difference(vis, params, delta, x),
                               rtol=1e-6, atol=1e-7)


def test_unsupported_structure_falls_back_to_jvp_with_math_attention():
    # An encoder the fast path does not know, with attention in eval mode: the MHA fast path
    # and the fused SDPA kernels have no forward-mode AD, the fallback must avoid them.
    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.out = nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.attn(x, x, x, need_weights=False)[0].mean(dim=1))

    module = Encoder().double().eval()
    assert not supports_fast_path(module)
    params = {n: p.detach() for n, p in module.named_parameters()}
    delta = _random_delta(params, 1e-2, 8)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        out = linearized_forward(module, params, delta, x)
    expected = module(x) + _central_difference(module, params, delta, x)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-7)
    with pytest.raises(InvalidInputError):
        linearized_forward(module, params, delta, x, method="dual")


def test_bf16_autocast_is_close_to_fp32(visual):
    params = {n: p.detach() for n, p in visual.named_parameters()}
    delta = _random_delta(params, 1e-3, 9)
    x = torch.randn(2, 3, 32, 32)
    ref = linearized_forward(visual, params, delta, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = linearized_forward(visual, params, delta, x)
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_bad_delta_is_refused(visual):
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(InvalidInputError, match="not a parameter"):
        linearized_forward(visual, None, {"visual.proj": torch.zeros(64, 64)}, x)
    with pytest.raises(InvalidInputError, match="shape"):
        linearized_forward(visual, None, {"proj": torch.zeros(3, 3)}, x)


def test_linearized_module_trains_only_the_delta(visual):
    module = LinearizedModule(copy.deepcopy(visual), trainable=["proj", "conv1.weight"])
    assert [n for n, _ in module.named_deltas()] == ["proj", "conv1.weight"]
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert len(trainable) == 2
    module(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in trainable)
    assert set(module.delta_state()) == {"proj", "conv1.weight"}


def test_reference_jvp_agrees_with_fast_path(visual):
    params = {n: p.detach() for n, p in visual.named_parameters()}
    delta = _random_delta(params, 1e-3, 10)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(jvp_reference(visual, params, delta, x),
                               linearized_forward(visual, params, delta, x),
                               rtol=1e-4, atol=1e-5)
