"""``tvtool inspect``: metadata, norms and cosine similarities of tvtool files."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from tvtool import operations
from tvtool.cli.common import JsonOpt, emit_json, handles_errors, stderr


@handles_errors
def inspect(
    files: Annotated[list[str], typer.Argument(help="tvtool files (.safetensors); - = stdin.")],
    top: Annotated[int, typer.Option("--top", help="Largest tensors listed per vector.")] = 10,
    as_json: JsonOpt = False,
) -> None:
    """Show metadata, per-tensor norms and the cosine-similarity matrix of task vectors."""
    report = operations.inspect(operations.InspectConfig(files=tuple(files), top=top))
    if as_json:
        emit_json(report)
        return
    for entry in report["files"]:
        table = Table(title=entry["file"], show_header=False)
        for key, value in entry["metadata"].items():
            table.add_row(key, value)
        table.add_row("tensors", str(entry["tensors"]))
        table.add_row("parameters", f"{entry['parameters']:,}")
        if "norm" in entry:
            table.add_row("L2 norm", f"{entry['norm']:.6g}")
            for item in entry["largest"]:
                table.add_row(f"  {item['tensor']}", f"{item['norm']:.6g}")
        stderr.print(table)
    if report["cosine"]:
        names = [e["file"] for e in report["files"] if "norm" in e]
        table = Table(title="cosine similarity")
        table.add_column("")
        for index in range(len(names)):
            table.add_column(str(index))
        for index, row in enumerate(report["cosine"]):
            table.add_row(f"{index}: {names[index]}", *[f"{v:.3f}" for v in row])
        stderr.print(table)
