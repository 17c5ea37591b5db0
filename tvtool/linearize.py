"""The linearized (tangent-space) model: f_lin(x; θ) = f(x; θ0) + J_θ f(x; θ0)·(θ − θ0).

Ortiz-Jimenez et al. (arXiv 2305.12827) train and evaluate the first-order Taylor expansion of
a network around its pre-trained weights θ0. Fine-tuning (``tvtool finetune --mode linear``),
evaluation of linearized task vectors and aTLAS all need "run the image encoder linearized at
θ0 with a weight delta τ"; this module provides that as :func:`linearized_forward` and as the
trainable wrapper :class:`LinearizedModule`.

Two implementations give the same numbers:

* **Fast dual path** (used automatically for open_clip-style ViT image encoders): a hand-written
  forward that carries a (primal, tangent) pair through every layer. The primal pass runs under
  ``torch.no_grad`` (it does not depend on τ), so autograd records only the tangent pass, which
  is linear in τ; attention is written in plain matmuls, so there is no dependence on fused
  attention kernels (which have no forward-mode AD). Cost of a training step: about 5 forward
  passes of work against 3 for ordinary fine-tuning, less the last block's non-class tokens
  (see :data:`CLASS_TOKEN_SHORTCUT`).
* **Generic path** (any other module): ``torch.func.jvp`` over ``functional_call`` with
  PyTorch's math attention kernel and the ``nn.MultiheadAttention`` fast path disabled, since
  the fused kernels raise "Trying to use forward AD with ... that does not support it".
  Normalisation layers with running statistics (BatchNorm in ResNet and MobileCLIP towers)
  run in eval mode, with their frozen statistics, whatever the module's mode: the linearized
  model is the network as evaluated, and forward AD cannot update the statistics in place.

The structure test for the fast path is by module type and shape (``nn.MultiheadAttention``,
``nn.LayerNorm``, ``nn.Linear``, ``nn.Conv2d``), not by importing open_clip.
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from tvtool.errors import InvalidInputError
from tvtool.types import StateDict

__all__ = [
    "LinearizedModule",
    "jvp_reference",
    "linearized_forward",
    "linearized_parts",
    "supports_fast_path",
]

Tangent = Tensor | None
"""A tangent that may be ``None``, meaning exactly zero (so no work is done for it)."""

CLASS_TOKEN_SHORTCUT = True
"""In a class-token-pooled ViT, compute only the class token's path through the last block
(the other tokens' outputs are never read). Exact; ``False`` computes every token, which the
benchmark uses to separate this saving from the rest."""


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def linearized_forward(
    module: nn.Module,
    params0: Mapping[str, Tensor] | None,
    delta: Mapping[str, Tensor],
    x: Tensor,
    *,
    method: str = "auto",
) -> Tensor:
    """Evaluate ``module`` linearized at ``params0`` and moved by ``delta``.

    Computes ``f(x; θ0) + J_θ f(x; θ0)·δ``. Gradients flow to ``delta`` (and to whatever it was
    computed from, e.g. aTLAS coefficients or LoRA factors), never to ``params0``.

    Args:
        module: The network, e.g. an open_clip image encoder (``model.visual``).
        params0: Expansion point θ0 by parameter name relative to ``module``; ``None`` uses the
            module's own parameters.
        delta: Weight offsets δ by the same names; names left out have δ = 0.
        x: Input batch.
        method: ``"auto"`` (fast dual path where the module's structure allows, otherwise
            ``torch.func.jvp``), ``"dual"`` (fast path, error if unsupported) or ``"jvp"``.

    Returns:
        The linearized output, shaped like ``module(x)``.

    Raises:
        InvalidInputError: a ``delta`` name is not a parameter of ``module`` or has the wrong
            shape, or ``method="dual"`` for an unsupported module.

    """
    out, tangent = linearized_parts(module, params0, delta, x, method=method)
    return out if tangent is None else out + tangent


def linearized_parts(
    module: nn.Module,
    params0: Mapping[str, Tensor] | None,
    delta: Mapping[str, Tensor],
    x: Tensor,
    *,
    method: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """Return ``(f(x; θ0), J·δ)`` separately (``None`` when δ is empty).

    The first part carries no autograd history, so callers that evaluate many deltas on one
    batch may cache it. Arguments and errors as in :func:`linearized_forward`.
    """
    params = _resolve_params(module, params0)
    _check_delta(params, delta)
    if method not in ("auto", "dual", "jvp"):
        raise ValueError(f"unknown linearization method {method!r}")
    plan = _vit_plan(module) if method != "jvp" else None
    if plan is None and method == "dual":
        raise InvalidInputError(
            f"{type(module).__name__} does not have the ViT structure the fast linearized "
            "forward supports", hint="use method='jvp' or 'auto'")
    if plan is not None:
        return _vit_dual_forward(plan, params, delta, x)
    return _jvp_parts(module, params, delta, x)


def jvp_reference(
    module: nn.Module, params0: Mapping[str, Tensor] | None, delta: Mapping[str, Tensor],
    x: Tensor,
) -> Tensor:
    """Linearized output computed with ``torch.func.jvp`` and the math attention kernel.

    This is how the public reference code bases evaluate a linearized model; tvtool keeps it as
    the fallback for arbitrary modules and as the yardstick in tests and benchmarks.
    """
    out, tangent = linearized_parts(module, params0, delta, x, method="jvp")
    return out if tangent is None else out + tangent


def supports_fast_path(module: nn.Module) -> bool:
    """Whether :func:`linearized_forward` can use the fast dual path for ``module``."""
    return _vit_plan(module) is not None


class LinearizedModule(nn.Module):
    """A frozen network plus a trainable weight delta, evaluated linearized.

    ``forward(x) = f(x; θ0) + J f(x; θ0)·δ`` where θ0 are the wrapped module's (frozen)
    parameters and δ the trainable offsets, initialised to zero.

    Args:
        module: The network to linearize; its parameters are frozen in place and used as θ0.
        trainable: Names (relative to ``module``) that get a delta; default all parameters
            that required grad.
        method: Passed to :func:`linearized_forward`.

    """

    def __init__(self, module: nn.Module, trainable: Iterable[str] | None = None,
                 method: str = "auto") -> None:
        super().__init__()
        params = dict(module.named_parameters())
        if trainable is None:
            names = [n for n, p in params.items() if p.requires_grad]
        else:
            names = list(trainable)
            unknown = [n for n in names if n not in params]
            if unknown:
                raise InvalidInputError(f"not parameters of the module: {unknown[:3]}")
        for p in module.parameters():
            p.requires_grad_(False)
        self.module = module
        self.method = method
        self.delta_names: list[str] = names
        self.deltas = nn.ParameterList(
            [nn.Parameter(torch.zeros_like(params[n])) for n in names])

    def named_deltas(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Yield ``(parameter name, delta)`` pairs."""
        yield from zip(self.delta_names, self.deltas, strict=True)

    def delta_state(self) -> StateDict:
        """Detached copy of δ by parameter name."""
        return {n: d.detach().clone() for n, d in self.named_deltas()}

    def forward(self, x: Tensor) -> Tensor:
        return linearized_forward(self.module, None, dict(self.named_deltas()), x,
                                  method=self.method)


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def _resolve_params(module: nn.Module, params0: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
    own = dict(module.named_parameters())
    if params0 is None:
        return {n: p.detach() for n, p in own.items()}
    missing = [n for n in own if n not in params0]
    if missing:
        raise InvalidInputError(f"params0 lacks {len(missing)} parameters of the module, e.g. "
                                f"{missing[:3]}")
    return {n: params0[n].detach() for n in own}


def _check_delta(params: Mapping[str, Tensor], delta: Mapping[str, Tensor]) -> None:
    for name, tensor in delta.items():
        if name not in params:
            raise InvalidInputError(
                f"delta tensor {name!r} is not a parameter of the linearized module",
                hint="names are relative to the module (e.g. drop a 'visual.' prefix)")
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise InvalidInputError(
                f"delta tensor {name!r} has shape {tuple(tensor.shape)}, the parameter has "
                f"{tuple(params[name].shape)}")


# --------------------------------------------------------------------------------------------
# Generic path: torch.func.jvp
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _forward_ad_safe_attention() -> Iterator[None]:
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
def _frozen_norm_statistics(module: nn.Module) -> Iterator[None]:
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


def _jvp(func: Any, primals: tuple[Any, ...], tangents: tuple[Any, ...]) -> Any:
    """``torch.func.jvp`` without torch's internal torch.jit.script deprecation warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_JIT_SCRIPT_DEPRECATED, category=FutureWarning)
        return jvp(func, primals, tangents)


def _jvp_parts(module: nn.Module, params: dict[str, Tensor], delta: Mapping[str, Tensor],
               x: Tensor) -> tuple[Tensor, Tensor | None]:
    if not delta:
        with torch.no_grad(), _frozen_norm_statistics(module):
            return functional_call(module, params, (x,)), None
    moving = {n: params[n] for n in delta}
    fixed = {n: p for n, p in params.items() if n not in delta}
    tangents = {n: delta[n].to(params[n].dtype) for n in delta}

    def run(sub: dict[str, Tensor]) -> Tensor:
        return functional_call(module, {**fixed, **sub}, (x,))

    with _forward_ad_safe_attention(), _frozen_norm_statistics(module):
        result = _jvp(run, (moving,), (tangents,))
    return result[0].detach(), result[1]


# --------------------------------------------------------------------------------------------
# Fast path: hand-written (primal, tangent) forward of an open_clip-style ViT
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _BlockPlan:
    prefix: str
    heads: int
    ln_1: nn.LayerNorm
    ln_2: nn.LayerNorm
    act: nn.Module
    ls_1: str | None  # parameter name of a LayerScale gamma, None for identity
    ls_2: str | None


@dataclass(frozen=True)
class _VitPlan:
    blocks: tuple[_BlockPlan, ...]
    ln_pre: nn.LayerNorm | None
    ln_post: nn.LayerNorm
    pool: str
    has_proj: bool
    conv_stride: tuple[int, int]


_PLANS: weakref.WeakKeyDictionary[nn.Module, _VitPlan | None] = weakref.WeakKeyDictionary()


def _vit_plan(module: nn.Module) -> _VitPlan | None:
    """Describe ``module`` if it is a ViT the dual forward implements exactly, else ``None``."""
    if module in _PLANS:
        return _PLANS[module]
    try:
        plan = _build_plan(module)
    except (AttributeError, TypeError, ValueError):
        plan = None
    _PLANS[module] = plan
    return plan


def _layer_scale(module: nn.Module, name: str) -> str | None:
    if isinstance(module, nn.Identity):
        return None
    gamma = getattr(module, "gamma", None)
    if isinstance(gamma, nn.Parameter) and not getattr(module, "inplace", False) and \
            len(list(module.parameters())) == 1:
        return f"{name}.gamma"
    raise ValueError("unsupported layer scale")


def _build_plan(vit: nn.Module) -> _VitPlan | None:
    conv = vit.conv1
    if not isinstance(conv, nn.Conv2d) or conv.bias is not None or conv.padding != (0, 0) \
            or conv.kernel_size != conv.stride or conv.groups != 1:
        return None
    if not isinstance(vit.class_embedding, nn.Parameter) or \
            not isinstance(vit.positional_embedding, nn.Parameter):
        return None
    if not isinstance(vit.patch_dropout, nn.Identity):
        return None
    if getattr(vit, "attn_pool", None) is not None or getattr(vit, "final_ln_after_pool", False):
        return None
    if getattr(vit, "output_tokens", False) or vit.pool_type not in ("tok", "avg"):
        return None
    ln_pre = vit.ln_pre
    if not isinstance(ln_pre, (nn.LayerNorm, nn.Identity)) or not isinstance(vit.ln_post,
                                                                            nn.LayerNorm):
        return None
    if getattr(vit.transformer, "grad_checkpointing", False):
        return None
    blocks = []
    for index, block in enumerate(cast(Any, vit.transformer).resblocks):
        prefix = f"transformer.resblocks.{index}"
        attn = block.attn
        if type(attn) is not nn.MultiheadAttention or not attn._qkv_same_embed_dim \
                or attn.in_proj_weight is None or attn.bias_k is not None \
                or attn.bias_v is not None or attn.add_zero_attn or attn.dropout != 0.0:
            return None
        if hasattr(block, "ln_1_kv") or not isinstance(block.ln_1, nn.LayerNorm) \
                or not isinstance(block.ln_2, nn.LayerNorm):
            return None
        mlp = list(block.mlp.children())
        if len(mlp) != 3 or not isinstance(mlp[0], nn.Linear) or not isinstance(mlp[2], nn.Linear) \
                or list(mlp[1].parameters()):
            return None
        if [n for n, _ in block.mlp.named_children()] != ["c_fc", "gelu", "c_proj"]:
            return None
        own = {n for n, _ in block.named_parameters()}
        expected = {"ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias",
                    "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
                    "attn.out_proj.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                    "mlp.c_proj.weight", "mlp.c_proj.bias"}
        ls_1 = _layer_scale(block.ls_1, "ls_1")
        ls_2 = _layer_scale(block.ls_2, "ls_2")
        expected |= {n for n in (ls_1, ls_2) if n}
        if own != expected:
            return None
        blocks.append(_BlockPlan(prefix, attn.num_heads, block.ln_1, block.ln_2, mlp[1],
                                 f"{prefix}.{ls_1}" if ls_1 else None,
                                 f"{prefix}.{ls_2}" if ls_2 else None))
    top = {n for n, _ in vit.named_parameters() if not n.startswith("transformer.")}
    expected_top = {"class_embedding", "positional_embedding", "conv1.weight", "ln_post.weight",
                    "ln_post.bias"}
    if isinstance(ln_pre, nn.LayerNorm):
        expected_top |= {"ln_pre.weight", "ln_pre.bias"}
    has_proj = isinstance(getattr(vit, "proj", None), nn.Parameter)
    if has_proj:
        expected_top.add("proj")
    if top != expected_top or not blocks:
        return None
    stride = (int(conv.stride[0]), int(conv.stride[1]))
    return _VitPlan(tuple(blocks), ln_pre if isinstance(ln_pre, nn.LayerNorm) else None,
                    vit.ln_post, str(vit.pool_type), has_proj, stride)


def _sum(*terms: Tangent) -> Tangent:
    present = [t for t in terms if t is not None]
    if not present:
        return None
    total = present[0]
    for t in present[1:]:
        total = total + t
    return total


def _linear(x: Tensor, dx: Tangent, w: Tensor, dw: Tangent, b: Tensor | None,
            db: Tangent) -> tuple[Tensor, Tangent]:
    """Apply y = x·wᵀ + b and its tangent dx·wᵀ + x·dwᵀ + db."""
    with torch.no_grad():
        y = F.linear(x, w, b)
    dy: Tangent = None
    if dw is not None:
        dy = F.linear(x, dw, db)
    elif db is not None:
        dy = db.to(y.dtype).expand_as(y)
    if dx is not None:
        if dy is None:
            dy = F.linear(dx, w)
        else:
            # addmm folds the sum of both terms into the second GEMM.
            flat = dy.reshape(-1, dy.shape[-1])
            dy = torch.addmm(flat.to(dx.dtype) if flat.dtype != dx.dtype else flat,
                             dx.reshape(-1, dx.shape[-1]), w.to(dx.dtype).t()).view(y.shape)
    return y, dy


class _LayerNormTangent(torch.autograd.Function):
    """Tangent of LayerNorm in its input and affine parameters, with a fused backward.

    With J0 = rstd·(I − 11ᵀ/n − x̂x̂ᵀ/n) (symmetric), the tangent is g ⊙ J0·dx + x̂ ⊙ dg + db.
    J0·v is exactly LayerNorm's backward without weight, and the adjoint of the whole map is
    LayerNorm's backward with weight g, which also yields the dg and db gradients in one call.
    """

    @staticmethod
    def forward(ctx: Any, dx: Tensor | None, dg: Tensor | None, db: Tensor | None, x: Tensor,
                xhat: Tensor, mean: Tensor, rstd: Tensor, g: Tensor, b: Tensor) -> Tensor:
        shape = [x.shape[-1]]
        out: Tensor | None = None
        if dx is not None:
            out = torch.ops.aten.native_layer_norm_backward(
                dx.to(x.dtype), x, shape, mean, rstd, None, None, [True, False, False])[0]
            out.mul_(g)
        if dg is not None:
            out = xhat * dg.to(x.dtype) if out is None else out.addcmul_(xhat, dg.to(x.dtype))
        if db is not None:
            out = db.to(x.dtype).expand_as(xhat).clone() if out is None else \
                out.add_(db.to(x.dtype))
        ctx.save_for_backward(x, mean, rstd, g, b)
        ctx.dtypes = (None if dx is None else dx.dtype, None if dg is None else dg.dtype,
                      None if db is None else db.dtype)
        if out is None:
            raise ValueError("LayerNorm tangent needs at least one of dx, dg, db")
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, mean, rstd, g, b = ctx.saved_tensors
        mask = [t is not None and need for t, need in zip(ctx.dtypes, ctx.needs_input_grad[:3],
                                                           strict=True)]
        gx, gg, gb = torch.ops.aten.native_layer_norm_backward(
            grad.to(x.dtype).contiguous(), x, [x.shape[-1]], mean, rstd, g, b, mask)
        grads = [t.to(dt) if t is not None and dt is not None else None
                 for t, dt in zip((gx, gg, gb), ctx.dtypes, strict=True)]
        return (*grads, None, None, None, None, None, None)


def _layer_norm(ln: nn.LayerNorm, x: Tensor, dx: Tangent, g: Tensor, dg: Tangent, b: Tensor,
                db: Tangent) -> tuple[Tensor, Tangent]:
    """Apply LayerNorm (computed in float32 at least, as open_clip does) and its tangent."""
    dtype = x.dtype
    acc = torch.promote_types(dtype, torch.float32)
    with torch.no_grad():
        x32 = x.to(acc).contiguous()
        g32, b32 = g.to(acc), b.to(acc)
        xhat, mean, rstd = torch.native_layer_norm(x32, [x.shape[-1]], None, None, ln.eps)
        y = torch.addcmul(b32, xhat, g32).to(dtype)
    if dx is None and dg is None and db is None:
        return y, None
    dy = _LayerNormTangent.apply(dx, dg, db, x32, xhat, mean, rstd, g32, b32)
    return y, dy.to(dtype)


class _AttentionTangent(torch.autograd.Function):
    """Tangent of softmax attention O = softmax(q·kᵀ)·v (q pre-scaled) in q, k and v.

    dS = dq·kᵀ + q·dkᵀ, W = P ⊙ dS, dO = W·v − rowsum(W)·O + P·dv. Written as one Function so
    the L×L intermediates are built in place, each L×L matrix is touched twice in the backward,
    and the head split/merge layout copies happen once instead of once per matmul.

    The tangents come either as one ``[B, L, 3E]`` q/k/v tensor, or (class-token-only queries)
    as ``[B, L, 2E]`` k/v plus ``[B, Lq, E]`` q.
    """

    @staticmethod
    def forward(ctx: Any, dqkv: Tensor, dq_only: Tensor | None, q: Tensor, k: Tensor,
                v: Tensor, probs: Tensor, o: Tensor, scale: float) -> Tensor:
        batch, heads, queries, head_dim = q.shape
        length = k.shape[2]
        dtype = v.dtype
        parts = 3 if dq_only is None else 2
        split = dqkv.to(dtype).view(batch, length, parts, heads, head_dim)
        unbound = split.permute(2, 0, 3, 1, 4).contiguous().unbind(0)
        if dq_only is None:
            dq, dk, dv = unbound
        else:
            dk, dv = unbound
            dq = dq_only.to(dtype).reshape(batch, queries, heads, head_dim).transpose(1, 2)
        weighted = torch.matmul(q, dk.transpose(-1, -2))
        weighted.add_(torch.matmul(dq, k.transpose(-1, -2)), alpha=scale)
        weighted.mul_(probs)
        rows = weighted.sum(dim=-1, keepdim=True)
        do = torch.matmul(probs, dv)
        do.add_(torch.matmul(weighted, v))
        do.addcmul_(rows, o, value=-1)
        ctx.save_for_backward(q, k, v, probs, o)
        ctx.scale = scale
        ctx.dtypes = (dqkv.dtype, None if dq_only is None else dq_only.dtype)
        return do.transpose(1, 2).reshape(batch, queries, heads * head_dim)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, probs, o = ctx.saved_tensors
        batch, heads, queries, head_dim = q.shape
        length = k.shape[2]
        separate = ctx.dtypes[1] is not None
        grad = grad.to(v.dtype).reshape(batch, queries, heads, head_dim).transpose(1, 2)
        grad = grad.contiguous()
        kv = torch.empty((2, batch, heads, length, head_dim), dtype=v.dtype, device=v.device)
        torch.matmul(probs.transpose(-1, -2), grad, out=kv[1])
        grad_w = torch.matmul(grad, v.transpose(-1, -2))
        grad_w.sub_((grad * o).sum(dim=-1, keepdim=True))
        grad_w.mul_(probs)
        torch.matmul(grad_w.transpose(-1, -2), q, out=kv[0])
        grad_q = torch.matmul(grad_w, k).mul_(ctx.scale)
        if separate:
            merged_kv = kv.permute(1, 3, 0, 2, 4).reshape(batch, length, 2 * heads * head_dim)
            merged_q = grad_q.transpose(1, 2).reshape(batch, queries, heads * head_dim)
            return (merged_kv.to(ctx.dtypes[0]), merged_q.to(ctx.dtypes[1]),
                    None, None, None, None, None, None)
        merged = torch.cat([grad_q.unsqueeze(0), kv]).permute(1, 3, 0, 2, 4) \
            .reshape(batch, length, 3 * heads * head_dim)
        return merged.to(ctx.dtypes[0]), None, None, None, None, None, None, None


def _softmax(scores: Tensor, like: Tensor) -> Tensor:
    if scores.dtype in (torch.float32, torch.float64):
        return torch.softmax(scores, dim=-1)
    # Half precision: normalise in float32, as the math attention kernel does.
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(like.dtype)


def _slice(t: Tangent, rows: slice) -> Tangent:
    return None if t is None else t[rows]


def _attention(x: Tensor, dx: Tangent, heads: int, p: Mapping[str, Tensor],
               d: Mapping[str, Tensor], prefix: str,
               first_query_only: bool = False) -> tuple[Tensor, Tangent]:
    """Multi-head self-attention (no mask, no dropout) and its tangent, in plain matmuls.

    With ``first_query_only`` only the first token attends (keys and values still come from
    every token): the output is ``[B, 1, E]``, all the last block of a class-token-pooled ViT
    contributes to the pooled features.
    """
    batch, length, width = x.shape
    head_dim = width // heads
    scale = 1.0 / math.sqrt(head_dim)
    w, b = p[f"{prefix}.in_proj_weight"], p[f"{prefix}.in_proj_bias"]
    dw, db = d.get(f"{prefix}.in_proj_weight"), d.get(f"{prefix}.in_proj_bias")
    dq_only: Tangent = None
    if not first_query_only:
        qkv, dqkv = _linear(x, dx, w, dw, b, db)
        with torch.no_grad():
            q, k, v = qkv.view(batch, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4) \
                .contiguous().unbind(0)
            q = q * scale
    else:
        query_rows, kv_rows = slice(0, width), slice(width, 3 * width)
        qh, dq_only = _linear(x[:, :1], None if dx is None else dx[:, :1], w[query_rows],
                              _slice(dw, query_rows), b[query_rows], _slice(db, query_rows))
        kv, dqkv = _linear(x, dx, w[kv_rows], _slice(dw, kv_rows), b[kv_rows],
                           _slice(db, kv_rows))
        with torch.no_grad():
            q = qh.view(batch, 1, heads, head_dim).transpose(1, 2) * scale
            k, v = kv.view(batch, length, 2, heads, head_dim).permute(2, 0, 3, 1, 4) \
                .contiguous().unbind(0)
    with torch.no_grad():
        probs = _softmax(q @ k.transpose(-1, -2), v)
        o = probs @ v
        merged = o.transpose(1, 2).reshape(batch, q.shape[2], width)
    do = None if dqkv is None else \
        _AttentionTangent.apply(dqkv, dq_only, q, k, v, probs, o, scale)
    return _linear(merged, do, p[f"{prefix}.out_proj.weight"], d.get(f"{prefix}.out_proj.weight"),
                   p[f"{prefix}.out_proj.bias"], d.get(f"{prefix}.out_proj.bias"))


def _activation(act: nn.Module, h: Tensor, dh: Tangent) -> tuple[Tensor, Tangent]:
    """Apply an elementwise activation and its tangent act'(h)·dh."""
    with torch.no_grad():
        if dh is None:
            return act(h), None
        if type(act) is nn.GELU:
            # One GELU-backward pass gives the slope; tangent and its adjoint are then products.
            a = act(h)
            ones = torch.ones((), dtype=h.dtype, device=h.device).expand_as(h)
            slope = torch.ops.aten.gelu_backward(ones, h, approximate=act.approximate)
        else:
            # jvp with a unit tangent gives act and act' in one pass for any elementwise act.
            a, slope = _jvp(act, (h,), (torch.ones_like(h),))[:2]
    return a, slope * dh


def _scale(x: Tensor, dx: Tangent, name: str | None, p: Mapping[str, Tensor],
           d: Mapping[str, Tensor]) -> tuple[Tensor, Tangent]:
    if name is None:
        return x, dx
    gamma = p[name]
    with torch.no_grad():
        y = x * gamma
    dgamma = d.get(name)
    return y, _sum(dx * gamma if dx is not None else None,
                   x * dgamma if dgamma is not None else None)


def _vit_dual_forward(plan: _VitPlan, p: Mapping[str, Tensor], d: Mapping[str, Tensor],
                      images: Tensor) -> tuple[Tensor, Tangent]:
    # Patch embedding: the images carry no tangent, so only dW contributes.
    w_conv = p["conv1.weight"]
    with torch.no_grad():
        tokens = F.conv2d(images, w_conv, stride=plan.conv_stride)
    dtokens = None
    if "conv1.weight" in d:
        dtokens = F.conv2d(images, d["conv1.weight"].to(w_conv.dtype), stride=plan.conv_stride)

    def flatten(t: Tensor) -> Tensor:
        return t.reshape(t.shape[0], t.shape[1], -1).permute(0, 2, 1)

    batch = images.shape[0]
    with torch.no_grad():
        tokens = flatten(tokens)
        cls = p["class_embedding"].to(tokens.dtype).view(1, 1, -1).expand(batch, 1, -1)
        x = torch.cat([cls, tokens], dim=1) + p["positional_embedding"].to(tokens.dtype)
    dx: Tangent = None
    dcls = d.get("class_embedding")
    if dtokens is not None or dcls is not None:
        dtokens = flatten(dtokens) if dtokens is not None else \
            torch.zeros_like(tokens)
        dcls_full = (dcls.to(dtokens.dtype).view(1, 1, -1).expand(batch, 1, -1)
                     if dcls is not None else torch.zeros_like(dtokens[:, :1]))
        dx = torch.cat([dcls_full, dtokens], dim=1)
    dpos = d.get("positional_embedding")
    if dpos is not None:
        dx = _sum(dx, dpos.to(x.dtype).expand_as(x))

    if plan.ln_pre is not None:
        x, dx = _layer_norm(plan.ln_pre, x, dx, p["ln_pre.weight"], d.get("ln_pre.weight"),
                            p["ln_pre.bias"], d.get("ln_pre.bias"))

    for index, block in enumerate(plan.blocks):
        pre = block.prefix
        # Class-token pooling reads one token of the last block's output: only that token's
        # query, residual and MLP are computed there (about 1/depth of the work saved).
        cls_only = CLASS_TOKEN_SHORTCUT and plan.pool == "tok" and index == len(plan.blocks) - 1
        h, dh = _layer_norm(block.ln_1, x, dx, p[f"{pre}.ln_1.weight"], d.get(f"{pre}.ln_1.weight"),
                            p[f"{pre}.ln_1.bias"], d.get(f"{pre}.ln_1.bias"))
        h, dh = _attention(h, dh, block.heads, p, d, f"{pre}.attn", first_query_only=cls_only)
        if cls_only:
            x, dx = x[:, :1], None if dx is None else dx[:, :1]
        h, dh = _scale(h, dh, block.ls_1, p, d)
        with torch.no_grad():
            x = x + h
        dx = _sum(dx, dh)
        h, dh = _layer_norm(block.ln_2, x, dx, p[f"{pre}.ln_2.weight"], d.get(f"{pre}.ln_2.weight"),
                            p[f"{pre}.ln_2.bias"], d.get(f"{pre}.ln_2.bias"))
        h, dh = _linear(h, dh, p[f"{pre}.mlp.c_fc.weight"], d.get(f"{pre}.mlp.c_fc.weight"),
                        p[f"{pre}.mlp.c_fc.bias"], d.get(f"{pre}.mlp.c_fc.bias"))
        h, dh = _activation(block.act, h, dh)
        h, dh = _linear(h, dh, p[f"{pre}.mlp.c_proj.weight"], d.get(f"{pre}.mlp.c_proj.weight"),
                        p[f"{pre}.mlp.c_proj.bias"], d.get(f"{pre}.mlp.c_proj.bias"))
        h, dh = _scale(h, dh, block.ls_2, p, d)
        with torch.no_grad():
            x = x + h
        dx = _sum(dx, dh)

    # open_clip normalises every token, then pools (for the class token the order is moot).
    if plan.pool == "tok":
        x, dx = x[:, 0], None if dx is None else dx[:, 0]
    x, dx = _layer_norm(plan.ln_post, x, dx, p["ln_post.weight"], d.get("ln_post.weight"),
                        p["ln_post.bias"], d.get("ln_post.bias"))
    if plan.pool == "tok":
        pooled, dpooled = x, dx
    else:
        with torch.no_grad():
            pooled = x[:, 1:].mean(dim=1)
        dpooled = None if dx is None else dx[:, 1:].mean(dim=1)
    if plan.has_proj:
        proj = p["proj"]
        with torch.no_grad():
            out = pooled @ proj
        dproj = d.get("proj")
        dout = _sum(dpooled @ proj if dpooled is not None else None,
                    pooled @ dproj.to(proj.dtype) if dproj is not None else None)
        return out, dout
    return pooled, dpooled
