"""``tvtool merge``: combine task vectors with a registered method (docs/merge.md)."""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any

import typer

from tvtool.cli.common import (
    DeclaredOptionsCommand,
    DeviceOpt,
    DownloadOpt,
    JsonOpt,
    LogEveryOpt,
    PrecisionOpt,
    QuietOpt,
    WorkersOpt,
    configure_progress,
    download_datasets,
    emit_json,
    emit_path,
    given,
    handles_errors,
    listed_or,
    log,
    percent,
    print_table,
    progress_bar,
    refuse_json_with_stdout,
)
from tvtool.errors import UsageError


def _method_help() -> dict[str, str]:
    """Help of ``--method``, ``--param``, ``--density``, ``--trim``, ``--coef-grid``, declared.

    The names are the registry's, and the shortcut flags name the methods whose params
    dataclass has that field, so a new method shows up without editing this module.
    """
    from tvtool.merge.registry import METHODS

    names = list(METHODS)

    def having(name: str) -> str:
        return "/".join(m.name for m in METHODS.values()
                        if name in {f.name for f in fields(m.params)})

    grids = ", ".join(f"{m.name} {m.search_grid(m.make_params())}" for m in METHODS.values())

    def defaults(method: Any) -> str:
        params = method.make_params()
        return ", ".join(f"{f.name}={_shown(getattr(params, f.name))}" for f in fields(params))

    declared = "; ".join(f"{m.name}: {defaults(m)}" for m in METHODS.values()
                         if fields(m.params))
    return {"method": f"{listed_or(names)} (docs/merge.md).",
            "param": "Method parameter KEY=VALUE (repeatable), value parsed as YAML. Each "
                     f"method's parameters and defaults: {declared}.",
            "coef_grid": "Search grid: START:STOP:STEP (inclusive), a,b,c, or auto (the "
                         "default grid, extended past an end where the best coefficient sits). "
                         f"Default: the method's own, for its default parameters: {grids} (a "
                         "parameter may change it: docs/merge.md).",
            "density": f"{having('density')}: fraction of entries kept.",
            "trim": f"{having('trim')}: global (whole vector) or tensor (per tensor)."}


def _method_metavar() -> dict[str, str]:
    """Metavar of ``--method``: the registered names, ``[task_arithmetic|mean|...]``."""
    from tvtool.merge.registry import METHODS

    return {"method": "[" + "|".join(METHODS) + "]"}


