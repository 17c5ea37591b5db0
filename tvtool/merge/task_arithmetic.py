"""Task arithmetic: ``τ = Σ_i α_i · τ_i``.

Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023 (arXiv 2212.04089).

Same result as ``peft.utils.merge_utils.task_arithmetic`` (tested equal); that function
stacks the N tensors first, this one accumulates one weighted vector at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tvtool.merge.method import MergeMethod, TensorContext, sum_of_terms


@dataclass(frozen=True)
class TaskArithmeticParams:
    """Task arithmetic has no hyper-parameter besides the coefficients."""


def accumulate(acc: torch.Tensor, tensor: torch.Tensor, index: int, weight: float,
               params: TaskArithmeticParams, ctx: TensorContext) -> None:
    """Add vector ``index``'s term ``w · τ`` to ``acc``.

    Args:
        acc: Accumulator (float32, or float64), updated in place.
        tensor: The vector's tensor.
        index: Its position among the vectors (unused).
        weight: Its coefficient.
        params: Unused (the method has none).
        ctx: Unused.

    """
    acc.add_(tensor, alpha=weight)


merge = sum_of_terms(accumulate)
"""``Σ_i w_i · tensors_i`` accumulated in float32 (float64 for float64 inputs)."""

METHOD = MergeMethod(
    name="task_arithmetic",
    paper="Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023, arXiv:2212.04089",
    summary="weighted sum of the task vectors: sum_i coef_i * tau_i",
    streaming=True,
    params=TaskArithmeticParams,
    fn=merge,
    accumulate=accumulate,
)
