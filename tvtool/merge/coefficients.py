"""Merge coefficients: one per vector, or one per vector per tensor (aTLAS).

Sources:

* ``--coef`` values: one for all vectors or one per vector;
* a JSON file: a list (one per vector) or a dict keyed by each vector's dataset, path as
  given, file name or file stem;
* a tvtool coefficients file (``tvtool.kind=coefficients``, written by ``learn-coeffs`` and
  read with :func:`tvtool.atlas.read_coefficients`; layout in docs/format.md, "Coefficient
  files"): a float tensor ``coefficients`` of shape ``[num_vectors, num_blocks]`` with
  ``tvtool.granularity``, ``tvtool.block_names``, ``tvtool.tensors`` and ``tvtool.sources``.
  Merge reads the whole-tensor granularities ``task``, ``tensor`` and ``layer``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tvtool.errors import InvalidInputError, TvtoolError, UsageError
from tvtool.io import read_json
from tvtool.limits import short_list, short_repr
from tvtool.vectors import check_coefficients, expand_coefs

WHOLE_TENSOR_GRANULARITIES = ("task", "tensor", "layer")
_FLOAT32_MAX = 3.4028234663852886e38


@dataclass(frozen=True)
class VectorId:
    """How a coefficient source may name one input vector."""

    path: str
    dataset: str | None = None

    def names(self) -> list[str]:
        """Every name a JSON dict key may use for this vector."""
        names = [self.path]
        if self.dataset:
            names.append(self.dataset)
        if self.path != "-":
            names += [Path(self.path).name, Path(self.path).stem]
        return names

    def named_by(self, key: str) -> bool:
        """Whether a JSON dict key names this vector (datasets compared as identities)."""
        if key in self.names():
            return True
        # tvtool.data (PIL, numpy, torch.utils.data) only where a key needs it: a file-level
        # merge starts as fast as a bare `import torch`.
        from tvtool.data import dataset_identity

        return bool(self.dataset) and dataset_identity(key) == dataset_identity(
            self.dataset or "")

    def label(self) -> str:
        """Short name for messages and metadata."""
        return self.dataset or self.path


@dataclass(frozen=True)
class Coefficients:
    """Resolved coefficients of a merge of N vectors.

    Attributes:
        per_vector: One coefficient per vector (with ``per_tensor``: each vector's mean
            coefficient, for summaries only).
        per_tensor: Tensor name -> one coefficient per vector, or None when every tensor of
            a vector has the same coefficient.
        origin: Where they came from (``--coef``, a file path), for metadata.
        source_granularity: Granularity recorded in a coefficients file (``task``,
            ``tensor``, ``layer``), if they came from one.

    """

    per_vector: tuple[float, ...]
    per_tensor: Mapping[str, tuple[float, ...]] | None = None
    origin: str = "--coef"
    source_granularity: str | None = None

    @property
    def granularity(self) -> str:
        """``task`` or ``tensor``."""
        return "tensor" if self.per_tensor is not None else "task"

    def for_tensor(self, name: str) -> list[float]:
        """Return the N coefficients that weight tensor ``name``."""
        if self.per_tensor is None:
            return list(self.per_vector)
        return list(self.per_tensor[name])

    def describe(self) -> dict[str, Any]:
        """JSON-ready record stored in the merged vector's metadata."""
        doc: dict[str, Any] = {"granularity": self.granularity, "origin": self.origin}
        if self.source_granularity is not None:
            doc["file_granularity"] = self.source_granularity
        if self.per_tensor is None:
            doc["values"] = list(self.per_vector)
        else:
            doc["values"] = {name: list(v) for name, v in self.per_tensor.items()}
        return doc

    def check_covers(self, names: Sequence[str]) -> None:
        """Refuse per-tensor coefficients that miss a merged tensor.

        Raises:
            InvalidInputError: naming the first tensors without a coefficient.

        """
        if self.per_tensor is None:
            return
        lacking = [n for n in names if n not in self.per_tensor]
        if lacking:
            raise InvalidInputError(
                f"{self.origin} has no coefficient for {len(lacking)} merged tensors, e.g. "
                f"{short_list(lacking, 3)}", hint="was it learned for these vectors?")


def _finite(values: Sequence[Any], where: str, error: type[TvtoolError] = InvalidInputError
            ) -> tuple[float, ...]:
    """:func:`tvtool.vectors.check_coefficients`, plus the float32 range the merge computes in."""
    numbers = check_coefficients(values, where, error)
    for value, number in zip(values, numbers, strict=True):
        if abs(number) > _FLOAT32_MAX:
            raise error(f"{where}: coefficient {short_repr(value)} is outside the "
                        "float32 range the merge computes in")
    return numbers


def from_values(values: Sequence[float], count: int) -> Coefficients:
    """Coefficients from ``--coef``: one for all vectors, or one per vector.

    Raises:
        UsageError: when the number of values fits neither.

    """
    return Coefficients(tuple(expand_coefs(_finite(values, "--coef", UsageError), count)))


