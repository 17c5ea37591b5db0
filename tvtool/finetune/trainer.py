"""The fine-tuning command: load the base, build the mode's adapter, train, write outputs.

Configuration and results: :mod:`tvtool.finetune.config`; processes and the deterministic
example stream: :mod:`tvtool.finetune.sampling`; the loop: :mod:`tvtool.finetune.loop`;
the resume state: :mod:`tvtool.finetune.resume`; the schedule:
:mod:`tvtool.finetune.schedule`; the process group: :mod:`tvtool.finetune.distributed`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Dataset

from tvtool.device import resolve_device, resolve_precision
from tvtool.errors import InvalidInputError, UsageError
from tvtool.finetune.base import Adapter
from tvtool.finetune.config import RESUME_FILE, FinetuneConfig, FinetuneResult, StepLog
from tvtool.finetune.distributed import init_process_group
from tvtool.finetune.loop import train
from tvtool.finetune.registry import get_mode
from tvtool.finetune.sampling import dist_from_env
from tvtool.io import check_output, ensure_directory, write_tensors
from tvtool.metadata import FileMeta, Kind, Mode, provenance
from tvtool.metrics import METRICS_FILE, MetricsLog, check_tensorboard, metrics_log_path
from tvtool.types import quiet as _quiet


def check_encoder(mode: Mode, encoder: torch.nn.Module, options: Any) -> None:
    """Refuse a mode the image encoder's structure does not support (works on meta tensors).

    Each mode says what it needs (``check_encoder`` of its mode object): ``full`` and
    ``linear`` train any encoder; ``attn`` needs attention blocks (``nn.MultiheadAttention``
    or timm attention); the LoRA modes need ``nn.MultiheadAttention`` blocks (open_clip's
    own ViTs).

    Raises:
        InvalidInputError: the encoder lacks what the mode trains.
    """
    get_mode(mode).check_encoder(encoder, options)


def _write_checkpoint(path: str, ref: Any, dense: Mapping[str, Tensor],
                      meta: FileMeta, inputs: Sequence[str]) -> None:
    from tvtool.io import TensorInfo
    from tvtool.models import base_source

    source, _ = base_source(ref)
    try:
        names = source.keys()
        layout = [TensorInfo(n, source.info(n).dtype, source.info(n).shape) for n in names]

        def tensors() -> Iterator[tuple[str, Tensor]]:
            for name in names:
                tensor = source.get(name)
                if name in dense:
                    tensor = (tensor.double() + dense[name].double()).to(tensor.dtype)
                yield name, tensor

        write_tensors(path, tensors(), meta.to_header(), layout=layout, inputs=inputs)
    finally:
        source.close()


def finetune(
    config: FinetuneConfig,
    *,
    dataset: Dataset | None = None,
    head: Tensor | None = None,
    progress: Callable[[StepLog], None] | None = None,
    after_step: Callable[[int], None] | None = None,
    log: Callable[[str], None] | None = None,
    on_trained: Callable[[Adapter], None] | None = None,
    metrics: bool = True,
    tensorboard: str | None = None,
) -> FinetuneResult:
    """Fine-tune the image encoder of ``config.base`` and write the task vector.

    Under torchrun every process calls this; process 0 writes the outputs.

    Args:
        config: What to do.
        dataset: Training examples; default ``tvtool.data.load_split(config.dataset, "train",
            preprocess_train)``.
        head: Zero-shot head; default built from the dataset's class names and templates.
        progress: Progress callback (see :func:`train`).
        after_step: Per-step callback (see :func:`train`).
        log: Info lines (stderr in the CLI).
        on_trained: Called on every process with the trained adapter, before the outputs
            are written (e.g. to evaluate in-process).
        metrics: Write the metrics log (:func:`tvtool.metrics.metrics_log_path` of the
            output; with ``config.workdir`` also a live copy there, continued on resume).
        tensorboard: A directory for TensorBoard scalars (the optional extra).

    Returns:
        The run summary.

    Raises:
        UsageError, InvalidInputError: bad configuration, inputs or resume state.
        NumericalError: the run diverged (no output written).
    """
    from tvtool.models import (
        base_source,
        build_zero_shot_head,
        fingerprint,
        image_encoder_skeleton,
        load_clip,
        resolve_ref,
    )
    from tvtool.models.refs import RefKind

    info = dist_from_env()
    say = log if log is not None and info.is_main else _quiet
    device = resolve_device(config.device, info.local_rank if info.world > 1 else None)
    precision = resolve_precision(config.precision, device)
    mode = get_mode(config.mode)
    # Refusals that depend only on the architecture come first, from a weightless skeleton of
    # the image encoder, not after minutes of loading weights and building the head.
    ref = resolve_ref(config.base)
    skeleton = image_encoder_skeleton(ref.architecture)
    if skeleton is not None:
        check_encoder(config.mode, skeleton, config.options)
    owns_group = init_process_group(info, device.type)
    closing = contextlib.ExitStack()
    try:
        source, ref = base_source(ref)
        try:
            base_fp = fingerprint(source)
        finally:
            source.close()
        inputs = [ref.location or ref.text] if ref.kind in (RefKind.CHECKPOINT,
                                                              RefKind.WEIGHTS_FILE) else []
        metrics_path = metrics_log_path(config.output) if metrics else None
        if info.is_main:
            check_output(config.output, inputs)
            if config.checkpoint_out is not None:
                check_output(config.checkpoint_out, inputs)
            if metrics_path is not None:
                check_output(metrics_path, inputs)
                if metrics_path == config.checkpoint_out:
                    raise UsageError(f"--checkpoint-out {metrics_path!r} is where the metrics "
                                     "log of -o goes", hint="give another file name")
            if tensorboard is not None:
                check_tensorboard()
            if config.workdir:
                ensure_directory(config.workdir)
                if config.resume == "no" and os.path.exists(os.path.join(config.workdir,
                                                                         RESUME_FILE)):
                    say(f"note: {config.workdir} holds the training state of an earlier run; "
                        "--resume no replaces it at the first save")
        if info.world > 1:
            dist.barrier()
        torch.manual_seed(config.seed)
        bundle = load_clip(ref, device)
        if skeleton is None:
            check_encoder(config.mode, cast(torch.nn.Module, bundle.model.visual),
                          config.options)
        data_record: dict[str, Any] | None = None
        if dataset is None:
            from tvtool.data import load_split

            dataset = load_split(config.dataset, "train", bundle.preprocess_train,
                                 data_root=config.data_root, seed=config.seed)
            data_record = _dataset_record(config)
        if head is None:
            spec = getattr(dataset, "spec", None)
            if spec is None:
                raise InvalidInputError("the dataset has no .spec (class names and templates)",
                                        hint="pass a zero-shot head explicitly")
            head = build_zero_shot_head(bundle, spec.classnames, spec.templates, device)
        encoder = cast(torch.nn.Module, bundle.model.visual)
        architecture = bundle.architecture
        del bundle  # drop the text tower: only the image encoder trains
        adapter = mode.build(encoder, config.options, seed=config.seed)
        say(f"fine-tuning {architecture} ({mode.name.value}: {mode.summary}) on "
            f"{config.dataset}, {len(dataset)} examples, {device}, {precision}"  # type: ignore[arg-type]
            + (f", {info.world} processes" if info.world > 1 else ""))
        live = os.path.join(config.workdir, METRICS_FILE) if config.workdir else None
        log_book = MetricsLog(live=live if metrics else None, tensorboard=tensorboard) \
            if info.is_main else None
        closing.callback(lambda: log_book.close() if log_book is not None else None)

        def report(entry: StepLog) -> None:
            if log_book is not None:
                log_book.add({"step": entry.step, "loss": entry.loss, "lr": entry.lr,
                              "train_accuracy": entry.accuracy,
                              "images_per_s": entry.images_per_s})
            if progress is not None:
                progress(entry)

        result = train(adapter, head, dataset, config, device=device, precision=precision,
                       info=info, fingerprint=base_fp, progress=report,
                       after_step=after_step, log=say,
                       on_start=log_book.start if log_book is not None else None)
        if on_trained is not None:
            on_trained(adapter)
        vector = adapter.task_vector()
        from tvtool.data import recorded_dataset_name

        meta = FileMeta(kind=Kind.TASK_VECTOR, architecture=architecture, base_ref=config.base,
                        base_fingerprint=base_fp, mode=config.mode, linearized=mode.linearized,
                        dataset=(recorded_dataset_name(config.dataset) if config.dataset
                                 else config.dataset),
                        provenance=provenance("finetune", {**config.as_json(),
                                                           "precision_resolved": precision,
                                                           "world_size": info.world},
                                              seed=config.seed, dataset=data_record),
                        extra=adapter.vector_metadata())
        if info.is_main:
            write_tensors(config.output, vector, meta.to_header(), inputs=inputs)
            if config.checkpoint_out is not None:
                ckpt_meta = meta.with_changes(kind=Kind.CHECKPOINT, linearized=False, extra={})
                _write_checkpoint(config.checkpoint_out, ref, adapter.dense_delta(), ckpt_meta,
                                  inputs)
            if metrics_path is not None and log_book is not None:
                log_book.write(metrics_path, tuple(inputs))
        if info.world > 1:
            dist.barrier()
        return FinetuneResult(
            output=config.output, checkpoint_out=config.checkpoint_out, mode=config.mode.value,
            linearized=mode.linearized, dataset=config.dataset, steps=result.steps,
            resumed_from=result.start_step, seconds=result.seconds,
            images_per_s=result.images_per_s, final_loss=result.final_loss,
            train_accuracy=result.train_accuracy, tensors=len(vector),
            parameters=sum(t.numel() for t in vector.values()), device=str(device),
            precision=precision, world_size=info.world,
            metrics_log=metrics_path or (live if metrics else None), tensorboard=tensorboard)
    finally:
        closing.close()
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _dataset_record(config: FinetuneConfig) -> dict[str, Any]:
    """Where the training examples came from: the dataset's split manifest.

    The manifest's ``source`` is the generator version of a synthetic task, the layout of a
    standard dataset or an image folder; its ``hashes`` identify the examples of every split
    (docs/embedded-world.md: the generator version decides which images a task holds).
    """
    from tvtool.data import recorded_dataset_name, split_manifest

    manifest = split_manifest(config.dataset, config.data_root, seed=config.seed)
    return {"name": recorded_dataset_name(config.dataset), "split": "train",
            "manifest": manifest}
