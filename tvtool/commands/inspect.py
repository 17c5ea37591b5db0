"""``tvtool inspect``: metadata, norms and cosine similarities of safetensors files."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tvtool.commands.common import check_stdin_once, opened
from tvtool.errors import UsageError
from tvtool.formats import dense_source
from tvtool.io import TensorSource, open_tensors
from tvtool.metadata import PREFIX, FileMeta, Kind, lineage
from tvtool.vectors import cosine_matrix, open_vector_meta, vector_norms


@dataclass(frozen=True)
class InspectConfig:
    """Configuration of ``tvtool inspect``.

    Attributes:
        files: safetensors files (tvtool vectors, checkpoints, coefficients, or plain ones).
        top: How many tensors (largest norm first) to list per task vector.
        cosine: Whether to compute the cosine-similarity matrix of the task vectors.
    """

    files: tuple[str, ...]
    top: int = 10
    cosine: bool = True


def inspect(config: InspectConfig) -> dict[str, Any]:
    """Metadata, norms and (for several vectors) the cosine-similarity matrix.

    Files without tvtool metadata are described too (kind ``null``, no norms). Norms and
    cosines of LoRA vectors are those of their dense deltas (alpha/r)·B·A.

    Returns:
        A JSON-ready report: ``files`` (one entry per input, in order; ``chain`` is how the
        file was made, :func:`tvtool.metadata.lineage`; task vectors carry ``norm``,
        ``norms`` of every tensor and the ``largest`` ``top`` of them) and ``cosine`` (the
        matrix over the task vectors, in the order they appear, or None).

    Raises:
        UsageError: stdin given twice, or a negative ``top``.
        InvalidInputError: a file that is not valid safetensors, or malformed tvtool metadata.
    """
    if not config.files:
        raise UsageError("inspect needs at least one file")
    check_stdin_once(config.files)
    if config.top < 0:
        raise UsageError(f"--top must be >= 0 (got {config.top})")
    sources: list[TensorSource] = []
    with opened(sources):
        for path in config.files:
            sources.append(open_tensors(path))
        files = []
        vectors: list[TensorSource] = []
        for path, source in zip(config.files, sources, strict=True):
            names = source.keys()
            meta = (FileMeta.from_header(source.metadata, source.label)
                    if PREFIX + "kind" in source.metadata else None)
            entry: dict[str, Any] = {
                "file": path,
                "kind": meta.kind.value if meta else None,
                # Sorted: safetensors hands the header over in hash-map order, which changes
                # from run to run; --json must be byte-stable.
                "metadata": {k: v for k, v in sorted(source.metadata.items())
                             if k != PREFIX + "provenance"},
                "provenance": meta.provenance if meta else None,
                # base -> vectors -> merge -> applied model, from the recorded lineage.
                "chain": lineage(meta) if meta else None,
                "tensors": len(names),
                "parameters": sum(source.info(n).numel for n in names),
                "dtypes": sorted({str(source.info(n).dtype).removeprefix("torch.")
                                  for n in names}),
            }
            if meta is not None and meta.kind is Kind.TASK_VECTOR:
                if meta.factored:
                    # Norms and cosines of factors say nothing about ΔW (runs with one seed
                    # share A0, so their factor cosine is high whatever B learned).
                    source = dense_source(source, open_vector_meta(source, source.label))
                norms = vector_norms(source)
                entry["norm"] = math.sqrt(sum(v * v for v in norms.values()))
                entry["largest"] = [
                    {"tensor": n, "norm": v}
                    for n, v in sorted(norms.items(), key=lambda kv: -kv[1])[: config.top]]
                entry["norms"] = norms
                vectors.append(source)
            files.append(entry)
        cosine = cosine_matrix(vectors) if config.cosine and len(vectors) > 1 else None
    return {"files": files, "cosine": cosine}
