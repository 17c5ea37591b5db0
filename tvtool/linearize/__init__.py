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
  (see :data:`tvtool.linearize.vit.CLASS_TOKEN_SHORTCUT`). In :mod:`tvtool.linearize.vit`.
* **Generic path** (any other module): ``torch.func.jvp`` over ``functional_call`` with
  PyTorch's math attention kernel and the ``nn.MultiheadAttention`` fast path disabled, since
  the fused kernels raise "Trying to use forward AD with ... that does not support it".
  Normalisation layers with running statistics (BatchNorm in ResNet and MobileCLIP towers)
  run in eval mode, with their frozen statistics, whatever the module's mode: the linearized
  model is the network as evaluated, and forward AD cannot update the statistics in place.
  In :mod:`tvtool.linearize.generic`.

The structure test for the fast path is by module type and shape (``nn.MultiheadAttention``,
``nn.LayerNorm``, ``nn.Linear``, ``nn.Conv2d``), not by importing open_clip.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn

from tvtool.errors import InvalidInputError
from tvtool.limits import short_list
from tvtool.linearize.generic import jvp_parts
from tvtool.linearize.vit import vit_dual_forward, vit_plan
from tvtool.types import StateDict

__all__ = [
    "LinearizedModule",
    "jvp_reference",
    "linearized_forward",
    "linearized_parts",
    "supports_fast_path",
]


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
    plan = vit_plan(module) if method != "jvp" else None
    if plan is None and method == "dual":
        raise InvalidInputError(
            f"{type(module).__name__} does not have the ViT structure the fast linearized "
            "forward supports", hint="use method='jvp' or 'auto'")
    if plan is not None:
        return vit_dual_forward(plan, params, delta, x)
    return jvp_parts(module, params, delta, x)


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
    return vit_plan(module) is not None


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
                raise InvalidInputError(f"not parameters of the module: {short_list(unknown, 3)}")
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
                                f"{short_list(missing, 3)}")
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
