"""``tvtool inspect``: metadata, norms and cosine similarities of tvtool files."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from tvtool.cli.common import JsonOpt, emit_json, handles_errors, print_table, stderr


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
    from rich.text import Text

    console = stderr
    for entry in report["files"]:
        table = Table(title=entry["file"], show_header=False, title_justify="left")
        table.add_column("key", no_wrap=True)
        table.add_column("value")
        for key, value in entry["metadata"].items():
            table.add_row(key, Text(value))
        if entry["provenance"]:
            prov = entry["provenance"]
            seed = f" (seed {prov['seed']})" if prov.get("seed") is not None else ""
            when = f", {prov['time']}" if prov.get("time") else ""
            table.add_row("provenance", f"{prov.get('command')}{seed}{when}")
        if entry.get("chain"):
            # Text, not markup: "[checkpoint by apply]" is no rich style.
            table.add_row("chain", Text("\n".join(chain_lines(entry["chain"], entry["file"]))))
        table.add_row("tensors", str(entry["tensors"]))
        table.add_row("parameters", f"{entry['parameters']:,}")
        table.add_row("dtypes", ", ".join(entry["dtypes"]))
        if "norm" in entry:
            table.add_row("L2 norm", f"{entry['norm']:.6g}")
            for item in entry["largest"]:
                table.add_row(f"  {item['tensor']}", f"{item['norm']:.6g}")
        print_table(table, console)
    if report["cosine"]:
        names = [e["file"] for e in report["files"] if "norm" in e]
        table = Table(title="cosine similarity", title_justify="left")
        table.add_column("")
        for index in range(len(names)):
            table.add_column(str(index), justify="right")
        for index, row in enumerate(report["cosine"]):
            table.add_row(f"{index}: {names[index]}", *[f"{v:.3f}" for v in row])
        print_table(table, console)


def chain_lines(chain: dict[str, Any], name: str) -> list[str]:
    """How a file was made, as an indented tree: the base, then each input and its inputs.

    One line per file: its name, kind and the command that wrote it, then what that command
    did (dataset and mode, merge method and coefficients, the search that chose them).
    """
    lines = []
    base = chain.get("base_ref") or "?"
    if chain.get("base_fingerprint"):
        base += f" ({_short(chain['base_fingerprint'])})"
    lines.append(f"base {base}")
    _node(lines, chain, name, None, "", True)
    return lines


def _node(lines: list[str], chain: dict[str, Any], name: str, item: dict[str, Any] | None,
          prefix: str, last: bool) -> None:
    branch = "└─ " if last else "├─ "
    coef = ""
    if item is not None and isinstance(item.get("coef"), (int, float)):
        coef = f"{item['coef']:g} × "
    kind = chain.get("kind") or "file without tvtool metadata"
    made = f"{kind} by {chain['command']}" if chain.get("command") else kind
    facts = [f for f in (_what(chain), _short(item.get("fingerprint")) if item else "") if f]
    lines.append(f"{prefix}{branch}{coef}{name}  [{made}]" + (f"  {'; '.join(facts)}"
                                                              if facts else ""))
    children = [c for c in chain.get("inputs") or () if isinstance(c, dict)]
    inner = prefix + ("   " if last else "│  ")
    for index, child in enumerate(children):
        final = index == len(children) - 1
        if child.get("truncated"):
            lines.append(f"{inner}{'└─ ' if final else '├─ '}… (older inputs not recorded)")
            continue
        _node(lines, child.get("lineage") or {"kind": child.get("kind")},
              str(child.get("file")), child, inner, final)


def _what(chain: dict[str, Any]) -> str:
    """What the command recorded about its work, in a few words."""
    parts = []
    if chain.get("dataset"):
        parts.append(f"on {chain['dataset']}")
    if chain.get("mode"):
        parts.append(f"mode {chain['mode']}")
    data = chain.get("data")
    if isinstance(data, dict) and data.get("generator_version"):
        parts.append(f"generator v{data['generator_version']}")
    merge = chain.get("merge")
    if isinstance(merge, dict):
        params = merge.get("params") or {}
        shown = ", ".join(f"{k}={v}" for k, v in sorted(params.items())) if isinstance(
            params, dict) else str(params)
        coefficients = merge.get("coefficients") or {}
        origin = coefficients.get("origin") if isinstance(coefficients, dict) else None
        parts.append(f"{merge.get('method')}" + (f"({shown})" if shown else "")
                     + (f", coefficients from {origin}" if origin else ""))
    search = chain.get("search")
    if isinstance(search, dict):
        parts.append(f"α = {search.get('best_coef')} searched on {search.get('split', 'val')}")
    for op in chain.get("operations") or ():
        if isinstance(op, dict) and op.get("op") == "negate":
            parts.append(f"negated ×{op.get('coef')}")
    if chain.get("time"):
        parts.append(str(chain["time"]))
    return ", ".join(parts)


def _short(fingerprint: Any) -> str:
    return f"{fingerprint[:19]}…" if isinstance(fingerprint, str) and fingerprint else ""
