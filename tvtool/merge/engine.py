"""The file-level ``merge`` command: open, check, plan, write.

:func:`merge` opens task-vector files (LoRA vectors as their dense deltas, through
:func:`tvtool.vectors.open_vector`), refuses vectors that do not belong together, resolves
coefficients, plans the merge (:mod:`tvtool.merge.plan`) and writes a task vector whose
metadata records how it was made.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from tvtool.cards import public_file
from tvtool.errors import InvalidInputError
from tvtool.io import TensorSource, check_output, fingerprint, write_tensors
from tvtool.limits import short_list
from tvtool.merge.coefficients import VectorId, from_values, load_coefficients
from tvtool.merge.config import MergeConfig
from tvtool.merge.method import MergeMethod
from tvtool.merge.plan import MergePlan, MergeSpec, plan_sources
from tvtool.merge.registry import METHODS, get_method
from tvtool.metadata import FileMeta, Kind, Mode, input_record, provenance
from tvtool.threads import intra_op_threads
from tvtool.types import Logger, WriteResult
from tvtool.types import quiet as _quiet
from tvtool.vectors import check_architecture, metadata_warnings, open_vector


class MergeResult(WriteResult):
    """What ``merge`` wrote (or, for a dry run, would write): a :class:`WriteResult`."""


@dataclass
class OpenedMerge:
    """Inputs opened and checked, coefficients resolved, plan and output metadata built."""

    config: MergeConfig
    sources: list[TensorSource]
    metas: list[FileMeta]
    plan: MergePlan
    header: dict[str, str]
    owned: list[TensorSource] = field(default_factory=list)

    def close(self) -> None:
        """Close every input."""
        for source in self.owned or self.sources:
            with contextlib.suppress(Exception):
                source.close()


def _check_compatible(config: MergeConfig, labels: Sequence[str], metas: Sequence[FileMeta],
                      log: Logger) -> tuple[Mode | None, bool]:
    """Refuse vectors of different architectures, bases or linearization.

    Returns:
        The mode (if shared) and the linearized flag of the output.

    """
    for index, meta in enumerate(metas):
        for warning in metadata_warnings(meta, labels[index]):
            log(warning)
    # The rule apply and eval use: another activation of the same tensors warns, anything
    # else is an error.
    known = [(labels[i], m.architecture) for i, m in enumerate(metas) if m.architecture]
    for label, architecture in known[1:]:
        note = check_architecture(label, architecture, known[0][1],
                                  f"the first vector {known[0][0]}")
        if note:
            log(note)
    prints = {m.base_fingerprint for m in metas if m.base_fingerprint}
    if len(prints) > 1 and not config.allow_base_mismatch:
        first = metas[0].base_fingerprint or ""
        other = next(i for i, m in enumerate(metas)
                     if m.base_fingerprint and m.base_fingerprint != first)
        raise InvalidInputError(
            f"{labels[0]} and {labels[other]} were extracted from different bases (fingerprint "
            f"{first[:19]}… vs {(metas[other].base_fingerprint or '')[:19]}…)",
            hint="merge vectors of one base, or --allow-base-mismatch if you are sure")
    flags = {m.linearized for m in metas}
    if len(flags) > 1:
        if config.mixed_modes_as is None:
            lin = [labels[i] for i, m in enumerate(metas) if m.linearized]
            raise InvalidInputError(
                f"cannot merge linearized vectors ({short_list(lin, 2)}) with non-linearized "
                "ones: they are evaluated as different models",
                hint="--mixed-modes-as linearized|nonlinear says how the result is evaluated")
        linearized = config.mixed_modes_as == "linearized"
        log(f"warning: merging linearized and non-linearized vectors; the result is recorded "
            f"as {'linearized' if linearized else 'non-linearized'}")
    else:
        linearized = flags.pop()
    modes = {m.mode for m in metas}
    mode = modes.pop() if len(modes) == 1 else None
    if mode is not None and mode.factored:
        # Materialised LoRA factors are dense weight deltas: the result is no LoRA vector.
        mode = None
    return mode, linearized


def _check_lora(method: MergeMethod, labels: Sequence[str], metas: Sequence[FileMeta]) -> None:
    """Refuse LoRA vectors for a method that says it cannot merge them (and why)."""
    if method.lora_refusal is None:
        return
    lora = [(labels[i], m.mode) for i, m in enumerate(metas) if m.mode and m.mode.factored]
    if lora:
        label, mode = lora[0]
        raise InvalidInputError(
            f"{method.name} does not merge LoRA vectors ({label}, mode {mode.value}): "
            f"{method.lora_refusal}",
            hint="methods that merge LoRA vectors (as dense deltas): "
                 + ", ".join(m.name for m in METHODS.values() if m.lora_refusal is None))


def open_merge(config: MergeConfig, log: Logger = _quiet, *, fingerprints: bool = False,
               search: dict[str, Any] | None = None) -> OpenedMerge:
    """Open and check the inputs of a merge and plan it (nothing is written).

    Args:
        config: What to merge and how.
        log: Receives notes and warnings.
        fingerprints: Record each input's fingerprint in the output's provenance (one more
            read of every input; a plan that writes nothing does without).
        search: The ``merge --search-coef`` record that chose the coefficient, kept in the
            output's provenance (``search``) and named as the coefficients' origin.

    Raises:
        UsageError: bad coefficients (the config itself is checked when it is built).
        InvalidInputError: non-vector inputs, different architectures/bases/linearization or
            key sets, shape mismatches, output equal to an input, bad coefficient files.

    """
    method = get_method(config.method)
    params = method.make_params(config.params)
    inputs = [*config.vectors, *([config.coefs_file] if config.coefs_file else [])]
    check_output(config.output, inputs)
    sources: list[TensorSource] = []
    owned: list[TensorSource] = []
    try:
        metas: list[FileMeta] = []
        vectors = []
        for path in config.vectors:
            # Factored (LoRA) vectors are merged as their dense deltas.
            vector = open_vector(path)
            owned.append(vector.source)
            sources.append(vector.source)
            metas.append(vector.meta)
            vectors.append(vector)
        labels = [s.label for s in sources]
        mode, linearized = _check_compatible(config, labels, metas, log)
        _check_lora(method, labels, metas)
        ids = [VectorId(p, m.dataset) for p, m in zip(config.vectors, metas, strict=True)]
        base_fp = next((m.base_fingerprint for m in metas if m.base_fingerprint), None)
        if config.coefs_file is not None:
            shapes = [{n: s.info(n).shape for n in list(s.keys())} for s in sources]
            coefficients = load_coefficients(config.coefs_file, ids, shapes, metas,
                                             allow_base_mismatch=config.allow_base_mismatch)
        else:
            coefficients = from_values(config.coefs, len(sources))
        spec = MergeSpec(method, params, coefficients, config.seed, config.missing,
                         method.make_vector_params(config.params, config.vector_params),
                         getattr(torch, config.dtype) if config.dtype else None)
        plan = plan_sources(sources, spec, log)
        first = metas[0]
        described = coefficients.describe()
        if search is not None:
            described["origin"] = "--search-coef"
        per_vector = (list(coefficients.per_vector) if coefficients.per_tensor is None
                      else [None] * len(metas))
        # Each input's own fingerprint (LoRA factors, not ΔW), computed once for the provenance
        # and for what a model card lists of each merged vector (apply --hf-dir).
        prints = [fingerprint(vector.stored or vector.source) if fingerprints else None
                  for vector in vectors]
        records = [input_record(path, meta, print_, role="vector", coef=coef)
                   for path, meta, print_, coef in zip(
                       config.vectors, metas, prints, per_vector, strict=True)]
        card_records = [{"file": public_file(path), "dataset": meta.dataset,
                         "mode": meta.mode.value if meta.mode else None,
                         "linearized": meta.linearized, "fingerprint": print_}
                        for path, meta, print_ in zip(config.vectors, metas, prints,
                                                      strict=True)]
        extra = {
            "sources": json.dumps([i.label() for i in ids]),
            "source_records": json.dumps(card_records, sort_keys=True),
            "merge_method": method.name,
            "merge_params": json.dumps(asdict(params), sort_keys=True),
            **({"merge_vector_params": json.dumps(list(config.vector_params), sort_keys=True)}
               if config.vector_params else {}),
            "coefficients": json.dumps(described, sort_keys=True),
            "input_modes": json.dumps([{"mode": m.mode.value if m.mode else None,
                                        "linearized": m.linearized} for m in metas]),
            # Defaults resolved, so the record still reproduces the merge if defaults change.
            "merge_config": replace(config, params=asdict(params)).to_json(),
        }
        out_meta = FileMeta(kind=Kind.TASK_VECTOR, architecture=first.architecture,
                            base_ref=first.base_ref, base_fingerprint=base_fp, mode=mode,
                            linearized=linearized,
                            provenance=provenance("merge", replace(config, params=asdict(params)
                                                          ).to_document(),
                                                  seed=config.seed, inputs=records,
                                                  search=search),
                            extra=extra)
        return OpenedMerge(config, sources, metas, plan, out_meta.to_header(), owned)
    except BaseException:
        for source in owned:
            with contextlib.suppress(Exception):
                source.close()
        raise


def describe_plan(opened: OpenedMerge) -> dict[str, Any]:
    """Build the dry-run report: inputs, method, coefficients, keys, shapes and output size."""
    plan, config = opened.plan, opened.config
    inputs = []
    for path, source, meta in zip(config.vectors, opened.sources, opened.metas, strict=True):
        names = source.keys()
        inputs.append({
            "path": path, "dataset": meta.dataset,
            "mode": meta.mode.value if meta.mode else None, "linearized": meta.linearized,
            "base_fingerprint": meta.base_fingerprint, "tensors": len(names),
            "parameters": sum(source.info(n).numel for n in names),
            "bytes": sum(source.info(n).nbytes for n in names),
        })
    count = len(opened.sources)
    keys = [{"name": info.name, "shape": list(info.shape), "dtype": str(info.dtype).replace(
        "torch.", ""), "missing_in": [i for i in range(count) if i not in plan.present[info.name]]}
        for info in plan.layout]
    method = plan.spec.method
    return {
        "dry_run": True,
        "method": {"name": method.name, "paper": method.paper,
                   "params": asdict(plan.spec.params),
                   "vector_params": list(config.vector_params)},
        "dtype": config.dtype,
        "coefficients": plan.spec.coefficients.describe(),
        "seed": config.seed,
        "missing": config.missing,
        "read_passes_per_input": plan.read_passes,
        "inputs": inputs,
        "output": {"path": config.output, "tensors": len(plan.layout),
                   "parameters": sum(i.numel for i in plan.layout),
                   "bytes": sum(i.nbytes for i in plan.layout),
                   "metadata": {k: v for k, v in opened.header.items()
                                if k != "tvtool.provenance"}},
        "keys": keys,
        "notes": plan.notes,
    }



def merge(config: MergeConfig, log: Logger = _quiet, *, dry_run: bool = False,
          threads: int | None = 1, search: dict[str, Any] | None = None) -> MergeResult:
    """Merge task-vector files into one task vector (streaming, tensor by tensor).

    Args:
        config: What to merge and how.
        log: Receives notes and warnings (stderr in the CLI).
        dry_run: Only check the inputs and describe the plan; write nothing.
        threads: CPU threads for the merge kernels (see :func:`intra_op_threads`; None keeps
            torch's setting).
        search: The coefficient search that chose ``config.coefs`` (``merge --search-coef``),
            recorded in the output's provenance.

    Returns:
        The result; for a dry run its ``details`` hold :func:`describe_plan`'s report.

    Raises:
        UsageError / InvalidInputError: see :func:`open_merge`; nothing is written.
        NumericalError: the merged vector would hold NaN or Inf (nothing is written).

    """
    opened = open_merge(config, log, fingerprints=not dry_run, search=search)
    try:
        plan = opened.plan
        for note in plan.notes:
            log(note)
        parameters = sum(i.numel for i in plan.layout)
        if dry_run:
            return MergeResult(config.output, len(plan.layout), parameters, plan.notes,
                               describe_plan(opened))
        inputs = [*config.vectors, *([config.coefs_file] if config.coefs_file else [])]
        # The plan checks every merged tensor itself (cheaply), so the writer need not.
        plan.reuse_buffers = True  # the writer consumes each tensor before the next
        stream = plan.tensors()
        try:
            with intra_op_threads(threads):
                write_tensors(config.output, stream, opened.header, layout=plan.layout,
                              inputs=inputs, check_finite=False)
        finally:
            stream.close()
        return MergeResult(config.output, len(plan.layout), parameters, plan.notes,
                           {"method": plan.spec.method.name,
                            "params": asdict(plan.spec.params),
                            "coefficients": plan.spec.coefficients.describe(),
                            "read_passes_per_input": plan.read_passes})
    finally:
        opened.close()
