"""``tvtool pretrain``: (re)create an embedded base (tvtool-tiny, -small, -base) by pre-training.

A thin command over :mod:`tvtool.synthetic_world.pretrain`: contrastive pre-training on the
synthetic captioned corpus, on CPU, in minutes.
"""

from __future__ import annotations

from typing import Annotated

import typer

from tvtool.cli.common import (
    RESUME_NAMES,
    CheckpointEveryOpt,
    JsonOpt,
    LogEveryOpt,
    QuietOpt,
    WorkdirOpt,
    configure_progress,
    deprecated_alias,
    emit_json,
    emit_path,
    given,
    handles_errors,
    log,
    progress_bar,
    refuse_json_with_stdout,
    take_alias,
)
from tvtool.errors import UsageError

# The embedded models (tvtool.models.EMBEDDED_MODELS, which imports open_clip): named here so
# that `--help` stays fast; tests/test_cli_grammar.py checks the two lists agree.
EMBEDDED_NAMES = ("tvtool-tiny", "tvtool-small", "tvtool-base")


@handles_errors
def pretrain(
    ctx: typer.Context,
    output: Annotated[str | None, typer.Option(
        "--output", "-o", help="Output checkpoint, or - for stdout. Default: the cache copy of "
                               "the embedded weights (cache dir/MODEL.safetensors).",
        show_default=False)] = None,
    steps: Annotated[int | None, typer.Option(
        "--steps", help="Optimiser steps (default: the recipe of the embedded weights).",
        show_default=False)] = None,
    batch: Annotated[int | None, typer.Option(
        "--batch-size", help="Image-caption pairs per step (default: the recipe's).",
        show_default=False)] = None,
    old_batch: Annotated[int | None, deprecated_alias("--batch", "--batch-size")] = None,
    seed: Annotated[int, typer.Option("--seed", envvar="TVTOOL_SEED",
                                      help="Seed of the corpus stream.")] = 0,
    model: Annotated[str, typer.Option(
        "--model", metavar="[" + "|".join(EMBEDDED_NAMES) + "]",
        help="Embedded model to pre-train: tvtool-tiny (the tests' model), "
                        "tvtool-small (the demo's) or tvtool-base (docs/results.md's; its "
                        "weights are not packaged: this creates them, ~23 min on 2 cores).")
    ] = "tvtool-tiny",
    threads: Annotated[int | None, typer.Option(
        "--threads", min=1,
        help="CPU threads torch trains on (default: torch's, one per core). The weights "
             "depend on it: the same count, torch build and CPU give the same weights bit "
             "for bit; it is recorded in the output's provenance as torch_threads.",
        show_default=False)] = None,
    workdir: WorkdirOpt = None,
    resume: Annotated[str, typer.Option(
        "--resume", rich_help_panel="Resumable runs", metavar="[" + "|".join(RESUME_NAMES) + "]",
        help="With --workdir: auto continues a state of this run and starts when there is "
             "none (a state of another run is refused); yes requires one; no starts over, "
             "replacing it.")] = "auto",
    checkpoint_every: CheckpointEveryOpt = 250,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    log_every: LogEveryOpt = 30.0,
) -> None:
    """Pre-train an embedded CLIP on the synthetic corpus (CPU; tvtool-tiny about 26 min).

    Measured on 2 shared cores: tvtool-tiny 1582 s, tvtool-small 1650 s, tvtool-base 1373 s
    (docs/embedded-world.md). With --workdir the run saves its state every --checkpoint-every
    steps; the same command continues an interrupted run to the same weights.
    """
    configure_progress(quiet, log_every)
    import dataclasses
    import os
    import time

    import torch

    from tvtool.io import check_output, ensure_directory
    from tvtool.models import cache_dir, embedded_weights_path
    from tvtool.synthetic_world.pretrain import (
        PretrainCheckpoints,
        PretrainConfig,
        learning_rate_at,
        pretrain_tiny,
        write_pretrained,
    )
    from tvtool.threads import intra_op_threads

    batch = take_alias(ctx, "batch", batch, old_batch)
    refuse_json_with_stdout(as_json, output or "")
    defaults = PretrainConfig.recipe(model)
    config = dataclasses.replace(defaults, seed=seed,
                                 steps=defaults.steps if steps is None else steps,
                                 batch=defaults.batch if batch is None else batch)
    checkpoints = None
    if workdir is not None:
        checkpoints = PretrainCheckpoints(workdir, every=checkpoint_every, resume=resume)
    else:
        flags = [f"--{name.replace('_', '-')}" for name in ("resume", "checkpoint_every")
                 if given(ctx, name)]
        if flags:
            raise UsageError(f"{' and '.join(flags)} "
                             f"{'need' if len(flags) > 1 else 'needs'} --workdir")
    target = output
    if target is None:
        default = cache_dir() / f"{config.model}.safetensors"
        # The default destination is tvtool's own cache directory, which may not exist yet.
        ensure_directory(str(default.parent))
        target = str(default)
        packaged = embedded_weights_path(config.model)
        if packaged != default:
            log(f"note: the packaged weights at {packaged} take precedence over {target}; "
                f"pass -o {packaged} to replace them")
    check_output(target)
    if checkpoints is not None:
        ensure_directory(checkpoints.workdir)
        if resume == "no" and os.path.exists(checkpoints.path):
            log(f"note: --resume no: the training state in {checkpoints.path} is replaced at "
                "the first save")
    start = time.perf_counter()
    last = [float("nan")]
    started_at = [0]
    with progress_bar(f"pre-training {config.model}", config.steps) as advance:

        def started(step: int) -> None:
            started_at[0] = step
            if step:
                log(f"resuming from step {step} of {config.steps}")
                advance.resumed_at(step)  # rate and ETA from here

        def report(step: int, loss: float) -> None:
            last[0] = loss
            advance(1, loss=loss, lr=learning_rate_at(step, config), unit="step")

        with intra_op_threads(threads):
            trained_on = torch.get_num_threads()
            state = pretrain_tiny(config, progress=report, checkpoints=checkpoints,
                                  on_start=started, log=log)
    elapsed = time.perf_counter() - start
    write_pretrained(state, target, config, threads=trained_on)
    log(f"pre-trained {config.steps} steps in {elapsed:.1f}s, final loss {last[0]:.3f}")
    if as_json:
        emit_json({"output": target, "steps": config.steps, "batch": config.batch,
                   "seed": config.seed, "seconds": elapsed, "final_loss": last[0],
                   "resumed_from": started_at[0], "torch_threads": trained_on},
                  outputs=[target])
    else:
        emit_path(target)
