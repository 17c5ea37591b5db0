"""Library entry points of the file-level commands: extract, negate, apply, inspect, convert.

Each takes one frozen config and returns a small result record; the CLI only parses flags,
calls these, and prints. Every command checks its output path before reading anything, and
streams tensor by tensor through :mod:`tvtool.vectors` plans.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from tvtool.cards import CardVector, model_card
from tvtool.errors import InvalidInputError, UsageError
from tvtool.formats import dense_source
from tvtool.formats.lora import SUFFIX_A
from tvtool.io import (
    STDIO,
    TensorSource,
    all_finite,
    check_new_directory,
    check_output,
    hf_model_files,
    is_peft_adapter,
    open_tensors,
    read_checkpoint,
    read_pickled_dict,
    write_open_clip_dir,
    write_tensors,
)
from tvtool.limits import loads_json
from tvtool.metadata import PREFIX, FileMeta, Kind, Mode, provenance
from tvtool.models import (
    architecture_shapes,
    base_source,
    fingerprint,
    hf_activation,
    hf_clip_to_open_clip,
    is_hf_clip,
    match_architecture,
    resolve_ref,
    uses_quick_gelu,
)
from tvtool.models.hub import open_clip_hf_config
from tvtool.models.refs import ModelRef
from tvtool.types import Logger
from tvtool.types import quiet as _quiet
from tvtool.vectors import (
    StreamPlan,
    check_coefficients,
    check_finite,
    check_vectors_fit_base,
    cosine_matrix,
    expand_coefs,
    open_vector_meta,
    plan_combine,
    plan_extract,
    vector_norms,
)


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
    kind = source.metadata.get(PREFIX + "kind")
    if kind is not None and kind != Kind.CHECKPOINT.value:
        source.close()
        raise InvalidInputError(f"{source.label} is a tvtool {kind}, not a model checkpoint",
                                hint="extract takes a fine-tuned checkpoint, not a task vector")
    return source


def extract(config: ExtractConfig, log: Logger = _quiet) -> WriteResult:
    """Write ``finetuned - base`` as a task vector (streaming, tensor by tensor).

    Raises:
        UsageError: a mode that extract cannot record.
        InvalidInputError: bad inputs (see :func:`tvtool.vectors.plan_extract`), or an output
            that is an input.
    """
    if config.mode not in (Mode.FULL, Mode.ATTN):
        raise UsageError(f"extract cannot record mode {config.mode.value}: those vectors come "
                         "from `tvtool finetune`, which stores what they need")
    ref = resolve_ref(config.base)
    check_output(config.output, [config.finetuned, *_file_inputs(ref)])
    finetuned = _open_finetuned(config.finetuned)
    with _opened([finetuned]):
        base, ref = base_source(ref)
        with _opened([base]):
            plan = plan_extract(base, finetuned, allow_missing=config.allow_missing,
                                keep=config.keep)
            for note in plan.notes:
                log(note)
            from tvtool.data import recorded_dataset_name

            dataset = (recorded_dataset_name(config.dataset) if config.dataset is not None
                       else None)
            meta = FileMeta(kind=Kind.TASK_VECTOR, architecture=ref.architecture,
                            base_ref=config.base, base_fingerprint=fingerprint(base),
                            mode=config.mode, linearized=False, dataset=dataset,
                            provenance=provenance("extract", _args(config)))
            write_tensors(config.output, plan.tensors(), meta.to_header(), layout=plan.layout,
                          inputs=[config.finetuned, *_file_inputs(ref)], check_finite=False)
    return WriteResult(config.output, len(plan.layout), plan.parameters, plan.notes)


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
    """Write the negated (and scaled) task vector, streaming.

    LoRA vectors keep their factors with only B scaled by ``-coef``, so the change they
    apply is ``-coef·ΔW``.

    Raises:
        UsageError: a coefficient that is not a positive finite number.
        InvalidInputError: the input is not a task vector, or the output is the input.
    """
    check_coefficients([config.coef])
    if config.coef <= 0:
        raise UsageError(f"--coef must be positive (got {config.coef}); negate flips the sign")
    check_output(config.output, [config.vector])
    source = open_tensors(config.vector)
    with _opened([source]):
        meta = open_vector_meta(source, source.label)
        plan = plan_combine(None, [(source, -config.coef)])
        if meta.mode is not None and meta.mode.factored:
            _keep_lora_a(plan, source)
        history = list(json_list(meta.extra.get("operations")))
        history.append({"op": "negate", "coef": config.coef})
        out_meta = meta.with_changes(
            provenance=provenance("negate", _args(config)),
            extra={**meta.extra, "operations": _dumps(history)})
        write_tensors(config.output, plan.tensors(), out_meta.to_header(), layout=plan.layout,
                      inputs=[config.vector], check_finite=False)
    return WriteResult(config.output, len(plan.layout), plan.parameters)


def _keep_lora_a(plan: StreamPlan, source: TensorSource) -> None:
    """Scale only the B factors of a LoRA vector: (−c·B)·A = −c·ΔW.

    Scaling both factors would give (−c·B)·(−c·A) = +c²·ΔW (a negation that adds the task).
    """
    def unchanged(name: str) -> Any:
        tensor = source.get(name)
        check_finite(tensor, name, source.label)
        return tensor

    for info in plan.layout:
        if info.name.endswith(SUFFIX_A):
            plan.producers[info.name] = functools.partial(unchanged, info.name)


def json_list(text: str | None) -> list[Any]:
    """Parse a JSON list stored in metadata (empty when absent).

    Raises:
        InvalidInputError: the text is not valid JSON, or is nested too deeply.
    """
    if not text:
        return []
    value = loads_json(text, "tvtool metadata (tvtool.operations)")
    return value if isinstance(value, list) else []


def _dumps(value: Any) -> str:
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
        hf_dir: Write an open_clip Hugging Face directory (weights, config, model card) there
            instead of a single checkpoint file (``output`` is then ignored and may be empty).
    """

    base: str
    vectors: tuple[str, ...]
    output: str
    coefs: tuple[float, ...] = (1.0,)
    allow_base_mismatch: bool = False
    approximate_linearized: bool = False
    hf_dir: str | None = None


