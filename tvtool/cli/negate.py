"""``tvtool negate``: flip (and scale) a task vector to forget a task."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from tvtool.cli.common import (
    DeviceOpt,
    DownloadOpt,
    JsonOpt,
    LogEveryOpt,
    OutputOpt,
    PrecisionOpt,
    QuietOpt,
    SeedOpt,
    SuiteOpt,
    WorkersOpt,
    configure_progress,
    deprecated_alias,
    download_datasets,
    emit_json,
    emit_path,
    handles_errors,
    log,
    percent,
    print_table,
    progress_bar,
    refuse_json_with_stdout,
    take_alias,
)
from tvtool.errors import UsageError

if TYPE_CHECKING:
    from tvtool.evaluate import EvalSettings


@handles_errors
def negate(
    ctx: typer.Context,
    vector: Annotated[str, typer.Argument(help="Task vector (.safetensors) or -.")],
    output: OutputOpt,
    coef: Annotated[float, typer.Option("--coef", "-a", help="Scale of the negated vector.")
                    ] = 1.0,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    log_every: LogEveryOpt = 30.0,
    search: Annotated[bool, typer.Option(
        "--search", help="Choose COEF on validation splits: lowest target accuracy while "
                         "every control accuracy stays >= --control-threshold x the base's "
                         "(docs/merge.md).")
    ] = False,
    base: Annotated[str | None, typer.Option("--base", "-b", envvar="TVTOOL_BASE",
                                             help="Search: model reference of the base.",
                                             show_default=False)] = None,
    control: Annotated[list[str] | None, typer.Option(
        "--control", help="Search: dataset to keep (repeatable).", show_default=False)] = None,
    suite: SuiteOpt = None,
    target: Annotated[str | None, typer.Option(
        "--target", help="Search: dataset to forget (default: the vector's recorded dataset).",
        show_default=False)] = None,
    control_threshold: Annotated[float, typer.Option(
        "--control-threshold",
        help="Search: fraction of the base's accuracy to keep on every control dataset.")
    ] = 0.95,
    threshold: Annotated[float | None, deprecated_alias("--threshold", "--control-threshold")
                         ] = None,
    coef_grid: Annotated[str, typer.Option(
        "--coef-grid", help="Search: START:STOP:STEP, a,b,c, or auto (the default grid, "
                            "extended past an end where the best α sits).")] = "0.05:1:0.05",
    data_root: Annotated[str | None, typer.Option(
        "--data-root", envvar="TVTOOL_DATA_ROOT", help="Search: root of standard datasets.",
        show_default=False)] = None,
    download: DownloadOpt = False,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Search: batch size.")] = 128,
    limit: Annotated[int | None, typer.Option(
        "--limit", help="Search: evaluate a seeded subset of N examples per split.",
        show_default=False)] = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    seed: SeedOpt = 0,
    workers: WorkersOpt = 0,
) -> None:
    """Write -COEF x VECTOR (streamed tensor by tensor)."""
    configure_progress(quiet, log_every)
    control_threshold = take_alias(ctx, "control_threshold", control_threshold, threshold)
    if download and not search:
        raise UsageError("--download goes with --search (only the search reads datasets)")
    if suite is not None and not search:
        raise UsageError("--suite goes with --search (its datasets are the search's controls)")
    if search:
        from tvtool.evaluate import EvalSettings

        settings = EvalSettings(base=base or "", data_root=data_root, batch_size=batch_size,
                                device=device, precision=precision, limit=limit, seed=seed,
                                workers=workers)
        _search(vector, output, settings, control or [], target, control_threshold, coef_grid,
                as_json, download=download, suite=suite)
        return
    from tvtool.commands.negate import NegateConfig
    from tvtool.commands.negate import negate as run_negate

    refuse_json_with_stdout(as_json, output)
    result = run_negate(NegateConfig(vector=vector, output=output, coef=coef), log=log)
    emit_json(result.as_json(), outputs=[result.output]) if as_json \
        else emit_path(result.output)


def _search(vector: str, output: str, settings: EvalSettings, control: list[str],
            target: str | None, threshold: float, grid_text: str, as_json: bool, *,
            download: bool = False, suite: str | None = None) -> None:
    """``tvtool negate --search``: choose α on validation splits, write ``-α · vector``."""
    from rich.table import Table

    from tvtool.grid import AUTO, AutoGrid, parse_grid
    from tvtool.workflows.evaluator import recorded_dataset
    from tvtool.workflows.negation import DEFAULT_NEGATION_GRID_TEXT, search_negate

    if not settings.base:
        raise UsageError("--search needs --base (the model the vector was made from)")
    if not control and suite is None:
        raise UsageError("--search needs --control DATASET (the task whose accuracy to keep) "
                         "or --suite 8|14|20")
    refuse_json_with_stdout(as_json, output)
    grid: Any = parse_grid(grid_text) if grid_text.strip().lower() != AUTO else \
        AutoGrid(parse_grid(DEFAULT_NEGATION_GRID_TEXT), floor=0.0, strict_floor=True)
    if download:
        from tvtool.data import suite_datasets

        download_datasets([*control, *(suite_datasets(suite) if suite else ()),
                           target or recorded_dataset(vector)], settings.data_root)
    report = search_negate(vector, output, settings, grid, control=control, target=target,
                           threshold=threshold, log=log, progress=progress_bar, suite=suite)
    document = report.as_json()
    table = Table(title=f"negation: α = {document['best_coef']:g} (chosen on val: lowest "
                        f"target accuracy with every control >= {threshold:.0%} of the base's)")
    columns = ["model", "split", f"target {report.target} %",
               *[f"control {name} %" for name in report.controls]]
    for column in columns:
        table.add_column(column, justify="left" if column in ("model", "split") else "right")
    search = report.search
    table.add_row("base", "val", percent(search.base_target),
                  *[percent(search.base_controls[name]) for name in report.controls])
    best = next(p for p in search.points if p.coef == search.best)
    table.add_row(f"-{best.coef:g} x vector", "val", percent(best.target),
                  *[percent(best.controls[name]) for name in report.controls])
    for name, accs in report.test.items():
        label = "base" if name == "base" else f"-{best.coef:g} x vector"
        table.add_row(label, "test", percent(accs[report.target]),
                      *[percent(accs[c]) for c in report.controls])
    print_table(table)
    emit_json(document, outputs=[output]) if as_json else emit_path(output)
