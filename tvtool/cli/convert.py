"""``tvtool convert``: legacy checkpoints -> tvtool checkpoints, peft adapters -> vectors."""

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
def convert(
    checkpoint: Annotated[str, typer.Argument(
        help="Pickled .pt/.pth/.bin checkpoint (state dict or whole module), a safetensors "
             "file without tvtool metadata, a Hugging Face transformers CLIP model (its "
             "directory, model.safetensors or pytorch_model.bin), a peft LoRA adapter directory "
             "(adapter_config.json + adapter_model.safetensors), or -.")],
    output: OutputOpt,
    architecture: Annotated[str | None, typer.Option(
        "--architecture", help="open_clip model name [default: inferred from the shapes].",
        show_default=False)] = None,
    base: Annotated[str | None, typer.Option(
        "--base", "-b", help="For a tangent_task_arithmetic linearized checkpoint: the "
        "pre-trained model it was linearized at; writes a linear task vector. For a peft "
        "adapter: the model it adapts (architecture and fingerprint).",
        show_default=False)] = None,
    dataset: Annotated[str | None, typer.Option(
        "--dataset", "-d", help="Dataset to record in that task vector.",
        show_default=False)] = None,
    module: Annotated[str, typer.Option(
        "--module", metavar="[auto|clip|visual]",
        help="For a peft adapter: trained on the open_clip model (clip) or on model.visual "
             "(visual); auto reads tvtool's or peft's record, else the module names.")
    ] = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Convert CHECKPOINT into a tvtool checkpoint without executing any pickled code.

    Hugging Face CLIP names are mapped to open_clip's; the config.json beside them picks the
    activation (quick_gelu -> the -quickgelu architecture). With --base, CHECKPOINT is a
    tangent_task_arithmetic linearized encoder and the output a `linear` task vector. A peft
    LoRA adapter directory becomes a `lora` task vector (needs --base or --architecture unless
    tvtool exported it); see docs/interop.md.
    """
    from tvtool.commands.convert import ConvertConfig
    from tvtool.commands.convert import convert as run_convert

    refuse_json_with_stdout(as_json, output)
    config = ConvertConfig(input=checkpoint, output=output, architecture=architecture,
                           base=base, dataset=dataset, module=module)
    from tvtool.io import is_peft_adapter

    if is_peft_adapter(checkpoint):
        from tvtool.commands.peft_interop import convert_peft

        result = convert_peft(config, log=log)
    else:
        result = run_convert(config, log=log)
    emit_json(result.as_json(), outputs=[result.output]) if as_json \
        else emit_path(result.output)
