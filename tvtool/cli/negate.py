"""``tvtool negate``: flip (and scale) a task vector to forget a task."""

from __future__ import annotations

from typing import Annotated

import typer

from tvtool.cli.common import (
    DeviceOpt,
    DownloadOpt,
    JsonOpt,
    OutputOpt,
    PrecisionOpt,
    SeedOpt,
    emit_json,
    emit_path,
    handles_errors,
    log,
    refuse_json_with_stdout,
)
from tvtool.errors import UsageError


@handles_errors
def negate(
    vector: Annotated[str, typer.Argument(help="Task vector (.safetensors) or -.")],
    output: OutputOpt,
    coef: Annotated[float, typer.Option("--coef", "-a", help="Scale of the negated vector.")
                    ] = 1.0,
    as_json: JsonOpt = False,
    search: Annotated[bool, typer.Option(
        "--search", help="Choose COEF on validation splits: lowest target accuracy while "
                         "control accuracy stays >= --threshold x the base's (docs/merge.md).")
    ] = False,
    base: Annotated[str | None, typer.Option("--base", "-b", envvar="TVTOOL_BASE",
                                             help="Search: model reference of the base.",
                                             show_default=False)] = None,
    control: Annotated[str | None, typer.Option("--control", help="Search: dataset to keep.",
                                                show_default=False)] = None,
    target: Annotated[str | None, typer.Option(
        "--target", help="Search: dataset to forget (default: the vector's recorded dataset).",
        show_default=False)] = None,
    threshold: Annotated[float, typer.Option(
        "--threshold", help="Search: fraction of the base's control accuracy to keep.")] = 0.95,
    coef_grid: Annotated[str, typer.Option("--coef-grid", help="Search: START:STOP:STEP or "
                                                               "a,b,c.")] = "0.05:1:0.05",
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
) -> None:
    """Write -COEF x VECTOR (streamed tensor by tensor)."""
    if download and not search:
        raise UsageError("--download goes with --search (only the search reads datasets)")
    if search:
        from tvtool.cli.merge import negate_search
        from tvtool.merge.evaluation import EvalSettings

        settings = EvalSettings(base=base or "", data_root=data_root, batch_size=batch_size,
                                device=device, precision=precision, limit=limit, seed=seed)
        negate_search(vector, output, settings, control, target, threshold, coef_grid, as_json,
                      download=download)
        return
    from tvtool.commands.negate import NegateConfig
    from tvtool.commands.negate import negate as run_negate

    refuse_json_with_stdout(as_json, output)
    result = run_negate(NegateConfig(vector=vector, output=output, coef=coef),
                               log=log)
    emit_json(result.as_json()) if as_json else emit_path(result.output)