def apply(config: ApplyConfig, log: Logger = _quiet) -> WriteResult:
    """Write an open_clip-loadable checkpoint of the edited model, streaming.

    Raises:
        UsageError: no vectors, stdin twice, coefficient count or value wrong.
        InvalidInputError: vectors from another base, linearized vectors without
            ``approximate_linearized``, key, shape or dtype mismatches, an output that is an
            input.
    """
    if not config.vectors:
        raise UsageError("apply needs at least one task vector")
    if list(config.vectors).count(STDIO) > 1:
        raise UsageError("stdin ('-') can be given only once")
    check_coefficients(config.coefs)
    coefs = expand_coefs(config.coefs, len(config.vectors))
    ref = resolve_ref(config.base)
    if config.hf_dir is not None:
        check_new_directory(config.hf_dir)
        hf_config = open_clip_hf_config(ref)
    else:
        check_output(config.output, [*config.vectors, *_file_inputs(ref)])
    sources: list[TensorSource] = []
    card_vectors: list[CardVector] = []
    with _opened(sources):
        metas = []
        for path, coef in zip(config.vectors, coefs, strict=True):
            source = open_tensors(path)
            sources.append(source)
            meta = open_vector_meta(source, source.label)
            if config.hf_dir is not None:
                card_vectors.append(_card_vector(path, coef, source, meta))
            if meta.linearized and not config.approximate_linearized:
                raise InvalidInputError(
                    f"{source.label} is a linearized ({meta.mode.value if meta.mode else '?'}) "
                    "vector: adding it to the weights only approximates the model it was "
                    "trained as", hint="evaluate it with `tvtool eval`, or pass "
                    "--approximate-linearized to write the weight-space approximation")
            if meta.linearized:
                log(f"warning: {source.label} is linearized; the checkpoint approximates its "
                    "linearized model by adding the vector to the weights")
            source = sources[-1] = dense_source(source, meta)
            metas.append((source.label, meta))
        base, ref = base_source(ref)
        sources.insert(0, base)
        base_fp = fingerprint(base)
        for warning in check_vectors_fit_base(metas, base_fp,
                                              allow_mismatch=config.allow_base_mismatch,
                                              architecture=ref.architecture):
            log(warning)
        mismatched = [label for label, m in metas
                      if m.base_fingerprint and m.base_fingerprint != base_fp]
        if mismatched:
            log(f"warning: {len(mismatched)} vectors were extracted from another base "
                f"({', '.join(mismatched[:3])}); applying them anyway (--allow-base-mismatch)")
        plan = plan_combine(base, list(zip(sources[1:], coefs, strict=True)))
        meta = FileMeta(kind=Kind.CHECKPOINT, architecture=ref.architecture,
                        base_ref=config.base, base_fingerprint=base_fp,
                        provenance=provenance("apply", _args(config)),
                        extra={"sources": _dumps([m.dataset or label for label, m in metas]),
                               "coefficients": _dumps(coefs)})
        inputs = [*config.vectors, *_file_inputs(ref)]
        if config.hf_dir is not None:
            from tvtool import __version__

            missing = sorted(set(architecture_shapes(ref.architecture))
                             - {info.name for info in plan.layout})
            if missing:
                raise InvalidInputError(
                    f"the base lacks {len(missing)} tensors of {ref.architecture} (e.g. "
                    f"{missing[:2]}); an open_clip directory needs the complete model",
                    hint="use a complete base (a converted image encoder lacks its text tower)")
            card = model_card(architecture=ref.architecture, base_ref=config.base,
                              base_fingerprint=base_fp, vectors=card_vectors,
                              tvtool_version=__version__)
            files = write_open_clip_dir(config.hf_dir, plan.tensors(), plan.layout,
                                        meta.to_header(), hf_config, card, inputs=inputs)
            return WriteResult(config.hf_dir, len(plan.layout), plan.parameters,
                               details={"coefficients": coefs, "base_fingerprint": base_fp,
                                        "files": files})
        write_tensors(config.output, plan.tensors(), meta.to_header(), layout=plan.layout,
                      inputs=inputs, check_finite=False)
    return WriteResult(config.output, len(plan.layout), plan.parameters,
                       details={"coefficients": coefs, "base_fingerprint": base_fp})


