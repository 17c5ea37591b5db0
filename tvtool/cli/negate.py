"""``tvtool negate``: flip (and scale) a task vector to forget a task."""

from __future__ import annotations

from typing import Annotated

import typer

from tvtool import operations
from tvtool.cli.common import JsonOpt, OutputOpt, emit_json, emit_path, handles_errors, log


@handles_errors
def negate(
    vector: Annotated[str, typer.Argument(help="Task vector (.safetensors) or -.")],
    output: OutputOpt,
    coef: Annotated[float, typer.Option("--coef", "-a", help="Scale of the negated vector.")
                    ] = 1.0,
    as_json: JsonOpt = False,
) -> None:
    """Write -COEF x VECTOR (streamed tensor by tensor)."""
    result = operations.negate(operations.NegateConfig(vector=vector, output=output, coef=coef),
                               log=log)
    emit_json(result.as_json()) if as_json else emit_path(result.output)
