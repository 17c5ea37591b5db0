"""The fast linearized path: a hand-written (primal, tangent) forward of an open_clip-style ViT.

The primal pass runs under ``torch.no_grad`` (it does not depend on the delta), so autograd
records only the tangent pass, which is linear in the delta; attention is written in plain
matmuls, so no fused attention kernel (without forward-mode AD) is involved. The structure test
(:func:`vit_plan`) is by module type and shape, not by importing open_clip.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tvtool.linearize.generic import quiet_jvp

Tangent = Tensor | None
"""A tangent that may be ``None``, meaning exactly zero (so no work is done for it)."""

CLASS_TOKEN_SHORTCUT = True
"""In a class-token-pooled ViT, compute only the class token's path through the last block
(the other tokens' outputs are never read). Exact; ``False`` computes every token, which the
benchmark uses to separate this saving from the rest."""


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
class VitPlan:
    """The layers of a ViT image encoder the dual forward walks through (see :func:`vit_plan`)."""

    blocks: tuple[_BlockPlan, ...]
    ln_pre: nn.LayerNorm | None
    ln_post: nn.LayerNorm
    pool: str
    has_proj: bool
    conv_stride: tuple[int, int]


_PLANS: weakref.WeakKeyDictionary[nn.Module, VitPlan | None] = weakref.WeakKeyDictionary()


def vit_plan(module: nn.Module) -> VitPlan | None:
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


def _build_plan(vit: nn.Module) -> VitPlan | None:
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
    return VitPlan(tuple(blocks), ln_pre if isinstance(ln_pre, nn.LayerNorm) else None,
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
            a, slope = quiet_jvp(act, (h,), (torch.ones_like(h),))[:2]
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


def vit_dual_forward(plan: VitPlan, p: Mapping[str, Tensor], d: Mapping[str, Tensor],
                      images: Tensor) -> tuple[Tensor, Tangent]:
    """``(f(x; θ0), J·δ)`` of a planned ViT: parameters ``p`` (θ0), deltas ``d`` (δ).

    The primal carries no autograd history; the tangent is ``None`` when ``d`` is empty.
    """
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
