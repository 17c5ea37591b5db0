"""``tvtool inspect``: metadata, norms and cosine similarities of tvtool files."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from tvtool.cli.common import JsonOpt, emit_json, handles_errors, stderr


@handles_errors
def inspect(
    files: Annotated[list[str], typer.Argument(help="safetensors files; - = stdin.")],
    top: Annotated[int, typer.Option("--top", help="Largest tensors listed per vector.")] = 10,
    no_cosine: Annotated[bool, typer.Option(
        "--no-cosine", help="Skip the cosine-similarity matrix (reads each vector once less).")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Show metadata, per-tensor norms and the cosine-similarity matrix of task vectors.

    Tables go to stderr like every human-readable report; --json prints the report on stdout.
    """
    from tvtool.commands.inspect import InspectConfig
    from tvtool.commands.inspect import inspect as run_inspect

    report = run_inspect(InspectConfig(files=tuple(files), top=top, cosine=not no_cosine))
    if as_json:
        emit_json(report)
    else:
        _print_tables(report)


def _print_tables(report: dict[str, Any]) -> None:
    from rich.table import Table

    console = stderr
    for entry in report["files"]:
        table = Table(title=entry["file"], show_header=False, title_justify="left")
        table.add_column("key", no_wrap=True)
        table.add_column("value")
        for key, value in entry["metadata"].items():
            table.add_row(key, value)
        if entry["provenance"]:
            prov = entry["provenance"]
            seed = f" (seed {prov['seed']})" if prov.get("seed") is not None else ""
            table.add_row("provenance", f"{prov.get('command')}{seed}")
        table.add_row("tensors", str(entry["tensors"]))
        table.add_row("parameters", f"{entry['parameters']:,}")
        table.add_row("dtypes", ", ".join(entry["dtypes"]))
        if "norm" in entry:
            table.add_row("L2 norm", f"{entry['norm']:.6g}")
            for item in entry["largest"]:
                table.add_row(f"  {item['tensor']}", f"{item['norm']:.6g}")
        console.print(table)
    if report["cosine"]:
        names = [e["file"] for e in report["files"] if "norm" in e]
        table = Table(title="cosine similarity", title_justify="left")
        table.add_column("")
        for index in range(len(names)):
            table.add_column(str(index), justify="right")
        for index, row in enumerate(report["cosine"]):
            table.add_row(f"{index}: {names[index]}", *[f"{v:.3f}" for v in row])
        console.print(table)
