"""``tvtool extract``: fine-tuned checkpoint minus base -> task vector."""

from __future__ import annotations

from typing import Annotated

import typer

from tvtool.cli.common import (
    JsonOpt,
    OutputOpt,
    emit_json,
    emit_path,
    handles_errors,
    listed_or,
    log,
    refuse_json_with_stdout,
)
from tvtool.metadata import Mode

# The choices, without importing torch through tvtool.vectors (tvtool --help stays fast);
# tests/test_cli_grammar.py checks they are tvtool.vectors.streaming.KEEP_CHOICES.
KEEP_CHOICES = ("image", "all", "changed")

# A checkpoint difference is a dense delta of the ordinary model: the modes whose vectors are
# neither linearized nor factored (the rule of tvtool.commands.extract).
_MODE_NAMES = [m.value for m in Mode if not m.linearized and not m.factored]
_MODES = listed_or(_MODE_NAMES)


@handles_errors
def extract(
    finetuned: Annotated[str, typer.Argument(help="Fine-tuned checkpoint (.safetensors) or -.")],
    base: Annotated[str, typer.Option("--base", "-b", envvar="TVTOOL_BASE",
                                      help="Model reference of the pre-trained base.")],
    output: OutputOpt,
    mode: Annotated[str, typer.Option("--mode", metavar="[" + "|".join(_MODE_NAMES) + "]",
                                      help=f"Mode to record: {_MODES}.")] = "full",
    dataset: Annotated[str | None, typer.Option("--dataset", "-d", help="Dataset to record.",
                                                show_default=False)] = None,
    allow_missing: Annotated[bool, typer.Option(
        "--allow-missing", help="Take base tensors absent from the checkpoint as unchanged.")
    ] = False,
    keep: Annotated[str, typer.Option(
        "--keep", metavar="[" + "|".join(KEEP_CHOICES) + "]",
        help="image: the image encoder (visual.*), as finetune vectors; all: every floating "
             "tensor; changed: every floating tensor whose delta is not zero.")] = "image",
    as_json: JsonOpt = False,
) -> None:
    """Write the task vector FINETUNED - BASE (streamed tensor by tensor)."""
    from tvtool.commands.extract import ExtractConfig
    from tvtool.commands.extract import extract as run_extract
    from tvtool.errors import UsageError

    try:
        mode_value = Mode(mode)
    except ValueError:
        raise UsageError(f"unknown mode {mode!r}", hint=f"extract records {_MODES}") from None
    refuse_json_with_stdout(as_json, output)
    config = ExtractConfig(base=base, finetuned=finetuned, output=output, mode=mode_value,
                           dataset=dataset, allow_missing=allow_missing, keep=keep)
    result = run_extract(config, log=log)
    emit_json(result.as_json(), outputs=[result.output]) if as_json \
        else emit_path(result.output)
