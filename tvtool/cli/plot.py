"""``tvtool plot``: draw a metrics log's curves (loss, learning rate, held-out score) as a PNG."""

from __future__ import annotations

from typing import Annotated

import typer

from tvtool.cli.common import (
    JsonOpt,
    OutputOpt,
    emit_json,
    emit_path,
    handles_errors,
    log,
    refuse_json_with_stdout,
)


@handles_errors
def plot(
    metrics: Annotated[str, typer.Argument(
        help="Metrics log (JSON lines) written by finetune or learn-coeffs.")],
    output: OutputOpt,
    metric: Annotated[list[str] | None, typer.Option(
        "--metric", metavar="NAME", help="Metric to draw (repeat; default: every numeric one).",
        show_default=False)] = None,
    title: Annotated[str | None, typer.Option(
        "--title", metavar="TEXT", help="Figure title (default: the log's file name).",
        show_default=False)] = None,
    log_y: Annotated[bool, typer.Option(
        "--log-y", help="Draw the loss on a log scale.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Draw the curves of a metrics log (one panel per metric, against the step) as a PNG.

    finetune writes NAME.metrics.jsonl beside its output; learn-coeffs too.
    """
    from tvtool.commands.plot import PlotConfig
    from tvtool.commands.plot import plot as run_plot

    refuse_json_with_stdout(as_json, output)
    result = run_plot(PlotConfig(metrics=metrics, output=output, keys=tuple(metric or ()),
                                 title=title, log_y=log_y))
    for note in result.notes:
        log(f"note: {note}")
    log(f"plotted {', '.join(result.series)} of {result.records} records")
    if as_json:
        emit_json(result.as_json())
    elif output != "-":
        emit_path(result.output)