def _shown(value: Any) -> str:
    """A parameter default as it is written on the command line (YAML scalar)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class MergeCommand(DeclaredOptionsCommand):
    """``tvtool merge`` with the help of its method flags taken from the method registry."""

    describe = _method_help
    metavars = _method_metavar


# Parameters that define the merge itself: with --config they must come from the file.
_DEFINING = ("vectors", "method", "coef", "coefs", "density", "trim", "param", "seed",
             "missing_as_zero", "common_only", "allow_base_mismatch", "mixed_modes_as",
             "dtype")
# tvtool.merge.config.DTYPES, without importing torch for `tvtool --help` (checked equal by
# tests/test_cli_grammar.py).
_DTYPES = ("float32", "float16", "bfloat16", "float64")


@handles_errors
def merge(
    ctx: typer.Context,
    vectors: Annotated[list[str] | None, typer.Argument(
        help="Task vectors (.safetensors); - = stdin (once).", show_default=False)] = None,
    output: Annotated[str | None, typer.Option(
        "--output", "-o", help="Output file, or - for stdout.", show_default=False)] = None,
    method: Annotated[str, typer.Option(
        "--method", "-m", help="(from the method registry, see MergeCommand)")
    ] = "task_arithmetic",
    # A tuple default: typer shows it ([default: 1.0]) and passes a list.
    coef: Annotated[list[float], typer.Option(
        "--coef", "-a", help="Coefficient: once for all vectors, or once per vector.")
    ] = (1.0,),  # type: ignore[assignment]
    coefs: Annotated[str | None, typer.Option(
        "--coefs", help="Coefficients file: JSON list/dict, or a tvtool coefficients "
                        "file (learn-coeffs).", show_default=False)] = None,
    density: Annotated[float | None, typer.Option(
        "--density", help="(from the method registry, see MergeCommand)",
        show_default=False)] = None,
    trim: Annotated[str | None, typer.Option(
        "--trim", metavar="[global|tensor]", help="(from the method registry, see MergeCommand)",
        show_default=False)] = None,
    param: Annotated[list[str] | None, typer.Option(
        "--param", "-p", help="(from the method registry, see MergeCommand)",
        show_default=False)] = None,
    seed: Annotated[int, typer.Option("--seed", envvar="TVTOOL_SEED",
                                      help="Random seed (DARE masks).")] = 0,
    missing_as_zero: Annotated[bool, typer.Option(
        "--missing-as-zero",
        help="Vectors with different tensors: merge the union, absent tensors as zero.")
    ] = False,
    common_only: Annotated[bool, typer.Option(
        "--common-only",
        help="Vectors with different tensors: merge and write only the shared ones.")] = False,
    allow_base_mismatch: Annotated[bool, typer.Option(
        "--allow-base-mismatch",
        help="Merge vectors extracted from different bases (unsafe).")] = False,
    mixed_modes_as: Annotated[str | None, typer.Option(
        "--mixed-modes-as", metavar="[linearized|nonlinear]",
        help="Merge linearized with non-linearized vectors; record the result as "
             "linearized or nonlinear.", show_default=False)] = None,
    dtype: Annotated[str | None, typer.Option(
        "--dtype", metavar="[" + "|".join(_DTYPES) + "]", show_default=False,
        help="Storage dtype of the merged vector (default: the inputs').")] = None,
    config: Annotated[str | None, typer.Option(
        "--config", help="YAML merge config (docs/merge.md); replaces the flags above.",
        show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Check the inputs and print the plan; write nothing.")] = False,
    force: Annotated[bool, typer.Option(
        "--force", help="Let the output a --config names replace an existing file (a config "
                        "cannot allow this itself).")] = False,
    save_config: Annotated[str | None, typer.Option(
        "--save-config", help="Also write this merge as a YAML config file.",
        show_default=False)] = None,
    search_coef: Annotated[bool, typer.Option(
        "--search-coef",
        help="Choose one coefficient for all vectors on the validation splits (best average "
             "normalized accuracy), then merge with it and report test accuracy.")] = False,
    coef_grid: Annotated[str | None, typer.Option(
        "--coef-grid", help="(from the method registry, see MergeCommand)",
        show_default=False)] = None,
    base: Annotated[str | None, typer.Option(
        "--base", "-b", envvar="TVTOOL_BASE", help="Search: model reference of the base.",
        show_default=False)] = None,
    dataset: Annotated[list[str] | None, typer.Option(
        "--dataset", "-d", help="Search: dataset of each vector, in order (default: from "
                                "their metadata).", show_default=False)] = None,
    suite: Annotated[str | None, typer.Option(
        "--suite", metavar="[8|14|20]", show_default=False,
        help="Search: the vectors are the 8-, 14- or 20-task benchmark's, one per dataset, "
             "matched by the datasets they record (docs/data.md).")] = None,
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
    workers: WorkersOpt = 0,
    search_report: Annotated[str | None, typer.Option(
        "--search-report", help="Search: also write the JSON report to this file.",
        show_default=False)] = None,
    threads: Annotated[int, typer.Option(
        "--threads", envvar="TVTOOL_MERGE_THREADS",
        help="CPU threads for the merge kernels (results do not depend on it).")] = 1,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    log_every: LogEveryOpt = 30.0,
) -> None:
    """Merge task vectors into one task vector (streamed tensor by tensor).

    Refuses vectors of different bases, linearized with non-linearized vectors, and vectors
    holding different tensors, unless a flag says how to combine them.
    """
    configure_progress(quiet, log_every)
    from tvtool.merge import MergeConfig
    from tvtool.merge.engine import merge as run_merge
    from tvtool.merge.job import load_job

    if config is not None:
        # Compared by name: typer may vendor its own click, with its own ParameterSource enum.
        defined = [name for name in _DEFINING
                   if getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE"]
        if defined:
            flags = ", ".join(name.replace("_", "-") for name in defined)
            raise UsageError(f"--config defines the merge; do not also give {flags}",
                             hint="edit the config file, or drop --config")
        job = load_job(config, output=output, force=force)
        cfg = job.merge
        if config == "-" and "-" in cfg.vectors:
            raise UsageError("the config came from stdin, so no vector can be '-'")
        if job.is_job:
            _run_job(ctx, job, as_json=as_json, dry_run=dry_run, threads=threads,
                     save_config=save_config, data_root=data_root, download=download,
                     batch_size=batch_size, limit=limit, device=device, precision=precision,
                     workers=workers)
            return
    else:
        if force:
            raise UsageError("--force goes with --config (it lets the config's output replace "
                             "an existing file); -o always replaces its file")
        if missing_as_zero and common_only:
            raise UsageError("--missing-as-zero and --common-only exclude each other")
        if coefs and given(ctx, "coef"):
            raise UsageError("give --coef or --coefs, not both")
        # The flags build the same MergeConfig a config file does (it validates itself).
        cfg = MergeConfig(
            vectors=tuple(vectors or ()), output=output if output is not None else "-",
            method=method, params=_params(density, trim, param),
            coefs=tuple(coef or [1.0]), coefs_file=coefs, seed=seed,
            missing="zero" if missing_as_zero else "common" if common_only else "refuse",
            allow_base_mismatch=allow_base_mismatch, mixed_modes_as=mixed_modes_as,
            dtype=dtype)
        if output is None and not dry_run:
            raise UsageError("missing option -o/--output", hint="-o merged.safetensors, or "
                                                              "-o - for stdout")
    if not dry_run:
        refuse_json_with_stdout(as_json, cfg.output)
    if download and not search_coef:
        raise UsageError("--download goes with --search-coef (only the search reads datasets)")
    if suite is not None and not search_coef:
        raise UsageError("--suite goes with --search-coef (only the search reads datasets)")
    if search_coef:
        _search(cfg, coef_grid, base, dataset, data_root, batch_size, limit, device, precision,
                search_report, as_json, dry_run, save_config, download, suite,
                workers)
        return
    result = run_merge(cfg, log=log, dry_run=dry_run, threads=threads)
    if save_config is not None:
        _write_config(save_config, cfg)
    if dry_run:
        emit_json(result.details, report="merge-plan", outputs=[save_config]) if as_json \
            else _print_plan(result.details)
        return
    emit_json(result.as_json(), outputs=[result.output, save_config]) if as_json \
        else emit_path(result.output)


# Search flags a job config says in its own keys instead (a job is reproduced by its file).
_IN_JOB_CONFIG = {"search_coef": "sweep: [{method: ...}]", "coef_grid": "sweep[].coef_grid",
                  "dataset": "datasets:", "suite": "suite:", "search_report": "sweep_report:",
                  "base": "base:", "save_config": "the config itself"}


def _run_job(ctx: typer.Context, job: Any, *, as_json: bool, dry_run: bool, threads: int,
             save_config: str | None, data_root: str | None, download: bool, batch_size: int,
             limit: int | None, device: str, precision: str, workers: int) -> None:
    """``merge --config`` of a config with ``base:``, ``apply:`` or ``sweep:``."""
    from tvtool.workflows.merge_job import run_job

    clashing = [f"--{name.replace('_', '-')} ({where})" for name, where in _IN_JOB_CONFIG.items()
                if getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE"]
    if clashing:
        raise UsageError(f"this config is a job (base:, apply: or sweep:); it says in its own "
                         f"keys what {', '.join(clashing)} would",
                         hint="edit the config file")
    del save_config  # refused above when given
    if not dry_run:
        refuse_json_with_stdout(as_json, job.merge.output)
    if download and not job.sweep:
        raise UsageError("--download goes with a config's sweep: (only the sweep reads "
                         "datasets)")
    settings = None
    if job.sweep and not dry_run:
        from tvtool.evaluate import EvalSettings
        from tvtool.workflows.merge_search import vector_datasets

        settings = EvalSettings(base=job.base, data_root=data_root, batch_size=batch_size,
                                device=device, precision=precision, limit=limit,
                                seed=job.merge.seed, workers=workers,
                                allow_base_mismatch=job.merge.allow_base_mismatch)
        if download:
            download_datasets(vector_datasets(job.merge, job.datasets, job.suite), data_root)
    result = run_job(job, settings, dry_run=dry_run, threads=threads, log=log,
                     progress=progress_bar)
    if dry_run:
        details = {**result.merge.details, "job": result.plan}
        emit_json(details, report="merge-plan") if as_json else _print_plan(details)
        return
    if result.sweep is not None:
        _print_sweep(result.sweep.as_json())
    if as_json:
        emit_json(result.as_json(), outputs=result.outputs)
    else:
        for path in result.outputs:
            emit_path(path)


def _print_sweep(report: dict[str, Any]) -> None:
    """The sweep's table on stderr: one row per variant, the written one marked."""
    from rich.table import Table

    table = Table(title=f"merge sweep on {', '.join(report['datasets'])}: α chosen on val "
                        f"({report['criterion']} accuracy); test split")
    for column in ("", "variant", "α", "val score", "test acc %", "normalized %"):
        table.add_column(column, justify="left" if column in ("", "variant") else "right")
    for row in report["variants"]:
        test = row["test"]
        table.add_row("*" if row["chosen"] else "", row["label"],
                      f"{row['best_coef']:g}" + ("" if row["coef"] is None else " (fixed)"),
                      f"{row['val_score']:.4f}", percent(test["average_accuracy"]),
                      percent(test["average_normalized_accuracy"]))
    print_table(table)


