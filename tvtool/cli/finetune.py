"""``tvtool finetune``: fine-tune a base model's image encoder and write the task vector.

A thin command over :func:`tvtool.finetune.finetune`. Under ``torchrun`` every process runs
it; process 0 prints and writes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import fields
from typing import Annotated, Any

import typer

from tvtool.cli.common import (
    DECLARED_OPTIONS,
    RESUME_NAMES,
    BaseOpt,
    CheckpointEveryOpt,
    DataRootOpt,
    DeclaredOption,
    DeclaredOptionsCommand,
    DeviceOpt,
    DownloadOpt,
    JsonOpt,
    LogEveryOpt,
    OutputOpt,
    PrecisionOpt,
    QuietOpt,
    SeedOpt,
    TensorboardOpt,
    WorkdirOpt,
    configure_progress,
    download_datasets,
    emit_json,
    emit_path,
    handles_errors,
    listed_or,
    log,
    reporter,
)
from tvtool.errors import UsageError


@contextmanager
def _training_progress(total: int | None) -> Iterator[tuple[Callable[[Any], None],
                                                            Callable[[int], None]]]:
    """Progress of the run on stderr (:func:`tvtool.cli.common.reporter`).

    Yields:
        ``(report, step_done)``: ``report`` takes the loop's :class:`StepLog` (loss, accuracy,
        lr, images/s), ``step_done`` the number of steps done after every step.
    """
    with reporter().task("fine-tuning", total, unit="step") as task:
        first = [True]

        def step_done(done: int) -> None:
            if first[0] and done > 1:
                task.resumed_at(done - 1)  # a resumed run: rate and ETA from here
            first[0] = False
            task.update(completed=done)

        def report(entry: Any) -> None:
            task.update(completed=entry.step, total=entry.total, loss=entry.loss,
                        acc=entry.accuracy, lr=entry.lr,
                        **{"img/s": entry.images_per_s})

        yield report, step_done


def _mode_options() -> list[DeclaredOption]:
    """The flags every fine-tuning mode declares (``cli_options`` of its mode object).

    Type and default come from the field of the mode's options dataclass; a tuple default
    is written as the comma-separated string the flag takes. Modes sharing options (the
    LoRA modes) share the flags.
    """
    from tvtool.finetune import MODES

    declared: dict[str, DeclaredOption] = {}
    for mode in MODES.values():
        defaults = {f.name: f.default for f in fields(mode.options)}
        for option in mode.cli_options:
            default = defaults[option.field]
            if isinstance(default, tuple):
                default = ",".join(default)
            declared.setdefault(option.flag, DeclaredOption(
                name=option.field, type=type(default), default=default, flag=option.flag,
                help=option.help, metavar=option.metavar, panel=option.panel))
    return list(declared.values())


def _mode_help() -> dict[str, str]:
    """Help of ``--mode`` and ``--checkpoint-out``, from the mode registry.

    A new mode (its file plus its line in ``tvtool/finetune/registry.py``) shows up here
    without editing this module.
    """
    from tvtool.finetune import MODES

    listed = [f"{m.name.value} ({m.label})" if m.label else m.name.value
              for m in MODES.values()]
    # config.FinetuneConfig refuses --checkpoint-out for linearized modes: their fine-tuned
    # model is not a set of weights.
    weights = [m.name.value for m in MODES.values() if not m.linearized]
    return {"mode": f"{listed_or(listed)}.",
            "checkpoint_out": "Also write the fine-tuned model as a checkpoint "
                              f"({', '.join(weights)})."}


def _mode_metavar() -> dict[str, str]:
    """Metavar of ``--mode``: the registered names, ``[full|attn|...]``."""
    from tvtool.finetune import MODES

    return {"mode": "[" + "|".join(m.value for m in MODES) + "]"}


def bare_resume(args: list[str]) -> list[str]:
    """``--resume`` without a value (its spelling before ``auto|yes|no``) means ``yes``.

    A bare ``--resume`` is one at the end or followed by another option; ``finetune`` takes no
    positional argument, so nothing else can follow it.
    """
    out: list[str] = []
    for index, arg in enumerate(args):
        if arg == "--":
            return out + args[index:]
        out.append(arg)
        if arg == "--resume" and (index + 1 == len(args) or args[index + 1].startswith("-")):
            out.append("yes")
    return out


class FinetuneCommand(DeclaredOptionsCommand):
    """``tvtool finetune`` with the flags and ``--mode`` help of the fine-tuning modes."""

    declare = _mode_options
    describe = _mode_help
    metavars = _mode_metavar

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        return super().parse_args(ctx, bare_resume(list(args)))  # type: ignore[no-any-return]


@handles_errors
def finetune(
    ctx: typer.Context,
    base: BaseOpt,
    dataset: Annotated[str, typer.Option(
        "--dataset", "-d", rich_help_panel="Model and data",
        help="Training dataset (synthetic:TASK, imagefolder:PATH, or a "
             "standard name).")],
    output: OutputOpt,
    # The help and metavar of --mode and the help of --checkpoint-out list the registered
    # modes (FinetuneCommand fills them in when the command parses or shows its help).
    mode: Annotated[str, typer.Option(
        "--mode", rich_help_panel="Model and data", metavar="MODE",
        help="Fine-tuning mode.")] = "full",
    checkpoint_out: Annotated[str | None, typer.Option(
        "--checkpoint-out", rich_help_panel="Output",
        help="Also write the fine-tuned model as a checkpoint.",
        show_default=False)] = None,
    steps: Annotated[int | None, typer.Option(
        "--steps", rich_help_panel="Optimisation",
        help="Optimizer steps (default 2000 unless --epochs).",
        show_default=False)] = None,
    epochs: Annotated[float | None, typer.Option(
        "--epochs", rich_help_panel="Optimisation",
        help="Passes over the training split, instead of --steps.",
        show_default=False)] = None,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", rich_help_panel="Optimisation",
        help="Global batch per optimizer step (all GPUs and micro-steps).")
    ] = 128,
    grad_accum: Annotated[int, typer.Option(
        "--grad-accum", rich_help_panel="Optimisation",
        help="Micro-steps per optimizer step.")] = 1,
    lr: Annotated[float, typer.Option("--lr", rich_help_panel="Optimisation",
                                      help="Peak learning rate (AdamW).")] = 1e-5,
    weight_decay: Annotated[float, typer.Option(
        "--weight-decay", rich_help_panel="Optimisation",
        help="AdamW weight decay on the weights θ.")] = 0.1,
    warmup_steps: Annotated[int | None, typer.Option(
        "--warmup-steps", rich_help_panel="Optimisation",
        help="Linear warm-up before cosine decay (default 500, at most a "
             "quarter of the run).", show_default=False)] = None,
    grad_clip: Annotated[float, typer.Option(
        "--grad-clip", rich_help_panel="Optimisation",
        help="Gradient-norm clip (0 disables).")] = 1.0,
    precision: PrecisionOpt = "auto",
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    workdir: WorkdirOpt = None,
    resume: Annotated[str, typer.Option(
        "--resume", rich_help_panel="Resumable runs", metavar="[" + "|".join(RESUME_NAMES) + "]",
        help="With --workdir: auto continues a state of this run and starts when there is "
             "none (a state of another run is refused); yes (or a bare --resume) requires "
             "one; no starts over, replacing it.")] = "auto",
    checkpoint_every: CheckpointEveryOpt = 500,
    data_root: DataRootOpt = None,
    download: DownloadOpt = False,
    workers: Annotated[int | None, typer.Option(
        "--workers", rich_help_panel="Model and data",
        help="DataLoader worker processes (default 4 on CUDA, 0 on CPU).",
        show_default=False)] = None,
    tensorboard: TensorboardOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    log_every: LogEveryOpt = 30.0,
) -> None:
    """Fine-tune the image encoder of BASE on DATASET and write the task vector.

    Defaults follow the reference recipe: AdamW lr 1e-5, weight decay 0.1,
    batch 128, cosine schedule with warm-up, gradient clip 1, frozen head.

    Several GPUs or nodes: torchrun --nproc_per_node N -m tvtool finetune ...
    """
    configure_progress(quiet, log_every)
    # The modes' own flags (--lora-*) are declared by the modes (FinetuneCommand) and
    # arrive in ctx.meta.
    from tvtool.finetune import FinetuneConfig, get_mode
    from tvtool.finetune import finetune as run

    if as_json and (output == "-" or checkpoint_out == "-"):
        raise UsageError("--json and an output to stdout (-) would both write to stdout")
    config = FinetuneConfig.from_values(dict(
        base=base, dataset=dataset, output=output, mode=get_mode(mode).name,
        checkpoint_out=checkpoint_out,
        steps=steps, epochs=epochs, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
        weight_decay=weight_decay, warmup_steps=warmup_steps, grad_clip=grad_clip,
        precision=precision, device=device, seed=seed, workdir=workdir, resume=resume,
        checkpoint_every=checkpoint_every, data_root=data_root, workers=workers,
        **ctx.meta.get(DECLARED_OPTIONS, {})))
    if download:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UsageError("--download under torchrun would race between processes",
                             hint="download first: tvtool eval ... --download, or run once "
                                  "without torchrun")
        download_datasets([dataset], data_root)
    with _training_progress(steps) as (progress, step_done):
        result = run(config, progress=progress, after_step=step_done, log=log,
                     tensorboard=tensorboard)
    if os.environ.get("RANK", "0") != "0":
        return
    log(f"{result.mode} fine-tuning: {result.steps} steps in {result.seconds:.1f}s "
        f"({result.images_per_s:.0f} img/s), final loss {result.final_loss:.4f}"
        + (f"; metrics log {result.metrics_log}" if result.metrics_log else ""))
    if as_json:
        # A failed report removes the outputs; the metrics log of a workdir (-o -) stays.
        emit_json(result.as_json(), outputs=[
            result.output, result.checkpoint_out,
            result.metrics_log if result.output != "-" else None])
    else:
        emit_path(result.output)
