"""``tvtool export-peft``: a ``lora``/``llora`` task vector -> a peft LoRA adapter directory."""

from __future__ import annotations

from typing import Annotated

import typer

from tvtool.cli.common import JsonOpt, emit_json, emit_path, handles_errors, log


@handles_errors
def export_peft(
    vector: Annotated[str, typer.Argument(help="A task vector of mode lora or llora, or -.")],
    output: Annotated[str, typer.Option(
        "--output", "-o", help="Adapter directory to create (must not exist, or be empty).")],
    module: Annotated[str, typer.Option(
        "--module", metavar="[clip|visual]",
        help="What the adapter is loaded onto: clip = the open_clip model "
             "(PeftModel.from_pretrained(model, DIR)), visual = its image tower "
             "(PeftModel.from_pretrained(model.visual, DIR)).")] = "clip",
    license: Annotated[str | None, typer.Option(
        "--license", metavar="ID",
        help="The model card's license (a Hugging Face identifier, e.g. mit, apache-2.0); "
             "default: the base's where tvtool knows it, else none, with a note.",
        show_default=False)] = None,
    as_json: JsonOpt = False,
) -> None:
    """Write VECTOR as a peft adapter directory (adapter_config.json + adapter_model.safetensors).

    The adapter changes every weight by the vector's dense delta (alpha/r)·B·A. peft adapts an
    attention's whole in-projection with one factor pair, so the q/k/v factors become one
    pair of rank r_q + r_k + r_v (A stacked, B block-diagonal: exact); every module gets the
    same rank (zero padding) and lora_alpha. llora-net and dense vectors are refused (exit 2).
    See docs/interop.md.
    """
    from tvtool.commands import peft_interop

    config = peft_interop.ExportPeftConfig(vector=vector, output=output, module=module,
                                           license=license)
    result = peft_interop.export_peft(config, log=log)
    emit_json(result.as_json(), outputs=[result.output]) if as_json \
        else emit_path(result.output)
