"""``tvtool demo``: the embedded end-to-end run and its report."""

from __future__ import annotations

from typing import Annotated

import typer

from tvtool.cli.common import (
    DeviceOpt,
    JsonOpt,
    LogEveryOpt,
    QuietOpt,
    SeedOpt,
    configure_progress,
    deprecated_alias,
    emit_json,
    emit_path,
    handles_errors,
    log,
    print_table,
    progress_bar,
    take_alias,
)


@handles_errors
def demo(
    ctx: typer.Context,
    output: Annotated[str, typer.Option(
        "--output", "-o", metavar="DIR", help="Directory for the report, figures and cached "
        "artefacts (re-runs reuse them).")] = "tvtool-demo",
    out: Annotated[str | None, deprecated_alias("--out", "--output")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Short run: 3 tasks, modes full/attn/"
                                        "linear, small evaluation subsets (~3 min on 2 cores).")
                     ] = False,
    base: Annotated[str, typer.Option("--base", "-b", help="Model reference of the base.")
                    ] = "tvtool-small",
    steps: Annotated[int | None, typer.Option(
        "--steps", help="Fine-tuning steps per task (default: the budget of --quick or of the "
                        "full run, docs/demo.md).", show_default=False)
                     ] = None,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    log_every: LogEveryOpt = 30.0,
) -> None:
    """Fine-tune, extract, merge, learn aTLAS coefficients, negate and evaluate, offline.

    Writes report.md, report.json and PNG figures into --output; prints the report path (or
    the JSON report with --json) on stdout and a summary table on stderr.
    """
    configure_progress(quiet, log_every)
    from rich.table import Table

    from tvtool.cli.common import stderr
    from tvtool.demo import DemoConfig, run_demo
    from tvtool.demo.report import method_rows

    out = take_alias(ctx, "output", output, out)
    results = run_demo(DemoConfig(out=out, quick=quick, base=base, steps=steps, device=device,
                                  seed=seed), log=log, progress=progress_bar)
    table = Table(title="tvtool demo: test accuracy (%)")
    table.add_column("mode")
    table.add_column("method", no_wrap=True)
    for task in results["tasks"]:
        table.add_column(task.split(":")[-1], justify="right")
    table.add_column("avg", justify="right")
    for mode, method, accs, avg in method_rows(results):
        table.add_row(mode, method, *[f"{100 * accs[t]:.1f}" for t in results["tasks"]],
                      f"{100 * avg:.1f}")
    print_table(table)
    for claim in results["claims"]:
        mark = "[green]held[/]" if claim["held"] else "[red]did not hold[/]"
        if claim.get("within_noise"):
            mark += " [yellow](within noise)[/]"
        stderr.print(f"{mark}: {claim['claim']} ({claim['evidence']})")
    if as_json:
        emit_json(results)
    else:
        emit_path(f"{out}/report.md")
