"""Library entry point of ``tvtool learn-coeffs``: files and datasets in, coefficient file out.

:func:`learn_coeffs` takes one frozen :class:`LearnCoeffsConfig`, opens the base and the task
vectors (refusing vectors of another base), packs the vectors' image-encoder tensors, samples
the k-shot (or unlabelled) examples, learns the coefficients and writes the coefficient file,
plus, on request, the composed model and the learning path. The protocol
(:mod:`tvtool.atlas.protocols`) decides where the selection data comes from: a held-out part
of the examples (``tvtool``), the dataset's labelled ``val`` split (``atlas``), or none
(``adamerging`` keeps its last iterate). Every check on the inputs runs before any training,
and nothing is written when one fails.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from tvtool.atlas.blocks import (
    Packing,
    Partition,
    TensorSpec,
    build_partition,
    parse_granularity,
)
from tvtool.atlas.compose import VISUAL_PREFIX, ComposedEncoder, VectorStack, compose_tensor
from tvtool.atlas.examples import dataset_labels, split_examples
from tvtool.atlas.files import CoefficientSet, write_coefficients
from tvtool.atlas.learner import LearnerConfig, TaskData, learn
from tvtool.atlas.objectives import (
    check_objective,
    needs_labels,
)
from tvtool.atlas.protocols import PROTOCOL_SPECS, resolve_protocol
from tvtool.data import data_source, dataset_identity
from tvtool.device import resolve_device
from tvtool.errors import InvalidInputError, UsageError
from tvtool.io import (
    TensorInfo,
    TensorSource,
    check_distinct_paths,
    check_output,
    fingerprint,
    write_json,
    write_tensors,
)
from tvtool.limits import short_repr
from tvtool.metadata import FileMeta, Kind, Mode, input_record, provenance
from tvtool.metrics import MetricsLog, check_tensorboard, metrics_log_path
from tvtool.types import Logger, ProgressFactory
from tvtool.types import no_progress as _no_progress
from tvtool.types import quiet as _quiet

VECTOR_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
AUDIT_SPLITS = ("val", "test")


@dataclass(frozen=True)
class LearnCoeffsConfig:
    """Configuration of ``tvtool learn-coeffs``: the files and data, plus the learner's settings.

    The hyper-parameters of learning (objective, steps, learning rate, batch size, selection
    thresholds, precision, seed, workers) are declared once, in
    :class:`~tvtool.atlas.learner.LearnerConfig`, and held here as ``learner``; its
    ``precision`` may be ``auto`` (resolved for the device when learning starts) and its
    ``seed`` also seeds the choice of examples.

    Attributes:
        vectors: Task-vector files, in the order of the coefficient rows.
        base: Model reference of the base the vectors were extracted from.
        output: Coefficient file to write (``-`` for stdout).
        datasets: Datasets to learn on (for ``negation``: the data to forget).
        control: Data to keep (``negation`` only).
        learner: How to learn (None fields take the objective's defaults).
        granularity: ``task``, ``tensor``, ``layer`` or ``random:K``.
        shots: Examples per class (labelled), or ``shots × classes`` examples (unlabelled);
            None uses the whole split.
        split: Split the examples come from (``train``; ``test`` for test-time adaptation).
        val_fraction: Fraction of the chosen examples held out for selection / early stopping
            (None: the protocol's -- 0.2 for ``tvtool``, 0 for ``atlas``, which selects on
            the ``val`` split, and ``adamerging``, which does not select).
        partition_seed: Seed of the ``random:K`` split.
        vector_dtype: Storage dtype of the packed vectors: ``fp32``, ``bf16`` or ``fp16``.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        data_root: Root of the standard datasets.
        merged_out: Also write the composed model: a checkpoint, or (linearized vectors) the
            composed linearized task vector.
        allow_base_mismatch: Accept vectors recorded against another base.
        audit_split: Also record, at every evaluation, the labelled accuracy on this split
            (``val`` or ``test``) of every dataset -- for studying selection rules; nothing is
            learned or selected on it.
        eval_limit: Evaluate the ``val`` split (``atlas`` selection) and the audit split on a
            seeded subset of this many examples per dataset.
        path_out: Also write the learning path (every evaluation's coefficients and
            statistics) as a JSON document.
    """

    vectors: tuple[str, ...]
    base: str
    output: str
    datasets: tuple[str, ...]
    control: tuple[str, ...] = ()
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    granularity: str = "tensor"
    shots: int | None = 16
    split: str = "train"
    val_fraction: float | None = None
    partition_seed: int = 0
    vector_dtype: str = "fp32"
    device: str = "auto"
    data_root: str | None = None
    merged_out: str | None = None
    allow_base_mismatch: bool = False
    audit_split: str | None = None
    eval_limit: int | None = None
    path_out: str | None = None

    def arguments(self) -> dict[str, Any]:
        """The settings as one flat JSON-ready mapping (the learner's fields among them)."""
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name != "learner"}
        merged = {**own, **dataclasses.asdict(self.learner)}
        return {name: (list(value) if isinstance(value, tuple) else value)
                for name, value in merged.items()}


@dataclass(frozen=True)
class LearnCoeffsResult:
    """What ``tvtool learn-coeffs`` produced.

    Attributes:
        output: The coefficient file.
        merged_output: The composed model, if written.
        vectors: Number of task vectors (rows).
        blocks: Number of blocks (columns).
        granularity: The granularity used.
        objective: The objective used.
        protocol: The protocol it ran under.
        linearized: Whether the composed model is evaluated linearized.
        best_step: Step of the selected coefficients (0 = initialisation, −1 = the
            zero-shot model).
        steps_run: Steps taken.
        selection: How the coefficients were selected.
        at_edge: ``first`` / ``last`` when the selection kept the first or the last
            candidate (None otherwise, and for protocols that do not select).
        rule_met: Whether the kept candidate satisfies the selection rule (not collapsed,
            control kept).
        candidates: Every evaluation in order: step, training loss, score, per-dataset
            statistics (accuracy where labels may be read, prediction entropy, information,
            predicted-class entropy against the class prior's), why the collapse guard
            rejected it, audit accuracy.
        initial: Held-out scores at the initialisation.
        best: Held-out scores of the selected coefficients.
        zero_shot: Held-out scores of the zero-shot model (all coefficients 0).
        settings: The hyper-parameters used (objective defaults filled in).
        coefficients: Per vector: mean, min and max of its row.
        seconds: Wall time of the learning loop.
        notes: Remarks (also printed on stderr).
        path_output: The learning-path document, if written.
        metrics_log: The metrics log (JSON lines of the evaluations), if written.
        tensorboard: The TensorBoard directory, if any.
    """

    output: str
    merged_output: str | None
    vectors: int
    blocks: int
    granularity: str
    objective: str
    protocol: str
    linearized: bool
    best_step: int
    steps_run: int
    selection: str
    at_edge: str | None
    rule_met: bool
    candidates: list[dict[str, Any]]
    initial: list[dict[str, Any]]
    best: list[dict[str, Any]]
    zero_shot: list[dict[str, Any]]
    settings: dict[str, Any]
    coefficients: list[dict[str, Any]]
    seconds: float
    notes: list[str] = field(default_factory=list)
    path_output: str | None = None
    metrics_log: str | None = None
    tensorboard: str | None = None

    def as_json(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return dataclasses.asdict(self)


class _SourceTensors(Mapping[str, Tensor]):
    """The tensors of a source as a read-only mapping (read lazily, one at a time)."""

    def __init__(self, source: TensorSource, names: Sequence[str]) -> None:
        own = set(source.keys())
        self._source = source
        self._names = [n for n in names if n in own]

    def __getitem__(self, name: str) -> Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self._source.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def check_config(config: LearnCoeffsConfig) -> None:
    """Validate everything that needs no file or model, before any work.

    Raises:
        UsageError: bad flag values or combinations.
        InvalidInputError: an output that is also an input, or in a missing directory.
    """
    objective = config.learner.objective
    check_objective(objective)
    protocol = resolve_protocol(objective, config.learner.protocol)
    parse_granularity(config.granularity)
    if not config.vectors:
        raise UsageError("learn-coeffs needs at least one task vector")
    if list(config.vectors).count("-") > 1:
        raise UsageError("stdin ('-') can be given only once")
    if not config.datasets:
        raise UsageError("learn-coeffs needs at least one --dataset")
    if objective == "negation" and not config.control:
        raise UsageError("the negation objective needs --control datasets (the data to keep)")
    if objective != "negation" and config.control:
        raise UsageError("--control is only used with --objective negation")
    identities = [dataset_identity(name) for name in (*config.datasets, *config.control)]
    twice = [name for index, name in enumerate(identities) if name in identities[:index]]
    if twice:
        raise UsageError(f"dataset {short_repr(twice[0], 80)} is given twice (--dataset and "
                         "--control name each dataset once)")
    if config.shots is not None and config.shots < 1:
        raise UsageError(f"--shots must be at least 1, got {config.shots}")
    if config.val_fraction is not None:
        if not 0.0 <= config.val_fraction < 1.0:
            raise UsageError(f"--val-fraction must be in [0, 1), got {config.val_fraction}")
        if protocol == "atlas" and config.val_fraction > 0:
            raise UsageError("the atlas protocol selects on the dataset's val split, not on a "
                             "held-out part (--val-fraction)",
                             hint="leave --val-fraction out, or use --protocol tvtool")
    if config.audit_split is not None and config.audit_split not in AUDIT_SPLITS:
        raise UsageError(f"unknown --audit-split {config.audit_split!r}", hint="use val or test")
    if config.eval_limit is not None and config.eval_limit < 1:
        raise UsageError(f"--eval-limit must be at least 1, got {config.eval_limit}")
    if config.vector_dtype not in VECTOR_DTYPES:
        raise UsageError(f"unknown --vector-dtype {config.vector_dtype!r}",
                         hint="use fp32, bf16 or fp16")
    config.learner.check()
    outputs = [config.output] + ([config.merged_out] if config.merged_out else []) \
        + ([config.path_out] if config.path_out else [])
    named = [o for o in outputs if o != "-"]
    if len(set(named)) != len(named):
        raise UsageError("-o, --merged-out and --path-out must name different files")
    if outputs.count("-") > 1:
        raise UsageError("only one of -o, --merged-out and --path-out can be stdout ('-')")
    inputs = [*config.vectors, config.base]
    for output in outputs:
        check_distinct_paths(output, inputs)
        if output != "-" and not Path(output).expanduser().parent.is_dir():
            raise InvalidInputError(f"output directory of {output!r} does not exist",
                                    hint="create it first")


def covered_tensors(encoder_params: Mapping[str, Tensor], vectors: Sequence[TensorSource],
                    prefix: str = VISUAL_PREFIX) -> tuple[list[TensorSpec], list[str]]:
    """The image-encoder tensors the coefficients will scale, and the notes on the rest.

    A tensor is covered when at least one vector holds it and it is a floating parameter of
    the encoder. Tensors elsewhere (text tower, logit scale) cannot change zero-shot image
    classification with a frozen head, so they get no coefficient (and count as 0 in
    ``--merged-out``).

    Raises:
        InvalidInputError: no vector touches the image encoder, or a shape mismatch.
    """
    names: list[str] = []
    seen: set[str] = set()
    outside = 0
    for source in vectors:
        stored = source.keys()
        for name in stored:
            if name in seen:
                continue
            seen.add(name)
            local = name[len(prefix):] if name.startswith(prefix) else None
            if local is not None and local in encoder_params and \
                    source.info(name).dtype.is_floating_point:
                names.append(name)
            else:
                outside += 1
    if not names:
        raise InvalidInputError("the task vectors hold no image-encoder tensors "
                                f"({prefix}*)", hint="aTLAS scales the image encoder")
    order = {f"{prefix}{n}": i for i, n in enumerate(encoder_params)}
    names.sort(key=order.__getitem__)
    key_sets = [set(source.keys()) for source in vectors]
    specs = []
    for name in names:
        shape = tuple(encoder_params[name[len(prefix):]].shape)
        for source, keys in zip(vectors, key_sets, strict=True):
            if name in keys and tuple(source.info(name).shape) != shape:
                raise InvalidInputError(f"{source.label}: tensor {name!r} has shape "
                                        f"{tuple(source.info(name).shape)}, the base has {shape}")
        specs.append(TensorSpec(name, shape))
    notes = [f"{outside} vector tensors outside the image encoder get no coefficient"] \
        if outside else []
    return specs, notes


def learn_coeffs(config: LearnCoeffsConfig, *, log: Logger = _quiet,
                 progress: ProgressFactory = _no_progress, metrics: bool = True,
                 tensorboard: str | None = None) -> LearnCoeffsResult:
    """Learn aTLAS coefficients and write the coefficient file (and the composed model).

    Args:
        config: What to learn and where to write it.
        log: Notes and warnings (stderr in the CLI).
        progress: Progress factory of the learning steps.
        metrics: Write the metrics log of the evaluations beside the output
            (:func:`tvtool.metrics.metrics_log_path`).
        tensorboard: A directory for the same scalars as TensorBoard events (optional extra).

    Raises:
        UsageError: bad settings.
        InvalidInputError: bad base, vectors, datasets or outputs (nothing is written).
        NumericalError: the loss diverged (nothing is written).
    """
    from tvtool.evaluate import head_key, open_eval_data, open_eval_model, zero_shot_head

    check_config(config)
    metrics_path = metrics_log_path(config.output) if metrics else None
    if metrics_path is not None:
        check_output(metrics_path, config.vectors)
        if metrics_path in (config.merged_out, config.path_out):
            raise UsageError(f"{metrics_path!r} is where the metrics log of -o goes",
                             hint="give --merged-out or --path-out another name")
    if tensorboard is not None:
        check_tensorboard()
    objective = config.learner.objective
    protocol = resolve_protocol(objective, config.learner.protocol)
    val_fraction = config.val_fraction if config.val_fraction is not None \
        else PROTOCOL_SPECS[protocol].held_out_fraction
    device = resolve_device(config.device)
    granularity = parse_granularity(config.granularity)
    model = open_eval_model(config.base, config.vectors, device=device,
                            allow_base_mismatch=config.allow_base_mismatch)
    with model:
        notes = list(model.notes)
        encoder_module = cast(nn.Module, model.bundle.model.visual)
        params = dict(encoder_module.named_parameters())
        sources = [v.source for v in model.vectors]
        specs, more = covered_tensors(params, sources)
        notes += more
        partition = build_partition(specs, granularity, config.partition_seed)
        if len(partition.tensors) < len(specs):
            notes.append(f"{granularity}: {len(specs) - len(partition.tensors)} image-encoder "
                         "tensors that are not 2-D keep θ0 (aTLAS x K's rule)")
        names = [s.name for s in specs]
        stack = VectorStack(Packing(partition),
                            [_SourceTensors(s, names) for s in sources],
                            VECTOR_DTYPES[config.vector_dtype], device)
        encoder = ComposedEncoder(encoder_module, stack, linearized=model.linearized)
        if model.linearized:
            notes.append("linearized vectors: the composed model is f(x; θ0) + J·Σ λτ "
                         "(tvtool.linearize)")
        for note in notes:
            log(note)

        tasks = []
        data_records: list[dict[str, Any]] = []
        roles = [("target" if objective == "negation" else "train", name)
                 for name in config.datasets] + [("control", name) for name in config.control]
        labelled = needs_labels(objective)
        for role, name in roles:
            data = open_eval_data(name, config.split, model.bundle.preprocess_eval,
                                  data_root=config.data_root, seed=config.learner.seed)
            labels = dataset_labels(data.dataset) if labelled else None
            train_idx, val_idx = split_examples(
                labels, data.total, shots=config.shots, val_fraction=val_fraction,
                seed=config.learner.seed, num_classes=data.num_classes)
            key = head_key(model.base_fingerprint, data.name, data.classnames, data.templates)
            head = zero_shot_head(model.bundle, key, data.templates, device=device, log=log)
            selection_data: Dataset[Any] | None = Subset(data.dataset, val_idx) \
                if val_idx else None
            # Where the examples came from (generator version, layout); the examples
            # themselves are fixed by the split, --shots, --val-fraction and the seed.
            data_records.append({"name": data.name, "role": "task" if role == "train" else role,
                                 "split": config.split,
                                 "source": data_source(name, config.data_root)})
            what = f" ({role})" if objective == "negation" else ""
            if protocol == "atlas":
                val = open_eval_data(name, "val", model.bundle.preprocess_eval,
                                     data_root=config.data_root, seed=config.learner.seed,
                                     limit=config.eval_limit)
                selection_data = val.dataset
                log(f"{data.name}{what}: {len(train_idx)} training examples from the "
                    f"{config.split} split; selection on "
                    f"{len(val.dataset)} labelled examples of the val split")  # type: ignore[arg-type]
            else:
                log(f"{data.name}{what}: {len(train_idx)} training and {len(val_idx)} "
                    f"held-out examples from the {config.split} split")
            train = Subset(data.dataset, train_idx)
            audit: Dataset[Any] | None = None
            if config.audit_split == config.split and config.eval_limit is None and \
                    len(train_idx) == data.total:
                audit = train  # the same examples: the learner scores them in one pass
            elif config.audit_split is not None:
                audit = open_eval_data(name, config.audit_split, model.bundle.preprocess_eval,
                                       data_root=config.data_root, seed=config.learner.seed,
                                       limit=config.eval_limit).dataset
            tasks.append(TaskData(data.name, head, train, selection_data, role, labelled,
                                  audit=audit))

        start = time.perf_counter()
        learner = config.learner.resolved()
        log(f"protocol {learner.protocol}: {PROTOCOL_SPECS[str(learner.protocol)].summary}")
        log_book = MetricsLog(tensorboard=tensorboard, prefix="learn")
        try:
            result = learn(encoder, tasks, learner, log=log, progress=progress,
                           metrics=log_book.add)
        finally:
            log_book.close()
        seconds = time.perf_counter() - start
        chosen = ("the zero-shot model (all coefficients 0)" if result.best_step < 0
                  else f"step {result.best_step}")
        log(f"selected {chosen} of {result.steps_run} steps ({result.selection})")

        vector_records = [{"path": v.path, "dataset": v.meta.dataset,
                           "mode": v.meta.mode.value if v.meta.mode else None,
                           "linearized": v.meta.linearized,
                           "base_fingerprint": v.meta.base_fingerprint}
                          for v in model.vectors]
        records = [input_record(v.path, v.meta, fingerprint(v.stored or v.source),
                                role="vector") for v in model.vectors]
        meta = FileMeta(kind=Kind.COEFFICIENTS, architecture=model.ref.architecture,
                        base_ref=config.base, base_fingerprint=model.base_fingerprint,
                        linearized=model.linearized,
                        dataset=",".join([*config.datasets, *config.control]),
                        provenance=provenance("learn-coeffs", config.arguments(),
                                              config.learner.seed, inputs=records,
                                              datasets=data_records),
                        extra={"objective": objective, "protocol": protocol,
                               "settings": json.dumps(result.config, sort_keys=True),
                               "history": json.dumps(_compact(result.history))})
        coefs = CoefficientSet(result.coefficients, partition, tuple(vector_records), meta)
        inputs = [*config.vectors, *([model.ref.location] if model.ref.is_file and
                                     model.ref.location else [])]
        write_coefficients(config.output, coefs, inputs=inputs)
        if config.merged_out:
            _write_merged(config.merged_out, coefs, model.base, sources, model.linearized,
                          [v.meta for v in model.vectors], inputs=[*inputs, config.output])
        if config.path_out:
            write_json(config.path_out, {
                "objective": objective, "protocol": protocol,
                "granularity": str(granularity), "block_names": list(partition.block_names),
                "vectors": [v.path for v in model.vectors], "best_step": result.best_step,
                "records": [{**record, "coefficients": matrix.tolist()}
                            for record, matrix in zip(result.history, result.path,
                                                      strict=True)]},
                       inputs=[*inputs, config.output])
        if metrics_path is not None:
            log_book.write(metrics_path, tuple(inputs))
    return LearnCoeffsResult(
        output=config.output, merged_output=config.merged_out, vectors=len(sources),
        blocks=partition.num_blocks, granularity=str(granularity), objective=objective,
        protocol=protocol, linearized=model.linearized, best_step=result.best_step,
        steps_run=result.steps_run, selection=result.selection, at_edge=result.at_edge,
        rule_met=result.rule_met, candidates=result.history, initial=result.initial,
        best=result.best, zero_shot=result.zero_shot, settings=result.config,
        coefficients=_row_stats(result.coefficients), seconds=round(seconds, 3), notes=notes,
        path_output=config.path_out, metrics_log=metrics_path, tensorboard=tensorboard)


def _compact(history: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The history the coefficient file keeps: step, loss, score, admissibility, notes."""
    keep = ("step", "loss", "score", "note", "candidate", "admissible", "rejected")
    return [{k: v for k, v in record.items() if k in keep} for record in history]


def _row_stats(matrix: Tensor) -> list[dict[str, Any]]:
    return [{"mean": float(row.mean()), "min": float(row.min()), "max": float(row.max())}
            for row in matrix]


def _write_merged(output: str, coefs: CoefficientSet, base: TensorSource,
                  vectors: Sequence[TensorSource], linearized: bool,
                  metas: Sequence[FileMeta], inputs: Sequence[str]) -> None:
    """Write the composed model, streaming one tensor at a time.

    Ordinary vectors give a checkpoint ``θ0 + Σ λτ`` open_clip can load. Linearized vectors
    give the composed task vector ``Σ λτ`` (marked linearized), since adding it to the
    weights would only approximate the linear model the coefficients were learned for.
    """
    partition: Partition = coefs.partition
    keys = [set(v.keys()) for v in vectors]

    def parts(name: str) -> list[Tensor | None]:
        return [v.get(name) if name in k else None for v, k in zip(vectors, keys, strict=True)]

    if linearized:
        layout = [TensorInfo(s.name, torch.float32, s.shape) for s in partition.tensors]
        produced: Iterator[tuple[str, Tensor]] = (
            (s.name, compose_tensor(partition, coefs.coefficients, s.name, parts(s.name)))
            for s in partition.tensors)
        mode = metas[0].mode if metas and metas[0].mode else Mode.LINEAR
        meta = coefs.meta.with_changes(kind=Kind.TASK_VECTOR, mode=mode, linearized=True,
                                       extra={"coefficients_of": ",".join(
                                           str(m.dataset) for m in metas)})
    else:
        base_names = base.keys()
        layout = [base.info(name) for name in base_names]

        def produce() -> Iterator[tuple[str, Tensor]]:
            for info in layout:
                tensor = base.get(info.name)
                offset = coefs.combine(info.name, parts(info.name)) \
                    if tensor.is_floating_point() else None
                yield info.name, (tensor if offset is None
                                  else (tensor.float() + offset).to(tensor.dtype))

        produced = produce()
        meta = coefs.meta.with_changes(kind=Kind.CHECKPOINT, extra={
            "sources": json.dumps(list(coefs.sources), sort_keys=True),
            "granularity": str(partition.granularity)})
    write_tensors(output, produced, meta.to_header(), layout=layout, inputs=inputs)
