"""``tvtool apply``: base + task vectors -> open_clip-loadable checkpoint."""

from __future__ import annotations

from typing import Annotated

import typer

from tvtool.cli.common import (
    AllowOtherBaseOpt,
    JsonOpt,
    OutputOpt,
    emit_json,
    emit_path,
    handles_errors,
    log,
    refuse_json_with_stdout,
)


@handles_errors
def apply(
    vectors: Annotated[list[str], typer.Argument(help="Task vectors (.safetensors); - = stdin.")],
    base: Annotated[str, typer.Option("--base", "-b", envvar="TVTOOL_BASE",
                                      help="Model reference of the base.")],
    output: OutputOpt,
    coef: Annotated[list[float] | None, typer.Option(
        "--coef", "-a", help="Coefficient: once for all vectors, or once per vector.")] = None,
    allow_base_mismatch: AllowOtherBaseOpt = False,
    approximate_linearized: Annotated[bool, typer.Option(
        "--approximate-linearized",
        help="Add linearized vectors to the weights (approximates their linearized model).")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Write BASE + sum(COEF_i x VECTOR_i) as a safetensors checkpoint open_clip can load."""
    from tvtool import operations

    refuse_json_with_stdout(as_json, output)
    config = operations.ApplyConfig(
        base=base, vectors=tuple(vectors), output=output, coefs=tuple(coef or [1.0]),
        allow_base_mismatch=allow_base_mismatch, approximate_linearized=approximate_linearized)
    result = operations.apply(config, log=log)
    emit_json(result.as_json()) if as_json else emit_path(result.output)