def from_json(document: Any, vectors: Sequence[VectorId], origin: str) -> Coefficients:
    """Coefficients from a JSON list (one per vector, or one) or dict (keyed by vector).

    Raises:
        InvalidInputError: wrong count, unknown or missing keys, non-numbers.

    """
    count = len(vectors)
    if isinstance(document, list):
        values = _finite(document, origin)
        if len(values) not in (1, count):
            raise InvalidInputError(f"{origin} holds {len(values)} coefficients for {count} "
                                    "vectors", hint="one per vector, in the order given")
        return Coefficients(values * count if len(values) == 1 else values, origin=origin)
    if isinstance(document, dict):
        per: list[float | None] = [None] * count
        for key, value in document.items():
            hits = [i for i, v in enumerate(vectors) if v.named_by(str(key))]
            if not hits:
                raise InvalidInputError(
                    f"{origin}: key {short_repr(key, 60)} names none of the vectors",
                    hint="use each vector's dataset, path, file name or stem: "
                         + ", ".join(v.label() for v in vectors))
            for index in hits:
                if per[index] is not None:
                    raise InvalidInputError(f"{origin}: vector {vectors[index].label()!r} "
                                            "has more than one coefficient")
                per[index] = _finite([value], origin)[0]
        lacking = [vectors[i].label() for i, v in enumerate(per) if v is None]
        if lacking:
            raise InvalidInputError(f"{origin} has no coefficient for {lacking}")
        return Coefficients(tuple(float(v) for v in per if v is not None), origin=origin)
    raise InvalidInputError(f"{origin} must hold a JSON list or object of coefficients")


def from_coefficients_file(path: str, vectors: Sequence[VectorId],
                           shapes: Sequence[Mapping[str, tuple[int, ...]]], metas: Sequence[Any],
                           *, allow_base_mismatch: bool = False) -> Coefficients:
    """Coefficients from a tvtool coefficients file (``tvtool.atlas.read_coefficients``).

    Granularities ``task``, ``tensor`` and ``layer`` give one coefficient per vector per
    tensor; tensors the file does not cover get 0 (the file format's rule). ``random:K``
    scales parts of tensors differently, which the merge methods cannot express.

    Args:
        path: The file.
        vectors: The input vectors, in row order.
        shapes: Tensor name -> shape of each vector.
        metas: Each vector's :class:`~tvtool.metadata.FileMeta`.
        allow_base_mismatch: Accept rows recorded against another base.

    Raises:
        InvalidInputError: another kind of file, a bad layout, ``random:K``, rows that do not
            match the vectors (count, dataset order, base, shapes).

    """
    from tvtool.atlas import read_coefficients

    coefficient_set = read_coefficients(path)
    label = repr(path)
    granularity = str(coefficient_set.partition.granularity)
    if coefficient_set.partition.granularity.kind not in WHOLE_TENSOR_GRANULARITIES:
        raise InvalidInputError(
            f"{label} has granularity {granularity}: it scales parts of tensors, which merge "
            "methods cannot express", hint="evaluate it with `tvtool eval --coefs`, or learn "
                                           "task, layer or tensor coefficients for merging")
    coefficient_set.check_vectors(
        [(v.path, m, dict(s)) for v, m, s in zip(vectors, metas, shapes, strict=True)],
        allow_base_mismatch=allow_base_mismatch)
    for row, (record, vector) in enumerate(zip(coefficient_set.sources, vectors, strict=True)):
        recorded = record.get("dataset")
        if recorded and vector.dataset and recorded != vector.dataset:
            raise InvalidInputError(
                f"{label} row {row} was learned for {recorded!r}, but vector {row} is "
                f"{vector.dataset!r}", hint="give the vectors in the order learn-coeffs had them")
    per_tensor: dict[str, tuple[float, ...]] = {}
    names = {n for s in shapes for n in s}
    zeros = tuple(0.0 for _ in vectors)
    for name in names:
        column = coefficient_set.tensor_coefficients(name)
        per_tensor[name] = zeros if column is None else tuple(
            float(v) for v in column.reshape(len(vectors)).tolist())
    matrix = coefficient_set.coefficients.double()
    means = tuple(float(v) for v in matrix.mean(dim=1).tolist())
    if (coefficient_set.partition.granularity.kind == "task"
            and all(name in coefficient_set.partition for name in names)):
        return Coefficients(tuple(float(v) for v in matrix[:, 0].tolist()), origin=path,
                            source_granularity=granularity)
    return Coefficients(means, per_tensor=per_tensor, origin=path,
                        source_granularity=granularity)


def load_coefficients(path: str, vectors: Sequence[VectorId],
                      shapes: Sequence[Mapping[str, tuple[int, ...]]], metas: Sequence[Any], *,
                      allow_base_mismatch: bool = False) -> Coefficients:
    """Read ``--coefs FILE``: a ``.json`` / ``.yaml`` document or a coefficients file.

    Args:
        path: The file; ``.json``, ``.yaml`` and ``.yml`` are documents, anything else is
            read as a safetensors coefficients file.
        vectors: The input vectors, in order.
        shapes: Tensor name -> shape of each vector.
        metas: Each vector's metadata.
        allow_base_mismatch: Accept a coefficients file learned on another base.

    Raises:
        InvalidInputError: see :func:`from_json` and :func:`from_coefficients_file`.

    """
    if path.lower().endswith((".json", ".yaml", ".yml")):
        if path.lower().endswith(".json"):
            document = read_json(path)
        else:
            from tvtool.io.yaml_io import read_yaml

            document = read_yaml(path)
        return from_json(document, vectors, repr(path))
    return from_coefficients_file(path, vectors, shapes, metas,
                                  allow_base_mismatch=allow_base_mismatch)
