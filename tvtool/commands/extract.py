"""``tvtool extract``: a fine-tuned checkpoint minus its base, as a task vector."""

from __future__ import annotations

from dataclasses import dataclass

from tvtool.commands.common import config_args, file_inputs, opened
from tvtool.errors import InvalidInputError, UsageError
from tvtool.io import TensorSource, check_output, open_tensors, write_tensors
from tvtool.metadata import PREFIX, FileMeta, Kind, Mode, input_record, provenance
from tvtool.models import base_source, fingerprint, resolve_ref
from tvtool.types import Logger, WriteResult
from tvtool.types import quiet as _quiet
from tvtool.vectors import BATCHNORM_STATISTICS, batchnorm_warning, plan_extract


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
        keep: ``image`` (the image encoder's tensors, ``visual.*``: what ``finetune`` vectors
            hold, so the two merge), ``all`` (every floating tensor) or ``changed`` (every
            floating tensor whose delta is not all zero).
    """

    base: str
    finetuned: str
    output: str
    mode: Mode = Mode.FULL
    dataset: str | None = None
    allow_missing: bool = False
    keep: str = "image"


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
    # A checkpoint difference is a dense delta of the ordinary model: a mode whose vectors are
    # linearized or factored records something a difference cannot give.
    if config.mode.linearized or config.mode.factored:
        raise UsageError(f"extract cannot record mode {config.mode.value}: those vectors come "
                         "from `tvtool finetune`, which stores what they need")
    ref = resolve_ref(config.base)
    check_output(config.output, [config.finetuned, *file_inputs(ref)])
    finetuned = _open_finetuned(config.finetuned)
    with opened([finetuned]):
        base, ref = base_source(ref)
        with opened([base]):
            plan = plan_extract(base, finetuned, allow_missing=config.allow_missing,
                                keep=config.keep)
            for note in plan.notes:
                log(note)
            # Statistics are small (one value per channel): reading them twice costs nothing.
            moved = [info.name for info in plan.layout
                     if info.name.endswith(BATCHNORM_STATISTICS)
                     and bool(plan.producers[info.name]().ne(0).any())]
            warning = batchnorm_warning(moved, finetuned.label)
            if warning:
                log(warning)
            from tvtool.data import recorded_dataset_name

            dataset = (recorded_dataset_name(config.dataset) if config.dataset is not None
                       else None)
            # The fine-tuned checkpoint is recorded by fingerprint, as the base is: extract
            # cannot see the data it was trained on, so no dataset source is recorded.
            finetuned_meta = (FileMeta.from_header(finetuned.metadata, finetuned.label)
                              if PREFIX + "kind" in finetuned.metadata else None)
            record = input_record(config.finetuned, finetuned_meta, fingerprint(finetuned),
                                  role="finetuned")
            meta = FileMeta(kind=Kind.TASK_VECTOR, architecture=ref.architecture,
                            base_ref=config.base, base_fingerprint=fingerprint(base),
                            mode=config.mode, linearized=False, dataset=dataset,
                            provenance=provenance("extract", config_args(config),
                                                  inputs=[record]))
            write_tensors(config.output, plan.tensors(), meta.to_header(), layout=plan.layout,
                          inputs=[config.finetuned, *file_inputs(ref)], check_finite=False)
    return WriteResult(config.output, len(plan.layout), plan.parameters, plan.notes)
