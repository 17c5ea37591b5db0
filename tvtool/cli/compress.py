"""``tvtool compress``: a task vector as per-tensor low-rank factors (TSV-C)."""

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
def compress(
    vector: Annotated[str, typer.Argument(help="Task vector (.safetensors) or -.")],
    output: OutputOpt,
    rank: Annotated[int | None, typer.Option(
        "--rank", help="Keep the top K singular components of every 2-D tensor.",
        show_default=False)] = None,
    energy: Annotated[float | None, typer.Option(
        "--energy", help="Keep, per 2-D tensor, the fewest components holding this fraction "
                         "of its energy (sum of squared singular values), in (0, 1].",
        show_default=False)] = None,
    fraction: Annotated[float | None, typer.Option(
        "--fraction", help="Keep int(F x min(m, n)) components per 2-D tensor (the TSV-C "
                           "reference keeps 1/N for N tasks).", show_default=False)] = None,
    threads: Annotated[int, typer.Option(
        "--threads", help="CPU threads for the SVDs (results do not depend on it).")] = 1,
    as_json: JsonOpt = False,
) -> None:
    """Write VECTOR as per-layer low-rank factors (top-k singular components, TSV-C).

    2-D tensors become factors B·A in the LoRA format that apply, merge, eval and inspect
    read; other tensors stay dense. Give exactly one of --rank, --energy or --fraction.
    """
    from tvtool.commands.compress import CompressConfig
    from tvtool.commands.compress import compress as run_compress

    config = CompressConfig(vector=vector, output=output, rank=rank, energy=energy,
                            fraction=fraction, threads=threads)
    refuse_json_with_stdout(as_json, output)
    result = run_compress(config, log=log)
    for note in result.notes:
        log(f"note: {note}")
    details = result.details
    log(f"compressed: {details['parameters']:,} of {details['dense_parameters']:,} numbers "
        f"({details['size_kept']:.1%}), energy kept {details['energy_kept']:.2%} "
        f"(relative error {details['relative_error']:.3g}); {details['factored_tensors']} "
        f"tensors factored, {details['dense_matrices']} matrices and "
        f"{details['other_tensors']} other tensors kept dense")
    emit_json(result.as_json()) if as_json else emit_path(result.output)
