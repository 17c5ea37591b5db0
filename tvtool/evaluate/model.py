"""The model under evaluation: a base plus task vectors with coefficients.

Ordinary vectors are added to the weights (``plan_combine`` over the base, loaded into the
open_clip model); vectors recorded as linearized are evaluated as the linear model they were
trained as, ``f(x; θ0) + J f(x; θ0)·Σ α_i τ_i``, with :mod:`tvtool.linearize`. The base stays
open for the model's lifetime so that another set of coefficients (a disentanglement grid, a
coefficient search) costs one weight rebuild, never a reload from disk.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tvtool.errors import InvalidInputError, UsageError
from tvtool.io import TensorInfo, TensorSource
from tvtool.limits import short_list
from tvtool.models import ClipBundle, base_source, fingerprint, load_clip, load_state_into
from tvtool.models.refs import ModelRef
from tvtool.types import StateDict
from tvtool.vectors import (
    StreamPlan,
    VectorInput,
    check_vectors_fit_base,
    expand_coefs,
    open_vector,
    plan_combine,
)

WeightBuilder = Callable[[TensorSource, Sequence[VectorInput]], StateDict]
"""Extension point: ``(base, vectors) -> edited weights`` (e.g. aTLAS coefficients applied
per block). Names left out of the result keep their base value."""

Weights = StateDict | WeightBuilder
"""Edited weights given directly, or a builder of them."""

VISUAL_PREFIX = "visual."


class _PlanSource:
    """A :class:`~tvtool.io.TensorSource` view of a streaming plan (tensors made on demand)."""

    def __init__(self, plan: StreamPlan, label: str) -> None:
        self._plan = plan
        self._infos = {info.name: info for info in plan.layout}
        self.label = label
        self.metadata: dict[str, str] = {}

    def keys(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def get(self, name: str) -> Tensor:
        return self._plan.producers[name]()  # type: ignore[operator,no-any-return]

    def close(self) -> None:
        return None


class _OverlaySource:
    """The base with some tensors replaced (a :class:`~tvtool.io.TensorSource`)."""

    def __init__(self, base: TensorSource, overrides: Mapping[str, Tensor]) -> None:
        self._base = base
        self._overrides = overrides
        self.label = "edited weights"
        self.metadata: dict[str, str] = {}

    def keys(self) -> list[str]:
        return self._base.keys()

    def info(self, name: str) -> TensorInfo:
        return self._base.info(name)

    def get(self, name: str) -> Tensor:
        return self._overrides[name] if name in self._overrides else self._base.get(name)

    def close(self) -> None:
        return None


@dataclass
class EvalModel:
    """An open base model with task vectors, ready to be evaluated at any coefficients.

    Build it with :func:`open_eval_model`; close it (or use it as a context manager) to release
    the files.

    Attributes:
        bundle: The open_clip model (holds the base weights until an edit is set).
        ref: Resolved reference of the base.
        base: The base tensors (lazily read).
        base_fingerprint: Fingerprint of the base tensors.
        vectors: The opened task vectors.
        linearized: Whether the vectors are evaluated as a linearized model.
        device: Torch device of the model.
        notes: Remarks for stderr (ignored tensors, approximations).
    """

    bundle: ClipBundle
    ref: ModelRef
    base: TensorSource
    base_fingerprint: str
    vectors: list[VectorInput]
    linearized: bool
    device: torch.device
    notes: list[str] = field(default_factory=list)
    _delta: dict[str, Tensor] | None = field(default=None, repr=False)
    _params0: dict[str, Tensor] | None = field(default=None, repr=False)
    _edited: bool = field(default=False, repr=False)

    def __enter__(self) -> EvalModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the base and vector files."""
        for source in [self.base, *(v.source for v in self.vectors)]:
            with contextlib.suppress(Exception):
                source.close()

    # ------------------------------------------------------------------ edits

    def reset(self) -> None:
        """Evaluate the base model itself."""
        self._delta = None
        if self._edited:
            load_state_into(self.bundle.model, self.base)
            self._edited = False

    def set_coefficients(self, coefs: Sequence[float]) -> None:
        """Evaluate ``θ0 + Σ coef_i · τ_i`` (or its linearized model).

        Args:
            coefs: One coefficient per vector, or one for all.

        Raises:
            UsageError: coefficient count does not fit.
            InvalidInputError: key or shape mismatches, NaN/Inf in a vector.
        """
        if not self.vectors:
            self.reset()
            return
        values = expand_coefs(list(coefs), len(self.vectors))
        pairs = [(v.source, c) for v, c in zip(self.vectors, values, strict=True)]
        if self.linearized:
            self._set_delta(plan_combine(None, pairs).tensors())
        else:
            self._load(_PlanSource(plan_combine(self.base, pairs), "edited model"))

    def set_weights(self, weights: Weights) -> None:
        """Evaluate explicitly given edited weights (the aTLAS / custom-merge extension point).

        Args:
            weights: Edited weights by open_clip name (names left out keep their base
                value), or a :data:`WeightBuilder` called with the base and the vectors.

        Raises:
            InvalidInputError: names not in the base, shape mismatches.
        """
        state = weights(self.base, self.vectors) if callable(weights) else weights
        base_keys = set(self.base.keys())
        unknown = sorted(set(state) - base_keys)
        if unknown:
            raise InvalidInputError(f"{len(unknown)} edited tensors are not in the base, e.g. "
                                    f"{short_list(unknown, 3)}")
        for name, tensor in state.items():
            expected = self.base.info(name).shape
            if tuple(tensor.shape) != tuple(expected):
                raise InvalidInputError(f"edited tensor {name!r} has shape "
                                        f"{tuple(tensor.shape)}, the base has {tuple(expected)}")
        if self.linearized:
            # The linear model only needs the offset from θ0; computed in float64 so a small τ
            # is not lost to the rounding of θ0 + τ.
            self._set_delta(
                (name, (tensor.double() - self.base.get(name).double()).float())
                for name, tensor in state.items())
            return

        self._load(_OverlaySource(self.base, state))

    def _load(self, source: TensorSource) -> None:
        self._delta = None
        load_state_into(self.bundle.model, source)
        self._edited = True

    def _set_delta(self, tensors: Any) -> None:
        if self._edited:
            load_state_into(self.bundle.model, self.base)
            self._edited = False
        visual = self._visual()
        if self._params0 is None:
            # Views of the model's own storage: valid while the model holds θ0, which every
            # linearized edit guarantees (above).
            self._params0 = {n: p.detach() for n, p in visual.named_parameters()}
        delta: dict[str, Tensor] = {}
        for name, tensor in tensors:
            if not name.startswith(VISUAL_PREFIX):
                continue
            local = name[len(VISUAL_PREFIX):]
            if local not in self._params0:
                continue
            delta[local] = tensor.to(self.device, torch.float32)
        self._delta = delta

    # ------------------------------------------------------------------ forward

    def image_features(self, images: Tensor) -> Tensor:
        """Unit-norm image embeddings of the model being evaluated (float32)."""
        if self._delta is not None:
            from tvtool.linearize import linearized_forward

            features = linearized_forward(self._visual(), self._params0, self._delta, images)
        else:
            features = cast(Any, self.bundle.model).encode_image(images)
        return F.normalize(features.float(), dim=-1)

    def _visual(self) -> nn.Module:
        return cast(nn.Module, self.bundle.model.visual)

    def describe_vectors(self, coefs: Sequence[float] | None) -> list[dict[str, Any]]:
        """JSON-ready description of the vectors (path, dataset, mode, coefficient)."""
        values = expand_coefs(list(coefs), len(self.vectors)) if coefs and self.vectors else \
            [None] * len(self.vectors)
        return [{"path": v.path, "dataset": v.meta.dataset,
                 "mode": v.meta.mode.value if v.meta.mode else None,
                 "linearized": v.meta.linearized, "coef": c}
                for v, c in zip(self.vectors, values, strict=True)]


