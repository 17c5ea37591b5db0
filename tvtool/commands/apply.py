"""``tvtool apply``: ``base + Σ coef_i · vector_i`` as a checkpoint or an open_clip directory."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tvtool.cards import CardVector, check_license, model_card, public_file
from tvtool.commands.common import (
    check_stdin_once,
    config_args,
    dumps_sorted,
    file_inputs,
    opened,
)
from tvtool.errors import InvalidInputError, UsageError
from tvtool.io import (
    STDIO,
    TensorSource,
    check_new_directory,
    check_output,
    write_open_clip_dir,
    write_tensors,
)
from tvtool.limits import short_list, short_repr
from tvtool.metadata import FileMeta, Kind, input_record, provenance
from tvtool.models import base_source, fingerprint, resolve_ref
from tvtool.types import Logger, WriteResult
from tvtool.types import quiet as _quiet
from tvtool.vectors import (
    batchnorm_warning,
    check_coefficients,
    check_vectors_fit_base,
    expand_coefs,
    moved_batchnorm,
    open_vector,
    plan_combine,
)


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
        license: The model card's ``license:`` (a Hugging Face identifier); default: the
            base's where tvtool knows it (the embedded models: ``mit``), else none, with a
            note in the card. Only with ``hf_dir``.
    """

    base: str
    vectors: tuple[str, ...]
    output: str
    coefs: tuple[float, ...] = (1.0,)
    allow_base_mismatch: bool = False
    approximate_linearized: bool = False
    hf_dir: str | None = None
    license: str | None = None


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
    check_stdin_once(config.vectors)
    if config.hf_dir == STDIO:
        raise UsageError("--hf-dir writes a directory, not stdout",
                         hint="use --hf-dir DIR, or -o - for a checkpoint on stdout")
    if config.hf_dir is not None:
        check_new_directory(config.hf_dir)  # before the base is resolved or read
    check_coefficients(config.coefs)
    if config.license is not None:
        if config.hf_dir is None:
            raise UsageError("--license is written into the model card of --hf-dir",
                             hint="add --hf-dir DIR, or drop --license")
        try:
            check_license(config.license)
        except ValueError as exc:
            raise UsageError(f"--license {short_repr(config.license, 40)}: {exc}") from None
    coefs = expand_coefs(config.coefs, len(config.vectors))
    ref = resolve_ref(config.base)
    if config.hf_dir is not None:
        # An open_clip directory holds the architecture's open_clip config: only this branch
        # imports open_clip (slow); applying to a file base reads files only.
        from tvtool.models.hub import open_clip_hf_config

        hf_config = open_clip_hf_config(ref)
    else:
        check_output(config.output, [*config.vectors, *file_inputs(ref)])
    sources: list[TensorSource] = []
    card_vectors: list[CardVector] = []
    records: list[dict[str, Any]] = []
    with opened(sources):
        metas = []
        for path, coef in zip(config.vectors, coefs, strict=True):
            vector = open_vector(path)
            sources.append(vector.source)
            source, meta = vector.source, vector.meta
            # The file's own fingerprint (LoRA factors, not ΔW), in the card and provenance.
            stored_fp = fingerprint(vector.stored or source)
            records.append(input_record(path, meta, stored_fp, role="vector", coef=coef))
            if config.hf_dir is not None:
                card_vectors.append(_card_vector(path, coef, stored_fp, meta))
            if meta.linearized and not config.approximate_linearized:
                raise InvalidInputError(
                    f"{source.label} is a linearized ({meta.mode.value if meta.mode else '?'}) "
                    "vector: adding it to the weights only approximates the model it was "
                    "trained as", hint="evaluate it with `tvtool eval`, or pass "
                    "--approximate-linearized to write the weight-space approximation")
            if meta.linearized:
                log(f"warning: {source.label} is linearized; the checkpoint approximates its "
                    "linearized model by adding the vector to the weights")
            warning = batchnorm_warning(moved_batchnorm(source), source.label)
            if warning:
                log(warning)
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
                        provenance=provenance("apply", config_args(config), inputs=records),
                        # The path as given, as merge records it (a label is a repr for
                        # messages: 'x.safetensors' with its quotes).
                        extra={"sources": dumps_sorted([m.dataset or path for path, (_, m)
                                                        in zip(config.vectors, metas,
                                                               strict=True)]),
                               "coefficients": dumps_sorted(coefs)})
        inputs = [*config.vectors, *file_inputs(ref)]
        if config.hf_dir is not None:
            from tvtool import __version__
            from tvtool.models.hub import card_base
            from tvtool.models.infer import architecture_shapes

            missing = sorted(set(architecture_shapes(ref.architecture))
                             - {info.name for info in plan.layout})
            if missing:
                raise InvalidInputError(
                    f"the base lacks {len(missing)} tensors of {ref.architecture} (e.g. "
                    f"{short_list(missing, 2)}); an open_clip directory needs the complete model",
                    hint="use a complete base (a converted image encoder lacks its text tower)")
            published = card_base(config.base, base_fp, config.license)
            if published.license is None:
                log("note: the model card states no license: tvtool does not know the base's; "
                    "pass --license ID (e.g. the base's own license) before publishing")
            card = model_card(architecture=ref.architecture, base=published,
                              vectors=card_vectors, tvtool_version=__version__)
            files = write_open_clip_dir(config.hf_dir, plan.tensors(), plan.layout,
                                        meta.to_header(), hf_config, card, inputs=inputs)
            return WriteResult(config.hf_dir, len(plan.layout), plan.parameters,
                               details={"coefficients": coefs, "base_fingerprint": base_fp,
                                        "files": files})
        write_tensors(config.output, plan.tensors(), meta.to_header(), layout=plan.layout,
                      inputs=inputs, check_finite=False)
    return WriteResult(config.output, len(plan.layout), plan.parameters,
                       details={"coefficients": coefs, "base_fingerprint": base_fp})


def _card_vector(path: str, coef: float, stored_fingerprint: str, meta: FileMeta
                 ) -> CardVector:
    """What the model card records about one applied vector."""
    merge: dict[str, Any] = {}
    if "merge_method" in meta.extra:
        merge = {"method": meta.extra["merge_method"],
                 "params": _loads(meta.extra.get("merge_params")),
                 "sources": _loads(meta.extra.get("sources")),
                 "source_records": _loads(meta.extra.get("source_records")),
                 "coefficients": _loads(meta.extra.get("coefficients"))}
    return CardVector(file=public_file(path),
                      coefficient=coef, dataset=meta.dataset,
                      mode=meta.mode.value if meta.mode else None, linearized=meta.linearized,
                      fingerprint=stored_fingerprint, merge=merge)


def _loads(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
