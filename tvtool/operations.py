"""Library entry points of the file-level commands: extract, negate, apply, inspect.

Each takes one frozen config and returns a small result record; the CLI only parses flags,
calls these, and prints.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from tvtool.errors import InvalidInputError, UsageError
from tvtool.io import TensorSource, open_tensors, write_tensors
from tvtool.metadata import LINEARIZED_MODES, FileMeta, Kind, Mode, provenance
from tvtool.models import base_source, fingerprint
from tvtool.models.refs import ModelRef
from tvtool.vectors import cosine_matrix, open_vector_meta, plan_combine, plan_extract

Logger = Callable[[str], None]


def _quiet(_: str) -> None:
    return None


@contextlib.contextmanager
def _opened(sources: list[TensorSource]) -> Iterator[list[TensorSource]]:
    try:
        yield sources
    finally:
        for source in sources:
            source.close()


# ---------------------------------------------------------------- extract


@dataclass(frozen=True)
class ExtractConfig:
    """Configuration of ``tvtool extract``.

    Attributes:
        base: Model reference of the pre-trained model.
        finetuned: Fine-tuned checkpoint (safetensors path, or ``-``).
        output: Output path or ``-``.
        mode: Fine-tuning mode to record.
        dataset: Dataset name to record.
        allow_missing: Treat tensors absent from the fine-tuned checkpoint as unchanged.
        keep: ``all`` or ``changed`` (drop tensors with an all-zero delta).
    """

    base: str
    finetuned: str
    output: str
    mode: Mode = Mode.FULL
    dataset: str | None = None
    allow_missing: bool = False
    keep: str = "all"


@dataclass(frozen=True)
class WriteResult:
    """What a writing command produced."""

    output: str
    tensors: int
    parameters: int
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return asdict(self)


def _open_finetuned(path: str) -> TensorSource:
    source = open_tensors(path)
    meta = source.metadata.get("tvtool.kind")
    if meta is not None and meta != Kind.CHECKPOINT.value:
        source.close()
        raise InvalidInputError(f"{source.label} is a tvtool {meta}, not a model checkpoint",
                                hint="extract takes a fine-tuned checkpoint, not a task vector")
    return source


def extract(config: ExtractConfig, log: Logger = _quiet) -> WriteResult:
    """Write ``finetuned - base`` as a task vector (streaming, tensor by tensor).

    Raises:
        InvalidInputError: bad inputs (see :func:`tvtool.vectors.plan_extract`).
    """
    if config.mode in LINEARIZED_MODES or config.mode in (Mode.LORA,):
        raise UsageError(f"extract cannot record mode {config.mode.value}: those vectors come "
                         "from `tvtool finetune`, which stores what they need")
    base, ref = base_source(config.base)
    with _opened([base]):
        finetuned = _open_finetuned(config.finetuned)
        with _opened([finetuned]):
            plan = plan_extract(base, finetuned, allow_missing=config.allow_missing,
                                keep=config.keep)
            for note in plan.notes:
                log(note)
            meta = FileMeta(kind=Kind.TASK_VECTOR, architecture=ref.architecture,
                            base_ref=config.base, base_fingerprint=fingerprint(base),
                            mode=config.mode, linearized=False, dataset=config.dataset,
                            provenance=provenance("extract", _args(config)))
            write_tensors(config.output, plan.tensors(), meta.to_header(), layout=plan.layout,
                          inputs=[config.finetuned, *_file_inputs(ref)])
    return WriteResult(config.output, len(plan.layout), sum(i.numel for i in plan.layout),
                       plan.notes)


def _args(config: Any) -> dict[str, Any]:
    return {k: (v.value if hasattr(v, "value") else v) for k, v in asdict(config).items()}


def _file_inputs(ref: ModelRef) -> list[str]:
    return [ref.location] if ref.is_file and ref.location else []


# ---------------------------------------------------------------- negate / scale


@dataclass(frozen=True)
class NegateConfig:
    """Configuration of ``tvtool negate``: write ``-coef * vector``."""

    vector: str
    output: str
    coef: float = 1.0


def negate(config: NegateConfig, log: Logger = _quiet) -> WriteResult:
    """Write the negated (and scaled) task vector, streaming."""
    if config.coef <= 0:
        raise UsageError(f"--coef must be positive (got {config.coef}); negate flips the sign")
    source = open_tensors(config.vector)
    with _opened([source]):
        meta = open_vector_meta(source, source.label)
        plan = plan_combine(None, [(source, -config.coef)])
        history = list(json_list(meta.extra.get("operations")))
        history.append({"op": "negate", "coef": config.coef})
        out_meta = meta.with_changes(
            provenance=provenance("negate", _args(config)),
            extra={**meta.extra, "operations": _dumps(history)})
        write_tensors(config.output, plan.tensors(), out_meta.to_header(), layout=plan.layout,
                      inputs=[config.vector])
    return WriteResult(config.output, len(plan.layout), sum(i.numel for i in plan.layout))


def json_list(text: str | None) -> list[Any]:
    """Parse a JSON list stored in metadata (empty when absent)."""
    import json

    if not text:
        return []
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise InvalidInputError("malformed JSON in tvtool metadata") from None
    return value if isinstance(value, list) else []


def _dumps(value: Any) -> str:
    import json

    return json.dumps(value, sort_keys=True)


# ---------------------------------------------------------------- apply


@dataclass(frozen=True)
class ApplyConfig:
    """Configuration of ``tvtool apply``: ``base + Σ coef_i · vector_i`` as a checkpoint.

    Attributes:
        base: Model reference of the base.
        vectors: Task-vector files (``-`` for stdin allowed once).
        coefs: One coefficient per vector (or one for all).
        output: Output path or ``-``.
        allow_base_mismatch: Apply vectors whose base fingerprint differs.
        approximate_linearized: Apply linearized vectors by adding weights (an approximation
            of the linearized model they were trained as).
    """

    base: str
    vectors: tuple[str, ...]
    output: str
    coefs: tuple[float, ...] = (1.0,)
    allow_base_mismatch: bool = False
    approximate_linearized: bool = False


def check_vectors_fit_base(metas: Sequence[tuple[str, FileMeta]], base_fp: str, *,
                           allow_mismatch: bool, architecture: str) -> None:
    """Refuse vectors recorded against another base, unless explicitly allowed.

    Raises:
        InvalidInputError: architecture or fingerprint mismatch.
    """
    for label, meta in metas:
        if meta.architecture and architecture and meta.architecture != architecture:
            raise InvalidInputError(f"{label} was made for {meta.architecture}, the base is "
                                    f"{architecture}")
        if meta.base_fingerprint and meta.base_fingerprint != base_fp and not allow_mismatch:
            raise InvalidInputError(
                f"{label} was extracted from another base (fingerprint "
                f"{meta.base_fingerprint[:19]}… vs {base_fp[:19]}…)",
                hint="use the base it was made from, or --allow-base-mismatch if you are sure")


def expand_coefs(coefs: Sequence[float], count: int) -> list[float]:
    """One coefficient per vector: a single value is repeated.

    Raises:
        UsageError: when the counts do not fit.
    """
    if len(coefs) == 1:
        return list(coefs) * count
    if len(coefs) != count:
        raise UsageError(f"{len(coefs)} coefficients given for {count} vectors",
                         hint="give one --coef for all vectors or one per vector")
    return list(coefs)


def apply(config: ApplyConfig, log: Logger = _quiet) -> WriteResult:
    """Write an open_clip-loadable checkpoint of the edited model, streaming.

    Raises:
        InvalidInputError: vectors from another base, linearized vectors without
            ``approximate_linearized``, key or shape mismatches.
    """
    if not config.vectors:
        raise UsageError("apply needs at least one task vector")
    if list(config.vectors).count("-") > 1:
        raise UsageError("stdin ('-') can be given only once")
    coefs = expand_coefs(config.coefs, len(config.vectors))
    base, ref = base_source(config.base)
    sources: list[TensorSource] = [base]
    with _opened(sources):
        metas = []
        for path in config.vectors:
            source = open_tensors(path)
            sources.append(source)
            meta = open_vector_meta(source, source.label)
            if meta.mode is Mode.LORA or meta.mode is Mode.LLORA:
                source = _materialized_lora(source, meta)
                sources[-1] = source
            if meta.linearized and not config.approximate_linearized:
                raise InvalidInputError(
                    f"{source.label} is a linearized ({meta.mode.value if meta.mode else '?'}) "
                    "vector: adding it to the weights only approximates the model it was "
                    "trained as", hint="evaluate it with `tvtool eval`, or pass "
                    "--approximate-linearized to write the weight-space approximation")
            metas.append((source.label, meta))
        base_fp = fingerprint(base)
        check_vectors_fit_base(metas, base_fp, allow_mismatch=config.allow_base_mismatch,
                               architecture=ref.architecture)
        plan = plan_combine(base, list(zip(sources[1:], coefs, strict=True)))
        meta = FileMeta(kind=Kind.CHECKPOINT, architecture=ref.architecture,
                        base_ref=config.base, base_fingerprint=base_fp,
                        provenance=provenance("apply", _args(config)),
                        extra={"sources": _dumps([m.dataset or label for label, m in metas]),
                               "coefficients": _dumps(coefs)})
        write_tensors(config.output, plan.tensors(), meta.to_header(), layout=plan.layout,
                      inputs=[*config.vectors, *_file_inputs(ref)])
    return WriteResult(config.output, len(plan.layout), sum(i.numel for i in plan.layout),
                       details={"coefficients": coefs, "base_fingerprint": base_fp})


def _materialized_lora(source: TensorSource, meta: FileMeta) -> TensorSource:
    """Dense deltas of a LoRA vector (factors are multiplied out once, in memory)."""
    from tvtool.finetune.lora_vectors import materialize_lora_source

    return materialize_lora_source(source, meta)


# ---------------------------------------------------------------- inspect


@dataclass(frozen=True)
class InspectConfig:
    """Configuration of ``tvtool inspect``.

    Attributes:
        files: tvtool files (vectors, checkpoints, coefficient files).
        top: How many tensors (largest norm first) to list per file.
        cosine: Whether to compute the cosine-similarity matrix of the task vectors.
    """

    files: tuple[str, ...]
    top: int = 10
    cosine: bool = True


def inspect(config: InspectConfig) -> dict[str, Any]:
    """Metadata, norms and (for several vectors) the cosine-similarity matrix.

    Returns:
        A JSON-ready report: ``files`` (one entry per input) and ``cosine`` (or None).
    """
    if list(config.files).count("-") > 1:
        raise UsageError("stdin ('-') can be given only once")
    sources = [open_tensors(path) for path in config.files]
    with _opened(sources):
        files = []
        vectors: list[TensorSource] = []
        for source in sources:
            meta = FileMeta.from_header(source.metadata, source.label)
            entry: dict[str, Any] = {
                "file": source.label.strip("'"),
                "metadata": {k: v for k, v in source.metadata.items()
                             if k != "tvtool.provenance"},
                "provenance": meta.provenance,
                "tensors": len(source.keys()),
                "parameters": sum(source.info(n).numel for n in source.keys()),
            }
            if meta.kind is Kind.TASK_VECTOR:
                from tvtool.vectors import vector_norms

                norms = vector_norms(source)
                total = sum(v * v for v in norms.values()) ** 0.5
                entry["norm"] = total
                entry["largest"] = [
                    {"tensor": n, "norm": v}
                    for n, v in sorted(norms.items(), key=lambda kv: -kv[1])[: config.top]]
                vectors.append(source)
            files.append(entry)
        cosine = cosine_matrix(vectors) if config.cosine and len(vectors) > 1 else None
    return {"files": files, "cosine": cosine}
