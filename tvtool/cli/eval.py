"""``tvtool eval``: accuracy of a base plus task vectors; ``tvtool eval disentanglement``.

``eval`` is both a command (``tvtool eval --base B TV ... --dataset D``) and a group holding
``disentanglement``. A click group normally reads its first positional argument as the
subcommand name and stops parsing its own options there; :class:`_EvalGroup` routes to a
subcommand only when the first argument names one, and otherwise parses everything (options
and vectors in any order) as the plain command.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from tvtool.cli.common import (
    DeviceOpt,
    DownloadOpt,
    JsonOpt,
    LogEveryOpt,
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
    given,
    handles_errors,
    log,
    percent,
    print_table,
    progress_bar,
    refuse_json_with_stdout,
    stderr,
    take_alias,
)
from tvtool.errors import UsageError


class _EvalGroup(TyperGroup):
    """A group that is also a command: subcommands by name, otherwise the group's own options."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if not args or args[0] not in self.commands:
            if not args:
                return super().parse_args(ctx, args)  # no_args_is_help
            ctx.allow_interspersed_args = True
            # Plain command parsing (TyperGroup's base), so positionals are vectors, not names.
            return super(TyperGroup, self).parse_args(ctx, args)  # type: ignore[no-any-return]
        # A subcommand: the group's own parameters take their defaults, the rest is routed on.
        no_args_is_help, self.no_args_is_help = self.no_args_is_help, False
        try:
            super(TyperGroup, self).parse_args(ctx, [])
        finally:
            self.no_args_is_help = no_args_is_help
        ctx._protected_args, ctx.args = args[:1], args[1:]
        return list(ctx.args)

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)
        if ctx.command is not self:
            # A subcommand's usage line lists its parents' positionals; VECTOR is not one of
            # the subcommand's.
            return [p for p in params if p.param_type_name != "argument"]
        return params  # type: ignore[no-any-return]

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return ["[OPTIONS] [VECTOR]...  |  tvtool eval disentanglement [OPTIONS] TV1 TV2"]


eval_app = typer.Typer(cls=_EvalGroup, no_args_is_help=True, invoke_without_command=True)

VectorsArg = Annotated[list[str] | None, typer.Argument(
    help="Task vectors (.safetensors) added to the base; - = stdin. None: the base itself.",
    show_default=False)]
BaseOpt = Annotated[str | None, typer.Option(
    "--base", "-b", envvar="TVTOOL_BASE", help="Model reference of the pre-trained base.",
    show_default=False)]
DatasetOpt = Annotated[list[str] | None, typer.Option(
    "--dataset", "-d", help="Dataset (synthetic:TASK, imagefolder:PATH, or a standard name); "
                            "repeatable.", show_default=False)]
SplitOpt = Annotated[str, typer.Option("--split", metavar="[val|test]", help="val or test.")]
DataRootOpt = Annotated[str | None, typer.Option(
    "--data-root", envvar="TVTOOL_DATA_ROOT", help="Root directory of the standard datasets.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")]
LimitOpt = Annotated[int | None, typer.Option(
    "--limit", help="Evaluate a seeded random subset of N examples per dataset.")]
NoCacheOpt = Annotated[bool, typer.Option(
    "--no-head-cache", help="Neither read nor write zero-shot heads in the cache directory.")]
AllowOtherBaseOpt = Annotated[bool, typer.Option(
    "--allow-base-mismatch",
    help="Use vectors (and head files) made from another base (unsafe).")]
ApproxOpt = Annotated[bool, typer.Option(
    "--approximate-linearized",
    help="Add linearized vectors to the weights instead of evaluating their linearized model.")]