def _params(density: float | None, trim: str | None, pairs: list[str] | None
            ) -> dict[str, Any]:
    """Method parameters from the shortcuts and ``--param KEY=VALUE`` (values parsed as YAML)."""
    from tvtool.io.yaml_io import parse_yaml

    params: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--param {pair[:80]!r} is not KEY=VALUE")
        params[key.strip()] = parse_yaml(text, f"--param {key.strip()[:40]!r}") \
            if text.strip() else ""
    if density is not None:
        params["density"] = density
    if trim is not None:
        params["trim"] = trim
    return params


def _write_config(path: str, cfg: Any) -> None:
    """Write ``cfg`` as a config file whose paths are relative to the file's folder.

    A config's paths are read relative to its folder, and its ``output`` must stay inside
    that folder (docs/merge.md): an output elsewhere is left out, so the saved config needs
    ``-o`` when it is run.
    """
    from dataclasses import replace

    from tvtool.io.yaml_io import write_yaml

    folder = Path.cwd() if path == "-" else Path(path).expanduser().parent.absolute()

    def relative(item: str) -> str:
        if item == "-":
            return item
        return os.path.relpath(Path(item).expanduser().absolute(), folder)

    document = replace(cfg, vectors=tuple(relative(v) for v in cfg.vectors),
                       coefs_file=relative(cfg.coefs_file) if cfg.coefs_file else None
                       ).to_document()
    output = relative(cfg.output)
    if output == "-" or not (output == ".." or output.startswith(f"..{os.sep}")):
        document["output"] = output
    else:
        del document["output"]
        log(f"note: {path} names no output (the output {cfg.output} lies outside its folder, "
            "where a config may not write); run it with -o")
    write_yaml(path, document, inputs=tuple(cfg.vectors))


