"""The generic linearized path: ``torch.func.jvp`` over ``functional_call``.

Works for any module; attention is routed through kernels with forward-mode AD formulas and
normalisation layers keep their frozen running statistics.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel


@contextlib.contextmanager
def forward_ad_safe_attention() -> Iterator[None]:
    """Route attention through kernels that have forward-mode AD formulas."""
    mha = torch.backends.mha
    previous = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        mha.set_fastpath_enabled(previous)


@contextlib.contextmanager
def frozen_norm_statistics(module: nn.Module) -> Iterator[None]:
    """Run BatchNorm-style layers in eval mode (frozen running statistics), then restore.

    In train mode they would update ``running_mean``/``num_batches_tracked`` in place, which
    forward-mode AD refuses, and normalise with batch statistics, which evaluation does not.
    """
    norms = [m for m in module.modules()
             if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
             and m.training]
    for norm in norms:
        norm.eval()
    try:
        yield
    finally:
        for norm in norms:
            norm.train()


# The first forward-AD call imports torch._decomp.decompositions_for_jvp, which scripts its
# decompositions with torch.jit.script and so warns once per process that torch.jit.script is
# deprecated: torch's own internals, nothing a user can act on.
_JIT_SCRIPT_DEPRECATED = r"`?torch\.jit\.script`? is deprecated"


def quiet_jvp(func: Any, primals: tuple[Any, ...], tangents: tuple[Any, ...]) -> Any:
    """``torch.func.jvp`` without torch's one-time ``torch.jit.script`` deprecation warning."""
    """``torch.func.jvp`` without torch's internal torch.jit.script deprecation warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_JIT_SCRIPT_DEPRECATED, category=FutureWarning)
        return jvp(func, primals, tangents)


def jvp_parts(module: nn.Module, params: dict[str, Tensor], delta: Mapping[str, Tensor],
              x: Tensor) -> tuple[Tensor, Tensor | None]:
    """``(f(x; θ0), J·δ)`` of any module by ``torch.func.jvp`` (tangent ``None`` if δ is empty)."""
    if not delta:
        with torch.no_grad(), frozen_norm_statistics(module):
            return functional_call(module, params, (x,)), None
    moving = {n: params[n] for n in delta}
    fixed = {n: p for n, p in params.items() if n not in delta}
    tangents = {n: delta[n].to(params[n].dtype) for n in delta}

    def run(sub: dict[str, Tensor]) -> Tensor:
        return functional_call(module, {**fixed, **sub}, (x,))

    with forward_ad_safe_attention(), frozen_norm_statistics(module):
        result = quiet_jvp(run, (moving,), (tangents,))
    return result[0].detach(), result[1]
