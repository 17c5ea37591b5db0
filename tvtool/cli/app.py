"""The typer application: registers one module per subcommand."""

from __future__ import annotations

import sys

import typer

from tvtool import __version__
from tvtool.cli import apply as apply_cmd
from tvtool.cli import convert as convert_cmd
from tvtool.cli import demo as demo_cmd
from tvtool.cli import eval as eval_cmd
from tvtool.cli import extract as extract_cmd
from tvtool.cli import finetune as finetune_cmd
from tvtool.cli import inspect_cmd
from tvtool.cli import learn_coeffs as learn_coeffs_cmd
from tvtool.cli import merge as merge_cmd
from tvtool.cli import negate as negate_cmd
from tvtool.cli import pretrain as pretrain_cmd

app = typer.Typer(
    name="tvtool",
    help="Edit CLIP models with task vectors. Data on stdout, logs on stderr. "
         "Exit codes: 0 ok, 1 runtime failure, 2 usage or invalid input.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    pretty_exceptions_show_locals=False,
    # `tvtool --install-completion` / `--show-completion`, as typer provides them.
    add_completion=True,
)


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"tvtool {__version__}\n")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Edit CLIP models with task vectors."""


app.command("finetune")(finetune_cmd.finetune)
app.command("extract")(extract_cmd.extract)
app.command("negate")(negate_cmd.negate)
app.command("apply")(apply_cmd.apply)
app.command("inspect")(inspect_cmd.inspect)
app.command("convert")(convert_cmd.convert)
app.command("merge")(merge_cmd.merge)
app.command("learn-coeffs")(learn_coeffs_cmd.learn_coeffs)
app.add_typer(eval_cmd.eval_app, name="eval")
app.command("pretrain")(pretrain_cmd.pretrain)
app.command("demo")(demo_cmd.demo)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="tvtool")
