"""``tvtool apply``: base + task vectors -> open_clip-loadable checkpoint."""

from __future__ import annotations

from typing import Annotated

import typer

from tvtool.cli.common import (
    AllowOtherBaseOpt,
    JsonOpt,
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
    output: Annotated[str | None, typer.Option(
        "--output", "-o", help="Output file, or - for stdout.", show_default=False)] = None,
    # A tuple default: typer shows it ([default: 1.0]) and passes a list.
    coef: Annotated[list[float], typer.Option(
        "--coef", "-a", help="Coefficient: once for all vectors, or once per vector.")
    ] = (1.0,),  # type: ignore[assignment]
    allow_base_mismatch: AllowOtherBaseOpt = False,
    approximate_linearized: Annotated[bool, typer.Option(
        "--approximate-linearized",
        help="Add linearized vectors to the weights (approximates their linearized model).")
    ] = False,
    hf_dir: Annotated[str | None, typer.Option(
        "--hf-dir", help="Write an open_clip Hugging Face directory instead (weights, "
        "open_clip_config.json, README.md model card with the recipe), ready for "
        "`huggingface-cli upload`.", show_default=False)] = None,
    license: Annotated[str | None, typer.Option(
        "--license", metavar="ID",
        help="The model card's license (a Hugging Face identifier, e.g. mit, apache-2.0); "
             "default: the base's where tvtool knows it (the embedded models: mit), else "
             "none, with a note. Only with --hf-dir.", show_default=False)] = None,
    as_json: JsonOpt = False,
) -> None:
    """Write BASE + sum(COEF_i x VECTOR_i) as a safetensors checkpoint open_clip can load.

    With --hf-dir DIR, write an open_clip Hugging Face directory that
    open_clip.create_model_and_transforms('local-dir:DIR') loads.
    """
    from tvtool.commands.apply import ApplyConfig
    from tvtool.commands.apply import apply as run_apply
    from tvtool.errors import UsageError

    if (output is None) == (hf_dir is None):
        raise UsageError("give either -o/--output or --hf-dir",
                         hint="-o writes one checkpoint file, --hf-dir an open_clip directory")
    refuse_json_with_stdout(as_json, output or "")
    config = ApplyConfig(
        base=base, vectors=tuple(vectors), output=output or "", coefs=tuple(coef or [1.0]),
        allow_base_mismatch=allow_base_mismatch, approximate_linearized=approximate_linearized,
        hf_dir=hf_dir, license=license)
    result = run_apply(config, log=log)
    emit_json(result.as_json(), outputs=[result.output]) if as_json \
        else emit_path(result.output)