def _card_vector(path: str, coef: float, source: TensorSource, meta: FileMeta) -> CardVector:
    """What the model card records about one applied vector."""
    merge: dict[str, Any] = {}
    if "merge_method" in meta.extra:
        merge = {"method": meta.extra["merge_method"],
                 "params": _loads(meta.extra.get("merge_params")),
                 "sources": _loads(meta.extra.get("sources")),
                 "coefficients": _loads(meta.extra.get("coefficients"))}
    return CardVector(file=path.rsplit("/", 1)[-1] if path != STDIO else "stdin",
                      coefficient=coef, dataset=meta.dataset,
                      mode=meta.mode.value if meta.mode else None, linearized=meta.linearized,
                      fingerprint=fingerprint(source), merge=merge)


def _loads(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


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
        A JSON-ready report: ``files`` (one entry per input, in order; task vectors carry
        ``norm``, ``norms`` of every tensor and the ``largest`` ``top`` of them) and ``cosine``
        (the matrix over the task vectors, in the order they appear, or None).

    Raises:
        UsageError: stdin given twice, or a negative ``top``.
        InvalidInputError: a file that is not valid safetensors, or malformed tvtool metadata.
    """
    if not config.files:
        raise UsageError("inspect needs at least one file")
    if list(config.files).count(STDIO) > 1:
        raise UsageError("stdin ('-') can be given only once")
    if config.top < 0:
        raise UsageError(f"--top must be >= 0 (got {config.top})")
    sources: list[TensorSource] = []
    with _opened(sources):
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
                "metadata": {k: v for k, v in source.metadata.items()
                             if k != PREFIX + "provenance"},
                "provenance": meta.provenance if meta else None,
                "tensors": len(names),
                "parameters": sum(source.info(n).numel for n in names),
                "dtypes": sorted({str(source.info(n).dtype).removeprefix("torch.")
                                  for n in names}),
            }
            if meta is not None and meta.kind is Kind.TASK_VECTOR:
                if meta.mode is not None and meta.mode.factored:
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


# ---------------------------------------------------------------- convert


@dataclass(frozen=True)
class ConvertConfig:
    """Configuration of ``tvtool convert``: a legacy checkpoint -> tvtool checkpoint.

    Attributes:
        input: Pickled ``.pt``/``.pth``/``.bin`` file (or safetensors without tvtool
            metadata), or ``-``.
        output: Output path or ``-``.
        architecture: open_clip model name; inferred from the tensor shapes when None.
        base: For a tangent_task_arithmetic linearized checkpoint: the model reference it was
            linearized at; the output is then a ``linear`` task vector.
        dataset: Dataset name to record in that task vector.
        module: For a peft adapter directory: the module it was trained on, ``clip`` (the
            open_clip model), ``visual`` (its image tower) or ``auto``.
    """

    input: str
    output: str
    architecture: str | None = None
    base: str | None = None
    dataset: str | None = None
    module: str = "auto"


def _activation(classes: frozenset[str]) -> bool | None:
    """Whether a pickled model used QuickGELU (None: the file does not say)."""
    if any(name.rsplit(".", 1)[-1] == "QuickGELU" for name in classes):
        return True
    if "torch.nn.modules.activation.GELU" in classes:
        return False
    return None


def convert(config: ConvertConfig, log: Logger = _quiet) -> WriteResult:
    """Convert a pickled (or plain safetensors) checkpoint into a tvtool checkpoint.

    A peft adapter directory (``adapter_config.json``) becomes a LoRA task vector instead
    (:func:`tvtool.peft_interop.convert_peft`).

    Pickles are read by :func:`tvtool.io.read_checkpoint`, which never executes code
    from the file. Wrapper prefixes (``module.``, ``model.``) are removed, Hugging Face
    ``transformers`` CLIP names are mapped to open_clip's (see :mod:`tvtool.models.hf_clip`),
    and the open_clip architecture is checked (``architecture``) or inferred from the tensor
    shapes.

    Raises:
        InvalidInputError: unreadable input, no or several fitting architectures, tensors
            that do not fit the given architecture, or an output that is the input.
    """
    if is_peft_adapter(config.input):
        raise UsageError(f"{config.input} is a peft adapter directory",
                         hint="convert it with tvtool.peft_interop.convert_peft (the CLI's "
                              "`tvtool convert` does)")
    if config.module != "auto":
        raise UsageError("--module is for peft adapter directories (adapter_config.json)")
    if config.base is not None:
        return _convert_linearized(config, log)
    if config.dataset is not None:
        raise UsageError("--dataset is recorded in task vectors; convert writes a checkpoint "
                         "unless --base names the base of a linearized checkpoint")
    files = hf_model_files(config.input)
    check_output(config.output, [files.weights])
    try:
        checkpoint = read_checkpoint(files.weights)
    except InvalidInputError as exc:
        if "'model.params" in exc.message:
            exc.hint = ("this looks like a tangent_task_arithmetic linearized checkpoint: pass "
                        "--base (the pre-trained model it was linearized at) to convert it "
                        "into a linear task vector")
        raise
    for note in checkpoint.notes:
        log(note)
    notes = list(checkpoint.notes)
    tensors = checkpoint.tensors
    container = checkpoint.container
    quick_gelu = _activation(checkpoint.classes)
    hf_config = None
    optional: frozenset[str] = frozenset()
    if is_hf_clip(tensors):
        mapped = hf_clip_to_open_clip(tensors)
        tensors = mapped.tensors
        container = f"Hugging Face {mapped.model_class} ({container})"
        hf_config = files.read_config()
        quick_gelu = hf_activation(hf_config) if hf_config is not None else None
        notes.append(f"mapped {len(checkpoint.tensors)} Hugging Face {mapped.model_class} "
                     f"tensors to {len(tensors)} open_clip tensors")
        notes.extend(mapped.notes)
        if mapped.model_class == "CLIPVisionModel":
            optional = frozenset({"visual.proj"})
        if hf_config is not None:
            notes.append(f"activation from {files.config_path}: "
                         f"{'quick_gelu' if quick_gelu else 'gelu'}"
                         if quick_gelu is not None else
                         f"{files.config_path} names no activation")
    try:
        match = match_architecture({n: tuple(t.shape) for n, t in tensors.items()},
                                   architecture=config.architecture, quick_gelu=quick_gelu,
                                   optional=optional)
    except InvalidInputError as exc:
        if hf_config is None and container.startswith("Hugging Face") \
                and config.architecture is None:
            exc.hint = ("pass --architecture NAME, or keep the Hugging Face config.json beside "
                        "the weights: it names the activation (quick_gelu -> NAME-quickgelu)")
        raise
    if container.startswith("Hugging Face") and quick_gelu is not None \
            and uses_quick_gelu(match.architecture) != quick_gelu:
        # The weights would load, but the MLPs would compute another function.
        want = "QuickGELU" if quick_gelu else "GELU"
        raise InvalidInputError(
            f"the Hugging Face config says the model uses {want}, but {match.architecture} "
            f"does not", hint="pass --architecture with the "
            f"{'-quickgelu variant' if quick_gelu else 'variant without -quickgelu'}")
    how = "inferred from the tensor shapes" if match.inferred else "as given"
    if match.inferred and quick_gelu is not None:
        how += f" and the {'config' if hf_config is not None else 'pickled'} activation " \
               f"({'QuickGELU' if quick_gelu else 'GELU'})"
    notes.append(f"architecture {match.architecture} ({how})")
    if match.missing:
        notes.append(f"the checkpoint lacks {len(match.missing)} tensors of "
                     f"{match.architecture} (e.g. {list(match.missing[:2])}); extract a task "
                     "vector from it with `tvtool extract --allow-missing`")
    for note in notes[len(checkpoint.notes):]:
        log(note)
    bad = [n for n, t in tensors.items() if not all_finite(t)]
    if bad:
        raise InvalidInputError(f"{len(bad)} tensors of the checkpoint contain NaN or Inf, "
                                f"e.g. {bad[:3]}")
    meta = FileMeta(kind=Kind.CHECKPOINT, architecture=match.architecture,
                    provenance=provenance("convert", _args(config)),
                    extra={"converted_from": container})
    write_tensors(config.output, tensors, meta.to_header(), inputs=[files.weights])
    return WriteResult(config.output, len(tensors),
                       sum(t.numel() for t in tensors.values()), notes,
                       details={"architecture": match.architecture,
                                "missing": len(match.missing)})


def _convert_linearized(config: ConvertConfig, log: Logger) -> WriteResult:
    """A tangent_task_arithmetic ``LinearizedImageEncoder`` save -> ``linear`` task vector."""
    from tvtool.models.tangent import (
        is_tangent_linearized,
        name_tangent_checkpoint,
        tangent_task_vector,
    )

    if config.architecture is not None:
        raise UsageError("--architecture is not used with --base: the base names it")
    if config.input == STDIO:
        raise UsageError("a linearized checkpoint is read from a file, not stdin")
    ref = resolve_ref(config.base or "")
    check_output(config.output, [config.input, *_file_inputs(ref)])
    entries = read_pickled_dict(config.input)
    label = repr(config.input)
    if not is_tangent_linearized(entries):
        raise InvalidInputError(
            f"{label} is not a tangent_task_arithmetic linearized checkpoint (no "
            "model.params.N / model.params0.N entries)",
            hint="--base is only for linearized checkpoints; convert others without it")
    base, ref = base_source(ref)
    with _opened([base]):
        named = name_tangent_checkpoint(entries, ref.architecture, label)
        available = set(base.keys())
        vector, notes = tangent_task_vector(
            named, {n: base.get(n) for n in named.params0 if n in available}, label)
        notes.insert(0, f"read {len(named.params)} linearized parameters of "
                        f"{named.model_name!r} (params and params0)")
        for note in notes:
            log(note)
        meta = FileMeta(kind=Kind.TASK_VECTOR, architecture=ref.architecture,
                        base_ref=config.base, base_fingerprint=fingerprint(base),
                        mode=Mode.LINEAR, linearized=True, dataset=config.dataset,
                        provenance=provenance("convert", _args(config)),
                        extra={"converted_from": "tangent_task_arithmetic LinearizedImageEncoder "
                                                 f"({named.model_name})"})
        write_tensors(config.output, vector, meta.to_header(),
                      inputs=[config.input, *_file_inputs(ref)])
    return WriteResult(config.output, len(vector), sum(t.numel() for t in vector.values()),
                       notes, details={"architecture": ref.architecture, "mode": "linear"})
