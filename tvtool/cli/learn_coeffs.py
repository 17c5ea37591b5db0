"""``tvtool learn-coeffs``: learn aTLAS coefficients (one per task vector per block)."""

from __future__ import annotations

from typing import Annotated

import typer

from tvtool.cli.common import (
    AllowOtherBaseOpt,
    BaseOpt,
    DataRootOpt,
    DeviceOpt,
    DownloadOpt,
    JsonOpt,
    LogEveryOpt,
    OutputOpt,
    PrecisionOpt,
    QuietOpt,
    SeedOpt,
    TensorboardOpt,
    configure_progress,
    download_datasets,
    emit_json,
    emit_path,
    handles_errors,
    log,
    progress_bar,
)
from tvtool.errors import UsageError


@handles_errors
def learn_coeffs(
    vectors: Annotated[list[str], typer.Argument(
        help="Task vectors (.safetensors), in the order of the coefficient rows; - = stdin.")],
    base: BaseOpt,
    output: OutputOpt,
    dataset: Annotated[list[str] | None, typer.Option(
        "--dataset", "-d", rich_help_panel="Model and data", show_default=False,
        help="Dataset to learn on (repeatable); for --objective negation, "
             "the data to forget.")] = None,
    suite: Annotated[str | None, typer.Option(
        "--suite", rich_help_panel="Model and data", metavar="[8|14|20]", show_default=False,
        help="The 8-, 14- or 20-task benchmark's datasets, added after any --dataset "
             "(docs/data.md).")] = None,
    control: Annotated[list[str] | None, typer.Option(
        "--control", rich_help_panel="Model and data",
        help="Data to keep (repeatable; --objective negation only).")] = None,
    objective: Annotated[str, typer.Option(
        "--objective", rich_help_panel="Objective and blocks",
        metavar="[ce|entropy|infomax|ufm|negation]",
        help="ce (k-shot labelled); unlabelled test-time adaptation: "
             "entropy (AdaMerging), infomax (entropy minus entropy of the mean "
             "prediction), ufm (aTLAS' unsupervised FixMatch); negation "
             "(forget --dataset, keep --control). docs/coeffs.md.")
    ] = "ce",
    protocol: Annotated[str | None, typer.Option(
        "--protocol", rich_help_panel="Objective and blocks",
        metavar="[adamerging|atlas|tvtool]",
        help="How the objective is trained and selected: adamerging (per-dataset "
             "batches 2x16 summed, clamp [0, 1], last iterate), atlas (epochs of "
             "batch 128, best epoch on the labelled val split), tvtool (held-out "
             "part, label-free for unlabelled objectives). Default: the "
             "objective's reference (entropy adamerging; ce, ufm, negation atlas; "
             "infomax tvtool).", show_default=False)] = None,
    granularity: Annotated[str, typer.Option(
        "--granularity", "-g", rich_help_panel="Objective and blocks",
        metavar="[task|tensor|layer|random:K|atlas:K]",
        help="task, tensor, layer, random:K (tvtool's equal groups, every tensor) or "
             "atlas:K (the reference's aTLAS x K: 2-D tensors, randint masks shared "
             "by shape).")] = "tensor",
    shots: Annotated[int | None, typer.Option(
        "--shots", "-k", rich_help_panel="Objective and blocks",
        help="Examples per class (unlabelled: K x classes at random). "
             "Omit with --all-examples.")] = 16,
    all_examples: Annotated[bool, typer.Option(
        "--all-examples", rich_help_panel="Objective and blocks",
        help="Use the whole split instead of --shots per class.")] = False,
    split: Annotated[str, typer.Option(
        "--split", rich_help_panel="Model and data", metavar="[train|val|test]",
        help="Split the examples come from (train; test for test-time "
             "adaptation).")] = "train",
    val_fraction: Annotated[float | None, typer.Option(
        "--val-fraction", rich_help_panel="Objective and blocks",
        help="Fraction of the examples held out for selection and early "
             "stopping (default: tvtool 0.2; adamerging, atlas 0).",
        show_default=False)] = None,
    steps: Annotated[int | None, typer.Option(
        "--steps", rich_help_panel="Optimisation",
        help="Optimisation steps (default: adamerging 500; atlas --epochs "
             "over the examples; tvtool ce, negation 100, others 500).",
        show_default=False)] = None,
    epochs: Annotated[int | None, typer.Option(
        "--epochs", rich_help_panel="Optimisation",
        help="atlas protocol: epochs over the training examples (default 10).",
        show_default=False)] = None,
    lr: Annotated[float | None, typer.Option(
        "--lr", rich_help_panel="Optimisation",
        help="AdamW learning rate (default: ce 0.1; entropy, infomax, ufm 1e-3; "
             "negation 5e-3).", show_default=False)] = None,
    weight_decay: Annotated[float | None, typer.Option(
        "--weight-decay", rich_help_panel="Optimisation",
        help="AdamW weight decay (default: 0.1; entropy, infomax 0).",
        show_default=False)] = None,
    grad_clip: Annotated[float | None, typer.Option(
        "--grad-clip", rich_help_panel="Optimisation",
        help="Maximum gradient norm, 0 = off (default: 1, atlas on the fp16 "
             "loss-scaled gradient as its reference; entropy, infomax off).",
        show_default=False)] = None,
    schedule: Annotated[str | None, typer.Option(
        "--schedule", rich_help_panel="Optimisation", metavar="[cosine|constant]",
        help="Learning-rate schedule (default: cosine; adamerging and atlas "
             "negation constant).", show_default=False)] = None,
    augment: Annotated[str | None, typer.Option(
        "--augment", rich_help_panel="Optimisation", metavar="[none|train|reference]",
        help="Training-image augmentation: none, train (crop 90-100 % of the "
             "area) or reference (crop 50-100 % + horizontal flip) (default: ce, "
             "ufm reference; negation train; entropy, infomax none).",
        show_default=False)] = None,
    batch_size: Annotated[int | None, typer.Option(
        "--batch-size", rich_help_panel="Optimisation",
        help="Examples per step, split across datasets (default: tvtool 32, "
             "atlas 128; adamerging 16 per dataset, drawn twice a step).",
        show_default=False)] = None,
    eval_every: Annotated[int | None, typer.Option(
        "--eval-every", rich_help_panel="Optimisation",
        help="Steps between evaluations (default: tvtool 10; atlas every "
             "epoch; adamerging the last step only).", show_default=False)] = None,
    patience: Annotated[int | None, typer.Option(
        "--patience", rich_help_panel="Optimisation",
        help="Stop after N evaluations without held-out improvement.")] = None,
    negation_weight: Annotated[float, typer.Option(
        "--negation-weight", rich_help_panel="Objective and blocks",
        help="Weight of the forgetting term (negation).")] = 1.0,
    negation_loss: Annotated[str | None, typer.Option(
        "--negation-loss", rich_help_panel="Objective and blocks",
        metavar="[unlikelihood|ce]",
        help="Forgetting term: unlikelihood, or ce (the aTLAS reference's "
             "-CE on the target) (default: atlas ce, tvtool unlikelihood).",
        show_default=False)] = None,
    control_threshold: Annotated[float, typer.Option(
        "--control-threshold", rich_help_panel="Objective and blocks",
        help="Negation selection: keep this fraction of the zero-shot "
             "control accuracy.")] = 0.95,
    ufm_threshold: Annotated[float, typer.Option(
        "--ufm-threshold", rich_help_panel="Objective and blocks",
        help="ufm: confidence a soft target needs to count.")] = 0.99,
    ufm_reading: Annotated[str | None, typer.Option(
        "--ufm-reading", rich_help_panel="Objective and blocks", metavar="[code|paper]",
        help="ufm: code (learn_ufm.py as it runs: every example trusted, CE "
             "against the zero-shot pseudo-labels) or paper (trusted subset, "
             "the rest thresholded) (default: atlas code, tvtool paper).",
        show_default=False)] = None,
    init: Annotated[float | None, typer.Option(
        "--init", rich_help_panel="Optimisation",
        help="Initial coefficient value (default: 0; entropy, infomax 0.3).",
        show_default=False)] = None,
    partition_seed: Annotated[int, typer.Option(
        "--partition-seed", rich_help_panel="Objective and blocks",
        help="Seed of the random:K split.")] = 0,
    vector_dtype: Annotated[str, typer.Option(
        "--vector-dtype", rich_help_panel="Optimisation", metavar="[fp32|bf16|fp16]",
        help="Storage of the packed vectors: fp32, bf16 or fp16.")] = "fp32",
    merged_out: Annotated[str | None, typer.Option(
        "--merged-out", rich_help_panel="Output",
        help="Also write the composed model (a checkpoint; for linearized "
             "vectors, the composed linearized task vector).")] = None,
    path_out: Annotated[str | None, typer.Option(
        "--path-out", rich_help_panel="Output", metavar="FILE",
        help="Also write the learning path (every evaluation's coefficients and "
             "statistics) as JSON.")] = None,
    audit_split: Annotated[str | None, typer.Option(
        "--audit-split", rich_help_panel="Output", metavar="[val|test]",
        help="Record every evaluation's labelled accuracy on this split (to study "
             "selection rules; never used to learn or select).")] = None,
    eval_limit: Annotated[int | None, typer.Option(
        "--eval-limit", rich_help_panel="Model and data",
        help="Evaluate the val split (atlas selection) and --audit-split on a "
             "seeded subset of N examples per dataset.")] = None,
    data_root: DataRootOpt = None,
    download: DownloadOpt = False,
    workers: Annotated[int, typer.Option("--workers", rich_help_panel="Model and data",
                                         help="DataLoader worker processes.")
                       ] = 0,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    seed: SeedOpt = 0,
    allow_base_mismatch: AllowOtherBaseOpt = False,
    tensorboard: TensorboardOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    log_every: LogEveryOpt = 30.0,
) -> None:
    """Learn one coefficient per task vector per block (aTLAS) and write a coefficient file.

    The file can be given to `merge --coefs` and `eval`.
    """
    configure_progress(quiet, log_every)
    from tvtool.atlas.learner import LearnerConfig
    from tvtool.data import with_suite
    from tvtool.workflows.learn_coeffs import LearnCoeffsConfig
    from tvtool.workflows.learn_coeffs import learn_coeffs as run

    to_stdout = "-" in (output, merged_out, path_out)
    if as_json and to_stdout:
        raise UsageError("--json prints a document on stdout, which already carries the "
                         "safetensors bytes of an output '-'", hint="write to files with --json")
    learner = LearnerConfig(
        objective=objective, protocol=protocol, steps=steps, epochs=epochs, lr=lr,
        weight_decay=weight_decay, batch_size=batch_size, eval_every=eval_every,
        patience=patience, negation_weight=negation_weight, negation_loss=negation_loss,
        control_threshold=control_threshold, ufm_threshold=ufm_threshold,
        ufm_reading=ufm_reading, init=init, grad_clip=grad_clip, augment=augment,
        schedule=schedule, precision=precision, seed=seed, workers=workers)
    config = LearnCoeffsConfig(
        vectors=tuple(vectors), base=base, output=output,
        datasets=tuple(with_suite(dataset or (), suite)),
        control=tuple(control or ()), learner=learner, granularity=granularity,
        shots=None if all_examples else shots, split=split, val_fraction=val_fraction,
        partition_seed=partition_seed, vector_dtype=vector_dtype, device=device,
        data_root=data_root, merged_out=merged_out, allow_base_mismatch=allow_base_mismatch,
        audit_split=audit_split, eval_limit=eval_limit, path_out=path_out)
    if download:
        download_datasets([*config.datasets, *config.control], data_root)
    result = run(config, log=log, progress=progress_bar, tensorboard=tensorboard)
    if as_json:
        emit_json(result.as_json(), outputs=[result.output, result.merged_output,
                                             result.metrics_log])
        return
    if to_stdout:
        return  # stdout holds the safetensors bytes; a path would corrupt the stream
    emit_path(result.output)
    if result.merged_output:
        emit_path(result.merged_output)
    if result.path_output:
        emit_path(result.path_output)