@eval_app.callback()
@handles_errors
def eval_command(
    ctx: typer.Context,
    vectors: VectorsArg = None,
    base: BaseOpt = None,
    # A tuple default: typer shows it ([default: 1.0]) and passes a list.
    coef: Annotated[list[float], typer.Option(
        "--coef", "-a", help="Coefficient: once for all vectors, or once per vector.")
    ] = (1.0,),  # type: ignore[assignment]
    coefs: Annotated[str | None, typer.Option(
        "--coefs", help="Coefficient file of `learn-coeffs` (aTLAS): per-block coefficients "
                        "of the VECTORs, in its row order; replaces --coef.",
        show_default=False)] = None,
    dataset: DatasetOpt = None,
    suite: SuiteOpt = None,
    split: SplitOpt = "test",
    data_root: DataRootOpt = None,
    download: DownloadOpt = False,
    batch_size: BatchOpt = 128,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    limit: LimitOpt = None,
    seed: SeedOpt = 0,
    workers: WorkersOpt = 0,
    reference: Annotated[list[str] | None, typer.Option(
        "--reference", "-r", help="Eval JSON of the fine-tuned models (or {dataset: acc}); "
                                  "adds normalized accuracy. Repeatable.",
        show_default=False)] = None,
    head: Annotated[list[str] | None, typer.Option(
        "--head", help="Head file (kind head) to use instead of the zero-shot head; one per "
                       "--dataset, in order.", show_default=False)] = None,
    allow_base_mismatch: AllowOtherBaseOpt = False,
    approximate_linearized: ApproxOpt = False,
    no_head_cache: NoCacheOpt = False,
    output: Annotated[str | None, typer.Option(
        "--output", "-o", help="Also write the JSON report to this file.",
        show_default=False)] = None,
    out: Annotated[str | None, deprecated_alias("--out", "--output")] = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    log_every: LogEveryOpt = 30.0,
) -> None:
    """Top-1 accuracy of BASE + sum(COEF_i x VECTOR_i) on each --dataset.

    Table on stderr; stdout gets the JSON report with --json, else the --output path, else
    nothing.

    Linearized vectors are evaluated as their linearized model f(x;θ0) + J·Σ a_i τ_i.
    """
    configure_progress(quiet, log_every)
    if ctx.invoked_subcommand is not None:
        return
    from tvtool.data import with_suite
    out = take_alias(ctx, "output", output, out)
    from tvtool.evaluate import EvalConfig, EvalSettings, evaluate
    from tvtool.io import write_json

    if base is None:
        raise UsageError("missing option --base", hint="e.g. --base tvtool-tiny")
    weights = None
    if coefs is not None:
        from tvtool.atlas import read_coefficients

        if given(ctx, "coef"):
            raise UsageError("--coef and --coefs are exclusive")
        weights = read_coefficients(coefs).weight_builder()
    settings = EvalSettings(
        base=base, data_root=data_root, batch_size=batch_size, device=device,
        precision=precision, limit=limit, seed=seed, workers=workers,
        allow_base_mismatch=allow_base_mismatch, cache_heads=not no_head_cache)
    config = EvalConfig(
        settings, datasets=tuple(with_suite(dataset or (), suite)), vectors=tuple(vectors or ()),
        coefs=tuple(coef or [1.0]), split=split, references=tuple(reference or ()),
        heads=tuple(head or ()), approximate_linearized=approximate_linearized,
        weights=weights)
    if out is not None:
        _check_out(out, config)
    if download:
        download_datasets(config.datasets, data_root)
    report = evaluate(config, log=log, progress=progress_bar)
    document = report.as_json()
    print_table(_table(document))
    if out is not None:
        write_json(out, document, inputs=_inputs(config))
    if as_json:
        emit_json(document, outputs=[out])
    elif out is not None:
        emit_path(out)


def _inputs(config: Any) -> list[str]:
    return [*config.vectors, *config.references, *config.heads]



def _check_out(out: str, config: Any) -> None:
    """Refuse a bad -o/--output before the (possibly long) evaluation starts."""
    from tvtool.io import check_output

    if out == "-":
        raise UsageError("-o - would mix the report with other output on stdout",
                         hint="use --json to print the report on stdout")
    check_output(out, _inputs(config))


def _table(document: dict[str, Any]) -> Any:
    from rich.table import Table

    model = document["model"]
    vectors = model["vectors"]
    title = model["base"] if not vectors else f"{model['base']} + " + " + ".join(
        f"{v['coef']:g}×{v['dataset'] or v['path']}" if v["coef"] is not None
        else str(v["dataset"] or v["path"]) for v in vectors)
    if model["evaluated_as"] == "linearized":
        title += " (linearized)"
    has_ref = any(r["reference_accuracy"] is not None for r in document["results"])
    table = Table(title=title)
    table.add_column("dataset")
    table.add_column("split")
    table.add_column("examples", justify="right")
    table.add_column("accuracy %", justify="right")
    if has_ref:
        table.add_column("fine-tuned %", justify="right")
        table.add_column("normalized %", justify="right")
    for row in document["results"]:
        cells = [row["dataset"], row["split"], str(row["total"]), percent(row["accuracy"])]
        if has_ref:
            cells += [percent(row["reference_accuracy"]), percent(row["normalized_accuracy"])]
        table.add_row(*cells)
    if len(document["results"]) > 1:
        average = document["average"]
        cells = ["average", "", "", percent(average["accuracy"])]
        if has_ref:
            cells += ["", percent(average["normalized_accuracy"])]
        table.add_row(*cells, style="bold")
    return table