def _print_plan(plan: dict[str, Any]) -> None:
    """Human-readable dry-run plan on stdout (it is the command's data)."""
    lines = [f"method: {plan['method']['name']} ({plan['method']['paper']})",
             f"params: {plan['method']['params']}",
             *([f"per-vector params: {plan['method']['vector_params']}"]
               if plan["method"].get("vector_params") else []),
             *([f"dtype: {plan['dtype']}"] if plan.get("dtype") else []),
             f"coefficients: {plan['coefficients']['granularity']} "
             f"from {plan['coefficients']['origin']}"
             + (f" {plan['coefficients']['values']}"
                if plan["coefficients"]["granularity"] == "task" else ""),
             f"seed: {plan['seed']}   missing tensors: {plan['missing']}   "
             f"reads per input: {plan['read_passes_per_input']}",
             "inputs:"]
    for item in plan["inputs"]:
        lines.append(f"  {item['path']}  dataset={item['dataset']} mode={item['mode']} "
                     f"linearized={item['linearized']} tensors={item['tensors']} "
                     f"parameters={item['parameters']:,} bytes={item['bytes']:,}")
    out = plan["output"]
    lines.append(f"output: {out['path']}  tensors={out['tensors']} "
                 f"parameters={out['parameters']:,} bytes={out['bytes']:,} (+ header)")
    lines.append("keys:")
    for key in plan["keys"]:
        missing = f"  absent in {key['missing_in']}" if key["missing_in"] else ""
        lines.append(f"  {key['name']}  {tuple(key['shape'])}  {key['dtype']}{missing}")
    for note in plan["notes"]:
        lines.append(f"note: {note}")
    lines += _job_lines(plan.get("job"))
    typer.echo("\n".join(lines))


