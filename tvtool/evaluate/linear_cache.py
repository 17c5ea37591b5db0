"""A linearized model at many coefficients, from encoder outputs computed once.

The image encoder of a linearized model is ``f(x; θ0) + J f(x; θ0)·Σ α_t τ_t``, which is
``f0(x) + Σ α_t j_t(x)`` with ``j_t = J f(x; θ0)·τ_t``: linear in the coefficients. A search
or a disentanglement map over any grid therefore needs, per evaluated split, one primal pass
(``f0``) and one JVP per vector (``j_t``); every set of coefficients after that costs a weighted
sum of ``[N, D]`` tensors, the normalization, the head and the argmax. Only the encoder output
is linear in α: normalization and logits are computed per α from the summed features.

The parts are computed lazily (a vector's ``j_t`` on a split only when a coefficient of it is
non-zero there), under the same autocast as :func:`tvtool.evaluate.predictions`, and kept in
float32; the weighted sum is formed in float32. The per-point path adds the combined delta in
weight space first and runs one JVP, so the two agree up to float rounding (not bitwise).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tvtool.device import autocast
from tvtool.evaluate.batches import EvalData, batches, check_finite_logits
from tvtool.evaluate.model import VISUAL_PREFIX, EvalModel
from tvtool.types import ProgressFactory, no_progress
from tvtool.vectors import expand_coefs, plan_combine


@dataclass
class _Parts:
    """What is cached of one split: ``f0``, the labels and the ``j_t`` computed so far."""

    data: EvalData
    primal: Tensor | None = None
    labels: Tensor | None = None
    tangents: dict[int, Tensor] = field(default_factory=dict)


class LinearizedFeatures:
    """Features and predictions of a linearized :class:`EvalModel` at any coefficients.

    Args:
        model: An open model whose vectors are evaluated linearized (``model.linearized``);
            its weights must be the base's (they are for every linearized edit).
        batch_size: Images per encoder pass.
        workers: DataLoader workers.
        precision: Autocast precision of the encoder passes, as for ``predictions``.
        progress: Progress-bar factory, advanced once per batch of each encoder pass.

    Attributes:
        primal_passes: Batches run through the encoder without a tangent (only ``f0``).
        tangent_passes: Batches run through the encoder with a JVP (one vector each).

    Raises:
        ValueError: the model is not evaluated linearized.
    """

    def __init__(self, model: EvalModel, *, batch_size: int, workers: int = 0,
                 precision: str = "auto", progress: ProgressFactory = no_progress) -> None:
        if not model.linearized:
            raise ValueError("LinearizedFeatures needs a model evaluated linearized")
        self.model = model
        self.batch_size = batch_size
        self.workers = workers
        self.precision = precision
        self.progress = progress
        self.primal_passes = 0
        self.tangent_passes = 0
        self._parts: dict[int, _Parts] = {}
        self._delta: tuple[int, dict[str, Tensor]] | None = None
        if model.vectors:
            # The same key, shape and dtype checks as the per-point path's combined delta.
            plan_combine(None, [(v.source, 1.0) for v in model.vectors])

    def features(self, data: EvalData, coefs: Sequence[float]) -> Tensor:
        """Unit-norm float32 image features ``[N, D]`` of the model at ``coefs``.

        Args:
            data: The split (the same object on every call, for the cache).
            coefs: One coefficient per vector, or one for all.

        Raises:
            UsageError: the coefficient count does not fit.
            InvalidInputError: bad vectors or data (as the per-point path).
        """
        values = expand_coefs(list(coefs), len(self.model.vectors)) if self.model.vectors \
            else []
        parts = self._ensure(data, [i for i, c in enumerate(values) if c != 0.0])
        assert parts.primal is not None
        total = parts.primal.clone()
        for index, coef in enumerate(values):
            if coef != 0.0:
                total.add_(parts.tangents[index], alpha=coef)
        return F.normalize(total, dim=-1)

    def predictions(self, data: EvalData, head: Tensor,
                    coefs: Sequence[float]) -> tuple[Tensor, Tensor]:
        """Predicted and true labels (int64, on CPU) at ``coefs``; see :meth:`features`."""
        features = self.features(data, coefs)
        parts = self._parts[id(data)]
        assert parts.labels is not None
        size = max(1, self.batch_size)
        chunks = []
        for index, chunk in enumerate(features.split(size)):
            logits = chunk @ head.float().T
            check_finite_logits(logits, data, index, size)
            chunks.append(logits.argmax(dim=-1).cpu())
        predicted = torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.long)
        return predicted, parts.labels

    def count_correct(self, data: EvalData, head: Tensor, coefs: Sequence[float]) -> int:
        """Number of correctly classified examples at ``coefs``."""
        predicted, labels = self.predictions(data, head, coefs)
        return int((predicted == labels).sum())

    # ------------------------------------------------------------------ encoder passes

    def _ensure(self, data: EvalData, needed: Sequence[int]) -> _Parts:
        parts = self._parts.setdefault(id(data), _Parts(data))
        if parts.data is not data:  # pragma: no cover - an id reused after the data was freed
            parts = self._parts[id(data)] = _Parts(data)
        missing = [i for i in needed if i not in parts.tangents]
        if parts.primal is None and not missing:
            self._pass(parts, None)
        for index in missing:
            self._pass(parts, index)
        return parts

    def _pass(self, parts: _Parts, index: int | None) -> None:
        """One pass over the split: ``f0`` (kept if not yet cached) and ``j_index``."""
        from tvtool.linearize import linearized_parts

        model = self.model
        visual = cast(nn.Module, model.bundle.model.visual)
        delta = self._vector_delta(index) if index is not None else {}
        data = parts.data
        primals: list[Tensor] = []
        tangents: list[Tensor] = []
        labels: list[Tensor] = []
        steps = -(-data.size // self.batch_size)
        label = f"{data.name} ({data.split})" + ("" if index is None else f", vector {index + 1}")
        with self.progress(label, steps) as advance, torch.no_grad():
            for images, targets in batches(data, self.batch_size, workers=self.workers,
                                           device=model.device, materialize=True):
                with autocast(model.device, self.precision):
                    primal, tangent = linearized_parts(visual, None, delta, images)
                if index is None:
                    self.primal_passes += 1
                else:
                    self.tangent_passes += 1
                if parts.primal is None:
                    primals.append(primal.float())
                    labels.append(targets.cpu())
                if index is not None:
                    tangents.append(torch.zeros_like(primal, dtype=torch.float32)
                                    if tangent is None else tangent.float())
                advance(1)
        if parts.primal is None:
            parts.primal = _cat(primals, model.device)
            parts.labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
        if index is not None:
            parts.tangents[index] = _cat(tangents, model.device)

    def _vector_delta(self, index: int) -> dict[str, Tensor]:
        """τ_index restricted to the image encoder, by parameter name relative to it.

        Only the most recent one is kept: one delta in memory at a time, as in the per-point
        path.
        """
        if self._delta is not None and self._delta[0] == index:
            return self._delta[1]
        self._delta = None
        model = self.model
        params = {n for n, _ in cast(nn.Module, model.bundle.model.visual).named_parameters()}
        delta: dict[str, Tensor] = {}
        for name, tensor in plan_combine(None, [(model.vectors[index].source, 1.0)]).tensors():
            local = name[len(VISUAL_PREFIX):]
            if name.startswith(VISUAL_PREFIX) and local in params:
                delta[local] = tensor.to(model.device, torch.float32)
        self._delta = (index, delta)
        return delta


def _cat(chunks: list[Tensor], device: Any) -> Tensor:
    return torch.cat(chunks) if chunks else torch.zeros(0, 0, device=device)