def open_eval_model(
    base: str,
    vectors: Sequence[str] = (),
    *,
    device: str | torch.device = "cpu",
    allow_base_mismatch: bool = False,
    approximate_linearized: bool = False,
) -> EvalModel:
    """Open a base and task vectors for evaluation.

    Args:
        base: Model reference of the base.
        vectors: Task-vector files (``-`` for stdin at most once).
        device: Torch device for the model.
        allow_base_mismatch: Accept vectors recorded against another base fingerprint.
        approximate_linearized: Add linearized vectors to the weights instead of evaluating
            their linearized model (and allow mixing them with ordinary vectors).

    Returns:
        The open :class:`EvalModel` holding the base weights.

    Raises:
        UsageError: stdin given twice.
        InvalidInputError: bad base or vectors, vectors of another base, linearized and
            ordinary vectors mixed.
    """
    if list(vectors).count("-") > 1:
        raise UsageError("stdin ('-') can be given only once")
    source, ref = base_source(base)
    opened: list[VectorInput] = []
    try:
        for path in vectors:
            opened.append(open_vector(path))
        base_fp = fingerprint(source)
        notes = check_vectors_fit_base([(v.source.label, v.meta) for v in opened], base_fp,
                                       allow_mismatch=allow_base_mismatch,
                                       architecture=ref.architecture)
        linearized = _linearized(opened, approximate_linearized, notes)
        notes += _text_side_notes(opened)
        torch_device = torch.device(device)
        bundle = load_clip(ref, torch_device)
    except BaseException:
        for item in [source, *(v.source for v in opened)]:
            with contextlib.suppress(Exception):
                item.close()
        raise
    return EvalModel(bundle, bundle.ref, source, base_fp, opened, linearized, torch_device,
                     notes)


def _linearized(vectors: Sequence[VectorInput], approximate: bool, notes: list[str]) -> bool:
    flagged = [v for v in vectors if v.meta.linearized]
    if not flagged:
        return False
    if approximate:
        notes.append(f"{len(flagged)} linearized vector(s) added to the weights: this "
                     "approximates the linearized model they were trained as")
        return False
    if len(flagged) != len(vectors):
        plain = next(v for v in vectors if not v.meta.linearized)
        raise InvalidInputError(
            f"{flagged[0].source.label} is linearized but {plain.source.label} is not: one "
            "model cannot be both the linearized and the ordinary network",
            hint="evaluate them separately, or pass --approximate-linearized to add every "
                 "vector to the weights")
    return True


def _text_side_notes(vectors: Sequence[VectorInput]) -> list[str]:
    """Say when a vector changes tensors that cannot affect zero-shot image classification."""
    notes = []
    for vector in vectors:
        names = vector.source.keys()
        changed = [n for n in names if not n.startswith(VISUAL_PREFIX)
                   and vector.source.info(n).dtype.is_floating_point
                   and bool(vector.source.get(n).any())]
        if changed:
            notes.append(f"{vector.source.label} changes {len(changed)} tensors outside the image "
                         "encoder (e.g. "
                         f"{changed[0]!r}); heads come from the base text encoder, so those "
                         "changes do not affect accuracy")
    return notes
