"""Coefficient files: what ``tvtool learn-coeffs`` writes and ``merge --coefs`` / ``eval`` read.

A coefficient file is safetensors with one float32 tensor ``coefficients`` of shape
``[num_vectors, num_blocks]`` (row t scales the t-th task vector, in the order the vectors were
given) and ``tvtool.*`` metadata (kind ``coefficients``):

* ``granularity`` -- ``task``, ``tensor``, ``layer``, ``random:K`` or ``atlas:K``;
* ``block_names`` -- JSON list, one name per column;
* ``tensors`` -- JSON list of ``[name, shape]``: the tensors the blocks cover, so the partition
  can be rebuilt from the file alone; tensors not listed are not scaled (coefficient 0);
* ``partition_seed`` and ``partition_k`` -- for ``random:K`` and ``atlas:K``, the seed and K
  of the split;
* ``sources`` -- JSON list, one entry per row: the vector's path, dataset, mode, whether it is
  linearized, and its base fingerprint;
* the usual ``architecture``, ``base_ref``, ``base_fingerprint``, ``linearized``, ``dataset``
  (the datasets the coefficients were learned on) and ``provenance``.

See docs/format.md, section "Coefficient files".
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from tvtool.atlas.blocks import Partition, TensorSpec, build_partition, parse_granularity
from tvtool.atlas.compose import compose_tensor
from tvtool.errors import InvalidInputError
from tvtool.io import TensorSource, open_tensors, write_tensors
from tvtool.limits import loads_json, short_list
from tvtool.metadata import FileMeta, Kind
from tvtool.types import StateDict

COEFFICIENTS_TENSOR = "coefficients"
"""Name of the tensor in a coefficient file."""


@dataclass(frozen=True)
class CoefficientSet:
    """A learned coefficient matrix with the partition it refers to.

    Attributes:
        coefficients: ``[num_vectors, num_blocks]`` float32.
        partition: The blocks (rebuilt from the file's metadata).
        sources: One record per row (path, dataset, mode, linearized, base_fingerprint).
        meta: The file's ``tvtool.*`` metadata.
    """

    coefficients: Tensor
    partition: Partition
    sources: tuple[dict[str, Any], ...]
    meta: FileMeta = field(default_factory=lambda: FileMeta(kind=Kind.COEFFICIENTS))

    @property
    def num_vectors(self) -> int:
        """Rows of the matrix."""
        return int(self.coefficients.shape[0])

    def to_header(self) -> dict[str, str]:
        """The safetensors metadata of this set."""
        part = self.partition
        extra = {**self.meta.extra,
                 "granularity": str(part.granularity),
                 "block_names": json.dumps(list(part.block_names)),
                 "tensors": json.dumps([[s.name, list(s.shape)] for s in part.tensors]),
                 "sources": json.dumps(list(self.sources), sort_keys=True)}
        if part.granularity.grouped:
            extra["partition_seed"] = str(part.seed)
            extra["partition_k"] = str(part.granularity.k)
        return self.meta.with_changes(kind=Kind.COEFFICIENTS, extra=extra).to_header()

    def check_vectors(self, vectors: Sequence[tuple[str, FileMeta, Mapping[str, tuple[int, ...]]]],
                      *, allow_base_mismatch: bool = False) -> None:
        """Check that ``vectors`` are the ones the coefficients were learned for.

        Args:
            vectors: ``(label, metadata, {tensor name: shape})`` per vector, in row order.
            allow_base_mismatch: Accept vectors whose base fingerprint differs from the one
                recorded for their row.

        Raises:
            InvalidInputError: a different number of vectors, a covered tensor with another
                shape, or (unless allowed) a vector recorded against another base.
        """
        if len(vectors) != self.num_vectors:
            expected = ", ".join(str(s.get("path") or s.get("dataset") or "?")
                                 for s in self.sources)
            raise InvalidInputError(
                f"the coefficient file has {self.num_vectors} rows (one per task vector) but "
                f"{len(vectors)} vectors were given",
                hint=f"pass the vectors it was learned for, in order: {expected}")
        for row, (label, meta, shapes) in enumerate(vectors):
            recorded = self.sources[row].get("base_fingerprint") if row < len(
                self.sources) else None
            if (recorded and meta.base_fingerprint and recorded != meta.base_fingerprint
                    and not allow_base_mismatch):
                raise InvalidInputError(
                    f"{label} (row {row}) comes from another base than the vector the "
                    "coefficients were learned for", hint="pass the vectors in the order "
                    "learn-coeffs was given them, or --allow-base-mismatch")
            for spec in self.partition.tensors:
                shape = shapes.get(spec.name)
                if shape is not None and tuple(shape) != spec.shape:
                    raise InvalidInputError(
                        f"{label}: tensor {spec.name!r} has shape {tuple(shape)}, the "
                        f"coefficient file expects {spec.shape}")

    def tensor_coefficients(self, name: str) -> Tensor | None:
        """Per-vector coefficients of one tensor, broadcastable over it.

        Returns:
            ``[T, 1, …, 1]`` or (``random:K``, ``atlas:K``) ``[T, *shape]`` float32; None for
            a tensor the file does not cover (its coefficient is 0).
        """
        if name not in self.partition:
            return None
        return self.partition.tensor_coefficients(self.coefficients, name)

    def combine(self, name: str, parts: Sequence[Tensor | None]) -> Tensor | None:
        """``Σ_t λ_t ⊙ τ_t`` of one tensor (float32); None when the file does not cover it.

        Args:
            name: Tensor name.
            parts: The tensor of every vector, in row order (None where a vector lacks it).
        """
        if name not in self.partition:
            return None
        return compose_tensor(self.partition, self.coefficients, name, parts)

    def weight_builder(self) -> Callable[[TensorSource, Sequence[Any]], StateDict]:
        """A builder ``(base, vectors) -> edited weights`` for :func:`tvtool.evaluate.evaluate`.

        ``vectors`` are opened task vectors (objects with ``source`` and ``meta``, as
        :class:`tvtool.vectors.VectorInput`), in row order.
        """
        def build(base: TensorSource, vectors: Sequence[Any]) -> StateDict:
            keys = [set(v.source.keys()) for v in vectors]
            self.check_vectors([(v.source.label, v.meta,
                                 {n: v.source.info(n).shape for n in names})
                                for v, names in zip(vectors, keys, strict=True)])
            out: StateDict = {}
            for spec in self.partition.tensors:
                parts = [v.source.get(spec.name) if spec.name in names else None
                         for v, names in zip(vectors, keys, strict=True)]
                offset = self.combine(spec.name, parts)
                tensor = base.get(spec.name)
                out[spec.name] = (tensor.float() + offset).to(tensor.dtype)  # type: ignore
            return out

        return build


def coefficient_set_from_source(source: TensorSource) -> CoefficientSet:
    """Parse and validate an opened coefficient file.

    Raises:
        InvalidInputError: another kind of file, a missing or malformed tensor or metadata
            entry, or a matrix whose shape does not fit the block list or the sources.
    """
    label = source.label
    meta = FileMeta.from_header(source.metadata, label)
    if meta.kind is not Kind.COEFFICIENTS:
        raise InvalidInputError(f"{label} is a tvtool {meta.kind.value}, not a coefficient file",
                                hint="coefficient files come from `tvtool learn-coeffs`")
    if source.keys() != [COEFFICIENTS_TENSOR]:
        raise InvalidInputError(f"{label} must hold exactly one tensor named "
                                f"{COEFFICIENTS_TENSOR!r}, found {short_list(source.keys(), 3)}")
    matrix = source.get(COEFFICIENTS_TENSOR)
    if matrix.ndim != 2 or not matrix.is_floating_point():
        raise InvalidInputError(f"{label}: {COEFFICIENTS_TENSOR!r} must be a 2-D floating "
                                f"tensor, got {matrix.dtype} {tuple(matrix.shape)}")
    if not bool(torch.isfinite(matrix).all()):
        raise InvalidInputError(f"{label}: the coefficients contain NaN or Inf")
    extra = meta.extra
    for key in ("granularity", "block_names", "tensors", "sources"):
        if key not in extra:
            raise InvalidInputError(f"{label} lacks metadata tvtool.{key}")
    granularity = parse_granularity(extra["granularity"])
    block_names = _json_list(extra["block_names"], label, "block_names")
    tensors = _json_list(extra["tensors"], label, "tensors")
    sources = _json_list(extra["sources"], label, "sources")
    try:
        specs = [TensorSpec(str(name), tuple(int(s) for s in shape)) for name, shape in tensors]
    except (TypeError, ValueError):
        raise InvalidInputError(f"{label}: malformed tvtool.tensors") from None
    seed = 0
    if granularity.grouped:
        try:
            seed = int(extra["partition_seed"])
            k = int(extra["partition_k"])
        except (KeyError, ValueError):
            raise InvalidInputError(f"{label}: a {granularity.kind}:K file needs integer "
                                    "tvtool.partition_seed and tvtool.partition_k") from None
        if k != granularity.k:
            raise InvalidInputError(f"{label}: tvtool.partition_k={k} disagrees with "
                                    f"granularity {granularity}")
    partition = build_partition(specs, granularity, seed)
    if list(partition.block_names) != [str(b) for b in block_names]:
        raise InvalidInputError(f"{label}: tvtool.block_names does not match the {granularity} "
                                "blocks of its tensors (the file was edited or is damaged)")
    if matrix.shape[1] != partition.num_blocks:
        raise InvalidInputError(f"{label}: the matrix has {matrix.shape[1]} columns but "
                                f"{partition.num_blocks} blocks are listed")
    if len(sources) != matrix.shape[0]:
        raise InvalidInputError(f"{label}: the matrix has {matrix.shape[0]} rows but "
                                f"{len(sources)} sources are listed")
    return CoefficientSet(matrix.float(), partition,
                          tuple(s if isinstance(s, dict) else {"path": str(s)} for s in sources),
                          meta)


def read_coefficients(path: str) -> CoefficientSet:
    """Read and validate a coefficient file (``-`` for stdin).

    Raises:
        InvalidInputError: see :func:`coefficient_set_from_source`.
    """
    source = open_tensors(path)
    try:
        return coefficient_set_from_source(source)
    finally:
        source.close()


def write_coefficients(output: str, coefficients: CoefficientSet, *,
                       inputs: Sequence[str] = ()) -> None:
    """Write a coefficient file atomically (``-`` for stdout).

    Raises:
        InvalidInputError: the output is one of ``inputs``, or its directory is missing.
        NumericalError: NaN or Inf coefficients (nothing is written).
    """
    write_tensors(output, {COEFFICIENTS_TENSOR: coefficients.coefficients.float().contiguous()},
                  coefficients.to_header(), inputs=inputs)


def _json_list(text: str, label: str, key: str) -> list[Any]:

    value = loads_json(text, f"{label}: tvtool.{key}")
    if not isinstance(value, list):
        raise InvalidInputError(f"{label}: tvtool.{key} must be a JSON list")
    return value