def _job_lines(job: dict[str, Any] | None) -> list[str]:
    """The dry-run lines of a job config: base, sweep, apply, and every file it would write."""
    if not job:
        return []
    lines = []
    if "base" in job:
        base = job["base"]
        lines.append(f"base: {base['reference']} ({base['architecture']}, "
                     f"{base['fingerprint'][:19]}…): the vectors were made from it")
    if "sweep" in job:
        sweep = job["sweep"]
        lines.append(f"sweep: {len(sweep['variants'])} variants evaluated on "
                     f"{', '.join(sweep['datasets'])} (validation splits); the best is "
                     "written (the plan above is variant 0's)")
        for index, variant in enumerate(sweep["variants"]):
            how = (f"fixed α {variant['coef']:g}" if variant["coef"] is not None
                   else f"α searched over {variant['grid']}")
            lines.append(f"  [{index}] {variant['label']}: {how}")
    if "apply" in job:
        apply = job["apply"]
        for key, what in (("checkpoint", "open_clip checkpoint"),
                          ("hf_dir", "open_clip directory: open_clip_model.safetensors, "
                                     "open_clip_config.json, README.md model card")):
            if apply[key] is not None:
                lines.append(f"apply: base + {apply['coef']:g} × merged -> {apply[key]} ({what})")
    lines.append("writes: " + ", ".join(job["writes"]))
    return lines


def _search(cfg: Any, grid_text: str | None, base: str | None, datasets: list[str] | None,
            data_root: str | None, batch_size: int, limit: int | None, device: str,
            precision: str, report_path: str | None, as_json: bool, dry_run: bool,
            save_config: str | None, download: bool = False, suite: str | None = None,
            workers: int = 0) -> None:
    from rich.table import Table

    from tvtool.evaluate import EvalSettings
    from tvtool.grid import AUTO, MAX_EXTENSIONS, AutoGrid, parse_grid
    from tvtool.io import check_output, write_json
    from tvtool.workflows.merge_search import default_grid_text, search_merge, vector_datasets

    if base is None:
        raise UsageError("--search-coef needs --base (the model the vectors were made from)")
    if dry_run:
        raise UsageError("--search-coef evaluates models; it cannot be a --dry-run")
    grid: Any
    if grid_text is not None and grid_text.strip().lower() == AUTO:
        start = default_grid_text(cfg.method, cfg.params)
        log(f"coefficient grid for {cfg.method}: auto ({start}, extended past an end where the "
            f"best α sits, at most {MAX_EXTENSIONS} times by its width; never below 0)")
        grid = AutoGrid(parse_grid(start), floor=0.0)
    else:
        if grid_text is None:
            grid_text = default_grid_text(cfg.method, cfg.params)
            log(f"coefficient grid for {cfg.method}: {grid_text} (--coef-grid to change)")
        grid = parse_grid(grid_text)
    if report_path is not None:
        if report_path == "-":
            raise UsageError("--search-report - would mix with stdout; use --json")
        check_output(report_path, list(cfg.vectors))
    settings = EvalSettings(base=base, data_root=data_root, batch_size=batch_size,
                            device=device, precision=precision, limit=limit, seed=cfg.seed,
                            workers=workers, allow_base_mismatch=cfg.allow_base_mismatch)
    if download:
        download_datasets(vector_datasets(cfg, datasets, suite), data_root)
    report = search_merge(cfg, settings, grid, datasets=datasets, suite=suite, log=log,
                          progress=progress_bar)
    document = report.as_json()
    table = Table(title=f"{document['method']} at α = {document['best_coef']:g} "
                        f"(chosen on val, {document['criterion']} accuracy); test split")
    for column in ("dataset", "zero-shot %", "fine-tuned %", "merged %", "normalized %"):
        table.add_column(column, justify="left" if column == "dataset" else "right")
    for row in _accuracy_rows(document):
        table.add_row(*row)
    print_table(table)
    if report_path is not None:
        write_json(report_path, document, inputs=list(cfg.vectors))
    if save_config is not None:
        from dataclasses import replace

        _write_config(save_config, replace(cfg, coefs=(document["best_coef"],)))
    emit_json(document, outputs=[cfg.output, report_path, save_config]) if as_json \
        else emit_path(cfg.output)


def _accuracy_rows(report: dict[str, Any]) -> list[list[str]]:
    """Rows (dataset, zero-shot, fine-tuned, merged, normalized) of a merge-search report."""
    from tvtool.workflows.merge_search import average

    rows = []
    test = report["test"]
    for name in report["datasets"]:
        rows.append([name, percent(report["zero_shot"]["test"][name]),
                     percent(report["finetuned"]["test"][name]), percent(test["accuracy"][name]),
                     percent(test["normalized_accuracy"][name])])
    rows.append(["average", percent(average(report["zero_shot"]["test"].values())),
                 percent(average(report["finetuned"]["test"].values())),
                 percent(test["average_accuracy"]), percent(test["average_normalized_accuracy"])])
    return rows