@eval_app.command("disentanglement")
@handles_errors
def disentanglement_command(
    ctx: typer.Context,
    vectors: Annotated[list[str], typer.Argument(help="The two task vectors TV1 TV2.",
                                                 metavar="TV1 TV2")],
    base: Annotated[str, typer.Option("--base", "-b", envvar="TVTOOL_BASE",
                                      help="Model reference of the pre-trained base.")],
    dataset: Annotated[list[str], typer.Option(
        "--dataset", "-d", help="Dataset of TV1, then dataset of TV2.")],
    grid: Annotated[str, typer.Option(
        "--coef-grid", help="Coefficients for both axes: START:STOP:STEP or a,b,c.")
    ] = "-3:3:0.5",
    old_grid: Annotated[str | None, deprecated_alias("--grid", "--coef-grid")] = None,
    output: Annotated[str | None, typer.Option(
        "--output", "-o", help="Write the error map (JSON) here; default: stdout.",
        show_default=False)] = None,
    png: Annotated[str | None, typer.Option(
        "--png", help="Also write a heatmap PNG.", show_default=False)] = None,
    split: SplitOpt = "test",
    data_root: DataRootOpt = None,
    download: DownloadOpt = False,
    batch_size: BatchOpt = 128,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    limit: LimitOpt = None,
    seed: SeedOpt = 0,
    workers: WorkersOpt = 0,
    allow_base_mismatch: AllowOtherBaseOpt = False,
    approximate_linearized: ApproxOpt = False,
    no_head_cache: NoCacheOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    log_every: LogEveryOpt = 30.0,
) -> None:
    """Weight-disentanglement error xi(a1, a2) of two task vectors over a coefficient grid.

    xi(a1, a2) = sum over t of the fraction of D_t whose prediction by
    BASE + a1 TV1 + a2 TV2 differs from that of BASE + a_t TV_t (Ortiz-Jimenez et al. 2023).
    """
    configure_progress(quiet, log_every)
    from tvtool.evaluate import (
        GRID_LIMITS,
        DisentanglementConfig,
        EvalSettings,
        disentanglement,
        render_heatmap,
    )
    from tvtool.evaluate.disentanglement import summarize
    from tvtool.grid import parse_grid
    from tvtool.io import check_output, write_bytes, write_json

    grid = take_alias(ctx, "grid", grid, old_grid)
    if len(vectors) != 2 or len(dataset) != 2:
        raise UsageError(f"got {len(vectors)} vectors and {len(dataset)} datasets; "
                         "disentanglement takes exactly two of each",
                         hint="TV1 TV2 --dataset D1 --dataset D2")
    settings = EvalSettings(
        base=base, data_root=data_root, batch_size=batch_size, device=device,
        precision=precision, limit=limit, seed=seed, workers=workers,
        allow_base_mismatch=allow_base_mismatch, cache_heads=not no_head_cache)
    config = DisentanglementConfig(
        settings, vectors=(vectors[0], vectors[1]), datasets=(dataset[0], dataset[1]),
        alphas=parse_grid(grid, **GRID_LIMITS), split=split,
        approximate_linearized=approximate_linearized)
    for path in (output, png):
        if path is not None:
            check_output(path, list(vectors))
    if output is not None and png is not None and output == png:
        raise UsageError("--output and --png name the same file")
    refuse_json_with_stdout(as_json, output or "")
    if png == "-" and (output is None or output == "-" or as_json):
        raise UsageError("--png - would mix the PNG with the JSON on stdout",
                         hint="write the PNG to a file")
    if download:
        download_datasets(config.datasets, data_root)
    report = disentanglement(config, log=log, progress=progress_bar)
    document = report.as_json()
    for key, value in summarize(report).items():
        stderr.print(f"{key.replace('_', ' ')}: {value:.4f}")
    if png is not None:
        write_bytes(png, render_heatmap(report), inputs=list(vectors))
    if output is None or output == "-":
        emit_json(document, outputs=[png])
        return
    write_json(output, document, inputs=list(vectors))
    emit_json(document, outputs=[output, png]) if as_json else emit_path(output)
